"""Training throughput of the seed's loop with each loader, against a loader-free bound.

    python scripts/bench_train.py [--pairs 200000] [--steps 400] [--rounds 5] [--workers 0,2,4]
                                  [--store PATH [--src PT_DIR]] [--also-store PATH] [--json FILE]
                                  [--device cuda]

What is measured: the seed's training step (`SimpleJASPERPredictor`, InfoNCE
`contrastive_loss`, AdamW lr 3e-4; B=128, D=384, n_neg=12, the train split = 80% of the pairs,
`torch.set_num_threads` left at its default) fed by

  1. a loader-free bound: one batch gathered once and reused every step (no loading at all;
     with --device cuda it is moved to the GPU once, so the bound has no copies either);
  2. a gather floor: per step only the batch's large rows, B x (1 + n_neg) source rows, B
     question rows and B steering rows of 1.5 KiB (D=384), at random, each array one
     `torch.index_select` from the store's memory maps into reused buffers, nothing else (no
     sampler, no variants, no checks, no small arrays): what moving the bytes between two
     steps costs at the least;
  3.-5. `create_loader(store, "train", 128, num_workers=w)` for each w of --workers;
  6. the seed's in-RAM dataset: every `.pt` loaded into RAM with `torch.load`, one
     `__getitem__` per sample, the default collate, num_workers=--inram-workers (4).

How: every other row is measured once per round, and the rounds go round-robin over the
rows (the order rotates by one each round), so drift and noise of a shared machine hit all
rows alike. The bound is measured before the first row of a round and again after each row,
and a row's "of bound" for the round is its rate over the mean of the two bound measurements
around it: on a shared 2-core machine the bound itself drifts by up to a third between
minutes, and a bound taken once per round compared rows with a bound a minute away. A
measurement starts a fresh iterator (a new epoch: `set_epoch`, then `iter`, as the seed's
loop does each epoch, so DataLoader workers start there), takes the first batch (timed
separately: "start-up"), runs --warmup steps untimed, then times --steps steps with
`time.perf_counter` (after `torch.cuda.synchronize()` on a GPU). Reported per row: the median
steps/s over its measurements with their min-max spread (the bound: all 1 + rows measurements
of every round), the median over rounds of (row / the bound around it), samples/s, the median
start-up, and what steps/s becomes over one full epoch when that start-up is paid once per
epoch.

"Loader alone" iterates the same loaders without training for --alone-seconds each (samples/s,
same round-robin), next to a raw bound: one numpy gather per array from in-RAM numpy arrays
(`raw_bound` of bench_loader.py) for the same batches, which all loader-alone rows share (a
seeded endless batch sampler, a different seed each round).

The store is read once before timing, so its pages are in the page cache ("page cache warm").
With --device cuda the loop copies the four inputs with `.to("cuda", non_blocking=True)` and
the loaders pin memory; without CUDA that variant reports that it is skipped and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from bench_loader import InRamDataset, raw_bound, warm_page_cache
from benchlib import B, ensure_dataset
from main_job import SimpleJASPERPredictor, contrastive_loss  # the example's model and loss

from jasper_mmap import create_loader, set_epoch
from jasper_mmap.stores import open_store

INPUTS = ("question_emb", "target_source_emb", "steering", "negative_embs")
FLOOR_ROWS = ("source_embs", "question_embs", "steering_centroid")


class RandomBatches:
    """Endless batch sampler: shuffled passes over ``n`` rows, full batches, seeded.

    Every iterator replays the same batches, so loaders given this sampler (and the raw bound)
    read the same rows.
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng(self.seed)
        while True:
            perm = rng.permutation(self.n)
            for i in range(0, self.n - self.batch_size + 1, self.batch_size):
                yield perm[i : i + self.batch_size].tolist()


