"""The loader and the seed's training loop on a machine whose cores are busy, per gather path.

    python scripts/bench_busy.py [--pairs 50000] [--rounds 4] [--seconds 1.5] [--steps 30]
                                 [--workers 0,4] [--busy N] [--store PATH] [--json FILE]

On a shared machine other processes keep every core busy. torch's intra-op (OpenMP) threads
then wait for cores at every parallel region (a team of threads finishes when its slowest
member gets a core), so the gathers that run on them (``torch.index_select``, NOTE [intra-op
gathers] in stores/safetensors_store.py) and the training step slow down far more than
single-threaded work. This script measures how much, and which gather path holds up:

  torch     ``torch.index_select`` on torch's intra-op threads (the loader's path in the loop);
  numpy     ``numpy.take(..., out=)``, one thread, GIL released (the gather threads' path);
  torch@1   ``torch.index_select`` with ``torch.set_num_threads(1)`` while it runs.
  adaptive  the in-loop rule (NOTE [intra-op gathers]): timed, torch or numpy per gather.

Rows: the loader alone (``create_loader(store, "train", 128, num_workers=w)``, thread mode,
samples/s over --seconds) for each path and each w of --workers; and a short version of the
seed's training loop (scripts/bench_train.py's step: SimpleJASPERPredictor, InfoNCE, AdamW) at
num_workers=0, steps/s over --steps after --warmup, with the step's own threads at torch's
default or at 1 (``torch.set_num_threads(1)``, as ``OMP_NUM_THREADS=1`` gives).

Load: "idle" (nothing added) or "busy" (--busy busy-loop processes, default one per CPU this
process may use, started by this script and stopped after the round's busy half). Rounds
alternate the load order and rotate the row order (A B A B), so a shared machine's drift hits
every row alike. Reported per row and load: the median rate with its min-max over rounds; and
per row the median over rounds of busy/idle (the collapse), and per path the median over
rounds of path/torch within one load (the choice). Compare only within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from benchlib import B, ensure_dataset
from main_job import SimpleJASPERPredictor, contrastive_loss

import jasper_mmap.stores.safetensors_store as sst
from jasper_mmap import create_loader, set_epoch

PATHS = ("torch", "numpy", "torch@1", "adaptive")
INPUTS = ("question_emb", "target_source_emb", "steering", "negative_embs")
DEFAULT_THREADS = torch.get_num_threads()
INTRA_OP_BYTES = sst._INTRA_OP_BYTES


@contextlib.contextmanager
def gather_path(path: str):
    """Make the loader's in-loop gathers take ``path`` (see the module docstring)."""
    sst._INTRA_OP_BYTES = 1 << 62 if path == "numpy" else INTRA_OP_BYTES
    torch.set_num_threads(1 if path == "torch@1" else DEFAULT_THREADS)
    chooser = sst._CHOOSER
    if path != "adaptive":  # torch, torch@1: always index_select (the chooser pinned)
        sst._CHOOSER = _Pinned()
    try:
        yield
    finally:
        sst._INTRA_OP_BYTES = INTRA_OP_BYTES
        sst._CHOOSER = chooser
        torch.set_num_threads(DEFAULT_THREADS)


class _Pinned:
    """A chooser that always answers index_select (the path before the adaptive rule)."""

    def choose(self, threads: int) -> str:
        return "torch"

    def record(self, path: str, seconds: float, nbytes: int) -> None:
        pass


@contextlib.contextmanager
def busy(n: int):
    """``n`` busy-loop processes beside us (none for 0); stopped on exit."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(0.3 if n else 0)  # let them reach their loop
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


@dataclass
class Row:
    label: str
    group: str  # rows compared by path: the same loader or loop
    path: str
    run: Callable[[int], float]  # round -> rate
    rates: dict[str, list[float]] = field(default_factory=lambda: {"idle": [], "busy": []})


def endless(loader, rnd: int):
    """The loader's batches, epoch after epoch (epochs ``1000 * rnd``, ``1000 * rnd + 1``...)."""
    for epoch in itertools.count(1000 * rnd):
        set_epoch(loader, epoch)
        yield from loader


def alone_row(store: Path, workers: int, path: str, seconds: float, warmup: int) -> Row:
    loader = create_loader(store, "train", B, num_workers=workers, shuffle=True, drop_last=True)

    def run(rnd: int) -> float:
        with gather_path(path):
            it = endless(loader, rnd)
            for _ in range(warmup):
                next(it)
            n, t = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - t) < seconds:
                n += next(it)["question_emb"].shape[0]
            it.close()
        return n / elapsed

    return Row(f"alone  w={workers} {path}", f"alone w={workers}", path, run)


