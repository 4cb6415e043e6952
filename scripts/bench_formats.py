"""Loader throughput of the same dataset stored as safetensors and as zarr, interleaved.

    python scripts/bench_formats.py --workdir bench_out --pairs 200000 --workers 0,4 --rounds 4
    python scripts/bench_formats.py ... --dtype bfloat16    # both stores converted --dtype bfloat16

One process, page cache warm (every store file read once first), B=128, D=384, n_neg=12:
for each round and each ``num_workers`` value, ``create_loader(store, "train", 128,
num_workers=N)`` over ``--batches`` fixed random batches, once per format, the formats'
order alternating between rounds (A B, B A, ...), so a shared machine's drift hits both
alike. Prints samples/s per measurement, and per ``num_workers`` the ratio zarr/safetensors
of each round, their median and spread. The stores are made once by ``convert-pt`` (the zarr
one with ``--format zarr``; with ``--dtype``, both with that dtype) from the ``.pt`` directory
the other benchmarks use.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_loader import warm_page_cache
from benchlib import B, ensure_dataset

from jasper_mmap import JASPERSteeringDataset, create_loader
from jasper_mmap.converters import convert_pt

FORMATS = ("safetensors", "zarr")


def rate(store: Path, workers: int, sampler: list[list[int]]) -> float:
    loader = create_loader(
        store,
        "train",
        B,
        num_workers=workers,
        batch_sampler=sampler,
        persistent_workers=workers > 0,
    )
    for k, _ in enumerate(loader):  # start up: maps, workers, first batches
        if k == 5:
            break
    t, n = time.perf_counter(), 0
    for batch in loader:
        n += batch["question_emb"].shape[0]
    return n / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workdir", type=Path, default=Path("bench_out"))
    ap.add_argument("--pairs", type=int, default=200000)
    ap.add_argument("--workers", default="0,4", help="comma-separated num_workers values")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--dtype", default="keep", help="convert-pt --dtype of both stores")
    ap.add_argument("--json", type=Path, help="append the figures to this JSON-lines file")
    args = ap.parse_args()
    print("$", " ".join([sys.executable, *sys.argv]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads")
    stores = {f: ensure_dataset(args.workdir, args.pairs, f)[1] for f in FORMATS}
    if args.dtype != "keep":
        src = ensure_dataset(args.workdir, args.pairs)[0]
        for f in FORMATS:
            dst = args.workdir / f"store_{args.pairs}_{args.dtype}_{f}"
            if not (dst / "manifest.json").exists():
                convert_pt(src, dst, format=f, dtype=args.dtype, progress=False)
            stores[f] = dst
    for store in stores.values():
        warm_page_cache(store)
    n_train = len(JASPERSteeringDataset(stores["safetensors"], "train"))
    rng = np.random.default_rng(0)
    sampler = [rng.integers(0, n_train, B).tolist() for _ in range(args.batches)]
    workers = [int(w) for w in args.workers.split(",")]
    rates: dict[tuple[str, int], list[float]] = {}
    for r in range(args.rounds):
        for w in workers:
            order = FORMATS if r % 2 == 0 else FORMATS[::-1]
            for fmt in order:
                x = rate(stores[fmt], w, sampler)
                rates.setdefault((fmt, w), []).append(x)
                print(f"round {r} num_workers={w} {fmt:12s} {x:10,.0f} samples/s", flush=True)
    print(
        f"\n{args.pairs} pairs, dtype {args.dtype}, B={B}, {args.batches} random batches, "
        "page cache warm:"
    )
    summary = {}
    for w in workers:
        s, z = rates[("safetensors", w)], rates[("zarr", w)]
        ratios = [b / a for a, b in zip(s, z, strict=True)]
        summary[w] = statistics.median(ratios)
        print(
            f"  num_workers={w}: safetensors median {statistics.median(s):,.0f}, zarr median "
            f"{statistics.median(z):,.0f} samples/s; zarr/safetensors per round "
            f"{', '.join(f'{q:.2f}' for q in ratios)} (median {summary[w]:.2f}, spread "
            f"{min(ratios):.2f}-{max(ratios):.2f})"
        )
    if args.json:
        with open(args.json, "a") as f:
            for w in workers:
                record = {
                    "bench": "formats",
                    "pairs": args.pairs,
                    "num_workers": w,
                    "dtype": args.dtype,
                    "rates": {
                        f"{fmt}, num_workers={w}": statistics.median(rates[(fmt, w)])
                        for fmt in FORMATS
                    },
                }
                f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