@dataclass
class Row:
    """One line of a table: how to start its batch iterator for a round, and its figures."""

    label: str
    start: Callable[[int], Iterator]  # round -> fresh iterator (workers start here)
    model: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    rates: list[float] = field(default_factory=list)
    startups: list[float] = field(default_factory=list)
    fracs: list[float] = field(default_factory=list)  # per round: rate / the bound around it


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(row: Row, batch: dict[str, torch.Tensor], device: torch.device) -> None:
    """The seed's step: copy the four inputs to the device, forward, InfoNCE, backward, AdamW."""
    q, target, steering, negatives = (batch[k].to(device, non_blocking=True) for k in INPUTS)
    loss = contrastive_loss(row.model(q, steering), target, negatives)
    row.optimizer.zero_grad()
    loss.backward()
    row.optimizer.step()


def measure_training(row: Row, rnd: int, args, device: torch.device) -> None:
    """Start-up (first batch) untimed for the rate, --warmup steps untimed, --steps timed."""
    sync(device)
    t0 = time.perf_counter()
    it = row.start(rnd)
    batch = next(it)
    row.startups.append(time.perf_counter() - t0)
    train_step(row, batch, device)
    for _ in range(args.warmup - 1):
        train_step(row, next(it), device)
    sync(device)
    t1 = time.perf_counter()
    for _ in range(args.steps):
        train_step(row, next(it), device)
    sync(device)
    row.rates.append(args.steps / (time.perf_counter() - t1))


def measure_alone(row: Row, rnd: int, args) -> None:
    """Samples/s of iterating alone for --alone-seconds, after the first batch and --warmup."""
    t0 = time.perf_counter()
    it = row.start(rnd)
    next(it)
    row.startups.append(time.perf_counter() - t0)
    for _ in range(args.warmup):
        next(it)
    n, t1 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t1) < args.alone_seconds:
        n += next(it)
    row.rates.append(n / elapsed)


def epoch_iter(loader) -> Callable[[int], Iterator]:
    """A round's iterator over ``loader``: a new epoch, as the seed's loop starts each one."""

    def start(rnd: int) -> Iterator:
        set_epoch(loader, rnd)
        return iter(loader)

    return start


def counted(loader) -> Iterator[int]:
    return (batch["question_emb"].shape[0] for batch in loader)


def gather_floor(store: Path, n_neg: int) -> Callable[[int], Iterator]:
    """A round's iterator of batches holding only the large rows, gathered between steps."""
    st = open_store(store)
    with warnings.catch_warnings():  # read-only maps; nothing writes to them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        maps = {name: torch.from_numpy(st.raw(name)) for name in FLOOR_ROWS}
    dim = maps["source_embs"].shape[1]
    counts = {"source_embs": B * (1 + n_neg), "question_embs": B, "steering_centroid": B}
    raw = {name: torch.empty(n, dim, dtype=maps[name].dtype) for name, n in counts.items()}
    outs = {name: torch.empty(n, dim) for name, n in counts.items()}  # float32, as served

    def start(rnd: int) -> Iterator:
        rng = np.random.default_rng(rnd)
        while True:
            for name, src in maps.items():
                idx = torch.from_numpy(rng.integers(0, src.shape[0], counts[name]))
                if src.dtype == torch.float32:
                    torch.index_select(src, 0, idx, out=outs[name])
                else:  # a float16/bfloat16 store: rows are widened as the loader does
                    outs[name].copy_(torch.index_select(src, 0, idx, out=raw[name]))
            rows = outs["source_embs"]
            yield {
                "question_emb": outs["question_embs"],
                "target_source_emb": rows[:B],
                "steering": outs["steering_centroid"],
                "negative_embs": rows[B:].view(B, n_neg, dim),
            }

    return start


def make_model(dim: int, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = SimpleJASPERPredictor(dim).to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=3e-4)


