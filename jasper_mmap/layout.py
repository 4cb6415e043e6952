"""The store layout: which arrays a store holds, in which unit, and its manifest.

A store is a directory::

    manifest.json            format name + version, arrays, counts, integrity facts, sources
    config.json              the dataset's config.json, passed through unchanged
    <unit>.safetensors ...   (safetensors backend) one file per unit below
    data.zarr/               (zarr backend) one zarr v3 group, one array per name
    negatives/CURRENT.json   pointer to the live negatives generation
    negatives/gen-000000.*   one immutable generation: hard_negatives + negative_tiers

# NOTE [negatives generations]
``hard_negatives`` and ``negative_tiers`` always change together, so they live in their own
unit, one immutable file (safetensors) or group (zarr) per *generation*. ``CURRENT.json`` names
the live generation and is replaced with one atomic ``os.replace``; a generation is never
rewritten in place, so a reader that mapped it keeps valid data until it lets go. The manifest
describes the generation written by the converter; later generations are described by their
pointer file. The hot-reload code builds on this.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._atomic import (
    moved_aside_advice,
    partial_name,
    settle_swapped_out,
    swapped_out,
    swapped_out_advice,
)
from .errors import JasperError, StoreFormatError, StoreNotFoundError, write_error
from .files import read_json

log = logging.getLogger(__name__)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST",
    "CONFIG",
    "NEGATIVES_DIR",
    "POINTER",
    "ArraySpec",
    "ARRAYS",
    "FLOAT_ROLES",
    "SPLITS",
    "load_manifest",
    "read_manifest",
    "write_json_atomic",
    "read_pointer",
    "generation_name",
    "write_store_metadata",
]

FORMAT_NAME = "jasper-mmap-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CONFIG = "config.json"
NEGATIVES_DIR = "negatives"
POINTER = "CURRENT.json"


@dataclass(frozen=True)
class ArraySpec:
    """One array of a store.

    Attributes:
        name: array name in the store (also the safetensors key / zarr array name).
        source: ``.pt`` file it comes from (``None`` for arrays derived from another file).
        unit: the file (safetensors) or group prefix it lives in.
        role: ``embedding`` and ``steering`` (float, can be stored at reduced precision),
            ``float`` (float32 kept exact), ``index`` (int64), ``split``, ``negatives``.
        ndim: number of dimensions.
        required: whether a dataset directory must provide it.
    """

    name: str
    source: str | None
    unit: str
    role: str
    ndim: int
    required: bool = True


ARRAYS: tuple[ArraySpec, ...] = (
    ArraySpec("question_embs", "question_embs.pt", "embeddings", "embedding", 2),
    ArraySpec("source_embs", "source_embs.pt", "embeddings", "embedding", 2),
    ArraySpec("keyword_embs", "keyword_embs.pt", "embeddings", "embedding", 2),
    ArraySpec("centroid_embs", "centroid_embs.pt", "embeddings", "embedding", 2),
    ArraySpec("pair_index", "pair_index.pt", "pairs", "index", 2),
    ArraySpec("pair_cluster_id", "pair_cluster_id.pt", "pairs", "index", 1),
    ArraySpec("pair_relevance", "pair_relevance.pt", "pairs", "float", 1),
    ArraySpec("centroid_distances", "centroid_distances.pt", "pairs", "float", 1),
    ArraySpec("pair_keyword_offsets", "pair_keyword_ids.pt", "pairs", "index", 1),
    ArraySpec("pair_keyword_values", None, "pairs", "index", 1),
    ArraySpec("steering_centroid", "steering_centroid.pt", "steering", "steering", 2),
    ArraySpec(
        "steering_keyword_weighted", "steering_keyword_weighted.pt", "steering", "steering", 2
    ),
    ArraySpec("steering_residual", "steering_residual.pt", "steering", "steering", 2),
    ArraySpec("train_idx", "train_idx.pt", "splits", "split", 1),
    ArraySpec("val_idx", "val_idx.pt", "splits", "split", 1, required=False),
    ArraySpec("test_idx", "test_idx.pt", "splits", "split", 1, required=False),
    ArraySpec("hard_negatives", "hard_negatives.pt", NEGATIVES_DIR, "negatives", 2),
    ArraySpec("negative_tiers", "negative_tiers.pt", NEGATIVES_DIR, "negatives", 2),
)

#: roles whose arrays may be stored as float16/bfloat16 (readers always return float32)
FLOAT_ROLES = ("embedding", "steering")

SPLITS = ("train", "val", "test")


#: generation numbers are below this: the control block's slot is an int64, and a publish adds
#: one to the largest number in use, so a stray ``gen-<huge>`` name is ignored, never followed
MAX_GENERATION = 2**62


def generation_name(generation: int) -> str:
    """Return the file/group stem of negatives generation ``generation``."""
    return f"gen-{generation:06d}"


def write_json_atomic(path: Path, obj: Any, what: str | None = None) -> None:
    """Write ``obj`` as JSON to ``path`` via a temporary file and one atomic ``os.replace``.

    On any failure the temporary file is removed and ``path`` is left as it was.

    Raises:
        StoreWriteError: the disk is full, the filesystem read-only, permission denied.
        OSError, TypeError, ValueError: anything else (``obj`` not JSON-serializable...).
    """
    path = Path(path)
    tmp = path.with_name(partial_name(path.name))
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink()
        except OSError:
            pass  # never created, or already renamed
        if isinstance(e, OSError) and not isinstance(e, JasperError):
            raise write_error(path, e, what or path.name) from e
        raise


def _read_json(path: Path, what: str, fix: str, dir_fd: int | None = None) -> dict[str, Any]:
    """A JSON object from ``path`` (relative to ``dir_fd`` when given), through
    :func:`~jasper_mmap.files.read_json` (NOTE [regular files only])."""
    obj = read_json(path, what=what, fix=fix, dir_fd=dir_fd)
    if not isinstance(obj, dict):
        raise StoreFormatError(
            f"{path}: {what} should be a JSON object, but got {type(obj).__name__}. {fix}"
        )
    return obj


def _restore_swapped_out(store_dir: Path) -> None:
    """Put back the store a killed ``--overwrite`` moved aside, where nothing is at its path
    (NOTE [a killed replacement] in _atomic.py); where that cannot be done (a read-only
    parent), the error that follows names it."""
    try:
        settle_swapped_out(Path(store_dir).expanduser().absolute().resolve())
    except (JasperError, OSError, RuntimeError) as e:
        log.warning(
            "%s: could not restore the store a killed replacement moved aside (%s)", store_dir, e
        )


def load_manifest(store_dir: Path) -> dict[str, Any]:
    """Read a store's manifest and check it is ours (format name) and of a version we read.

    Its contents are not checked further: see :func:`read_manifest`.

    Raises:
        StoreNotFoundError: the directory or its manifest does not exist.
        StoreFormatError: the manifest is not a regular file (NOTE [regular files only] in
            files.py), not JSON (or nested too deeply, or too large), not ours, or of a newer
            version.
    """
    store_dir = Path(store_dir)
    if not store_dir.exists():
        _restore_swapped_out(store_dir)
    if not store_dir.exists():
        real = Path(store_dir).expanduser().absolute().resolve()
        left = swapped_out(real)
        if left:
            raise StoreNotFoundError(
                f"{store_dir}: store directory does not exist: "
                f"{swapped_out_advice(store_dir, *left[0])}"
            )
        aside = moved_aside_advice(real)  # another namespace's, or a running (reused) PID's
        if aside:
            raise StoreNotFoundError(f"{store_dir}: store directory does not exist. {aside}")
        raise StoreNotFoundError(
            f"{store_dir}: store directory does not exist. Check the path, or create a store "
            f"there with `convert-pt SRC {store_dir}`."
        )
    if not store_dir.is_dir():  # not `convert-pt SRC FILE`: convert-pt refuses a file there
        raise StoreNotFoundError(
            f"{store_dir}: is not a directory. Pass the store directory that holds "
            f"manifest.json (one made by `convert-pt DATASET_DIR STORE`), not a file."
        )
    path = store_dir / MANIFEST
    if not path.exists() and (store_dir / CONFIG).is_file() and any(store_dir.glob("*.pt")):
        raise StoreNotFoundError(
            f"{path}: manifest.json is missing: {store_dir} is a .pt dataset directory, not a "
            f"store. Convert it with `convert-pt {store_dir} STORE` (STORE: a new directory), or "
            f"open {store_dir} directly (JASPERSteeringDataset converts it once)."
        )
    not_ours = (
        f"{store_dir} is not a jasper_mmap store, or its manifest is damaged. Check the path; "
        f"a damaged store must be converted again from its .pt dataset."
    )
    manifest = _read_json(path, "manifest.json", not_ours)
    if manifest.get("format") != FORMAT_NAME:
        raise StoreFormatError(
            f"{path}: format should be {FORMAT_NAME!r}, but got "
            f"format={manifest.get('format')!r:.60}. {not_ours}"
        )
    version = manifest.get("format_version")
    if type(version) is not int or version < 1 or version > FORMAT_VERSION:
        raise StoreFormatError(
            f"{path}: format_version should be an integer in 1..{FORMAT_VERSION}, but got "
            f"format_version={version!r:.40}. Upgrade jasper_mmap, or re-create the store with "
            f"`convert-pt SRC {store_dir} --overwrite`."
        )
    return manifest


def read_manifest(store_dir: Path) -> dict[str, Any]:
    """Read a store's manifest and check its structure and the sizes of its data files.

    Checks what :func:`load_manifest` checks, then the types of every field and array entry,
    required arrays, dtypes, shapes against ``counts``, and that every recorded data file
    exists with its recorded size (O(number of files); see ``jasper_mmap.integrity``).

    Raises:
        StoreNotFoundError: the directory, its manifest or a data file does not exist.
        StoreFormatError: the manifest is not ours, of a newer version, or malformed.
        StoreCorruptError: a data file's size differs from the recorded one.
    """
    from .integrity import file_problems
    from .schema import manifest_problems, raise_problems, store_fix

    store_dir = Path(store_dir)
    manifest = load_manifest(store_dir)
    problems = manifest_problems(store_dir, manifest)
    if not problems:
        fix = store_fix(store_dir, manifest)
        where = str(store_dir / MANIFEST)
        problems = file_problems(store_dir, manifest["files"], where, fix=fix)
    raise_problems(problems, store_dir)
    return manifest


def read_pointer(
    store_dir: Path, generation: int | None = None, *, check: bool = True
) -> dict[str, Any]:
    """Read the description of a negatives generation.

    With ``generation=None``: ``negatives/CURRENT.json``, the live generation. Otherwise
    ``negatives/gen-NNNNNN.json``, the description every generation keeps beside its data.
    With ``check`` (default) its structure is checked: ``generation``, both arrays' entries
    (types, known dtypes), ``files``; not its data files (``integrity.generation_problems``).

    Raises:
        StoreNotFoundError: the file is missing (a generation removed after newer ones).
        StoreFormatError: it is not a regular file, not valid JSON, or malformed.
    """
    from .schema import pointer_problems, raise_problems, store_fix

    name = POINTER if generation is None else f"{generation_name(generation)}.json"
    path = Path(store_dir) / NEGATIVES_DIR / name
    fix = f"Publish the negatives again (publish_negatives), or {store_fix(store_dir)[0].lower()}"
    fix += store_fix(store_dir)[1:]
    pointer = _read_json(path, "negatives generation description", fix)
    if check:
        raise_problems(pointer_problems(path, pointer, fix), store_dir)
    return pointer


def write_store_metadata(
    tmp: Path,
    backend: str,
    entries: dict[str, dict[str, Any]],
    counts: dict[str, int],
    *,
    writer: str,
    source: dict[str, Any],
    dtype_option: str = "keep",
    warnings: list[str] | None = None,
) -> None:
    """Write generation 0's description, ``negatives/CURRENT.json`` and ``manifest.json``.

    ``entries`` holds every array's manifest entry, negatives included (they move into the
    generation's description). ``source["files"]`` are the fingerprints of the inputs.
    ``warnings`` (lenient-input notices of the converter) are recorded for ``jasper-mmap
    info``/``verify`` to show. Every data file is recorded with its size: the manifest's
    ``files``, and the generation's own ``files`` (NOTE [recorded files] in integrity.py). The
    manifest's ``store_id`` is a random token naming this conversion (NOTE [store identity]).
    """
    import secrets
    import time

    from . import __version__
    from .integrity import data_files, entry_files

    entries = dict(entries)
    neg = {k: entries.pop(k) for k in ("hard_negatives", "negative_tiers")}
    files = source.get("files", {})
    pointer = {
        "generation": 0,
        "arrays": neg,
        "created_unix": time.time(),
        "files": entry_files(tmp, neg),
        "sources": {k: files[k] for k in ("hard_negatives.pt", "negative_tiers.pt") if k in files},
    }
    write_json_atomic(tmp / NEGATIVES_DIR / f"{generation_name(0)}.json", pointer)
    write_json_atomic(tmp / NEGATIVES_DIR / POINTER, pointer)
    groups = [r for r in (f"{NEGATIVES_DIR}/zarr.json",) if (tmp / r).is_file()]
    manifest = {
        "files": {**entry_files(tmp, entries), **data_files(tmp, groups)},
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "backend": backend,
        "converter": {"name": writer, "version": __version__},
        "created_unix": time.time(),
        "dtype_option": dtype_option,
        "counts": counts,
        "splits": {s: entries[f"{s}_idx"]["shape"][0] for s in SPLITS if f"{s}_idx" in entries},
        "arrays": entries,
        "negatives_initial": neg,
        "source": source,
        "store_id": secrets.token_hex(16),  # NOTE [store identity] in stores/base.py
        "warnings": list(warnings or []),
    }
    write_json_atomic(tmp / MANIFEST, manifest)
