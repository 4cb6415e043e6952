"""The schema of a store's manifest and negatives descriptions, checked field by field.

Each check returns a list of :class:`Problem` (never raises), so that opening a store can raise
the first and ``jasper-mmap verify`` can list them all (see ``jasper_mmap.format.integrity``). Nothing
here reads a file: these functions look at parsed JSON only.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jasper_mmap._fs.files import read_json
from jasper_mmap.errors import JasperError, StoreFormatError
from jasper_mmap.format.dtypes import STORED_DTYPES
from jasper_mmap.format.spec import (
    ARRAYS,
    BACKEND_NAMES,
    COUNT_KEYS,
    FLOAT_ROLES,
    MANIFEST,
    MAX_GENERATION,
    NEGATIVE_ARRAYS,
    NEGATIVES_DIR,
    POINTER,
    SPECS,
    SPLITS,
)

__all__ = [
    "Problem",
    "bad_rel",
    "counts_problems",
    "description_field_problems",
    "entry_problems",
    "expected_shape",
    "is_count",
    "is_time",
    "manifest_problems",
    "pointer_problems",
    "raise_problems",
    "shape_problems",
    "source_findings",
    "sources_problem",
    "store_fix",
    "store_replaced",
    "type_name",
]

_MAX_CRC = 2**32


@dataclass(frozen=True)
class Problem:
    """One structural problem of a store.

    Attributes:
        error: the error class it raises at open (a :class:`JasperError` subclass).
        message: names the file, the problem and the fix.
        arrays: the arrays it concerns; empty when it concerns the whole store.
    """

    error: type[JasperError]
    message: str
    arrays: tuple[str, ...] = ()

    def exception(self) -> JasperError:
        """The error to raise for this problem."""
        return self.error(self.message)


def raise_problems(problems: list[Problem], store_dir: str | Path) -> None:
    """Raise the first of ``problems`` (its class), mentioning how many more there are."""
    if not problems:
        return
    first = problems[0]
    more = (
        ""
        if len(problems) == 1
        else f" ({len(problems) - 1} more problem(s); `jasper-mmap verify {store_dir}` lists all)"
    )
    raise first.error(first.message + more)


def store_fix(store_dir: str | Path, manifest: Any = None) -> str:
    """The fix for a damaged store of ours: convert its source again over it.

    Unless ``store_dir`` is no longer the store ``manifest`` describes (replaced since it was
    read, e.g. by ``convert-pt --overwrite`` of another dataset): converting the old source
    over it would destroy a store the user made on purpose, so the fix is to open it again.
    """
    if isinstance(manifest, dict) and store_replaced(store_dir, manifest):
        return (
            f"The store at {store_dir} was replaced by another conversion after this process "
            f"opened it; it is not damaged. Open it again (a new dataset) to read the new "
            f"store, or convert your data to another path; do not convert over it."
        )
    src, fmt = "SRC", ""
    if isinstance(manifest, dict):
        source = manifest.get("source")
        if isinstance(source, dict) and isinstance(source.get("dir"), str) and source["dir"]:
            src = shlex.quote(source["dir"])
        if manifest.get("backend") == "zarr":
            fmt = " --format zarr"
    dst = shlex.quote(str(store_dir))
    return f"Re-create the store with `convert-pt {src} {dst}{fmt} --overwrite`."


def store_replaced(store_dir: str | Path, manifest: dict[str, Any]) -> bool:
    """Whether the manifest on disk at ``store_dir`` is another conversion's than ``manifest``
    (unreadable or absent: not known to be, so False)."""
    try:  # never blocks on a FIFO; nesting bounded (NOTE [regular files only] in jasper_mmap/_fs/files.py)
        on_disk = read_json(Path(store_dir) / MANIFEST, what="manifest", fix="")
    except (JasperError, OSError):
        return False
    keys = ("created_unix", "source", "counts", "backend")
    return isinstance(on_disk, dict) and any(on_disk.get(k) != manifest.get(k) for k in keys)


def bad_rel(rel: Any) -> bool:
    """Whether ``rel`` is not a usable path inside a store."""
    if not isinstance(rel, str) or not rel or rel[0] == "/" or "\0" in rel:
        return True
    return ".." in rel and ".." in rel.split("/")


def is_count(v: Any) -> bool:
    """Whether ``v`` is a non-negative integer (not a bool)."""
    return type(v) is int and v >= 0


def type_name(v: Any) -> str:
    """The name of ``v``'s type, for messages."""
    return type(v).__name__