def training_rows(store, base, args, device) -> tuple[list[Row], int]:
    """The rows of the training table, and the number of steps of one epoch."""
    pin = device.type == "cuda"
    first = next(iter(create_loader(store, "train", B, num_workers=0)))
    bound = {k: v.to(device) for k, v in first.items()}
    loaders = {w: create_loader(store, "train", B, num_workers=w) for w in args.workers}
    inram = torch.utils.data.DataLoader(
        base,
        batch_size=B,
        shuffle=True,
        drop_last=True,
        num_workers=args.inram_workers,
        pin_memory=pin,
    )
    rows = [Row("loader-free bound (one batch reused)", lambda rnd: itertools.repeat(bound))]
    floor = gather_floor(store, first["negative_embs"].shape[1])
    rows.append(Row("gather floor (large rows only, index_select)", floor))
    rows += [Row(f"create_loader, num_workers={w}", epoch_iter(ld)) for w, ld in loaders.items()]
    if args.also_store:  # the same rows over the other store, in the same rounds
        fmt = open_store(args.also_store).backend
        also = {w: create_loader(args.also_store, "train", B, num_workers=w) for w in args.workers}
        rows += [
            Row(f"create_loader ({fmt}), num_workers={w}", epoch_iter(ld)) for w, ld in also.items()
        ]
        loaders.update({-1 - w: ld for w, ld in also.items()})
    rows.append(
        Row(
            f"in-RAM seed dataset, num_workers={args.inram_workers}",
            lambda rnd: iter(inram),
        )
    )
    dim = first["question_emb"].shape[1]
    for row in rows:
        row.model, row.optimizer = make_model(dim, device)
    epoch = min(len(inram), *(len(ld) for ld in loaders.values()))
    if args.warmup + args.steps > epoch:
        raise SystemExit(
            f"--warmup + --steps should fit in one epoch of {epoch} batches, but got "
            f"{args.warmup} + {args.steps}: pass fewer --steps or more --pairs"
        )
    return rows, epoch


def alone_rows(store, base, arrays, n_train: int, args) -> list[Row]:
    """The loader-alone rows: the raw bound, each create_loader, the in-RAM loader."""

    def raw(rnd: int) -> Iterator[int]:
        for idx in RandomBatches(n_train, B, rnd):
            yield raw_bound(arrays, [np.asarray(idx)], base.sched)

    def ours(w: int, where=store) -> Callable[[int], Iterator[int]]:
        def start(rnd: int) -> Iterator[int]:
            sampler = RandomBatches(n_train, B, rnd)
            return counted(create_loader(where, "train", B, num_workers=w, batch_sampler=sampler))

        return start

    def inram(rnd: int) -> Iterator[int]:
        sampler = RandomBatches(n_train, B, rnd)
        nw, pin = args.inram_workers, args.device == "cuda"
        loader = torch.utils.data.DataLoader(
            base, batch_sampler=sampler, num_workers=nw, pin_memory=pin
        )
        return counted(loader)

    rows = [Row("raw bound: numpy gather per array from RAM", raw)]
    rows += [Row(f"create_loader, num_workers={w}", ours(w)) for w in args.workers]
    if args.also_store:
        fmt = open_store(args.also_store).backend
        rows += [
            Row(f"create_loader ({fmt}), num_workers={w}", ours(w, args.also_store))
            for w in args.workers
        ]
    rows.append(Row(f"in-RAM seed dataset, num_workers={args.inram_workers}", inram))
    return rows


def run_rounds(train: list[Row], alone: list[Row], args, device) -> list[float]:
    """Round-robin over all rows, rotating the order each round; the 1-min load after each."""
    loads = []
    for rnd in range(args.rounds):
        t = time.perf_counter()
        bound, rows = train[0], train[1:]
        k = rnd % len(rows)
        measure_training(bound, rnd, args, device)
        for row in rows[k:] + rows[:k]:
            measure_training(row, rnd, args, device)
            measure_training(bound, rnd, args, device)  # the bound after = the next's before
            row.fracs.append(row.rates[-1] / statistics.mean(bound.rates[-2:]))
        k = rnd % len(alone)
        for row in alone[k:] + alone[:k]:
            measure_alone(row, rnd, args)
        loads.append(os.getloadavg()[0])
        print(
            f"  round {rnd + 1}/{args.rounds}: {time.perf_counter() - t:.0f} s, "
            f"load {loads[-1]:.2f}",
            flush=True,
        )
    return loads


