"""``convert_pt``: stream a directory of ``.pt`` artifacts into a safetensors or zarr store.

Flow: read ``config.json`` -> describe every tensor (no data read) -> check shapes and counts ->
decode keyword ids in a thread while the main thread streams the tensors block by block
(check, cast, write) into a hidden temporary directory -> write the manifest -> reopen the result
and compare shapes, dtypes and sampled rows with the sources -> publish with one atomic rename
(a replacement holds the store's writer lock: NOTE [one writer per store] in ``jasper_mmap/_fs/publish.py``).
Memory is bounded by a few blocks (``block_bytes``), whatever the dataset size.
"""

from __future__ import annotations

import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jasper_mmap._fs.files import as_path
from jasper_mmap._fs.partials import partial_dir
from jasper_mmap._fs.publish import check_destination, fsync_tree, publish_dir
from jasper_mmap.converters.keywords import KeywordJob
from jasper_mmap.converters.shapes import check_shapes, check_source
from jasper_mmap.errors import ArtifactError, ArtifactMissingError, JasperError, write_error
from jasper_mmap.format.config import read_config
from jasper_mmap.format.dtypes import to_float32, to_stored
from jasper_mmap.format.manifest import write_store_metadata
from jasper_mmap.format.spec import (
    ARRAYS,
    BACKEND_NAMES,
    CONFIG,
    FLOAT_ROLES,
    NEGATIVES_DIR,
    ArraySpec,
    generation_name,
)
from jasper_mmap.format.store_dirs import is_store, remove_stale_partials, warn_stale_partials
from jasper_mmap.format.values import (
    REBUILD,
    Notices,
    SplitCheck,
    Stats,
    check_block,
    check_steering,
)
from jasper_mmap.sources.directory import detect_storage_format, open_source
from jasper_mmap.sources.fingerprints import source_fingerprints
from jasper_mmap.sources.pt.reader import TensorArtifact
from jasper_mmap.stores import WRITERS, open_store

__all__ = ["convert_pt", "FORMATS", "DTYPES"]

log = logging.getLogger(__name__)

FORMATS = BACKEND_NAMES  # the store formats convert-pt writes
DTYPES = ("keep", "float16", "bfloat16")
UNIT_ORDER = ("embeddings", "steering", "pairs", "splits", NEGATIVES_DIR)


@dataclass
class _Planned:
    spec: ArraySpec
    art: TensorArtifact | None
    shape: tuple[int, ...]
    stored: str  # stored dtype name
    out: str  # dtype readers hand out


def _stored_dtype(spec: ArraySpec, art: TensorArtifact, dtype: str) -> str:
    if spec.role in FLOAT_ROLES:
        if dtype != "keep":
            return dtype
        return {"torch.float16": "float16", "torch.bfloat16": "bfloat16"}.get(art.dtype, "float32")
    return "float32" if spec.role == "float" else "int64"


def _plan(
    arts: dict[str, TensorArtifact], dtype: str, nnz: int, n_pairs: int
) -> dict[str, list[_Planned]]:
    units: dict[str, list[_Planned]] = {u: [] for u in UNIT_ORDER}
    for spec in ARRAYS:
        if spec.name == "pair_keyword_offsets":
            units[spec.unit].append(_Planned(spec, None, (n_pairs + 1,), "int64", "int64"))
        elif spec.name == "pair_keyword_values":
            units[spec.unit].append(_Planned(spec, None, (nnz,), "int64", "int64"))
        elif spec.name in arts:
            art = arts[spec.name]
            stored = _stored_dtype(spec, art, dtype)
            out = "int64" if stored == "int64" else "float32"
            units[spec.unit].append(_Planned(spec, art, art.shape, stored, out))
    return units