def entry_problems(name: str, entry: Any, where: str, fix: str) -> list[Problem]:
    """Types and values of one array entry (``file``, ``key``, ``shape``, dtypes, ``crc32``...)."""
    spec = SPECS.get(name)
    if spec is None:
        known = ", ".join(SPECS)
        return [
            Problem(
                StoreFormatError,
                f"{where}: lists an array {name!r} that no store has (arrays are {known}). {fix}",
                (name,),
            )
        ]
    if not isinstance(entry, dict):
        return [
            Problem(
                StoreFormatError,
                f"{where}: the entry of {name!r} should be an object, but got "
                f"{type_name(entry)} {entry!r:.60}. {fix}",
                (name,),
            )
        ]
    found = []
    for key in ("file", "key", "stored_dtype", "dtype"):
        if not isinstance(entry.get(key), str):
            found.append(f"{key!r} should be a string, but got {entry.get(key)!r:.40}")
    rel = entry.get("file")
    if isinstance(rel, str) and bad_rel(rel):
        found.append(f"'file' should be a relative path inside the store: {rel!r}")
    elif isinstance(rel, str) and not (rel.endswith(".safetensors") or rel.split("/")[-1] == name):
        found.append(f"'file' should be a .safetensors file or the zarr array {name!r}: {rel!r}")
    if isinstance(entry.get("key"), str) and entry["key"] != name:
        found.append(f"'key' should be {name!r}, but is {entry['key']!r}")
    found += _dtype_findings(spec, entry)
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(is_count(d) for d in shape):
        found.append(f"'shape' should be a list of non-negative integers, but got {shape!r:.60}")
    elif len(shape) != spec.ndim:
        found.append(f"'shape' should have {spec.ndim} dimension(s), but is {shape}")
    found += _optional_findings(entry)
    return [
        Problem(StoreFormatError, f"{where}: array {name!r}: {f}. {fix}", (name,)) for f in found
    ]


def _dtype_findings(spec, entry: dict[str, Any]) -> list[str]:
    stored, logical = entry.get("stored_dtype"), entry.get("dtype")
    allowed = ("float32", "float16", "bfloat16") if spec.role in FLOAT_ROLES else None
    if allowed is None:
        allowed = ("float32",) if spec.role == "float" else ("int64",)
    found = []
    if isinstance(stored, str) and stored not in allowed:
        what = "unknown" if stored not in STORED_DTYPES else "not allowed for this array"
        found.append(f"'stored_dtype' {stored!r} is {what} (should be one of {list(allowed)})")
    want = "int64" if allowed == ("int64",) else "float32"
    if isinstance(logical, str) and logical != want:
        found.append(f"'dtype' (what readers return) should be {want!r}, but is {logical!r}")
    return found


def _optional_findings(entry: dict[str, Any]) -> list[str]:
    """What is wrong with an entry's optional fields (``crc32``, ``stats``, ``data_offsets``...)."""
    found = []
    crc = entry.get("crc32")
    if "crc32" in entry and not (type(crc) is int and 0 <= crc < _MAX_CRC):
        found.append(f"'crc32' should be an integer in [0, 2**32), but got {crc!r:.40}")
    shards = entry.get("shard_crc32")
    if "shard_crc32" in entry and not (
        isinstance(shards, list) and all(type(c) is int and 0 <= c < _MAX_CRC for c in shards)
    ):
        found.append(f"'shard_crc32' should be a list of crc32 values, but got {shards!r:.40}")
    if "stats" in entry and not isinstance(entry["stats"], dict):
        found.append(f"'stats' should be an object, but got {entry['stats']!r:.40}")
    for key in ("source", "source_dtype"):
        if entry.get(key) is not None and not isinstance(entry[key], str):
            found.append(f"{key!r} should be a string or null, but got {entry[key]!r:.40}")
    offsets = entry.get("data_offsets")
    if "data_offsets" in entry and not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(is_count(v) for v in offsets)
        and offsets[0] <= offsets[1]
    ):
        found.append(
            f"'data_offsets' should be [begin, end] with 0 <= begin <= end: {offsets!r:.40}"
        )
    return found


def expected_shape(name: str, counts: dict[str, int]) -> tuple[int | None, ...]:
    """The shape array ``name`` must have for ``counts`` (``None``: any length)."""
    d, p = counts["embedding_dim"], counts["n_pairs"]
    rows = {
        "question_embs": counts["n_questions"],
        "source_embs": counts["n_sources"],
        "keyword_embs": counts["n_keywords"],
        "centroid_embs": counts["n_clusters"],
    }
    if name in rows:
        return (rows[name], d)
    if name.startswith("steering_"):
        return (p, d)
    if name in NEGATIVE_ARRAYS:
        return (p, counts["n_neg"])
    return {
        "pair_index": (p, 2),
        "pair_keyword_offsets": (p + 1,),
        "pair_keyword_values": (counts["n_keyword_values"],),
    }.get(name, (None,) if name.endswith("_idx") else (p,))


