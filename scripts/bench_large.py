"""A store larger than RAM: make it, open it, serve a full pass of a split spanning it.

    python scripts/bench_large.py --workdir bench_out --gb 32

1. Writes a synthetic store of about ``--gb`` GB with `jasper_mmap.synthetic.large.make_store`
   (in a child process, whose peak RSS is reported) unless it exists. Its train split is every
   tenth pair, so it spans the whole store.
2. Drops the page cache, opens the dataset (cold open time), and for each loader of
   ``--loaders`` (``thread:4`` = `create_loader(num_workers=4)`, gather threads;
   ``process:2`` = `worker_mode="process"`, 2 persistent worker processes) drops the page cache
   again and serves one full pass of the train split (B=128, shuffled), reporting samples/s,
   the peak RssAnon of the main process and of each worker process (polled every 0.5 s), and
   what the disk did meanwhile (reads completed and MB read, from /proc/diskstats).
3. Drops the page cache again and measures what the disk does for the same access pattern:
   the large rows of ``--probe-batches`` batches drawn by the same sampler (question, target,
   12 negatives and the drawn steering row of each sample), each read with `os.pread` from the
   cold store by 2 threads (one outstanding read per loader worker) and by 32 threads (what
   the disk can do with a deep queue, which the loader's batch prefetch uses). Our rows/s over
   the same number of first batches of the pass (cold too) and over the whole pass are
   reported as fractions of each. Later batches of the pass find part of the store in the page
   cache (RAM is 3/4 of the store), so the whole-pass figure is higher than a cold figure.
4. With ``fio`` installed (``apt-get install fio``): the disk's own random-read figures over
   the store's largest file, ``--fio-seconds`` each (0: skipped): 4 KiB reads at queue depth
   32 and 1 MiB reads at queue depth 16 (libaio, O_DIRECT); our pass's disk reads/s and MB/s
   as fractions of them. The dense arrays (NOTE [dense arrays] in jasper_mmap/dataset.py) are
   read in 1 MiB windows, so a pass from a cold store is bound by the disk's bandwidth more
   than by its IOPS.

Caveat for virtual disks: fio and the pread probes run after the passes, on files the passes
have just read. Where the storage below the machine caches what was read (the development
machine's does: fio over a file not read since the machine started gave ~5-6k 4 KiB IOPS and
~460 MB/s at 1 MiB, over a file read shortly before up to ~100k IOPS), those figures are the
warm storage's, and the first pass after the machine starts is slower than the next ones.
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
from jasper_mmap.format.safetensors_header import read_header
from jasper_mmap.steering import draw_variants

B = 128
STEER = {1: "steering_centroid", 2: "steering_keyword_weighted", 3: "steering_residual"}


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1\n")


def status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next((int(line.split()[1]) for line in f if line.startswith(key + ":")), 0)


def make(store: Path, gb: float, fmt: str) -> None:
    code = (
        "import sys, resource; from jasper_mmap.synthetic.large import make_store, pairs_for_bytes; "
        "make_store(sys.argv[1], pairs_for_bytes(float(sys.argv[2]) * 1e9), sparse_train=True, format=sys.argv[3]); "
        "print(f'peak RSS of the generator: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB')"
    )
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(store), str(gb), fmt], check=True)
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


def disk_counters(path: Path) -> tuple[int, int]:
    """(reads completed, sectors read) of the block device holding ``path``."""
    dev = os.stat(path).st_dev
    name = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve().name
    with open("/proc/diskstats") as f:
        for line in f:
            parts = line.split()
            if parts[2] == name:
                return int(parts[3]), int(parts[5])
    return 0, 0


def full_pass(store: Path, probe: int, spec: str) -> dict:
    mode, workers = spec.split(":")
    extra = {"persistent_workers": True} if mode == "process" else {}
    loader = create_loader(store, "train", B, num_workers=int(workers), worker_mode=mode, **extra)
    order = list(
        iter(loader.batch_sampler)
    )  # batches drawn the same way as the pass's (for the disk probe)
    reads0, sectors0 = disk_counters(store)
    it = iter(loader)
    workers_of = getattr(loader._iterator, "_workers", []) if mode == "process" else []
    pids = [os.getpid()] + [w.pid for w in workers_of]
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
    reads1, sectors1 = disk_counters(store)
    names = ["main"] + [f"worker {i}" for i in range(len(pids) - 1)]
    print(
        f"{spec} full pass: {n} samples in {secs:.0f} s = {n / secs:,.0f} samples/s; peak "
        f"RssAnon: "
        + ", ".join(
            f"{name} {peaks.peak[p] / 1024:.0f} MB" for name, p in zip(names, pids, strict=True)
        )
    )
    disk_reads, disk_mb = (reads1 - reads0) / secs, (sectors1 - sectors0) * 512 / 1e6
    print(f"{spec} first {probe} batches (cold): {first:,.0f} samples/s")
    print(
        f"{spec} the disk over the whole pass: {disk_reads:,.0f} reads/s, "
        f"{disk_mb / secs:,.0f} MB/s ({disk_mb / 1e3:,.1f} GB read)"
    )
    return {
        "rate": n / secs,
        "first": first,
        "order": order,
        "disk_reads": disk_reads,
        "disk_mb_s": disk_mb / secs,
    }


def fio_read(path: Path, seconds: int, bs: str, depth: int) -> tuple[float, float] | None:
    """Random reads of ``bs`` at queue ``depth`` (libaio, direct) over ``path``: (IOPS, MB/s),
    or None without fio."""
    try:
        out = subprocess.run(
            [
                "fio",
                "--name=randread",
                f"--filename={path}",
                "--rw=randread",
                f"--bs={bs}",
                f"--iodepth={depth}",
                "--ioengine=libaio",
                "--direct=1",
                "--readonly",
                f"--runtime={seconds}",
                "--time_based",
                "--output-format=json",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"fio: not run ({e}); apt-get install fio")
        return None
    job = json.loads(out)["jobs"][0]["read"]
    mb_s = job["bw_bytes"] / 1e6
    print(
        f"fio {bs} random reads, queue depth {depth}, {path.name}: {job['iops']:,.0f} IOPS, "
        f"{mb_s:,.0f} MB/s"
    )
    return float(job["iops"]), mb_s


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
        "--loaders",
        default="thread:4,process:2",
        help="MODE:N,...: create_loader(num_workers=N, worker_mode=MODE) passes, each cold",
    )
    ap.add_argument("--fio-seconds", type=int, default=20)
    ap.add_argument(
        "--format",
        default="safetensors",
        choices=["safetensors", "zarr"],
        help="store format (zarr: the disk probes and fio, which read safetensors files, are "
        "skipped)",
    )
    ap.add_argument(
        "--json", type=Path, help="append the figures to this JSON-lines file (for plots)"
    )
    args = ap.parse_args()
    print("$", " ".join([sys.executable, *sys.argv]))
    with open("/proc/meminfo") as f:
        print("machine:", os.cpu_count(), "cores,", f.readline().strip())
    suffix = "" if args.format == "safetensors" else f"_{args.format}"
    store = args.workdir / f"large_{args.gb:g}gb{suffix}"
    if not (store / "manifest.json").exists():
        make(store, args.gb, args.format)
    drop_caches()
    t = time.perf_counter()
    ds = JASPERSteeringDataset(store, "train")
    print(
        f"cold open: {(time.perf_counter() - t) * 1e3:.1f} ms; {len(ds)} train samples of "
        f"{ds.store.counts['n_pairs']} pairs; reads ahead: {ds.store.reads_ahead}"
    )
    del ds
    passes = {}
    for spec in args.loaders.split(","):
        drop_caches()
        passes[spec] = full_pass(store, args.probe_batches, spec)
    if args.json:
        size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
        rates = {}
        for spec, r in passes.items():
            rates[f"full pass, {spec}"] = r["rate"]
            rates[f"first batches cold, {spec}"] = r["first"]
        with open(args.json, "a") as f:
            record = {"bench": "large", "store_bytes": size, "rates": rates}
            if args.format != "safetensors":
                record["format"] = args.format
            f.write(json.dumps(record) + "\n")
    if args.format != "safetensors":
        return 0
    order = next(iter(passes.values()))["order"]
    reads = row_reads(store, order[: args.probe_batches])
    per_sample = len(reads) / sum(len(b) for b in order[: args.probe_batches])
    print(f"{per_sample:.2f} large rows per sample ({len(reads)} in {args.probe_batches} batches)")
    for threads in (2, 32):
        disk = disk_rows_per_s(reads, threads)
        print(f"disk, same kind of rows, cold, pread by {threads} threads: {disk:,.0f} rows/s")
        for spec, r in passes.items():
            print(
                f"  {spec}: first {args.probe_batches} batches {r['first'] * per_sample:,.0f} "
                f"rows/s = {r['first'] * per_sample / disk:.0%}; full pass "
                f"{r['rate'] * per_sample:,.0f} rows/s = {r['rate'] * per_sample / disk:.0%}"
            )
    biggest = max((p for p in store.rglob("*.safetensors")), key=lambda p: p.stat().st_size)
    if args.fio_seconds <= 0:
        return 0
    small = fio_read(biggest, args.fio_seconds, "4k", 32)
    large = fio_read(biggest, args.fio_seconds, "1m", 16)
    for spec, r in passes.items():
        if small:
            print(
                f"  {spec}: the disk served {r['disk_reads']:,.0f} reads/s during the pass = "
                f"{r['disk_reads'] / small[0]:.0%} of fio's 4 KiB QD32 IOPS"
            )
        if large:
            print(
                f"  {spec}: and {r['disk_mb_s']:,.0f} MB/s = {r['disk_mb_s'] / large[1]:.0%} of "
                "fio's 1 MiB QD16 bandwidth (dense arrays are read in 1 MiB windows)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
