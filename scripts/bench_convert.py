"""Benchmark ``convert-pt``: throughput against the disk's write speed, and peak memory.

For each dataset size this script

1. generates a synthetic ``.pt`` dataset (D=384, n_neg=12) in ``--workdir``, or reuses one
   whose ``config.json`` matches;
2. for each format: drops the page cache, measures the disk's sequential write speed just
   before the conversion (as many random bytes as the dataset holds, in 16 MiB blocks, plain
   Python writes, then fsync), drops the cache again (``sync`` + ``/proc/sys/vm/drop_caches``),
   runs ``python -m jasper_mmap.converters.cli SRC DST --quiet --overwrite --format F`` as a subprocess
   and polls the peak RSS (``VmHWM``) of the converter process every ~20 ms, and counts the
   child processes it starts (the converter starts none, so this should print 0);
4. prints one table row per size and format.

With ``--snapshot`` the package code (``jasper_mmap``, ``converters``) is copied into ``WORKDIR/code_snapshot``
at the start and every conversion runs from that copy, so edits made to the working tree
while the benchmark runs cannot mix versions within one table. The code's git commit,
changed files and content hash are printed.

Targets: throughput >= 70% of the disk write speed; peak RSS <= 600 MB, about the same at
every size. MB = 10**6 bytes throughout.

Example::

    python scripts/bench_convert.py --sizes 200000,800000 --formats safetensors,zarr
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
DIM, N_NEG, N_KEYWORDS, N_CLUSTERS = 384, 12, 20_000, 64
DISK_TEST_BYTES = 2 << 30
DISK_BLOCK_BYTES = 16 << 20
POLL_S = 0.02
MB = 1e6
TARGET_RATIO = 0.70
TARGET_RSS_MB = 600.0


@dataclass
class RunResult:
    """One converter run: wall time, exit status and peak RSS (bytes) per process role."""

    seconds: float
    returncode: int
    stderr: str
    peak_main: int = 0
    children: dict[int, str] = field(default_factory=dict)  # pid -> command, any ever seen


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="200000,800000", help="comma-separated n_pairs values")
    p.add_argument("--formats", default="safetensors,zarr", help="comma-separated formats")
    p.add_argument("--workdir", type=Path, default=Path("bench_out"), help="datasets and stores")
    p.add_argument(
        "--disk-test-bytes",
        type=int,
        default=0,
        help="bytes of the disk write test (default: the dataset's size, i.e. as much as "
        "the conversion writes)",
    )
    p.add_argument(
        "--snapshot",
        action="store_true",
        help="run a copy of the package code taken at start (for runs while editing)",
    )
    p.add_argument("--keep-stores", action="store_true", help="do not delete converted stores")
    return p.parse_args(argv)


#: above this many pairs datasets are generated with jasper_mmap.synthetic.large.make_pt_dir
#: (streamed, bounded memory) instead of jasper_mmap.synthetic.make_pt_dataset (in RAM)
STREAMING_FROM = 1_000_000


def expected_config(n_pairs: int) -> dict[str, int]:
    """The config.json counts the synthetic dataset of ``n_pairs`` pairs must have."""
    return {
        "embedding_dim": DIM,
        "n_neg": N_NEG,
        "n_pairs": n_pairs,
        "n_questions": n_pairs // 2,
        "n_sources": n_pairs,
        "n_keywords": N_KEYWORDS,
        "n_clusters": N_CLUSTERS,
    }


def ensure_dataset(workdir: Path, n_pairs: int, code: Path) -> Path:
    """Return the dataset dir for ``n_pairs``, generating it unless a matching one exists."""
    src = workdir / f"pt_{n_pairs}"
    want = expected_config(n_pairs)
    cfg_path = src / "config.json"
    if cfg_path.exists():
        have = json.loads(cfg_path.read_text())
        if all(have.get(k) == v for k, v in want.items()):
            print(f"[{n_pairs}] reusing dataset {src}")
            return src
        print(f"[{n_pairs}] {cfg_path} does not match; regenerating")
    if str(code) not in sys.path:
        sys.path.insert(0, str(code))
    from jasper_mmap.synthetic import SyntheticSpec, make_pt_dataset

    spec = SyntheticSpec(
        n_pairs=n_pairs,
        dim=DIM,
        n_neg=N_NEG,
        n_questions=want["n_questions"],
        n_sources=want["n_sources"],
        n_keywords=N_KEYWORDS,
        n_clusters=N_CLUSTERS,
    )
    if cfg_path.exists():
        cfg_path.unlink()  # config.json is written last: its presence marks a complete dataset
    t0 = time.perf_counter()
    if n_pairs > STREAMING_FROM:  # too large to build in RAM: the block-by-block generator
        from jasper_mmap.synthetic.large import make_pt_dir

        make_pt_dir(
            src, n_pairs, dim=DIM, n_neg=N_NEG, n_clusters=N_CLUSTERS, n_keywords=N_KEYWORDS
        )
    else:
        make_pt_dataset(src, spec)
    print(f"[{n_pairs}] generated dataset {src} in {time.perf_counter() - t0:.1f} s")
    return src


def source_bytes(src: Path) -> int:
    """Total size of the ``.pt`` files in ``src``."""
    return sum(p.stat().st_size for p in src.glob("*.pt"))


def disk_write_speed(workdir: Path, nbytes: int, block: int = DISK_BLOCK_BYTES) -> float:
    """Bytes/s of a sequential write of ``nbytes`` random bytes (Python writes + fsync)."""
    rng = np.random.default_rng()
    pool = [rng.bytes(block) for _ in range(8)]  # distinct random blocks, generated untimed
    path = workdir / ".disk_write_test.bin"
    n_blocks = max(1, nbytes // block)
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for i in range(n_blocks):
            f.write(pool[i % len(pool)])
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    path.unlink()
    return n_blocks * block / seconds


def drop_caches() -> str:
    """``sync`` and drop the page cache; return a note on what worked."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
    except OSError as e:
        return f"sync ok; drop_caches FAILED ({e}); page cache may be warm"
    return "sync + drop_caches ok"


