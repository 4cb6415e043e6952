"""Benchmark zarr chunk sizes for random row gathers (see NOTE [zarr chunking] in zarr_store.py).

Writes a synthetic ``source_embs``-like float32 array of shape [N, D] (random normal,
generated block by block) once per chunk size with :class:`ZarrWriter`, and once as a raw
file, then measures, with a warm page cache:

* random gathers: batches of ``--batch-rows`` random rows (128 * 12, one batch of
  negatives; drawn with replacement, unsorted) through ``arr.oindex[idx]``;
* sequential reads: contiguous slices of ``--seq-rows`` rows;
* the same through ``numpy.memmap`` fancy indexing of the raw file, as a reference.

Each measurement stops after its batch count or its time budget, whichever comes first, so
the whole run stays within a few minutes. MB = 10**6 bytes.

Example::

    python scripts/bench_zarr_chunks.py --rows 200000 --batches 200
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MB = 1e6
DEFAULT_CHUNKS = "1536,16384,131072,1048576"


@dataclass
class CaseResult:
    """Figures for one storage layout."""

    label: str
    rows_per_chunk: int | str
    rows_per_shard: int | str
    files: int
    write_s: float
    gather_batches: int
    gather_s: float
    seq_bytes: int
    seq_s: float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=200_000, help="N, rows of the array")
    p.add_argument("--dim", type=int, default=384, help="D, float32 values per row")
    p.add_argument("--chunk-bytes", default=DEFAULT_CHUNKS, help="comma-separated sizes")
    p.add_argument("--shard-bytes", type=int, default=8 << 20)
    p.add_argument("--batch-rows", type=int, default=128 * 12, help="rows per random batch")
    p.add_argument("--batches", type=int, default=200, help="random batches per layout (max)")
    p.add_argument("--seq-rows", type=int, default=4096, help="rows per sequential slice")
    p.add_argument("--budget-s", type=float, default=12.0, help="max seconds per gather test")
    p.add_argument("--seq-budget-s", type=float, default=4.0, help="max seconds per seq test")
    p.add_argument("--tmpdir", type=Path, default=None, help="where to write the arrays")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def blocks(n: int, dim: int, seed: int, block_rows: int = 16384) -> Iterator[np.ndarray]:
    """The array's rows, as float32 blocks of random normal values (same for every layout)."""
    rng = np.random.default_rng(seed)
    for start in range(0, n, block_rows):
        rows = min(block_rows, n - start)
        yield rng.standard_normal((rows, dim), dtype=np.float32)


