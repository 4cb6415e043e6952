"""Main-thread gather speed and open time of one checkout of jasper_mmap, for A/B comparisons.

    git worktree add /tmp/old REV
    python scripts/bench_ab.py --code /tmp/old --store STORE     # the old code
    python scripts/bench_ab.py --code . --store STORE            # this code

Imports ``jasper_mmap`` from ``--code`` (put first on ``sys.path``), opens ``--store``'s train
split, times ``__getitems__`` over 300 random batches of 128 (``--reps`` times, after one
untimed pass) and ``--opens`` opens (20). Prints the best and median samples/s, the median open
time, and the time of the process's first open (which pays lazy imports and cold caches).
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
    ap.add_argument("--opens", type=int, default=20, help="opens timed (median reported)")
    ap.add_argument("--no-gather", action="store_true", help="time the opens only")
    args = ap.parse_args()
    sys.path.insert(0, str(args.code.resolve()))
    import numpy as np

    import jasper_mmap
    from jasper_mmap import JASPERSteeringDataset

    print(f"jasper_mmap from {Path(jasper_mmap.__file__).parent}")

    t = time.perf_counter()
    ds = JASPERSteeringDataset(args.store, "train")
    first_open = time.perf_counter() - t  # this process's first: lazy imports, cold caches
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, len(ds), 128).tolist() for _ in range(300)]
    for b in batches:
        ds.__getitems__(b)
    rates = []
    for _ in range(0 if args.no_gather else args.reps):
        t = time.perf_counter()
        for b in batches:
            ds.__getitems__(b)
        rates.append(len(batches) * 128 / (time.perf_counter() - t))
    opens, full = [], []
    integrity = sys.modules.get("jasper_mmap.format.integrity") or sys.modules.get(
        "jasper_mmap.integrity"
    )  # before and after the layout move (issue 25)
    checked = getattr(integrity, "_CHECKED", None)
    for _ in range(args.opens):
        t = time.perf_counter()
        JASPERSteeringDataset(args.store, "train")
        opens.append(time.perf_counter() - t)
        if checked is not None:  # NOTE [checked stores]: forget it, check in full
            checked.clear()
            t = time.perf_counter()
            JASPERSteeringDataset(args.store, "train")
            full.append(time.perf_counter() - t)
    gather = (
        f"best {max(rates):,.0f} median {statistics.median(rates):,.0f} samples/s; "
        if rates
        else ""
    )
    in_full = f", {statistics.median(full) * 1e3:.2f} ms checked in full" if full else ""
    print(
        f"{args.code}: {gather}open {statistics.median(opens) * 1e3:.2f} ms (median of "
        f"{args.opens}{in_full}), first open in this process {first_open * 1e3:.1f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
