"""Loader throughput: in-RAM per-sample baseline vs our batched store loader vs the raw bound.

    python scripts/bench_loader.py --workdir bench_out --pairs 200000 [--pairs-large 800000]

One run, same machine, B=128, D=384, n_neg=12:
  (a) baseline: every `.pt` loaded into RAM, one `__getitem__` per sample, default collate
      (how the seed's in-RAM dataset works);
  (b) ours: `create_loader` over the converted store, num_workers 0 and 2;
  (c) raw bound: one vectorized numpy gather per array of the same rows from in-RAM arrays.
Also: open time of the dataset (store of ~1.4 GB and a 4x larger one) and RssAnon growth of
the main process and workers over one full epoch of (b).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from benchlib import NAMES, B, ensure_dataset

from jasper_mmap import JASPERSteeringDataset, create_loader
from jasper_mmap.steering import SteeringSchedule, draw_variants


def rss_anon_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class InRamDataset(torch.utils.data.Dataset):
    """The seed's way: all tensors in RAM, one sample per __getitem__."""

    def __init__(self, src: Path, seed: int = 42) -> None:
        self.t = {n: torch.load(src / f"{n}.pt", weights_only=True) for n in [*NAMES, "train_idx"]}

        self.sched = SteeringSchedule.from_config(json.loads((src / "config.json").read_text()))
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.t["train_idx"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        t = self.t
        p = t["train_idx"][i]
        q, s = t["pair_index"][p]
        v = int(torch.multinomial(torch.tensor(self.sched.probs(0)), 1, generator=self.gen))
        steer = (
            torch.zeros(t["question_embs"].shape[1])
            if v == 0
            else t[["", "steering_centroid", "steering_keyword_weighted", "steering_residual"][v]][
                p
            ]
        )
        return {
            "question_emb": t["question_embs"][q],
            "target_source_emb": t["source_embs"][s],
            "steering": steer,
            "negative_embs": t["source_embs"][t["hard_negatives"][p]],
            "cluster_id": t["pair_cluster_id"][p],
            "relevance": t["pair_relevance"][p],
            "centroid_distance": t["centroid_distances"][p],
            "steering_variant": torch.tensor(v),
            "negative_tiers": t["negative_tiers"][p],
        }


def raw_bound(
    arrays: dict[str, np.ndarray], batches: list[np.ndarray], sched: SteeringSchedule
) -> int:
    n = 0
    for idx in batches:
        p = arrays["train_idx"][idx]
        qs = arrays["pair_index"][p]
        negs = arrays["hard_negatives"][p]
        rows = arrays["source_embs"][np.concatenate([qs[:, 1], negs.ravel()])]
        v = draw_variants(42, 0, p, sched.probs(0))
        steer = np.zeros((idx.size, rows.shape[1]), np.float32)
        for k, name in (
            (1, "steering_centroid"),
            (2, "steering_keyword_weighted"),
            (3, "steering_residual"),
        ):
            sel = np.flatnonzero(v == k)
            steer[sel] = arrays[name][p[sel]]
        _ = (
            arrays["question_embs"][qs[:, 0]],
            arrays["negative_tiers"][p],
            arrays["pair_cluster_id"][p],
            arrays["pair_relevance"][p],
            arrays["centroid_distances"][p],
            rows,
        )
        n += idx.size
    return n


def warm_page_cache(store: Path) -> None:
    """Read every file of the store once, so its pages are in the page cache (if RAM allows)."""
    buf = bytearray(16 << 20)
    for f in store.rglob("*"):
        if f.is_file():
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass


def timed(fn, *args) -> tuple[float, int]:
    t = time.perf_counter()
    n = fn(*args)
    return time.perf_counter() - t, n


def drain(loader, limit: int | None = None) -> int:
    n = 0
    for i, batch in enumerate(loader):
        n += batch["question_emb"].shape[0]
        if limit is not None and i + 1 >= limit:
            break
    return n


def open_time_ms(store: Path, repeats: int = 20, full: bool = False) -> float:
    """Median time of ``JASPERSteeringDataset(store, "train")``. A store this process already
    found sound is only stat-ed at open (NOTE [checked stores] in jasper_mmap/integrity.py);
    ``full`` forgets that before each open, so every open checks the store in full, as the
    first open of a process does."""
    from jasper_mmap.format import integrity

    times = []
    for _ in range(repeats):
        if full:
            integrity._CHECKED.clear()
        t = time.perf_counter()
        JASPERSteeringDataset(store, "train")
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def epoch_rss(store: Path, workers: int, mode: str = "thread") -> str:
    """RssAnon growth of every process over one epoch (worker processes, or gather threads)."""
    loader = create_loader(
        store, "train", B, num_workers=workers, worker_mode=mode, persistent_workers=workers > 0
    )
    procs = mode == "process" and workers > 0
    pids = lambda: [os.getpid()] + ([w.pid for w in loader._iterator._workers] if procs else [])  # noqa: E731
    it = iter(loader)
    next(it)
    before = [rss_anon_mb(p) for p in pids()]
    n = B + drain(it)
    after = [rss_anon_mb(p) for p in pids()]
    grow = ", ".join(f"{a - b:+.1f}" for a, b in zip(after, before, strict=True))
    what = f"num_workers={workers}" + (f", worker_mode={mode!r}" if workers else "")
    return f"{what}: {n} samples, RssAnon growth MB per process (main, workers...): {grow}"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workdir", type=Path, default=Path("bench_out"))
    ap.add_argument("--pairs", type=int, default=200000)
    ap.add_argument("--pairs-large", type=int, default=800000)
    ap.add_argument("--batches", type=int, default=300, help="batches timed per configuration")
    ap.add_argument(
        "--json", type=Path, help="append the figures to this JSON-lines file (for plots)"
    )
    args = ap.parse_args()
    print("$", " ".join([sys.executable, *sys.argv]))
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    src, store = ensure_dataset(args.workdir, args.pairs)
    rng = np.random.default_rng(0)
    n_train = len(JASPERSteeringDataset(store, "train"))
    batches = [rng.integers(0, n_train, B) for _ in range(args.batches)]

    base = InRamDataset(src)
    sampler = [b.tolist() for b in batches]
    base_loader = torch.utils.data.DataLoader(base, batch_sampler=sampler)
    ta, na = timed(drain, base_loader)
    arrays = {n: t.numpy() for n, t in base.t.items()}
    tc, nc = timed(raw_bound, arrays, batches, base.sched)
    del base, base_loader, arrays
    rates = {
        "(a) in-RAM per-sample baseline, num_workers=0": na / ta,
        "(c) raw bound: numpy gather from RAM": nc / tc,
    }
    warm_page_cache(store)  # the figures below are "page cache warm": make it true
    for workers in (0, 2):
        loader = create_loader(
            store,
            "train",
            B,
            num_workers=workers,
            batch_sampler=sampler,
            persistent_workers=workers > 0,
        )
        drain(loader, 5)  # start the workers
        tb, nb = timed(drain, loader)
        rates[f"(b) jasper_mmap create_loader, num_workers={workers}"] = nb / tb
        tb, nb = timed(drain, loader)  # same batches again: this process has them mapped
        rates[f"(b) same batches again (mapped), num_workers={workers}"] = nb / tb
    print(
        f"\nthroughput, {args.pairs} pairs, B={B}, {args.batches} random batches (page cache warm):"
    )
    for k, v in rates.items():
        print(f"  {k:55s} {v:10.0f} samples/s")
    if args.json:
        size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
        with open(args.json, "a") as f:
            f.write(
                json.dumps(
                    {"bench": "loader", "pairs": args.pairs, "store_bytes": size, "rates": rates}
                )
                + "\n"
            )
    b0 = rates["(b) jasper_mmap create_loader, num_workers=0"]
    print(
        f"  (b)/(a) at num_workers=0: {b0 / rates['(a) in-RAM per-sample baseline, num_workers=0']:.1f}x "
        f"(target >= 6x);  (b)/(c): {b0 / rates['(c) raw bound: numpy gather from RAM']:.0%} (target >= 75%)"
    )
    print("\nopen time (median of 20 JASPERSteeringDataset(store, 'train'); target < 50 ms):")
    for pairs in (args.pairs, args.pairs_large):
        _, st = ensure_dataset(args.workdir, pairs)
        size = sum(f.stat().st_size for f in st.rglob("*") if f.is_file()) / 1e9
        print(
            f"  {pairs} pairs, store {size:.2f} GB: {open_time_ms(st):.2f} ms opened again, "
            f"{open_time_ms(st, full=True):.2f} ms checked in full"
        )
    print("\nRssAnon over one full epoch of the train split:")
    for workers, mode in ((0, "thread"), (2, "thread"), (2, "process")):
        print("  " + epoch_rss(store, workers, mode))
    return 0


if __name__ == "__main__":
    sys.exit(main())