def write_zarr(root: Path, args: argparse.Namespace, chunk_bytes: int) -> float:
    """Write the array with ZarrWriter at ``chunk_bytes`` per chunk; return seconds."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from jasper_mmap.stores.zarr_store import ZarrWriter

    t0 = time.perf_counter()
    writer = ZarrWriter(root, chunk_bytes=chunk_bytes, shard_bytes=args.shard_bytes)
    writer.begin_unit("embeddings", [("source_embs", (args.rows, args.dim), "float32")])
    for block in blocks(args.rows, args.dim, args.seed):
        writer.write("source_embs", block)
    writer.end_unit()
    return time.perf_counter() - t0


def write_raw(path: Path, args: argparse.Namespace) -> float:
    """Write the array as a raw little-endian float32 file; return seconds."""
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for block in blocks(args.rows, args.dim, args.seed):
            f.write(block.tobytes())
    return time.perf_counter() - t0


def time_batches(
    fn: Callable[[np.ndarray], np.ndarray], batches: list[np.ndarray], budget_s: float
) -> tuple[int, float]:
    """Call ``fn`` on each batch (after one untimed warm-up) until done or over budget."""
    fn(batches[0])
    done, t0 = 0, time.perf_counter()
    for idx in batches:
        fn(idx)
        done += 1
        if time.perf_counter() - t0 > budget_s:
            break
    return done, time.perf_counter() - t0


def time_sequential(
    read: Callable[[int, int], np.ndarray], n: int, seq_rows: int, budget_s: float
) -> tuple[int, float]:
    """Read rows ``[start, start + seq_rows)`` from 0 on until the end or the budget."""
    nbytes, t0 = 0, time.perf_counter()
    for start in range(0, n, seq_rows):
        nbytes += read(start, min(n, start + seq_rows)).nbytes
        if time.perf_counter() - t0 > budget_s:
            break
    return nbytes, time.perf_counter() - t0


def count_files(root: Path) -> int:
    """Number of files under ``root`` (or 1 for a file)."""
    return 1 if root.is_file() else sum(1 for p in root.rglob("*") if p.is_file())


def bench_zarr(
    tmp: Path,
    args: argparse.Namespace,
    chunk_bytes: int,
    batches: list[np.ndarray],
    reference: np.ndarray,
) -> CaseResult:
    """Write one zarr layout, check it against the reference, time gathers and slices."""
    import zarr

    root = tmp / f"zarr_{chunk_bytes}"
    write_s = write_zarr(root, args, chunk_bytes)
    arr = zarr.open_group(str(root), mode="r", zarr_format=3)["source_embs"]
    if not np.array_equal(arr.oindex[batches[0]], reference[batches[0]]):
        raise RuntimeError(f"{root}: gathered rows differ from the raw reference")
    n_done, gather_s = time_batches(lambda idx: arr.oindex[idx], batches, args.budget_s)
    seq_bytes, seq_s = time_sequential(
        lambda a, b: arr[a:b], args.rows, args.seq_rows, args.seq_budget_s
    )
    return CaseResult(
        label=f"zarr {chunk_bytes} B",
        rows_per_chunk=arr.chunks[0],
        rows_per_shard=arr.shards[0] if arr.shards else "-",
        files=count_files(root),
        write_s=write_s,
        gather_batches=n_done,
        gather_s=gather_s,
        seq_bytes=seq_bytes,
        seq_s=seq_s,
    )


def bench_memmap(
    path: Path, args: argparse.Namespace, batches: list[np.ndarray], write_s: float
) -> CaseResult:
    """Time the same gathers and slices through numpy.memmap fancy indexing."""
    mm = np.memmap(path, dtype=np.float32, mode="r", shape=(args.rows, args.dim))
    n_done, gather_s = time_batches(lambda idx: mm[idx], batches, args.budget_s)
    seq_bytes, seq_s = time_sequential(  # np.array: copy, so the pages are really read
        lambda a, b: np.array(mm[a:b]), args.rows, args.seq_rows, args.seq_budget_s
    )
    return CaseResult(
        label="numpy.memmap (raw)",
        rows_per_chunk="-",
        rows_per_shard="-",
        files=1,
        write_s=write_s,
        gather_batches=n_done,
        gather_s=gather_s,
        seq_bytes=seq_bytes,
        seq_s=seq_s,
    )


HEADER = (
    f"{'layout':<20} {'rows/chunk':>10} {'rows/shard':>10} {'files':>6} {'write s':>8} "
    f"{'batches':>7} {'gather rows/s':>13} {'gather MB/s':>11} {'ms/batch':>9} {'seq MB/s':>9}"
)


def gather_rate(r: CaseResult) -> float:
    """Random-gather batches per second."""
    return r.gather_batches / r.gather_s


def table_row(r: CaseResult, args: argparse.Namespace) -> str:
    """One table line."""
    rows_s = r.gather_batches * args.batch_rows / r.gather_s
    row_bytes = args.dim * 4
    return (
        f"{r.label:<20} {r.rows_per_chunk!s:>10} {r.rows_per_shard!s:>10} {r.files:>6} "
        f"{r.write_s:>8.1f} {r.gather_batches:>7} {rows_s:>13,.0f} "
        f"{rows_s * row_bytes / MB:>11.1f} {1e3 * r.gather_s / r.gather_batches:>9.2f} "
        f"{r.seq_bytes / r.seq_s / MB:>9.0f}"
    )


def run(args: argparse.Namespace) -> list[CaseResult]:
    """Write every layout into a temporary directory and measure it."""
    rng = np.random.default_rng(args.seed + 1)
    batches = [rng.integers(0, args.rows, args.batch_rows) for _ in range(args.batches)]
    chunk_sizes = [int(c) for c in args.chunk_bytes.split(",") if c]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_zarr_", dir=args.tmpdir) as tmp:
        raw = Path(tmp) / "source_embs.f32"
        raw_s = write_raw(raw, args)
        reference = np.memmap(raw, dtype=np.float32, mode="r", shape=(args.rows, args.dim))
        for chunk_bytes in chunk_sizes:
            results.append(bench_zarr(Path(tmp), args, chunk_bytes, batches, reference))
            print(table_row(results[-1], args), flush=True)
        results.append(bench_memmap(raw, args, batches, raw_s))
        print(table_row(results[-1], args), flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the table."""
    args = parse_args(argv)
    import zarr

    t0 = time.perf_counter()
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(
        f"array [{args.rows}, {args.dim}] float32 ({args.rows * args.dim * 4 / MB:.0f} MB), "
        f"shard_bytes={args.shard_bytes}, zarr {zarr.__version__}, no compression; "
        f"random batches of {args.batch_rows} rows (with replacement), up to {args.batches} "
        f"batches or {args.budget_s:.0f} s per layout; sequential slices of {args.seq_rows} "
        f"rows, up to {args.seq_budget_s:.0f} s; warm page cache; MB = 1e6 bytes"
    )
    print(HEADER, flush=True)
    results = run(args)
    print()
    print("summary (sorted by gather throughput):")
    print(HEADER)
    for r in sorted(results, key=gather_rate, reverse=True):
        print(table_row(r, args))
    print(f"total run time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
