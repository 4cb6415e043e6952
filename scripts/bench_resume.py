"""What starting an epoch and resuming one cost (NOTE [epoch order], NOTE [resuming]).

    python scripts/bench_resume.py --workdir bench_out --pairs 200000

1. The first batch's indices of a shuffled epoch of n samples: our counter-based order
   (``EpochOrder``) against ``torch.randperm(n)`` (what ``DistributedSampler`` and
   ``RandomSampler`` build at every epoch), with the peak memory Python allocated for it
   (tracemalloc; randperm's tensor is outside it, so its size is printed: 8 bytes per sample).
2. Resuming the 200k-pair store's train loader at batch k (k = 0, 100, the epoch's last
   batch; B=128, num_workers=0): time from ``load_state_dict`` to the first batch in hand,
   median of 5.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import torch
from benchlib import B, ensure_dataset

from jasper_mmap import create_loader
from jasper_mmap.loading.order import EpochOrder, _Plan


def first_batch_ours(n: int) -> tuple[float, float]:
    tracemalloc.start()
    t = time.perf_counter()
    # what the loader's batch sampler does for its first batch (a chunk of batches at once)
    next(_Plan(n, 0, 1, 0, B, True).batches_of(EpochOrder(n, seed=42, epoch=3, shuffle=True)))
    secs = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return secs, peak


def first_batch_randperm(n: int) -> float:
    g = torch.Generator().manual_seed(45)
    t = time.perf_counter()
    torch.randperm(n, generator=g)[:B].tolist()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workdir", type=Path, default=Path("bench_out"))
    ap.add_argument("--pairs", type=int, default=200000)
    ap.add_argument("--randperm-max", type=int, default=30_000_000)
    args = ap.parse_args()
    print("$", " ".join([sys.executable, *sys.argv]))
    print("first batch of a shuffled epoch of n samples:")
    for n in (10**6, 10**7, 3 * 10**7, 10**8, 10**9):  # 1M, 10M, 30M (the issue's), 100M, 1B
        secs, peak = first_batch_ours(n)
        line = f"  n={n:>13,}: ours {secs * 1e3:8.3f} ms, {peak / 1024:7.1f} KiB"
        if n <= args.randperm_max:
            rp = first_batch_randperm(n)
            line += f"; torch.randperm {rp * 1e3:9.1f} ms, {8 * n / 2**20:7.0f} MiB"
        print(line, flush=True)
    _, store = ensure_dataset(args.workdir, args.pairs)
    print(f"\nresume at batch k, {store}, B={B}, num_workers=0 (median of 5):")
    last = len(create_loader(store, "train", B)) - 1
    for k in (0, 100, last):
        loader = create_loader(store, "train", B)
        it = iter(loader)
        for _ in range(k):
            next(it)
        state = loader.state_dict()
        del it
        times = []
        for _ in range(5):
            again = create_loader(store, "train", B)
            t = time.perf_counter()
            again.load_state_dict(state)
            next(iter(again))
            times.append(time.perf_counter() - t)
        print(f"  k={k:5d} (cursor {state['cursor']:>7,}): {statistics.median(times) * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