def ratios(row: Row, ref: Row) -> list[float]:
    return [a / b for a, b in zip(row.rates, ref.rates, strict=True)]


def training_table(rows: list[Row], epoch: int) -> tuple[list[str], list[dict]]:
    lines = [
        "| training loop fed by | steps/s (median) | min-max | of bound | samples/s "
        f"| start-up s | steps/s over a {epoch}-step epoch incl. start-up |",
        "|---|---|---|---|---|---|---|",
    ]
    records = []
    for row in rows:
        med, startup = statistics.median(row.rates), statistics.median(row.startups)
        first = row is rows[0]
        frac = 1.0 if first else statistics.median(row.fracs)
        with_startup = epoch / (epoch / med + startup)
        lines.append(
            f"| {row.label} | {med:.1f} | {min(row.rates):.1f}-{max(row.rates):.1f} "
            f"| {frac:.0%} | {med * B:,.0f} | {'-' if first else f'{startup:.3f}'} "
            f"| {'-' if first else f'{with_startup:.1f}'} |"
        )
        records.append(
            {
                "section": "train",
                "row": row.label,
                "steps_per_s": med,
                "steps_per_s_rounds": row.rates,
                "frac_bound": frac,
                "frac_bound_rounds": None if first else row.fracs,
                "samples_per_s": med * B,
                "startup_s": None if first else startup,
                "startup_s_rounds": None if first else row.startups,
                "epoch_steps": epoch,
                "steps_per_s_epoch_incl_startup": None if first else with_startup,
            }
        )
    return lines, records


def alone_table(rows: list[Row]) -> tuple[list[str], list[dict]]:
    lines = [
        "| loader alone (no training) | samples/s (median) | min-max | of raw bound | start-up s |",
        "|---|---|---|---|---|",
    ]
    records = []
    for row in rows:
        med, startup = statistics.median(row.rates), statistics.median(row.startups)
        frac = statistics.median(ratios(row, rows[0]))
        lines.append(
            f"| {row.label} | {med:,.0f} | {min(row.rates):,.0f}-{max(row.rates):,.0f} "
            f"| {frac:.0%} | {'-' if row is rows[0] else f'{startup:.3f}'} |"
        )
        records.append(
            {
                "section": "loader_alone",
                "row": row.label,
                "samples_per_s": med,
                "samples_per_s_rounds": row.rates,
                "frac_raw_bound": frac,
                "startup_s": startup,
            }
        )
    return lines, records


def resolve_data(args) -> tuple[Path, Path]:
    """``(pt dir, store)``: --store/--src when given, else the cached benchmark dataset."""
    if args.store is None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return ensure_dataset(args.workdir, args.pairs)
    src = args.src or args.store
    if not (src / "config.json").exists() or not (src / "train_idx.pt").exists():
        raise SystemExit(
            f"the in-RAM baseline needs the .pt directory, but {src} has no config.json and "
            "train_idx.pt: pass --src PT_DIR"
        )
    return src, args.store