def shape_problems(
    name: str, entry: Any, counts: dict[str, int], where: str, fix: str
) -> list[Problem]:
    """The entry's shape against ``counts`` (entries already checked by ``entry_problems``)."""
    want = expected_shape(name, counts)
    shape = entry["shape"]
    if name.endswith("_idx") and shape[0] > counts["n_pairs"]:
        return [
            Problem(
                StoreFormatError,
                f"{where}: split {name!r} has {shape[0]} rows, more than n_pairs="
                f"{counts['n_pairs']} (a split lists each pair once). {fix}",
                (name,),
            )
        ]
    if all(w is None or w == s for w, s in zip(want, shape, strict=True)):
        return []
    shown = [("any" if w is None else w) for w in want]
    return [
        Problem(
            StoreFormatError,
            f"{where}: array {name!r} has shape {shape}, but counts {_counts_text(counts)} "
            f"say it should be {shown}. {fix}",
            (name,),
        )
    ]


def _counts_text(counts: dict[str, int]) -> str:
    """The counts, for messages."""
    return ", ".join(f"{k}={counts[k]}" for k in COUNT_KEYS)


def counts_problems(counts: Any, where: str, fix: str) -> list[Problem]:
    """``counts`` is an object holding every count of ``COUNT_KEYS`` as an integer >= 0."""
    if not isinstance(counts, dict):
        return [
            Problem(
                StoreFormatError,
                f"{where}: 'counts' should be an object, but got {type_name(counts)}. {fix}",
            )
        ]
    bad = [
        f"{k}={counts.get(k, '(missing)')!r:.20}"
        for k in COUNT_KEYS
        if not is_count(counts.get(k)) or (k == "embedding_dim" and counts[k] < 1)
    ]
    if not bad:
        return []
    return [
        Problem(
            StoreFormatError,
            f"{where}: 'counts' should hold non-negative integers {', '.join(COUNT_KEYS)} "
            f"(embedding_dim at least 1), but has {', '.join(bad)}. {fix}",
        )
    ]


def _top_level_problems(manifest: dict[str, Any], where: str, fix: str) -> list[Problem]:
    """Types of the manifest's own fields (not the arrays and counts)."""
    found = []
    if not isinstance(manifest.get("backend"), str) or manifest["backend"] not in BACKEND_NAMES:
        found.append(
            f"'backend' should be one of {list(BACKEND_NAMES)}, but got "
            f"{manifest.get('backend')!r:.40} (a newer jasper_mmap may know it: upgrade)"
        )
    for key in ("arrays", "files"):
        if not isinstance(manifest.get(key), dict):
            found.append(f"{key!r} should be an object, but got {type_name(manifest.get(key))}")
    for key in ("splits", "negatives_initial", "converter", "source"):
        if key in manifest and not isinstance(manifest[key], dict):
            found.append(f"{key!r} should be an object, but got {type_name(manifest[key])}")
    splits = manifest.get("splits")
    if isinstance(splits, dict) and not all(k in SPLITS and is_count(v) for k, v in splits.items()):
        found.append(f"'splits' should map {list(SPLITS)} to row counts, but is {splits!r:.60}")
    warnings = manifest.get("warnings")
    if "warnings" in manifest and not (
        isinstance(warnings, list) and all(isinstance(w, str) for w in warnings)
    ):
        found.append(f"'warnings' should be a list of strings, but is {warnings!r:.60}")
    found += source_findings(manifest.get("source"))
    return [Problem(StoreFormatError, f"{where}: {f}. {fix}") for f in found]


def source_findings(source: Any) -> list[str]:
    """What is wrong with the manifest's ``source`` (read by ``resolve`` before any open)."""
    if not isinstance(source, dict):
        return []
    found = []
    if source.get("dir") is not None and not isinstance(source["dir"], str):
        found.append(f"'source.dir' should be a path or null, but is {source['dir']!r:.40}")
    files = source.get("files")
    if "files" in source and not (
        isinstance(files, dict) and all(isinstance(v, dict) for v in files.values())
    ):
        found.append(f"'source.files' should map file names to fingerprints: {files!r:.60}")
    return found


