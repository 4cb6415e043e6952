"""``convert_pt``: stream a directory of ``.pt`` artifacts into a safetensors or zarr store.

Flow: read ``config.json`` -> describe every tensor (no data read) -> check shapes and counts ->
parse keyword ids in a child process while the main process streams the tensors block by block
(check, cast, write) into a hidden temporary directory -> write the manifest -> reopen the result
and compare shapes, dtypes and sampled rows with the sources -> publish with one atomic rename.
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

from jasper_mmap._atomic import (
    check_destination,
    fsync_tree,
    is_store,
    partial_dir,
    publish_dir,
    remove_stale_partials,
)
from jasper_mmap._dtypes import to_float32, to_stored
from jasper_mmap.errors import (
    ArtifactError,
    ArtifactMissingError,
    ConfigError,
    JasperError,
    write_error,
)
from jasper_mmap.fingerprints import source_fingerprints
from jasper_mmap.layout import (
    ARRAYS,
    CONFIG,
    FLOAT_ROLES,
    NEGATIVES_DIR,
    ArraySpec,
    generation_name,
    write_store_metadata,
)
from jasper_mmap.stores import WRITERS, open_store

from .checks import COUNT_KEYS, SplitCheck, Stats, check_block, read_config
from .keywords import KeywordJob
from .pt_reader import TensorArtifact, open_tensor

__all__ = ["convert_pt", "FORMATS", "DTYPES"]

log = logging.getLogger(__name__)

FORMATS = ("safetensors", "zarr")
DTYPES = ("keep", "float16", "bfloat16")
UNIT_ORDER = ("embeddings", "steering", "pairs", "splits", NEGATIVES_DIR)
#: float8 tensors are decoded to float32 by the reader (numpy has no float8)
_FLOAT_SOURCES = {
    "torch.float32",
    "torch.float64",
    "torch.float16",
    "torch.bfloat16",
    "torch.float8_e4m3fn",
    "torch.float8_e5m2",
    "torch.float8_e4m3fnuz",
    "torch.float8_e5m2fnuz",
}
_INT_SOURCES = {
    "torch.int64",
    "torch.int32",
    "torch.int16",
    "torch.int8",
    "torch.uint8",
    "torch.uint16",
    "torch.uint32",
    "torch.uint64",
}


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


def _open_all(src: Path) -> dict[str, TensorArtifact]:
    arts = {}
    for spec in ARRAYS:
        if spec.source is None or spec.name == "pair_keyword_offsets":
            continue
        path = src / spec.source
        if not path.exists() and not spec.required:
            log.info(
                "%s: no %s split; the store will have none", src, spec.name.removesuffix("_idx")
            )
            continue
        arts[spec.name] = open_tensor(path)
    return arts


def _expect(art: TensorArtifact, ndim: int, kinds: set[str], what: str) -> None:
    if len(art.shape) != ndim:
        raise ArtifactError(
            f"{art.path}: should be a {ndim}-D tensor ({what}), but has shape "
            f"{list(art.shape)}. Re-run the dataset builder."
        )
    if art.dtype not in kinds:
        want = "a float" if kinds is _FLOAT_SOURCES else "an integer"
        raise ArtifactError(
            f"{art.path}: should hold {want} dtype ({what}), but holds {art.dtype}. "
            f"Re-run the dataset builder."
        )


def _check_shapes(
    src: Path, arts: dict[str, TensorArtifact], config: dict[str, Any]
) -> dict[str, int]:
    """Check every shape/dtype against the others and config.json; return the counts."""
    emb = ["question_embs", "source_embs", "keyword_embs", "centroid_embs"]
    steer = ["steering_centroid", "steering_keyword_weighted", "steering_residual"]
    for name in emb + steer:
        _expect(arts[name], 2, _FLOAT_SOURCES, "rows of embeddings")
    dims = {arts[n].shape[1] for n in emb + steer}
    want_d = config.get("embedding_dim")
    found = {arts[n].path.name: arts[n].shape[1] for n in emb + steer}
    if len(dims) == 1 and want_d is not None and dims != {want_d}:
        raise ConfigError(
            f"{src / 'config.json'}: embedding_dim={want_d}, but every embedding and steering file "
            f"has dimension {dims.pop()}. The files are the truth: fix config.json."
        )
    if len(dims) > 1:
        raise ArtifactError(
            f"{src}: embedding dimensions disagree: config.json says embedding_dim="
            f"{want_d}, the files have {found}. Re-run the dataset builder so all agree."
        )
    _expect(arts["pair_index"], 2, _INT_SOURCES, "question row, source row per pair")
    n_pairs = arts["pair_index"].shape[0]
    if arts["pair_index"].shape[1] != 2:
        raise ArtifactError(
            f"{arts['pair_index'].path}: should have shape [N_pairs, 2], but has "
            f"{list(arts['pair_index'].shape)}. Re-run the dataset builder."
        )
    pair_level = {
        "pair_cluster_id": _INT_SOURCES,
        "pair_relevance": _FLOAT_SOURCES,
        "centroid_distances": _FLOAT_SOURCES,
    }
    for name, kinds in pair_level.items():
        _expect(arts[name], 1, kinds, "one value per pair")
    for name in ("hard_negatives", "negative_tiers"):
        _expect(arts[name], 2, _INT_SOURCES, "[N_pairs, n_neg]")
    for name in [*pair_level, *steer, "hard_negatives", "negative_tiers"]:
        if arts[name].shape[0] != n_pairs:
            raise ArtifactError(
                f"{arts[name].path}: should have {n_pairs} rows (one per pair, as "
                f"pair_index.pt has), but has {arts[name].shape[0]}. Re-run the dataset builder."
            )
    n_neg = arts["hard_negatives"].shape[1]
    if arts["negative_tiers"].shape != arts["hard_negatives"].shape:
        raise ArtifactError(
            f"{arts['negative_tiers'].path}: shape {list(arts['negative_tiers'].shape)} "
            f"should equal hard_negatives' {list(arts['hard_negatives'].shape)}. Re-run the miner."
        )
    if config.get("n_neg") is not None and config["n_neg"] != n_neg:
        raise ConfigError(
            f"{src / 'config.json'}: n_neg={config['n_neg']}, but hard_negatives.pt has "
            f"{n_neg} negatives per pair. Fix config.json or the negatives."
        )
    for name in ("train_idx", "val_idx", "test_idx"):
        if name in arts:
            _expect(arts[name], 1, _INT_SOURCES, "pair rows of the split")
    for key, name in COUNT_KEYS.items():
        if config.get(key) is not None and config[key] != arts[name].shape[0]:
            raise ConfigError(
                f"{src / 'config.json'}: {key}={config[key]}, but {arts[name].path.name} has "
                f"{arts[name].shape[0]} rows. The files are the truth: fix config.json."
            )
    for art in arts.values():
        if art.dtype == "torch.float64":
            log.warning("%s: float64 is cast to float32", art.path)
    return {
        "embedding_dim": dims.pop(),
        "n_neg": n_neg,
        "n_pairs": n_pairs,
        "n_questions": arts["question_embs"].shape[0],
        "n_sources": arts["source_embs"].shape[0],
        "n_keywords": arts["keyword_embs"].shape[0],
        "n_clusters": arts["centroid_embs"].shape[0],
    }


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


def _stream_tensor(p: _Planned, writer, limits, allow_nonfinite, block_bytes, progress) -> dict:
    art = p.art
    stats = Stats()
    split = SplitCheck(art.path, limits["n_pairs"]) if p.spec.role == "split" else None
    rows = max(1, block_bytes // max(1, art.row_bytes))
    for start, block in _prefetched_blocks(art, rows):
        if block.dtype.byteorder == ">":
            block = block.astype(block.dtype.newbyteorder("<"))
        if art.dtype == "torch.bfloat16":
            block = to_float32(block.view(np.uint16), "bfloat16")
        if p.out == "float32":
            block = block.astype(np.float32, copy=False)
            check_block(art.path, p.spec.name, block, start, limits, stats, allow_nonfinite)
        else:
            block = block.astype(np.int64, copy=False)
            check_block(art.path, p.spec.name, block, start, limits, stats, False)
            if split is not None:
                split.update(block, start)
        writer.write(p.spec.name, to_stored(block, p.stored))
        progress.update(block.shape[0] * art.row_bytes, p.spec.name)
    if split is not None:
        split.finish()
    return stats.as_dict()


def _write_units(
    tmp, units, writer, arts, limits, kw_future, allow_nonfinite, block_bytes, progress
):
    entries: dict[str, dict[str, Any]] = {}
    stats: dict[str, dict[str, Any]] = {}
    for unit in UNIT_ORDER:
        planned = units[unit]
        if not planned:
            continue
        name_unit = f"{NEGATIVES_DIR}/{generation_name(0)}" if unit == NEGATIVES_DIR else unit
        if unit == "pairs":
            kw = kw_future.result()
            for p in planned:
                if p.spec.name == "pair_keyword_values":
                    p.shape = (kw["nnz"],)
        writer.begin_unit(name_unit, [(p.spec.name, p.shape, p.stored) for p in planned])
        for p in planned:
            if p.art is not None:
                stats[p.spec.name] = _stream_tensor(
                    p, writer, limits, allow_nonfinite, block_bytes, progress
                )
            else:
                stats[p.spec.name] = _copy_keywords(tmp, p, writer, kw, block_bytes, progress)
        for name, e in writer.end_unit().items():
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


def _check_source(src: Path) -> None:
    """SRC must be a dataset directory; say what was probably meant when it is not."""
    if is_store(src):
        raise ArtifactError(
            f"{src}: is already a jasper_mmap store, not a dataset directory of .pt files. "
            f"Open it directly (JASPERSteeringDataset({str(src)!r}, ...)); to change its format "
            f"or precision, convert the original .pt directory it was made from."
        )
    if src.is_file():
        hint = (
            f" Did you mean its directory, {src.parent}?" if (src.parent / CONFIG).is_file() else ""
        )
        raise ArtifactError(
            f"{src}: is a file; convert-pt takes the dataset directory that holds config.json "
            f"and the .pt files.{hint}"
        )
    if not src.is_dir():
        raise ArtifactMissingError(
            f"{src}: dataset directory does not exist. Check the path; it should hold "
            f"config.json and the .pt files (docs/dataset_format.md)."
        )


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
    """Convert the ``.pt`` dataset directory ``src`` into a store at ``dst``.

    Args:
        src: dataset directory (``config.json`` + ``.pt`` artifacts; see FORMAT.md).
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

    Returns:
        The store path.

    Raises:
        ArtifactMissingError, ArtifactError, ConfigError: bad input, named in the message.
        StoreExistsError: ``dst`` is a store and ``overwrite`` is false; ``dst`` is, or holds,
            ``src``; ``dst`` is a file or a non-empty directory that is not a store; another
            process published at ``dst`` meanwhile.
    """
    src, dst = Path(src).expanduser().absolute(), Path(dst).expanduser().absolute()
    if format not in FORMATS:
        raise ValueError(f"format should be one of {FORMATS}, but got format={format!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype should be one of {DTYPES}, but got dtype={dtype!r}")
    _check_source(src)
    t0 = time.perf_counter()
    config = read_config(src)
    dst = check_destination(dst, overwrite=overwrite, inputs=[src])  # NOTE [never destroy ...]
    remove_stale_partials(dst)
    arts = _open_all(src)
    counts = _check_shapes(src, arts, config)
    kw_path = src / "pair_keyword_ids.pt"
    if not kw_path.exists():
        raise ArtifactMissingError(
            f"{kw_path}: required artifact is missing. Re-run the dataset builder."
        )
    try:
        tmp = partial_dir(dst)
    except OSError as e:
        raise write_error(dst.parent, e, "a temporary directory for the store") from e
    bar = None
    kw_future = None
    try:
        kw_future = KeywordJob(str(kw_path), str(tmp), counts["n_pairs"], counts["n_keywords"])
        units = _plan(arts, dtype, 0, counts["n_pairs"])
        total = sum(a.nbytes for a in arts.values()) + kw_path.stat().st_size
        bar = _Progress(total, progress)
        writer = WRITERS[format](tmp)
        limits = dict(counts)
        entries = _write_units(
            tmp, units, writer, arts, limits, kw_future, allow_nonfinite, block_bytes, bar
        )
        kw = kw_future.result()
        counts["n_keyword_values"] = kw["nnz"]
        bar.update(kw_path.stat().st_size, "verify")
        sources = source_fingerprints(src)
        shutil.copyfile(src / CONFIG, tmp / CONFIG)
        write_store_metadata(
            tmp,
            format,
            entries,
            counts,
            writer="jasper_mmap.convert_pt",
            source={"dir": str(src), "files": sources},
            dtype_option=dtype,
        )
        _verify(tmp, units)
        fsync_tree(tmp)
        publish_dir(tmp, dst, replace=overwrite)
    except BaseException as e:
        if bar is not None:
            bar.close()
        if kw_future is not None:
            kw_future.cancel()
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, JasperError):
            raise write_error(dst, e, "the store") from e
        raise
    bar.close()
    kw_future.cancel()
    log.debug("converted %s -> %s (%s, %.1f s)", src, dst, format, time.perf_counter() - t0)
    return dst
