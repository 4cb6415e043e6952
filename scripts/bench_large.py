"""A store larger than RAM: make it, open it, serve a full pass of a split spanning it.

    python scripts/bench_large.py --workdir bench_out --gb 32

1. Writes a synthetic store of about ``--gb`` GB with `jasper_mmap.synthetic_store.make_store`
   (in a child process, whose peak RSS is reported) unless it exists. Its train split is every
   tenth pair, so it spans the whole store.
2. Drops the page cache, opens the dataset (cold open time), and serves one full pass of the
   train split through `create_loader` (B=128, 2 persistent workers, shuffled), reporting
   samples/s and the peak RssAnon of the main process and of each worker (polled every 0.5 s).
3. Drops the page cache again and measures what the disk does for the same access pattern:
   the large rows of ``--probe-batches`` batches drawn by the same sampler (question, target,
   12 negatives and the drawn steering row of each sample), each read with `os.pread` from the
   cold store by 2 threads (one outstanding read per loader worker) and by 32 threads (what
   the disk can do with a deep queue, which the loader's batch prefetch uses). Our rows/s over
   the same number of first batches of the pass (cold too) and over the whole pass are
   reported as fractions of each. Later batches of the pass find part of the store in the page
   cache (RAM is 3/4 of the store), so the whole-pass figure is higher than a cold figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from jasper_mmap import JASPERSteeringDataset, create_loader, open_store
from jasper_mmap.steering import draw_variants
from jasper_mmap.stores.safetensors_store import read_header

B = 128
STEER = {1: "steering_centroid", 2: "steering_keyword_weighted", 3: "steering_residual"}


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1\n")


def status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next((int(line.split()[1]) for line in f if line.startswith(key + ":")), 0)


def make(store: Path, gb: float) -> None:
    code = (
        "import sys, resource; from jasper_mmap.synthetic_store import make_store, pairs_for_bytes; "
        "make_store(sys.argv[1], pairs_for_bytes(float(sys.argv[2]) * 1e9), sparse_train=True); "
        "print(f'peak RSS of the generator: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB')"
    )
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(store), str(gb)], check=True)
    size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    print(
        f"made {store}: {size / 1e9:.1f} GB in {time.perf_counter() - t:.0f} s "
        f"({size / 1e6 / (time.perf_counter() - t):.0f} MB/s)"
    )


class Peaks(threading.Thread):
    """Polls RssAnon of some processes until stopped; keeps the peak of each."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.pids, self.peak, self.stop = pids, dict.fromkeys(pids, 0), threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            for pid in self.pids:
                self.peak[pid] = max(self.peak[pid], status_kb(pid, "RssAnon"))


def full_pass(store: Path, probe: int) -> tuple[float, float, list[np.ndarray]]:
    loader = create_loader(store, "train", B, num_workers=2, persistent_workers=True)
    order = list(
        iter(loader.batch_sampler)
    )  # batches drawn the same way as the pass's (for the disk probe)
    it = iter(loader)
    pids = [os.getpid()] + [w.pid for w in loader._iterator._workers]
    peaks = Peaks(pids)
    peaks.start()
    t, n, k, first = time.perf_counter(), 0, 0, 0.0
    for k, batch in enumerate(it, start=1):
        n += batch["question_emb"].shape[0]
        if k == probe:
            first = n / (time.perf_counter() - t)
        if k % 500 == 0:
            print(f"  {k} batches, {n / (time.perf_counter() - t):,.0f} samples/s", flush=True)
    secs = time.perf_counter() - t
    peaks.stop.set()
    peaks.join()
    names = ["main"] + [f"worker {i}" for i in range(len(pids) - 1)]
    print(
        f"full pass: {n} samples in {secs:.0f} s = {n / secs:,.0f} samples/s; peak RssAnon: "
        + ", ".join(
            f"{name} {peaks.peak[p] / 1024:.0f} MB" for name, p in zip(names, pids, strict=True)
        )
    )
    print(f"first {probe} batches (cold): {first:,.0f} samples/s")
    return n / secs, first, order