def manifest_problems(store_dir: Path, manifest: dict[str, Any]) -> list[Problem]:
    """Every structural problem of a parsed manifest of our format (no file is read).

    Checks the types of every field and of every array entry, that the required arrays are
    there, that dtypes are known and shapes agree with ``counts`` and ``splits``.
    """
    where = str(Path(store_dir) / MANIFEST)
    fix = store_fix(store_dir, manifest)
    problems = _top_level_problems(manifest, where, fix)
    problems += counts_problems(manifest.get("counts"), where, fix)
    arrays = manifest.get("arrays")
    if not isinstance(arrays, dict):
        return problems
    for spec in ARRAYS:
        if spec.required and spec.name not in NEGATIVE_ARRAYS and spec.name not in arrays:
            problems.append(
                Problem(
                    StoreFormatError,
                    f"{where}: required array {spec.name!r} is missing from 'arrays'. {fix}",
                    (spec.name,),
                )
            )
    counts_ok = not counts_problems(manifest.get("counts"), where, fix)
    for name, entry in arrays.items():
        if name in NEGATIVE_ARRAYS:
            problems.append(
                Problem(
                    StoreFormatError,
                    f"{where}: 'arrays' lists {name!r}, which lives in the negatives "
                    f"generations ({NEGATIVES_DIR}/{POINTER}). {fix}",
                )
            )
            continue
        found = entry_problems(name, entry, where, fix)
        problems += found
        if not found and counts_ok:
            problems += shape_problems(name, entry, manifest["counts"], where, fix)
    problems += _splits_agree(manifest, where, fix)
    return problems


def _splits_agree(manifest: dict[str, Any], where: str, fix: str) -> list[Problem]:
    splits, arrays = manifest.get("splits"), manifest["arrays"]
    if not isinstance(splits, dict):
        return []
    problems = []
    for s in SPLITS:
        entry = arrays.get(f"{s}_idx")
        shape = entry.get("shape") if isinstance(entry, dict) else None
        rows = shape[0] if isinstance(shape, list) and shape and is_count(shape[0]) else None
        if splits.get(s) != rows and not (s not in splits and entry is None):
            problems.append(
                Problem(
                    StoreFormatError,
                    f"{where}: 'splits' says {s}={splits.get(s)!r}, but the {s}_idx array "
                    f"has {rows if entry is not None else 'no entry'} rows. {fix}",
                    (f"{s}_idx",) if entry is not None else (),
                )
            )
    return problems


def pointer_problems(path: Path, pointer: dict[str, Any], fix: str) -> list[Problem]:
    """Structure of a negatives generation's description (``CURRENT.json``, ``gen-*.json``)."""
    where = str(path)
    g = pointer.get("generation")
    arrays = pointer.get("arrays")
    if type(g) is not int or not 0 <= g < MAX_GENERATION or not isinstance(arrays, dict):
        return [
            Problem(
                StoreFormatError,
                f"{where}: should hold a non-negative integer 'generation' (below 2**62) and an 'arrays' "
                f"object, but has generation={g!r:.20} and arrays of type "
                f"{type_name(arrays)}. {fix}",
            )
        ]
    problems = []
    for name in NEGATIVE_ARRAYS:
        if name not in arrays:
            problems.append(
                Problem(StoreFormatError, f"{where}: 'arrays' lacks {name!r}. {fix}", (name,))
            )
    for name, entry in arrays.items():
        if name not in NEGATIVE_ARRAYS:
            problems.append(
                Problem(
                    StoreFormatError,
                    f"{where}: 'arrays' should hold only {list(NEGATIVE_ARRAYS)}, but has "
                    f"{name!r}. {fix}",
                )
            )
            continue
        problems += entry_problems(name, entry, where, fix)
    problems += description_field_problems(pointer, where, fix)
    if "files" in pointer and not isinstance(pointer["files"], dict):
        problems.append(
            Problem(
                StoreFormatError,
                f"{where}: 'files' should be an object of relative paths to sizes, but got "
                f"{type_name(pointer['files'])}. {fix}",
            )
        )
    return problems


def is_time(v: Any) -> bool:
    """Whether ``v`` is a time in seconds since the epoch: a finite, non-negative number."""
    return type(v) in (int, float) and math.isfinite(v) and v >= 0


def sources_problem(sources: Any) -> str | None:
    """What is wrong with a generation's ``sources`` (the negatives files it took in: file
    name -> fingerprint object), or None."""
    if not isinstance(sources, dict):
        return f"should be an object of file names to fingerprints, but got {type_name(sources)}"
    for name, fp in sources.items():
        if fp is not None and not isinstance(fp, dict):
            return f"should map file names to fingerprint objects, but maps {name!r:.60} to {type_name(fp)}"
    return None


def description_field_problems(pointer: dict[str, Any], where: str, fix: str) -> list[Problem]:
    """``created_unix`` and ``sources`` of a generation's description (both optional: older
    versions wrote neither), as :mod:`jasper_mmap.dataset.resolve` uses them."""
    problems = []
    if "created_unix" in pointer and not is_time(pointer["created_unix"]):
        problems.append(
            Problem(
                StoreFormatError,
                f"{where}: 'created_unix' should be a finite, non-negative number of seconds, "
                f"but got {pointer['created_unix']!r:.40}. {fix}",
            )
        )
    if "sources" in pointer and (why := sources_problem(pointer["sources"])) is not None:
        problems.append(Problem(StoreFormatError, f"{where}: 'sources' {why}. {fix}"))
    return problems
