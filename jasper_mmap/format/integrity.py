"""Structural checks of a store in O(number of files), reading no array data.

``store_problems`` is the one function that looks at a store's structure: the manifest (types
of every field of every entry, required arrays, known dtypes, shapes consistent with
``counts``), ``config.json``, every data file recorded in the manifest (present, with the size
recorded when it was written), each safetensors header or zarr array metadata against the
manifest, and the live negatives generation. It returns every problem it finds, each with the
error class it maps to: ``open_store`` raises the first, ``jasper-mmap verify`` lists them all.

# NOTE [recorded files]
When a store is written, ``write_store_metadata`` records every data file with its size: the
manifest's ``files`` holds the safetensors files, or every zarr chunk/shard file and
``zarr.json`` of the group; each negatives generation's description holds its own ``files``.
Opening checks them all (one ``stat`` each), so a removed zarr shard is refused at open instead
of being read as zeros (zarr serves a missing chunk as its fill value). Manifests written
before this (zarr ones recorded no files) keep the old, weaker check.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

from jasper_mmap.errors import JasperError, StoreFormatError, StoreNotFoundError
from jasper_mmap.format.config import config_problems
from jasper_mmap.format.dtypes import STORED_DTYPES
from jasper_mmap.format.recorded import file_problems
from jasper_mmap.format.schema import (
    Problem,
    counts_problems,
    manifest_problems,
    pointer_problems,
    raise_problems,
    shape_problems,
    store_fix,
    store_replaced,
)
from jasper_mmap.format.spec import (
    BACKEND_NAMES,
    CONFIG,
    COUNT_KEYS,
    MANIFEST,
    NEGATIVE_ARRAYS,
    NEGATIVES_DIR,
    POINTER,
    SPECS,
)

__all__ = [
    "MAX_COUNT",
    "check_generation",
    "generation_problems",
    "store_problems",
    "value_problems",
]


def _recorded(files: dict[str, Any], entries: dict[str, Any], backend: str, where: str, fix):
    """New-style records (NOTE [recorded files]) must list every array's data file."""
    if not files:
        return []  # written before every file was recorded
    problems = []
    for name, e in entries.items():
        rel = e["file"] if backend == "safetensors" else f"{e['file']}/zarr.json"
        if rel not in files:
            problems.append(
                Problem(
                    StoreFormatError,
                    f"{where}: 'files' does not record {rel} (array {name!r}), so its size "
                    f"cannot be checked. {fix}",
                    (name,),
                )
            )
    return problems


def _backend_problems(
    store_dir: Path, backend: str, entries: dict, files: dict, fix: str
) -> list[Problem]:
    """Each safetensors header / zarr array metadata against the manifest entries."""
    if backend == "safetensors":
        from jasper_mmap.format.safetensors_header import header_problems

        return header_problems(store_dir, entries, fix)
    from jasper_mmap.format.zarr_metadata import metadata_problems

    return metadata_problems(store_dir, entries, files, fix)


def _generation_fix(store_dir: Path, manifest: dict[str, Any]) -> str:
    """Publish again, or convert again; for a store replaced by another conversion since it
    was opened, only ``store_fix``'s advice (open it again): publishing into, or converting
    over, a store the user made on purpose is never advised."""
    again = store_fix(store_dir, manifest)
    if store_replaced(store_dir, manifest):
        return again
    return f"Publish the negatives again (publish_negatives), or {again[0].lower()}{again[1:]}"


def generation_problems(
    store_dir: Path, pointer: dict[str, Any], manifest: dict[str, Any], path: Path | None = None
) -> list[Problem]:
    """A negatives generation's description (``pointer``, read from ``path``) against the
    store: structure, shapes ``[n_pairs, n_neg]``, its recorded files, its data headers."""
    store_dir = Path(store_dir)
    path = path or store_dir / NEGATIVES_DIR / POINTER
    fix = _generation_fix(store_dir, manifest)
    problems = pointer_problems(path, pointer, fix)
    if problems:
        return problems
    entries = pointer["arrays"]
    problems = []  # created_unix and sources: pointer_problems (description_field_problems)
    for name in NEGATIVE_ARRAYS:
        problems += [
            Problem(StoreFormatError, f"{path}: array {name!r}: {f}. {fix}", (name,))
            for f in _entry_value_findings(entries[name])
        ]
    counts = manifest["counts"]
    for name in NEGATIVE_ARRAYS:
        problems += shape_problems(name, entries[name], counts, str(path), fix)
    files = pointer.get("files", {})
    problems += file_problems(store_dir, files, str(path), fix=fix, entries=entries)
    problems += _recorded(files, entries, manifest["backend"], str(path), fix)
    if not problems:
        problems += _backend_problems(store_dir, manifest["backend"], entries, files, fix)
    return problems