def train_row(store: Path, path: str, step_threads: int, steps: int, warmup: int) -> Row:
    loader = create_loader(store, "train", B, num_workers=0, shuffle=True, drop_last=True)
    dim = next(iter(loader))["question_emb"].shape[1]
    torch.manual_seed(0)
    model = SimpleJASPERPredictor(dim)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)

    def step(batch) -> None:
        q, target, steering, negatives = (batch[k] for k in INPUTS)
        loss = contrastive_loss(model(q, steering), target, negatives)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def run(rnd: int) -> float:
        with gather_path(path):
            torch.set_num_threads(step_threads)
            set_epoch(loader, rnd)
            it = iter(loader)
            for _ in range(warmup):
                step(next(it))
            t = time.perf_counter()
            for _ in range(steps):
                step(next(it))
            rate = steps / (time.perf_counter() - t)
            del it
        return rate

    label = f"train  w=0 {path:7s} step threads={step_threads}"
    return Row(label, "train w=0", path, run)


def spread(xs: list[float], fmt: str = ",.0f") -> str:
    if not xs:
        return "-"
    return f"{statistics.median(xs):{fmt}} [{min(xs):{fmt}}-{max(xs):{fmt}}]"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--pairs", type=int, default=50000, help="size of the synthetic dataset")
    ap.add_argument("--store", type=Path, help="an existing store instead of a synthetic one")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/jasper_bench"))
    ap.add_argument("--rounds", type=int, default=4, help="rounds (each: idle and busy halves)")
    ap.add_argument("--seconds", type=float, default=1.5, help="seconds per loader-alone row")
    ap.add_argument("--steps", type=int, default=30, help="timed training steps per row")
    ap.add_argument("--warmup", type=int, default=5, help="untimed batches/steps per row")
    ap.add_argument("--workers", default="0,4", help="num_workers of the loader-alone rows")
    ap.add_argument(
        "--busy", type=int, default=len(os.sched_getaffinity(0)), help="busy-loop processes"
    )
    ap.add_argument(
        "--paths", default=",".join(PATHS), help="gather paths to compare (default: %(default)s)"
    )
    ap.add_argument("--no-train", action="store_true", help="loader-alone rows only")
    ap.add_argument("--json", type=Path, help="write the raw rates here")
    args = ap.parse_args()
    store = args.store or ensure_dataset(args.workdir, args.pairs)[1]
    workers = [int(w) for w in args.workers.split(",") if w != ""]
    paths = args.paths.split(",")
    rows = [alone_row(store, w, p, args.seconds, args.warmup) for w in workers for p in paths]
    if not args.no_train:  # torch@1: the step's own threads at 1 too (OMP_NUM_THREADS=1)
        rows += [
            train_row(store, p, 1 if p == "torch@1" else DEFAULT_THREADS, args.steps, args.warmup)
            for p in paths
        ]
    print(
        f"store {store}; torch {torch.__version__}, default threads {DEFAULT_THREADS}, "
        f"{args.busy} busy-loop processes in 'busy'; {os.cpu_count()} CPUs; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
        flush=True,
    )
    for rnd in range(args.rounds):
        loads = ("idle", "busy") if rnd % 2 == 0 else ("busy", "idle")
        for load in loads:
            with busy(args.busy if load == "busy" else 0):
                k = rnd % len(rows)
                for row in rows[k:] + rows[:k]:
                    row.rates[load].append(row.run(rnd))
        print(f"round {rnd + 1}/{args.rounds} done", flush=True)
    unit = "samples/s (alone) or steps/s (train)"
    print(f"\n{'row':38s} {'idle ' + unit:>30s} {'busy':>24s} {'busy/idle':>18s}")
    for row in rows:
        ratio = [b / i for i, b in zip(row.rates["idle"], row.rates["busy"], strict=True)]
        fmt = ",.0f" if row.label.startswith("alone") else ",.1f"
        print(
            f"{row.label:38s} {spread(row.rates['idle'], fmt):>30s} "
            f"{spread(row.rates['busy'], fmt):>24s} {spread(ratio, '.2f'):>18s}"
        )
    print("\npath / torch, same load and round (median [min-max] over rounds):")
    groups: dict[str, dict[str, Row]] = {}
    for row in rows:
        groups.setdefault(row.group, {})[row.path] = row
    for name, by_path in groups.items():
        base = by_path.get("torch")
        for p, row in by_path.items():
            if p == "torch" or base is None:
                continue
            for load in ("idle", "busy"):
                r = [a / b for a, b in zip(row.rates[load], base.rates[load], strict=True)]
                print(f"  {name:10s} {p:8s} {load}: {spread(r, '.2f')}")
    if args.json:
        args.json.write_text(json.dumps({r.label: r.rates for r in rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
