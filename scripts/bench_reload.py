"""Hot-reload cost: publish_negatives + reload_negatives, and the training loop's stall.

    python scripts/bench_reload.py --workdir bench_out --pairs 200000

Uses (or makes) the 200k-pair store of the other benchmarks (D=384, n_neg=12). Prints the
time of `publish_negatives` of a fresh 200k x 12 table (validated, written, fsynced,
published), the time of `reload_negatives()`, and the per-batch times of a training loop
(`create_loader`, B=128, 2 persistent workers) in which a miner process publishes and the loop
calls `reload_negatives()` 10 batches after each publication finished (so the miner's own
CPU and disk load, which competes with training on a small machine, is not counted as the
reload's): median, max, and the slowest batch within 5 batches after each reload as a multiple
of the median (target: below 2x).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np
from benchlib import ensure_dataset

from jasper_mmap import create_loader, open_store, publish_negatives


def new_table(seed: int, n_pairs: int, n_neg: int, n_sources: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_sources, (n_pairs, n_neg)), rng.integers(1, 5, (n_pairs, n_neg))


def miner(store: str, requests, replies) -> None:
    """A separate process that publishes a new table whenever asked."""
    c = open_store(store).counts
    while (seed := requests.get()) is not None:
        t = time.perf_counter()
        g = publish_negatives(store, *new_table(seed, c["n_pairs"], c["n_neg"], c["n_sources"]))
        replies.put((g, time.perf_counter() - t))


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workdir", type=Path, default=Path("bench_out"))
    ap.add_argument("--pairs", type=int, default=200000)
    ap.add_argument("--batches", type=int, default=400)
    ap.add_argument("--every", type=int, default=50, help="batches between reloads")
    args = ap.parse_args()
    print("$", " ".join([sys.executable, *sys.argv]))
    _, store = ensure_dataset(args.workdir, args.pairs)
    ctx = mp.get_context("spawn")
    requests, replies = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=miner, args=(str(store), requests, replies))
    proc.start()
    loader = create_loader(store, "train", 128, num_workers=2, persistent_workers=True)
    ds = loader.dataset_obj
    times, reload_at, publish_s, reload_s = [], [], [], []
    it, pending, ready_at = iter(loader), False, None
    next(it)  # start the workers
    for k in range(args.batches):
        if k % args.every == args.every // 2 and not pending:
            requests.put(k)  # the miner works while training goes on
            pending = True
        if pending and ready_at is None and not replies.empty():
            _, seconds = replies.get()
            publish_s.append(seconds)
            ready_at = k + 10  # let the miner's CPU and disk load settle: measure the reload alone
        if pending and ready_at is not None and k >= ready_at:
            ready_at = None
            t = time.perf_counter()
            ds.reload_negatives()
            reload_s.append(time.perf_counter() - t)
            reload_at.append(k)
            pending = False
        t = time.perf_counter()
        try:
            next(it)
        except StopIteration:
            it = iter(loader)
            next(it)
        times.append(time.perf_counter() - t)
    requests.put(None)
    proc.join(timeout=60)
    report(np.array(times), reload_at, publish_s, reload_s, ds.negatives_generation)
    return 0


def report(
    times: np.ndarray,
    reload_at: list[int],
    publish_s: list[float],
    reload_s: list[float],
    generation: int,
) -> None:
    med = float(np.median(times))
    print(
        f"publish_negatives (200k x 12, in the miner process): "
        f"{', '.join(f'{s:.2f}' for s in publish_s)} s"
    )
    print(
        f"reload_negatives() in the training loop: {', '.join(f'{s * 1e3:.1f}' for s in reload_s)} ms"
    )
    print(
        f"batches: {len(times)}, median {med * 1e3:.2f} ms, max {times.max() * 1e3:.2f} ms, "
        f"reloads at batches {reload_at}, final generation {generation}"
    )
    worst = max((times[k : k + 5].max() for k in reload_at), default=float("nan"))
    print(
        f"slowest batch within 5 after a reload: {worst * 1e3:.2f} ms = {worst / med:.2f}x the median "
        f"(target < 2x); slowest elsewhere: "
        f"{np.delete(times, [k + i for k in reload_at for i in range(5) if k + i < len(times)]).max() / med:.2f}x"
    )


if __name__ == "__main__":
    sys.exit(main())
