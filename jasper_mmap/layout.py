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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import StoreCorruptError, StoreFormatError, StoreNotFoundError

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


def generation_name(generation: int) -> str:
    """Return the file/group stem of negatives generation ``generation``."""
    return f"gen-{generation:06d}"


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` via a temporary file and one atomic ``os.replace``."""
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: Path, what: str, fix: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise StoreNotFoundError(f"{path}: {what} is missing. {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreFormatError(f"{path}: {what} is not valid JSON ({e}). {fix}") from None
    if not isinstance(obj, dict):
        raise StoreFormatError(
            f"{path}: {what} should be a JSON object, but got {type(obj).__name__}. {fix}"
        )
    return obj


def read_manifest(store_dir: Path) -> dict[str, Any]:
    """Read and check a store's manifest: format name, version and the keys readers need.

    Raises:
        StoreNotFoundError: the directory or its manifest does not exist.
        StoreFormatError: the manifest is not ours, of a newer version, or incomplete.
    """
    store_dir = Path(store_dir)
    if not store_dir.is_dir():
        kind = "is not a directory" if store_dir.exists() else "does not exist"
        raise StoreNotFoundError(
            f"{store_dir}: store directory {kind}. Create it with `convert-pt SRC {store_dir}`."
        )
    fix = f"Re-create the store with `convert-pt SRC {store_dir} --overwrite`."
    manifest = _read_json(store_dir / MANIFEST, "manifest.json", fix)
    if manifest.get("format") != FORMAT_NAME:
        raise StoreFormatError(
            f"{store_dir / MANIFEST}: format should be {FORMAT_NAME!r}, "
            f"but got format={manifest.get('format')!r}. This is not a jasper_mmap store. {fix}"
        )
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1 or version > FORMAT_VERSION:
        raise StoreFormatError(
            f"{store_dir / MANIFEST}: format_version should be an integer in 1..{FORMAT_VERSION}, "
            f"but got format_version={version!r}. Upgrade jasper_mmap or {fix[0].lower()}{fix[1:]}"
        )
    for key, kind in (("backend", str), ("arrays", dict), ("counts", dict), ("files", dict)):
        if not isinstance(manifest.get(key), kind):
            raise StoreFormatError(
                f"{store_dir / MANIFEST}: key {key!r} should be a {kind.__name__}, but got "
                f"{type(manifest.get(key)).__name__}. {fix}"
            )
    _check_sizes(store_dir, manifest["files"], fix)
    return manifest


def _check_sizes(store_dir: Path, sizes: dict[str, int], fix: str) -> None:
    """O(number of files): every data file exists with the size recorded at conversion."""
    for rel, want in sizes.items():
        if (
            type(want) is not int
            or not rel
            or "\0" in rel
            or Path(rel).is_absolute()
            or ".." in Path(rel).parts
        ):
            raise StoreFormatError(
                f"{store_dir / MANIFEST}: 'files' should map relative paths inside the store "
                f"to sizes, but has {rel!r}: {want!r}. {fix}"
            )
        path = store_dir / rel
        try:
            got = path.stat().st_size
        except FileNotFoundError:
            raise StoreNotFoundError(
                f"{path}: store file is missing (the manifest lists it). {fix}"
            ) from None
        if got != want:
            raise StoreCorruptError(
                f"{path}: file is {got} bytes, but the manifest records {want} (truncated, "
                f"appended to or replaced). {fix}"
            )


def read_pointer(store_dir: Path, generation: int | None = None) -> dict[str, Any]:
    """Read the description of a negatives generation.

    With ``generation=None``: ``negatives/CURRENT.json``, the live generation. Otherwise
    ``negatives/gen-NNNNNN.json``, the description every generation keeps beside its data.

    Raises:
        StoreNotFoundError: the file is missing (a generation removed after newer ones).
        StoreFormatError: it is not valid JSON or lacks ``generation``/``arrays``.
    """
    name = POINTER if generation is None else f"{generation_name(generation)}.json"
    path = Path(store_dir) / NEGATIVES_DIR / name
    fix = f"Re-create the store with `convert-pt SRC {store_dir} --overwrite`."
    pointer = _read_json(path, "negatives generation description", fix)
    if not isinstance(pointer.get("generation"), int) or not isinstance(
        pointer.get("arrays"), dict
    ):
        raise StoreFormatError(
            f"{path}: should hold an integer 'generation' and an 'arrays' object, "
            f"but got keys {sorted(pointer)}. {fix}"
        )
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
) -> None:
    """Write generation 0's description, ``negatives/CURRENT.json`` and ``manifest.json``.

    ``entries`` holds every array's manifest entry, negatives included (they move into the
    generation's description). ``source["files"]`` are the fingerprints of the inputs.
    """
    import time

    from . import __version__

    entries = dict(entries)
    neg = {k: entries.pop(k) for k in ("hard_negatives", "negative_tiers")}
    files = source.get("files", {})
    pointer = {
        "generation": 0,
        "arrays": neg,
        "created_unix": time.time(),
        "sources": {k: files[k] for k in ("hard_negatives.pt", "negative_tiers.pt") if k in files},
    }
    write_json_atomic(tmp / NEGATIVES_DIR / f"{generation_name(0)}.json", pointer)
    write_json_atomic(tmp / NEGATIVES_DIR / POINTER, pointer)
    sizes = {
        e["file"]: (tmp / e["file"]).stat().st_size
        for e in entries.values()
        if (tmp / e["file"]).is_file()
    }
    manifest = {
        "files": sizes,
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
    }
    write_json_atomic(tmp / MANIFEST, manifest)