def parse_args():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workdir", type=Path, default=Path("bench_out"))
    ap.add_argument("--pairs", type=int, default=200000)
    ap.add_argument("--store", type=Path, help="reuse this store (or .pt directory)")
    ap.add_argument("--src", type=Path, help="the .pt directory of --store (in-RAM baseline)")
    ap.add_argument("--steps", type=int, default=400, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=20, help="untimed steps per measurement")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workers", default="0,2,4", help="num_workers of create_loader rows")
    ap.add_argument("--inram-workers", type=int, default=4)
    ap.add_argument(
        "--also-store",
        type=Path,
        help="a second store of the same dataset (e.g. its zarr conversion): its create_loader "
        "rows join the same rounds",
    )
    ap.add_argument("--alone-seconds", type=float, default=3.0)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--json", type=Path, help="append one JSON record per row to this file")
    args = ap.parse_args()
    args.workers = [int(w) for w in args.workers.split(",") if w.strip()]
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        ap.error("--warmup, --steps and --rounds should be >= 1")
    return args


def main() -> int:
    args = parse_args()
    # torch warns each time more workers than cores start: the rows measure exactly that
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    cmd = shlex.join(["python", *sys.argv])
    print("$", cmd)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available here (torch.cuda.is_available() is False)")
        print("skipped: nothing measured")
        return 0
    device = torch.device(args.device)
    load_before = os.getloadavg()
    print(
        f"machine: {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} intra-op threads (default), device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    )
    print("load average before: " + ", ".join(f"{x:.2f}" for x in load_before))
    if load_before[0] > 0.5 * (os.cpu_count() or 1):
        print("WARNING: the machine is busy; the figures will be noisy and slow (rerun later)")
    t_all = time.perf_counter()
    src, store = resolve_data(args)
    t = time.perf_counter()
    base = InRamDataset(src)
    arrays = {name: x.numpy() for name, x in base.t.items()}
    print(f"in-RAM baseline: torch.load of every .pt of {src}: {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    warm_page_cache(store)
    if args.also_store:
        warm_page_cache(args.also_store)
    size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    print(
        f"page cache warmed: read the store {store} once ({size / 1e9:.2f} GB, "
        f"{time.perf_counter() - t:.1f} s) before timing"
    )
    train, epoch = training_rows(store, base, args, device)
    n_train = len(base)
    alone = alone_rows(store, base, arrays, n_train, args)
    print(
        f"{n_train} train pairs, B={B}; {args.rounds} interleaved rounds: each row per round "
        f"= fresh iterator, first batch (start-up), {args.warmup} untimed steps, "
        f"{args.steps} timed steps; loader alone {args.alone_seconds:g} s per row"
    )
    loads = run_rounds(train, alone, args, device)
    load_after = os.getloadavg()
    lines, records = training_table(train, epoch)
    lines2, records2 = alone_table(alone)
    print(
        f"\ntraining steps/s, {device}, {n_train} train pairs, B={B}, D={base.t['question_embs'].shape[1]}, "
        f"median over {args.rounds} interleaved rounds; steps/s exclude worker start-up "
        "(first batch of a fresh iterator, shown separately; the last column pays it once per "
        "epoch, as non-persistent workers do); 'of bound' = median over rounds of the row's "
        "rate / the mean of the bound measured just before and after it; page cache warm"
    )
    print("\n".join(lines))
    print(
        f"\nloader alone (no training), samples/s, {args.alone_seconds:g} s per row and round "
        "after the first batch and the warm-up batches; the same batches for every row of a round:"
    )
    print("\n".join(lines2))
    print("\nload average after: " + ", ".join(f"{x:.2f}" for x in load_after))
    print("1-min load after each round: " + ", ".join(f"{x:.2f}" for x in loads))
    print(f"total {time.perf_counter() - t_all:.0f} s")
    if args.json:
        common = {
            "bench": "train",
            "cmd": cmd,
            "time": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": str(device),
            "pairs": None if args.store else args.pairs,
            "n_train": n_train,
            "batch_size": B,
            "store": str(store),
            "store_bytes": size,
            "steps": args.steps,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "alone_seconds": args.alone_seconds,
            "load_before": load_before,
            "load_after": load_after,
        }
        with open(args.json, "a") as f:
            for rec in records + records2:
                f.write(json.dumps({**common, **rec}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