def converter_command(src: Path, dst: Path, fmt: str) -> list[str]:
    """The converter's command line."""
    cli = [sys.executable, "-m", "jasper_mmap.converters.cli", str(src), str(dst)]
    return [*cli, "--quiet", "--overwrite", "--format", fmt]


def peak_rss(proc: psutil.Process) -> int:
    """Peak RSS so far of ``proc`` in bytes (``VmHWM``; current RSS if that is unavailable)."""
    try:
        with open(f"/proc/{proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return proc.memory_info().rss
    except (OSError, psutil.Error):
        return 0


def poll_peaks(proc: subprocess.Popen, result: RunResult) -> None:
    """Poll the converter until it exits; keep the highest VmHWM seen, note any child."""
    main = psutil.Process(proc.pid)
    while proc.poll() is None:
        result.peak_main = max(result.peak_main, peak_rss(main))
        try:
            children = main.children(recursive=True)
        except psutil.Error:
            children = []
        for child in children:
            if child.pid not in result.children:
                try:
                    result.children[child.pid] = " ".join(child.cmdline())[:80]
                except psutil.Error:
                    result.children[child.pid] = "?"
        time.sleep(POLL_S)


def run_converter(src: Path, dst: Path, fmt: str, log_path: Path, code: Path) -> RunResult:
    """Run the converter as a subprocess, sampling peak RSS; return timing and memory."""
    paths = [str(code), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    with open(log_path, "w+") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            converter_command(src, dst, fmt), cwd=code, env=env, stdout=log, stderr=log
        )
        result = RunResult(seconds=0.0, returncode=-1, stderr="")
        poll_peaks(proc, result)
        result.seconds = time.perf_counter() - t0
        result.returncode = proc.returncode
        log.seek(0)
        result.stderr = log.read()
    return result


HEADER = (
    f"{'pairs':>8} {'format':>11} {'src GB':>7} {'seconds':>8} {'MB/s':>7} {'disk MB/s':>9} "
    f"{'ratio':>6} {'RSS main MB':>11} {'children':>8}  targets"
)


def table_row(n_pairs: int, fmt: str, nbytes: int, disk: float, r: RunResult) -> str:
    """One table line, with the target checks."""
    tput = nbytes / r.seconds
    ratio = tput / disk
    main_mb = r.peak_main / MB
    checks = [
        f"ratio>={TARGET_RATIO:.2f} {'ok' if ratio >= TARGET_RATIO else 'MISS'}",
        f"main<={TARGET_RSS_MB:.0f} {'ok' if main_mb <= TARGET_RSS_MB else 'MISS'}",
        f"no child process {'ok' if not r.children else 'MISS'}",
    ]
    return (
        f"{n_pairs:>8} {fmt:>11} {nbytes / 1e9:>7.2f} {r.seconds:>8.1f} {tput / MB:>7.0f} "
        f"{disk / MB:>9.0f} {ratio:>6.2f} {main_mb:>11.0f} {len(r.children):>8}  {', '.join(checks)}"
    )


def bench_size(args: argparse.Namespace, n_pairs: int, formats: list[str]) -> list[tuple]:
    """Generate/reuse one dataset, measure the disk, convert to every format; return rows."""
    try:
        src = ensure_dataset(args.workdir, n_pairs, args.code)
    except Exception:  # report and go on with the other sizes
        print(f"[{n_pairs}] dataset generation FAILED:")
        traceback.print_exc(file=sys.stdout)
        return []
    nbytes = source_bytes(src)
    print(f"[{n_pairs}] source {nbytes / 1e9:.2f} GB")
    rows = []
    for fmt in formats:
        # a name no other benchmark uses: this one is removed after the run
        dst = args.workdir / f"converted_{n_pairs}_{fmt}"
        print(f"[{n_pairs}] {fmt}: {drop_caches()}")
        disk = disk_write_speed(args.workdir, args.disk_test_bytes or nbytes)
        print(
            f"[{n_pairs}] {fmt}: disk sequential write just before: {disk / MB:.0f} MB/s "
            f"({(args.disk_test_bytes or nbytes) / 1e9:.2f} GB, fsynced)"
        )
        print(f"[{n_pairs}] {fmt}: {drop_caches()}")
        r = run_converter(src, dst, fmt, args.workdir / f"convert_{n_pairs}_{fmt}.log", args.code)
        if r.returncode != 0:
            print(f"[{n_pairs}] {fmt}: converter FAILED (exit {r.returncode}); its output:")
            print(r.stderr, end="")
            continue
        if r.children:
            print(f"[{n_pairs}] {fmt}: child processes seen: {list(r.children.values())}")
        rows.append((n_pairs, fmt, nbytes, disk, r))
        print(f"[{n_pairs}] {fmt}: {table_row(*rows[-1])}", flush=True)
        if not args.keep_stores:
            shutil.rmtree(dst, ignore_errors=True)
    return rows


def print_summary(rows: list[tuple]) -> None:
    """Print the table and how peak RSS changes between the smallest and largest size."""
    print()
    print(HEADER)
    for row in rows:
        print(table_row(*row))
    print()
    for fmt in dict.fromkeys(r[1] for r in rows):
        mine = sorted((r for r in rows if r[1] == fmt), key=lambda r: r[0])
        if len(mine) < 2:
            continue
        lo, hi = mine[0], mine[-1]
        print(
            f"{fmt}: peak RSS at {hi[0]} vs {lo[0]} pairs: main "
            f"{hi[4].peak_main / max(1, lo[4].peak_main):.2f}x (target: about 1x)"
        )


def snapshot_code(workdir: Path) -> Path:
    """Copy the package code into ``workdir/code_snapshot``; return that directory."""
    dst = workdir / "code_snapshot"
    shutil.rmtree(dst, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "jasper_mmap", dst / "jasper_mmap", ignore=ignore)
    return dst


def code_hash(code: Path) -> str:
    """Short hash of every ``.py`` file of the package code in ``code``."""
    h = hashlib.blake2b(digest_size=8)
    for path in sorted(code.glob("*/**/*.py")):
        h.update(path.relative_to(code).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def git_state() -> str:
    """HEAD commit and the package files modified since, so a result can be traced to code."""
    try:
        git = ["git", "-C", str(REPO)]
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "jasper_mmap", "converters"],
            capture_output=True,
            text=True,
        )
    except OSError as e:
        return f"unknown ({e})"
    changed = " ".join(line[3:] for line in dirty.stdout.splitlines()) or "none"
    return f"HEAD {head.stdout.strip() or '?'}; package files changed since: {changed}"


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the table."""
    args = parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    formats = [f for f in args.formats.split(",") if f]
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.workdir = args.workdir.absolute()
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print("converter:", shlex.join(converter_command(Path("SRC"), Path("DST"), "F")))
    print(
        f"targets: throughput >= {TARGET_RATIO:.0%} of disk write speed; peak RSS <= "
        f"{TARGET_RSS_MB:.0f} MB and about the same at every size (MB = 1e6 bytes)"
    )
    args.code = snapshot_code(args.workdir) if args.snapshot else REPO
    print(f"code: {args.code} (hash {code_hash(args.code)}); working tree: {git_state()}")
    print(f"host: {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.1f} GiB RAM")
    rows = []
    for n_pairs in sizes:
        rows += bench_size(args, n_pairs, formats)
    print_summary(rows)


if __name__ == "__main__":
    main()