def row_reads(store: Path, batches: list[list[int]]) -> list[tuple[Path, int, int]]:
    """(file, offset, length) of every large row the loader reads for these batches."""
    s = open_store(store)
    ds = JASPERSteeringDataset(store, "train")
    where = {}
    for name in ("question_embs", "source_embs", *STEER.values()):
        e = s.entry(name)
        start, header = read_header(store / e["file"])
        row = int(np.prod(e["shape"][1:])) * 4
        where[name] = (store / e["file"], start + header[name]["data_offsets"][0], row)
    reads = []
    for idx in batches:
        pairs = s.gather("train_idx", idx)
        pi, negs = s.gather("pair_index", pairs), s.gather("hard_negatives", pairs)
        v = draw_variants(ds.seed, 0, pairs, ds.schedule.probs(0))
        rows = [
            ("question_embs", pi[:, 0]),
            ("source_embs", np.concatenate([pi[:, 1], negs.ravel()])),
        ]
        rows += [(STEER[k], pairs[v == k]) for k in STEER]
        for name, r in rows:
            path, base, row = where[name]
            reads += [(path, base + int(i) * row, row) for i in r]
    return reads


def disk_rows_per_s(reads: list[tuple[Path, int, int]], threads: int) -> float:
    drop_caches()
    fds = {p: os.open(p, os.O_RDONLY) for p in {p for p, _, _ in reads}}
    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda r: os.pread(fds[r[0]], r[2], r[1]), reads, chunksize=64))
    secs = time.perf_counter() - t
    for fd in fds.values():
        os.close(fd)
    return len(reads) / secs


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workdir", type=Path, default=Path("bench_out"))
    ap.add_argument("--gb", type=float, default=32)
    ap.add_argument("--probe-batches", type=int, default=400)
    ap.add_argument(
        "--json", type=Path, help="append the figures to this JSON-lines file (for plots)"
    )
    args = ap.parse_args()
    print("$", " ".join([sys.executable, *sys.argv]))
    with open("/proc/meminfo") as f:
        print("machine:", os.cpu_count(), "cores,", f.readline().strip())
    store = args.workdir / f"large_{args.gb:g}gb"
    if not (store / "manifest.json").exists():
        make(store, args.gb)
    drop_caches()
    t = time.perf_counter()
    ds = JASPERSteeringDataset(store, "train")
    print(
        f"cold open: {(time.perf_counter() - t) * 1e3:.1f} ms; {len(ds)} train samples of "
        f"{ds.store.counts['n_pairs']} pairs; read-ahead advice {ds.store.advice!r}"
    )
    del ds
    drop_caches()
    rate, first, order = full_pass(store, args.probe_batches)
    reads = row_reads(store, order[: args.probe_batches])
    per_sample = len(reads) / sum(len(b) for b in order[: args.probe_batches])
    print(f"{per_sample:.2f} large rows per sample ({len(reads)} in {args.probe_batches} batches)")
    if args.json:
        size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
        with open(args.json, "a") as f:
            f.write(
                json.dumps(
                    {
                        "bench": "large",
                        "store_bytes": size,
                        "rates": {
                            "full pass, num_workers=2": rate,
                            "first batches cold, num_workers=2": first,
                        },
                    }
                )
                + "\n"
            )
    for threads in (2, 32):
        disk = disk_rows_per_s(reads, threads)
        print(
            f"disk, same kind of rows, cold, pread by {threads} threads: {disk:,.0f} rows/s; ours over the "
            f"first {args.probe_batches} batches: {first * per_sample:,.0f} rows/s = {first * per_sample / disk:.0%}; "
            f"ours over the full pass: {rate * per_sample:,.0f} rows/s = {rate * per_sample / disk:.0%} "
            f"(target >= 50%)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
