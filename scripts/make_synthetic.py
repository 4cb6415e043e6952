"""Make a synthetic JASPER dataset of any size, as a `.pt` directory or straight into a store.

    python scripts/make_synthetic.py DST --gb 32 --store          # a 32 GB store, bounded memory
    python scripts/make_synthetic.py DST --pairs 3600000          # a .pt directory (docs/dataset_format.md)
    python scripts/make_synthetic.py DST --pairs 20000 --in-ram   # small, via torch.save

Clustered embeddings (centroid + noise, normalized), steering vectors derived from the pair's
cluster, keywords and question, and 4-tier negatives as the in-RAM dataset's documents describe. Both
streaming forms write block by block (memory stays at a few hundred MB whatever the size); the
`.pt` files are readable by `torch.load` and can each be larger than RAM.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from pathlib import Path

from jasper_mmap.errors import JasperError
from jasper_mmap.format.store_dirs import publishing
from jasper_mmap.synthetic import SyntheticSpec, make_pt_dataset
from jasper_mmap.synthetic.large import (
    is_synthetic_pt_dir,
    make_pt_dir,
    make_store,
    mark_synthetic_pt_dir,
    pairs_for_bytes,
)


def _make_in_ram(dst: Path, spec: SyntheticSpec, overwrite: bool) -> Path:
    """make_pt_dataset with make_pt_dir's rules: atomic, and never over a directory not ours."""
    what = "a synthetic .pt directory written by these scripts"
    with publishing(dst, overwrite=overwrite, is_ours=is_synthetic_pt_dir, what=what) as (
        tmp,
        real,
    ):
        make_pt_dataset(tmp, spec)
        mark_synthetic_pt_dir(tmp)
    return real


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "dst",
        type=Path,
        help="directory to create: a .pt dataset directory (default) or, with --store, a store",
    )
    size = ap.add_mutually_exclusive_group(required=True)
    size.add_argument("--pairs", type=int, help="number of (question, source) pairs")
    size.add_argument("--gb", type=float, help="approximate size in GB (1e9 bytes)")
    ap.add_argument(
        "--dim", type=int, default=384, help="embedding dimension D (default: %(default)s)"
    )
    ap.add_argument(
        "--n-neg",
        type=int,
        default=12,
        help="hard negatives per pair (default: %(default)s)",
    )
    ap.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of every generator: the same seed gives the same bytes (default: %(default)s)",
    )
    form = ap.add_mutually_exclusive_group()
    form.add_argument(
        "--store", action="store_true", help="write a safetensors store directly (no .pt files)"
    )
    form.add_argument(
        "--in-ram", action="store_true", help="build each artifact in RAM (small sizes)"
    )
    ap.add_argument(
        "--sparse-train",
        action="store_true",
        help="train split = every tenth pair (a small split that spans the whole store)",
    )
    ap.add_argument(
        "--overwrite",
        action="store_true",
        help="replace DST if these scripts made it (a store, or a .pt directory with the "
        "synthetic marker); any other directory is refused",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    pairs = args.pairs or pairs_for_bytes(args.gb * 1e9, args.dim, args.n_neg)
    kw = dict(dim=args.dim, n_neg=args.n_neg, seed=args.seed, sparse_train=args.sparse_train)
    t = time.perf_counter()
    try:
        if args.store:
            make_store(args.dst, pairs, overwrite=args.overwrite, **kw)
        elif args.in_ram:
            spec = SyntheticSpec(n_pairs=pairs, dim=args.dim, n_neg=args.n_neg, seed=args.seed)
            _make_in_ram(args.dst, spec, args.overwrite)
        else:
            make_pt_dir(args.dst, pairs, overwrite=args.overwrite, **kw)
    except JasperError as e:
        print(f"make_synthetic: error: {e}", file=sys.stderr)
        return 1
    size = sum(f.stat().st_size for f in args.dst.rglob("*") if f.is_file())
    secs = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{args.dst}: {pairs} pairs, {size / 1e9:.2f} GB in {secs:.0f} s ({size / 1e6 / secs:.0f} MB/s), "
        f"peak RSS {peak:.0f} MB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
