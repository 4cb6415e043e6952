"""Main-thread gather speed and open time of one checkout of jasper_mmap, for A/B comparisons.

    git worktree add /tmp/old REV
    python scripts/bench_ab.py --code /tmp/old --store STORE     # the old code
    python scripts/bench_ab.py --code . --store STORE            # this code

Imports ``jasper_mmap`` from ``--code`` (put first on ``sys.path``), opens ``--store``'s train
split, times ``__getitems__`` over 300 random batches of 128 (``--reps`` times, after one
untimed pass) and 20 opens. Prints the best and median samples/s and the median open time.
Alternate the two checkouts a few times: on a shared machine single runs vary by ~30%.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--code", type=Path, required=True, help="checkout whose jasper_mmap to use")
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    sys.path.insert(0, str(args.code.resolve()))
    import numpy as np

    import jasper_mmap
    from jasper_mmap import JASPERSteeringDataset

    print(f"jasper_mmap from {Path(jasper_mmap.__file__).parent}")

    ds = JASPERSteeringDataset(args.store, "train")
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, len(ds), 128).tolist() for _ in range(300)]
    for b in batches:
        ds.__getitems__(b)
    rates = []
    for _ in range(args.reps):
        t = time.perf_counter()
        for b in batches:
            ds.__getitems__(b)
        rates.append(len(batches) * 128 / (time.perf_counter() - t))
    opens = []
    for _ in range(20):
        t = time.perf_counter()
        JASPERSteeringDataset(args.store, "train")
        opens.append(time.perf_counter() - t)
    print(
        f"{args.code}: best {max(rates):,.0f} median {statistics.median(rates):,.0f} samples/s; "
        f"open {statistics.median(opens) * 1e3:.2f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