def check_generation(
    store_dir: Path, pointer: dict[str, Any], manifest: dict[str, Any], path: Path | None = None
) -> None:
    """Raise the first of :func:`generation_problems` (for a generation about to be read).

    Raises:
        StoreNotFoundError, StoreFormatError, StoreCorruptError: naming the file.
    """
    raise_problems(generation_problems(store_dir, pointer, manifest, path), store_dir)


def _named_generation(
    store_dir: Path, pointer: dict[str, Any], manifest: dict[str, Any]
) -> tuple[list[Problem], dict[str, Any] | None]:
    """The generation ``CURRENT.json`` (``pointer``) names: its own description
    ``gen-NNNNNN.json`` (what readers use) in full, and the pointer agreeing with it.
    Returns the problems and the description read (None when it could not be read)."""
    from jasper_mmap.format.manifest import read_generation_desc
    from jasper_mmap.format.spec import generation_name

    g, fix = pointer["generation"], _generation_fix(store_dir, manifest)
    path = store_dir / NEGATIVES_DIR / f"{generation_name(g)}.json"
    try:
        desc = read_generation_desc(store_dir, g, check=False)
    except StoreNotFoundError:
        msg = f"{path}: negatives generation {g}, which {POINTER} names, has no description. {fix}"
        return [Problem(StoreNotFoundError, msg)], None
    except JasperError as e:
        return [Problem(type(e), str(e))], None
    problems = generation_problems(store_dir, desc, manifest, path)
    differ = [k for k in ("generation", "arrays", "files") if desc.get(k) != pointer.get(k)]
    if not problems and differ:
        msg = (
            f"{store_dir / NEGATIVES_DIR / POINTER}: {differ} differ from {path.name}'s (both "
            f"are written from one description when a generation is published). {fix}"
        )
        problems.append(Problem(StoreFormatError, msg, NEGATIVE_ARRAYS))
    return problems, desc


def _live_generation_problems(
    store_dir: Path, manifest: dict[str, Any], verified: dict[int, dict] | None = None
) -> list[Problem]:
    """Problems of the live generation (``CURRENT.json``, then the description it names);
    read again (up to twice) if a publisher switched ``CURRENT.json`` meanwhile, so a
    generation removed after a newer one went live is not reported. A generation found
    sound is recorded in ``verified`` (generation -> its description)."""
    from jasper_mmap.format.manifest import read_generation_desc

    current = store_dir / NEGATIVES_DIR / POINTER
    problems: list[Problem] = []
    for _ in range(3):
        try:
            pointer = read_generation_desc(store_dir, check=False)
        except JasperError as e:
            return [Problem(type(e), str(e))]
        problems = pointer_problems(current, pointer, _generation_fix(store_dir, manifest))
        if not problems:
            problems, desc = _named_generation(store_dir, pointer, manifest)
            if not problems:
                if verified is not None:
                    verified[pointer["generation"]] = desc
                return []
        try:
            again = read_generation_desc(store_dir, check=False).get("generation")
        except JasperError:
            again = None
        if again == pointer.get("generation"):
            break
    return problems


# NOTE [checked stores]
# A process that opens one store several times (its train, val and test splits; a trainer that
# creates its datasets again) checks it in full once. After a full check finds no problem,
# the state (device, inode, size, mtime, ctime) of every file it read or stat-ed is kept;
# the next open stats those files again and, when every state is unchanged, skips reading
# and checking them. Any write to a file moves its ctime, which no user can set back, and a
# replaced file has another inode. A file whose ctime is later than _RACY_SECONDS before the
# check started is not remembered (git's "racy" rule): a write during the check (or between
# reading the manifest and the check), or two writes within one tick of the kernel's coarse
# clock, could otherwise go unseen. The files remembered are those the check reads (also
# where a store written before NOTE [recorded files] does not record them) and those it
# stats. ``verify`` always checks in full. Only ``open_store`` asks for this (``reuse=True``).
_RACY_SECONDS = 2.0


_CHECKED: dict[str, tuple[tuple[str, ...], tuple, str]] = {}


_CHECKED_MAX = 64


_CHECKED_LOCK = threading.Lock()


