"""Reading and writing a store's manifest and its negatives generation descriptions."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from jasper_mmap._fs.files import read_json, write_json_atomic
from jasper_mmap._fs.partials import (
    moved_aside_advice,
    swapped_out,
    swapped_out_advice,
)
from jasper_mmap.errors import JasperError, StoreFormatError, StoreNotFoundError
from jasper_mmap.format.spec import (
    CONFIG,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    NEGATIVES_DIR,
    POINTER,
    SPLITS,
    generation_name,
)
from jasper_mmap.format.store_dirs import settle_swapped_out

__all__ = [
    "read_raw_manifest",
    "read_valid_manifest",
    "read_generation_desc",
    "write_store_metadata",
]

log = logging.getLogger(__name__)


def _read_json(path: Path, what: str, fix: str, dir_fd: int | None = None) -> dict[str, Any]:
    """A JSON object from ``path`` (relative to ``dir_fd`` when given), through
    :func:`~jasper_mmap._fs.files.read_json` (NOTE [regular files only])."""
    obj = read_json(path, what=what, fix=fix, dir_fd=dir_fd)
    if not isinstance(obj, dict):
        raise StoreFormatError(
            f"{path}: {what} should be a JSON object, but got {type(obj).__name__}. {fix}"
        )
    return obj


def _restore_swapped_out(store_dir: Path) -> None:
    """Put back the store a killed ``--overwrite`` moved aside, where nothing is at its path
    (NOTE [a killed replacement] in jasper_mmap/_fs/publish.py); where that cannot be done (a read-only
    parent), the error that follows names it."""
    try:
        settle_swapped_out(Path(store_dir).expanduser().absolute().resolve())
    except (JasperError, OSError, RuntimeError) as e:
        log.warning(
            "%s: could not restore the store a killed replacement moved aside (%s)", store_dir, e
        )


def read_raw_manifest(store_dir: Path) -> dict[str, Any]:
    """Read a store's manifest and check it is ours (format name) and of a version we read.

    Its contents are not checked further: see :func:`read_valid_manifest`.

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


def read_valid_manifest(store_dir: Path) -> dict[str, Any]:
    """Read a store's manifest and check its structure and the sizes of its data files.

    Checks what :func:`read_raw_manifest` checks, then the types of every field and array entry,
    required arrays, dtypes, shapes against ``counts``, and that every recorded data file
    exists with its recorded size (O(number of files); see ``jasper_mmap.format.integrity``).

    Raises:
        StoreNotFoundError: the directory, its manifest or a data file does not exist.
        StoreFormatError: the manifest is not ours, of a newer version, or malformed.
        StoreCorruptError: a data file's size differs from the recorded one.
    """
    from jasper_mmap.format.recorded import file_problems
    from jasper_mmap.format.schema import manifest_problems, raise_problems, store_fix

    store_dir = Path(store_dir)
    manifest = read_raw_manifest(store_dir)
    problems = manifest_problems(store_dir, manifest)
    if not problems:
        fix = store_fix(store_dir, manifest)
        where = str(store_dir / MANIFEST)
        problems = file_problems(store_dir, manifest["files"], where, fix=fix)
    raise_problems(problems, store_dir)
    return manifest


def read_generation_desc(
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
    from jasper_mmap.format.schema import pointer_problems, raise_problems, store_fix

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
    ``files``, and the generation's own ``files`` (NOTE [recorded files] in jasper_mmap/format/integrity.py). The
    manifest's ``store_id`` is a random token naming this conversion (NOTE [store identity]).
    """
    import secrets
    import time

    from jasper_mmap._version import __version__
    from jasper_mmap.format.recorded import data_files, entry_files

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
        "store_id": secrets.token_hex(
            16
        ),  # NOTE [store identity] in jasper_mmap/stores/identity.py
        "warnings": list(warnings or []),
    }
    write_json_atomic(tmp / MANIFEST, manifest)