class _Progress:
    def __init__(self, total: int, enabled: bool | None) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="convert-pt",
            disable=(None if enabled is None else not enabled),
            dynamic_ncols=True,
        )

    def update(self, n: int, what: str | None = None) -> None:
        if what is not None:
            self.bar.set_postfix_str(what, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def _prefetched_blocks(art: TensorArtifact, rows: int):
    """Yield ``(start, rows block)`` while a thread already reads the next block.

    ``pread`` releases the GIL, so reading block k+1 overlaps checking and writing block k;
    two blocks are in memory at a time.
    """
    n = art.shape[0]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="convert-pt-read") as pool:
        pending = pool.submit(art.read_rows, 0, min(n, rows)) if n else None
        for start in range(0, n, rows):
            block = pending.result()
            nxt = start + rows
            pending = pool.submit(art.read_rows, nxt, min(n, nxt + rows)) if nxt < n else None
            yield start, block


@dataclass
class _Run:
    """One conversion's settings and what it found, handed down the streaming functions."""

    tmp: Path
    writer: Any
    limits: dict[str, int]
    allow_nonfinite: bool
    block_bytes: int
    progress: _Progress
    notices: Notices
    keywords: KeywordJob


def _stream_tensor(p: _Planned, run: _Run) -> dict:
    art = p.art
    stats = Stats()
    split = None
    if p.spec.role == "split":
        split = SplitCheck(art.path, run.limits["n_pairs"], run.notices)
    rows = max(1, run.block_bytes // max(1, art.row_bytes))
    for start, block in _prefetched_blocks(art, rows):
        if block.dtype.byteorder == ">":
            block = block.astype(block.dtype.newbyteorder("<"))
        if art.dtype == "torch.bfloat16":
            block = to_float32(block.view(np.uint16), "bfloat16")
        floats = p.out == "float32"
        if block.dtype == np.uint64 and block.size and block.max() > np.iinfo(np.int64).max:
            rows = np.flatnonzero((block > np.iinfo(np.int64).max).reshape(len(block), -1).any(1))
            raise ArtifactError(
                f"{art.path}: rows {(rows[:5] + start).tolist()} hold uint64 values above "
                f"2**63 - 1, which no index can be. {REBUILD}"
            )
        block = block.astype(np.float32 if floats else np.int64, copy=False)
        allow = run.allow_nonfinite and floats
        check_block(art.path, p.spec.name, block, start, run.limits, stats, allow, run.notices)
        if split is not None:
            split.update(block, start)
        run.writer.write(p.spec.name, to_stored(block, p.stored))
        run.progress.update(block.shape[0] * art.row_bytes, p.spec.name)
        run.keywords.check()  # a bad keyword file fails the conversion now, not at the pairs
    if split is not None:
        split.finish()
    return stats.as_dict()


def _write_units(units: dict[str, list[_Planned]], run: _Run) -> dict[str, dict[str, Any]]:
    entries: dict[str, dict[str, Any]] = {}
    for unit in UNIT_ORDER:
        planned = units[unit]
        if not planned:
            continue
        name_unit = f"{NEGATIVES_DIR}/{generation_name(0)}" if unit == NEGATIVES_DIR else unit
        kw = run.keywords.result() if unit == "pairs" else None
        for p in planned:
            if p.spec.name == "pair_keyword_values":
                p.shape = (kw["nnz"],)
        run.writer.begin_unit(name_unit, [(p.spec.name, p.shape, p.stored) for p in planned])
        stats = {
            p.spec.name: _stream_tensor(p, run)
            if p.art is not None
            else _copy_keywords(run.tmp, p, run.writer, kw, run.block_bytes, run.progress)
            for p in planned
        }
        for name, e in run.writer.end_unit().items():
            p = next(q for q in planned if q.spec.name == name)
            entries[name] = {
                **e,
                "shape": list(p.shape),
                "dtype": p.out,
                "stored_dtype": p.stored,
                "source": p.spec.source,
                "source_dtype": p.art.dtype if p.art else "list[list[int]]",
                "stats": stats[name],
            }
    return entries


def _copy_keywords(tmp: Path, p: _Planned, writer, kw: dict, block_bytes: int, progress) -> dict:
    path = tmp / (".kw_offsets.bin" if p.spec.name == "pair_keyword_offsets" else ".kw_values.bin")
    data = (
        np.memmap(path, mode="r", dtype=np.int64) if path.stat().st_size else np.empty(0, np.int64)
    )
    step = max(1, block_bytes // 8)
    for start in range(0, data.shape[0], step):
        block = np.array(data[start : start + step])
        writer.write(p.spec.name, block)
        progress.update(0, p.spec.name)  # the source file's bytes are counted once, at the end
    del data
    path.unlink()
    key = "offsets" if p.spec.name == "pair_keyword_offsets" else "values"
    return kw[f"{key}_stats"]


def _source_rows(p: _Planned, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` of the source as readers should see them (cast, stored, widened)."""
    want = np.concatenate([p.art.read_rows(i, i + 1) for i in idx])
    if want.dtype.byteorder == ">":
        want = want.astype(want.dtype.newbyteorder("<"))
    if p.art.dtype == "torch.bfloat16":
        want = to_float32(want.view(np.uint16), "bfloat16")
    return to_float32(to_stored(want.astype(np.dtype(p.out)), p.stored), p.stored)


def _verify_array(tmp: Path, p: _Planned, rng: np.random.Generator, samples: int) -> None:
    # a fresh store per array, closed at once: the pages each check maps are let go before
    # the next (large page-cache folios make even a few rows map megabytes)
    with open_store(tmp) as store:
        name = p.spec.name
        if store.shape(name) != tuple(p.shape):
            raise ArtifactError(
                f"{tmp}: verification failed: {name} has shape {store.shape(name)}, "
                f"expected {p.shape}. This is a bug; please report it."
            )
        n = p.shape[0]
        if n == 0:
            return
        idx = np.unique(np.concatenate([[0, n - 1], rng.integers(0, n, samples)]))
        got = store.gather(name, idx)
        if p.art is None:  # keyword arrays: checked against the parser's totals
            if name == "pair_keyword_offsets" and (
                got[0] != 0
                or got[-1] != store.shape("pair_keyword_values")[0]
                or (np.diff(got) < 0).any()
            ):
                raise ArtifactError(
                    f"{tmp}: verification failed: keyword offsets {got[:8].tolist()} do not "
                    f"span the values. The store was not published; convert again."
                )
            return
        if got.dtype != np.dtype(p.out) or got.tobytes() != _source_rows(p, idx).tobytes():
            raise ArtifactError(
                f"{tmp}: verification failed: rows {idx[:8].tolist()} of {name} differ "
                f"from {p.art.path}. The store was not published. Check the disk (dmesg) "
                f"and convert again."
            )


def _verify(tmp: Path, units: dict[str, list[_Planned]], samples: int = 32) -> None:
    """Reopen the written store; compare shapes, dtypes and sampled rows with the sources."""
    rng = np.random.default_rng(0)
    for planned in units.values():
        for p in planned:
            _verify_array(tmp, p, rng, samples)


def convert_pt(
    src: str | Path,
    dst: str | Path,
    *,
    format: str = "safetensors",
    dtype: str = "keep",
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    progress: bool | None = None,
    block_bytes: int = 16 << 20,
    source: str = "auto",
) -> Path:
    """Convert the dataset directory ``src`` into a store at ``dst``.

    Args:
        src: dataset directory: ``config.json`` plus the ``.pt`` artifacts, or an upstream
            ``dataset.h5`` (see docs/dataset_format.md).
        dst: store directory to create. Made visible only when complete and verified. A
            symlink is followed: the store it points to is replaced.
        format: ``"safetensors"`` (memory-mapped files) or ``"zarr"`` (one zarr v3 group).
        dtype: ``"keep"``, or ``"float16"``/``"bfloat16"`` to store embeddings and steering
            vectors at half precision (readers still return float32). float64 is always cast
            to float32.
        overwrite: replace an existing store at ``dst`` (atomically) instead of refusing. Only
            a jasper_mmap store is ever replaced; never ``src``, a directory holding ``src``,
            or any other non-empty directory.
        allow_nonfinite: convert NaN/Inf embedding rows instead of refusing them.
        progress: show a progress bar; ``None`` shows one when stderr is a terminal.
        block_bytes: rows are streamed in blocks of about this many bytes.
        source: which files of ``src`` to read: ``"pt"``, ``"hdf5"`` (``dataset.h5``), or
            ``"auto"`` (``dataset.h5`` when present and h5py is installed, as the in-RAM
            dataset decides).

    Returns:
        The store path.

    Raises:
        ArtifactMissingError, ArtifactError, ConfigError: bad input, named in the message.
            Unusual but valid input (counts in config.json that disagree with the files,
            values outside their usual ranges, splits that repeat pairs) is converted, logged
            as warnings and recorded in the manifest's ``warnings``.
        StoreExistsError: ``dst`` is a store and ``overwrite`` is false; ``dst`` is, or holds,
            ``src``; ``dst`` is a file or a non-empty directory that is not a store; another
            process published at ``dst`` meanwhile.
        StoreWriteError: the disk is full, the destination read-only, a file-size limit.
    """
    src = as_path(src, "src (the dataset directory)", ArtifactMissingError)
    dst = as_path(dst, "dst (the store's path)", ArtifactMissingError)
    if format not in FORMATS:
        raise ValueError(f"format should be one of {FORMATS}, but got format={format!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype should be one of {DTYPES}, but got dtype={dtype!r}")
    check_source(src)
    t0 = time.perf_counter()
    config = read_config(src)
    dst = check_destination(
        dst, overwrite=overwrite, inputs=[src], is_ours=is_store
    )  # NOTE [never destroy ...]
    remove_stale_partials(dst)
    warn_stale_partials(dst)  # other destinations' are named, never removed
    reader = open_source(src, detect_storage_format(src, source))
    try:
        check_steering(src, config)  # after the files: a foreign folder is told that first
        notices = Notices()
        counts = check_shapes(src, reader.arrays, config, notices)
        _convert_into(
            dst,
            reader,
            counts,
            notices,
            format,
            dtype,
            overwrite,
            allow_nonfinite,
            progress,
            block_bytes,
        )
    finally:
        reader.close()
    log.debug("converted %s -> %s (%s, %.1f s)", src, dst, format, time.perf_counter() - t0)
    return dst


def _convert_into(
    dst, reader, counts, notices, format, dtype, overwrite, allow_nonfinite, progress, block_bytes
) -> None:
    """Stream ``reader`` into a temporary directory, verify it, publish it at ``dst``."""
    try:
        tmp = partial_dir(dst)
    except OSError as e:
        raise write_error(dst.parent, e, "a temporary directory for the store") from e
    bar = keywords = None
    try:
        keywords = KeywordJob(
            str(reader.keyword_path),
            str(tmp),
            counts["n_pairs"],
            counts["n_keywords"],
            decode=reader.decode_keywords,
        )
        arts = reader.arrays
        units = _plan(arts, dtype, 0, counts["n_pairs"])
        bar = _Progress(sum(a.nbytes for a in arts.values()) + reader.keyword_bytes, progress)
        run = _Run(
            tmp,
            WRITERS[format](tmp),
            dict(counts),
            allow_nonfinite,
            block_bytes,
            bar,
            notices,
            keywords,
        )
        entries = _write_units(units, run)
        counts["n_keyword_values"] = keywords.result()["nnz"]
        bar.update(reader.keyword_bytes, "verify")
        for warning in notices.messages():
            log.warning("%s", warning)
        shutil.copyfile(reader.dir / CONFIG, tmp / CONFIG)
        write_store_metadata(
            tmp,
            format,
            entries,
            counts,
            writer="jasper_mmap.converters.convert_pt",
            source={
                "dir": str(reader.dir),
                "format": reader.format,
                "files": source_fingerprints(reader.dir, reader.format),
            },
            dtype_option=dtype,
            warnings=notices.messages(),
        )
        _verify(tmp, units)
        fsync_tree(tmp)
        publish_dir(
            tmp, dst, replace=overwrite, is_ours=is_store
        )  # a replacement holds the store's writer lock
    except BaseException as e:
        if keywords is not None:
            keywords.cancel()
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, JasperError):
            raise write_error(dst, e, "the store") from e
        raise
    finally:
        if bar is not None:
            bar.close()
    keywords.cancel()