def _file_states(store_dir: str, rels: tuple[str, ...], before: float | None = None):
    """The state of each file of ``store_dir`` in ``rels``; None when one is missing, or
    (with ``before``) was changed later than ``_RACY_SECONDS`` before that time."""
    states = []
    for rel in rels:
        try:
            st = os.stat(os.path.join(store_dir, rel))
        except (OSError, ValueError):
            return None
        if before is not None and st.st_ctime_ns / 1e9 > before - _RACY_SECONDS:
            return None
        states.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(states)


def _checked_files(manifest: dict[str, Any], verified: dict[int, dict]) -> tuple[str, ...]:
    """Every file a full check of a sound store read or stat-ed: the JSON files, the recorded
    files, and each array's data file (safetensors) or ``zarr.json`` (zarr), which the check
    reads also where a store written before NOTE [recorded files] does not record them."""
    from jasper_mmap.format.spec import generation_name

    zarr = manifest.get("backend") == "zarr"

    def read(entries: dict[str, Any]) -> list[str]:
        return [f"{e['file']}/zarr.json" if zarr else e["file"] for e in entries.values()]

    rels = [MANIFEST, CONFIG, f"{NEGATIVES_DIR}/{POINTER}", *manifest.get("files", {})]
    rels += read({n: e for n, e in manifest["arrays"].items() if n not in NEGATIVE_ARRAYS})
    for g, desc in verified.items():
        rels += [f"{NEGATIVES_DIR}/{generation_name(g)}.json", *desc.get("files", {})]
        rels += read(desc["arrays"])
    return tuple(dict.fromkeys(rels))


def _remember_sound(
    store_dir: str, manifest: dict[str, Any], verified: dict[int, dict], started: float
) -> None:
    rels = _checked_files(manifest, verified)
    states = _file_states(store_dir, rels, before=started)
    with _CHECKED_LOCK:
        if states is None:
            _CHECKED.pop(store_dir, None)
            return
        while len(_CHECKED) >= _CHECKED_MAX:
            _CHECKED.pop(next(iter(_CHECKED)))
        # kept as JSON: each open gets its own copy of the descriptions
        _CHECKED[store_dir] = (rels, states, json.dumps(verified))


def _known_sound(store_dir: str) -> dict[int, dict] | None:
    """The generations verified by the last full check of ``store_dir``, when no file it
    looked at changed since (NOTE [checked stores]); else None."""
    hit = _CHECKED.get(store_dir)
    if hit is None:
        return None
    rels, states, verified = hit
    if _file_states(store_dir, rels) != states:
        with _CHECKED_LOCK:
            if _CHECKED.get(store_dir) is hit:
                del _CHECKED[store_dir]
        return None
    return {int(g): desc for g, desc in json.loads(verified).items()}


def store_problems(
    store_dir: str | Path,
    manifest: dict[str, Any] | None = None,
    verified: dict[int, dict] | None = None,
    *,
    reuse: bool = False,
) -> list[Problem]:
    """Every structural problem of the store at ``store_dir``, in O(number of files).

    Reads ``manifest.json`` (unless ``manifest`` is given), ``config.json``, the safetensors
    headers or zarr ``zarr.json`` files and ``negatives/CURRENT.json``, and stats every
    recorded file; reads no array data. Never raises for a problem of the store. A problem
    whose ``arrays`` is empty concerns the whole store. The live negatives generation, when
    found sound, is recorded in ``verified`` with its description (its lease need not read
    and check it again). ``reuse``: when this process found the store sound before and none
    of the files looked at changed since, only stat them (NOTE [checked stores]).
    """
    from jasper_mmap.format.manifest import read_raw_manifest

    store_dir = Path(store_dir)
    key = os.fspath(store_dir)
    if reuse:
        known = _known_sound(key)
        if known is not None:
            if verified is not None:
                verified.update(known)
            return []
    if manifest is None:
        try:
            manifest = read_raw_manifest(store_dir)
        except JasperError as e:
            return [Problem(type(e), str(e))]
    live: dict[int, dict] = {}
    started = time.time()
    problems = _structure_problems(store_dir, manifest, live)
    if verified is not None:
        verified.update(live)
    if reuse and not problems:
        _remember_sound(key, manifest, live, started)
    return problems


# NOTE [values that fit]
# The schema checks types (a count is a non-negative int, a shape a list of them); Python's
# ints have no bound, so ``counts.n_pairs = 2**64`` passed them and reached numpy in verify
# ("Maximum allowed dimension exceeded"). Counts and every dimension index int64 arrays and
# an array's bytes are a file offset: counts and dimensions above MAX_COUNT (2**62, which
# leaves room for n_pairs + 1 keyword offsets) and arrays of 2**63 bytes or more are refused
# here, naming the file and the field, before anything sizes a buffer from them. The fields
# read elsewhere that the schema leaves alone are typed here too: ``store_id`` (the identity
# token, NOTE [store identity]: not a string silently disabled the check), ``created_unix``
# (compared with file times when negatives are taken in) and each entry's ``stats``
# (``nonfinite_rows`` lets verify pass non-finite rows).
MAX_COUNT = 2**62


