"""The built-in example: make a small synthetic `.pt` dataset, convert it, read rows back.

python scripts/example.py [--workdir example_out] [--pairs 20000]
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from jasper_mmap import open_store
from jasper_mmap.synthetic import SyntheticSpec, make_pt_dataset


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workdir", type=Path, default=Path("example_out"))
    ap.add_argument("--pairs", type=int, default=20000)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    src, dst = args.workdir / "pt_dataset", args.workdir / "store"
    t = time.perf_counter()
    make_pt_dataset(
        src, SyntheticSpec(n_pairs=args.pairs, dim=384, n_neg=12, n_keywords=2000, n_clusters=32)
    )
    size = sum(p.stat().st_size for p in src.glob("*.pt"))
    print(
        f"made {src}: {args.pairs} pairs, {size / 1e6:.0f} MB of .pt files in {time.perf_counter() - t:.1f} s"
    )
    cmd = [sys.executable, "-m", "converters.cli", str(src), str(dst), "--overwrite"]
    print("$ convert-pt", " ".join(cmd[3:]))
    subprocess.run(cmd, check=True)
    t = time.perf_counter()
    store = open_store(dst)
    rows = np.random.default_rng(0).integers(0, store.shape("pair_index")[0], 128)
    pairs = store.gather("pair_index", rows)
    q = store.gather("question_embs", pairs[:, 0])
    negs = store.gather("source_embs", store.gather("hard_negatives", rows).ravel())
    print(
        f"opened {dst} ({store.backend}) and gathered a batch of 128 pairs in "
        f"{(time.perf_counter() - t) * 1e3:.1f} ms: questions {q.shape} {q.dtype}, "
        f"negatives {negs.shape}; counts {store.counts}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