_MAX_BYTES = 2**63 - 1


def _finite_number(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _entry_value_findings(entry: Any) -> list[str]:
    """What does not fit in an (already typed, or not) array entry: shape, bytes, stats."""
    if not isinstance(entry, dict):
        return []
    found = []
    shape = entry.get("shape")
    if isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape):
        big = [d for d in shape if d > MAX_COUNT]
        dtype = (
            STORED_DTYPES.get(entry.get("stored_dtype"))
            if isinstance(entry.get("stored_dtype"), str)
            else None
        )
        if big:
            found.append(f"'shape' {shape!r:.80} has a dimension above {MAX_COUNT} (2**62)")
        elif dtype is not None and math.prod(shape) * dtype[0].itemsize > _MAX_BYTES:
            found.append(f"'shape' {shape!r:.80} makes an array of 2**63 bytes or more")
    stats = entry.get("stats")
    if isinstance(stats, dict):
        for key in ("min", "max"):
            if stats.get(key) is not None and not _finite_number(stats[key]):
                found.append(f"'stats.{key}' should be a finite number or null: {stats[key]!r:.40}")
        rows = stats.get("nonfinite_rows")
        if "nonfinite_rows" in stats and not (type(rows) is int and 0 <= rows <= MAX_COUNT):
            found.append(f"'stats.nonfinite_rows' should be a row count: {rows!r:.40}")
    return found


def value_problems(manifest: dict[str, Any], where: str, fix: str) -> list[Problem]:
    """NOTE [values that fit]: counts, shapes, ``store_id``, ``created_unix`` and ``stats`` of
    a parsed manifest (whole-store problems for the counts and top-level fields)."""
    problems = []
    counts = manifest.get("counts")
    if isinstance(counts, dict):
        for k in COUNT_KEYS:
            v = counts.get(k)
            if type(v) is int and v > MAX_COUNT:
                problems.append(
                    Problem(
                        StoreFormatError,
                        f"{where}: 'counts.{k}' is {v}, more than any store holds (at most "
                        f"{MAX_COUNT} = 2**62: rows are indexed with int64). {fix}",
                    )
                )
    token = manifest.get("store_id")
    found = []
    t = manifest.get("created_unix")
    if "created_unix" in manifest and not _finite_number(t):
        found.append(f"'created_unix' should be a finite number (seconds), but is {t!r:.40}")
    if "store_id" in manifest and not (isinstance(token, str) and token):
        found.append(f"'store_id' should be the token string written at conversion: {token!r:.40}")
    problems += [Problem(StoreFormatError, f"{where}: {f}. {fix}") for f in found]
    arrays = manifest.get("arrays")
    for name, entry in arrays.items() if isinstance(arrays, dict) else ():
        problems += [
            Problem(StoreFormatError, f"{where}: array {name!r}: {f}. {fix}", (name,))
            for f in _entry_value_findings(entry)
        ]
    return problems


def _structure_problems(
    store_dir: Path, manifest: dict[str, Any], verified: dict[int, dict]
) -> list[Problem]:
    where = str(store_dir / MANIFEST)
    # first: a count that fits no store explains the shape mismatches that follow
    problems = value_problems(manifest, where, store_fix(store_dir, manifest))
    problems += manifest_problems(store_dir, manifest)
    fix = store_fix(store_dir, manifest)
    problems += config_problems(store_dir, fix)
    files, backend, arrays = manifest.get("files"), manifest.get("backend"), manifest.get("arrays")
    if not isinstance(arrays, dict):
        arrays = {}
    if isinstance(files, dict):
        problems += file_problems(store_dir, files, where, fix=fix, entries=arrays)
    if backend not in BACKEND_NAMES or not isinstance(files, dict):
        return problems
    bad = {a for p in problems for a in p.arrays}
    good = {n: e for n, e in arrays.items() if n in SPECS and n not in bad | set(NEGATIVE_ARRAYS)}
    problems += _recorded(files, good, backend, where, fix)
    problems += _backend_problems(store_dir, backend, good, files, fix)
    if not counts_problems(manifest.get("counts"), where, fix) and not any(
        p.message.startswith(f"{where}: 'counts.") for p in problems
    ):
        problems += _live_generation_problems(store_dir, manifest, verified)
    return problems
