"""Turn what a user passes as ``dataset_dir`` into a store path, converting ``.pt`` dirs once.

A store directory (it has ``manifest.json``) is used as it is. A ``.pt`` dataset directory is
converted once into a store kept beside the data (``DATASET/.jasper_mmap_store``), or under
``cache_dir`` when given, or under ``~/.cache/jasper_mmap`` when the dataset directory is not
writable (unless the store beside the data is up to date: then it is used as it is). The store
is reused while the dataset's own files match the fingerprints recorded in its manifest
(:mod:`jasper_mmap.sources.fingerprints`), and rebuilt when any changed. The store's writer lock
(NOTE [one writer per store] in ``jasper_mmap/_fs/publish.py``) keeps two processes (DDP ranks, two jobs) from
converting the same directory at once, and a publish or ``convert-pt --overwrite`` from acting
on it meanwhile; a process that waits says which process holds it and for how long.

Rewritten negatives ``.pt`` files are not a reason to rebuild: they are published as a new
negatives generation (NOTE [hot reload] in jasper_mmap/stores/generations.py), unless a newer publication is live,
or their ``n_neg`` changed (then the store is rebuilt).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jasper_mmap._fs.files import as_path, describe_path, read_json
from jasper_mmap._fs.lock import lock_holder, store_lock
from jasper_mmap._fs.partials import moved_aside
from jasper_mmap.errors import (
    ArtifactError,
    ArtifactMissingError,
    ConfigError,
    JasperError,
    StoreFormatError,
    StoreNotFoundError,
    StoreStaleError,
    StoreWriteError,
)
from jasper_mmap.format.manifest import read_generation_desc, read_raw_manifest, read_valid_manifest
from jasper_mmap.format.schema import source_findings
from jasper_mmap.format.spec import CONFIG, MANIFEST, NEGATIVES_DIR
from jasper_mmap.sources.directory import STORAGE_FORMATS, detect_storage_format
from jasper_mmap.sources.fingerprints import (
    NEGATIVE_FILES,
    changed,
    dataset_file_names,
    fingerprint,
)
from jasper_mmap.sources.hdf5.layout import H5_FILE

__all__ = [
    "resolve_store",
    "resolve_dataset",
    "detect_storage_format",
    "refresh_negatives",
    "Resolved",
    "STORE_DIRNAME",
    "NEGATIVE_FILES",
    "STORAGE_FORMATS",
]

log = logging.getLogger(__name__)

STORE_DIRNAME = ".jasper_mmap_store"


def _recorded_sources(store: Path) -> dict | None:
    """The source fingerprints in ``store``'s manifest; None if there is no usable store."""
    if not (store / MANIFEST).exists():
        return None
    try:
        files = read_valid_manifest(store)["source"]["files"]
    except (KeyError, TypeError, ValueError, OSError):
        return None
    return files if isinstance(files, dict) else None


def _stale_files(recorded: dict, src: Path, fmt: str = "pt") -> list[str]:
    """The dataset's own files for source format ``fmt`` (negatives aside) that differ from
    their fingerprints: recorded ones changed or gone, and unrecorded ones that appeared."""
    base = os.fspath(src)
    names = set(dataset_file_names(fmt)) | set(recorded) | {CONFIG}
    stale = []
    for n in sorted(names - set(NEGATIVE_FILES)):
        path = os.path.join(base, n)
        if n in recorded or n == CONFIG:
            if changed(path, recorded.get(n)):
                stale.append(n)
        elif os.path.isfile(path):  # one of ours that the conversion did not see
            stale.append(n)
    return stale


def _negative_files(fmt: str) -> tuple[str, ...]:
    """The files that hold a dataset directory's negatives, for source format ``fmt``.

    In ``hdf5`` mode they are inside ``dataset.h5`` (and ``.pt`` negatives beside it are
    ignored, as the in-RAM dataset ignores them in that mode).
    """
    return (H5_FILE,) if fmt == "hdf5" else NEGATIVE_FILES


@contextlib.contextmanager
def _negative_readers(src: Path, fmt: str):
    """(hard_negatives, negative_tiers) row readers of dataset directory ``src``."""
    if fmt == "hdf5":
        from jasper_mmap.sources.hdf5.reader import open_h5_source

        with open_h5_source(src) as h5:
            yield h5.arrays["hard_negatives"], h5.arrays["negative_tiers"]
        return
    from jasper_mmap.sources.pt.reader import open_tensor

    yield tuple(open_tensor(src / n) for n in NEGATIVE_FILES)


def _negatives_n_neg(src: Path, fmt: str = "pt") -> int | None:
    """``n_neg`` of the negatives files (None when they disagree or cannot be read)."""
    try:
        with _negative_readers(src, fmt) as readers:
            shapes = {tuple(r.shape) for r in readers}
    except (ArtifactError, ArtifactMissingError, ImportError):
        return None
    shape = shapes.pop() if len(shapes) == 1 else None
    return shape[1] if shape is not None and len(shape) == 2 else None


def _taken_in(store: Path, pointer: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """Fingerprints of the negatives files as last taken in: the live generation's record,
    else (a store converted before the record existed, or from dataset.h5) the conversion's."""
    recorded = dict(pointer.get("sources") or {})
    missing = [n for n in names if n not in recorded]
    if missing:
        converted = (read_valid_manifest(store).get("source") or {}).get("files") or {}
        recorded.update({n: converted.get(n) for n in missing})
    return recorded


def _h5_negatives_digest(src: Path) -> str:
    """blake2b of the negatives inside ``src/dataset.h5`` (both datasets, streamed in blocks).

    In HDF5 mode a miner rewrites the negatives in place, in the middle of the file, where the
    head/tail hash of a fingerprint cannot see them; this digest is what tells a rewrite from
    a touch. Cost: one pass over ``N_pairs x n_neg`` values (~20 MB for 200k pairs), once per
    state of the file (size, mtime) in a process.
    """
    st = (src / H5_FILE).stat()
    return _digest_at(str(src), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _digest_at(src: str, size: int, mtime_ns: int) -> str:
    h = hashlib.blake2b(digest_size=16)
    with _negative_readers(Path(src), "hdf5") as readers:
        for arr in readers:
            n = int(arr.shape[0])
            step = 65536
            if getattr(arr, "chunk_rows", None):
                step = max(arr.chunk_rows, step - step % arr.chunk_rows)
            for start in range(0, n, step):
                h.update(np.ascontiguousarray(arr.read_rows(start, min(n, start + step))))
    return h.hexdigest()


def _negatives_fingerprints(src: Path, fmt: str) -> dict[str, dict[str, Any]]:
    """What a generation records of the negatives files it took in (``sources``)."""
    current = {n: fingerprint(src / n) for n in _negative_files(fmt)}
    if fmt == "hdf5":
        current[H5_FILE]["negatives_blake2b"] = _h5_negatives_digest(src)
    return current


def _negatives_moved(src: Path, name: str, recorded: Any, fmt: str) -> bool:
    """Whether negatives file ``name`` differs from what was last taken in (a file that does
    not exist is not news)."""
    path = src / name
    if not path.is_file():
        return False
    if fmt != "hdf5":
        return changed(path, recorded)
    if not isinstance(recorded, dict):
        return True
    st = path.stat()  # dataset.h5: its head and tail say nothing of the negatives inside
    if (st.st_size, st.st_mtime_ns) == (recorded.get("size"), recorded.get("mtime_ns")):
        return False
    digest = recorded.get("negatives_blake2b")  # none: taken in at conversion
    return digest is None or _h5_negatives_digest(src) != digest


def negatives_to_take_in(src: Path, store: Path, fmt: str = "pt") -> bool:
    """Whether ``src``'s negatives files should be published into ``store`` now.

    They should when they changed since they were last taken in (the fingerprints that every
    generation carries forward as ``sources``) and are newer than the live publication: a
    ``publish_negatives`` call made after the files were written wins over them. Files that
    do not exist are not news.
    """
    pointer, names = read_generation_desc(store), _negative_files(fmt)
    recorded = _taken_in(store, pointer, names)
    moved = [n for n in names if _negatives_moved(src, n, recorded.get(n), fmt)]
    if not moved:
        return False
    newest = max((src / n).stat().st_mtime for n in moved)
    if newest <= float(pointer.get("created_unix", 0.0)):
        log.info(
            "%s: %s changed, but generation %d was published after them; keeping it",
            src,
            " / ".join(moved),
            pointer["generation"],
        )
        return False
    return True


def refresh_negatives(src: Path, store: Path, fmt: str = "pt") -> int | None:
    """Publish ``src``'s rewritten negatives (``.pt`` files, or ``dataset.h5`` in ``hdf5``
    mode) as a new generation if they should be (:func:`negatives_to_take_in`).

    Returns:
        The new generation, or None when nothing was published.

    Raises:
        ArtifactError: the files are invalid, or their ``n_neg`` differs from the store's (a
            running dataset cannot change it; opening the directory again rebuilds the store).
    """
    from jasper_mmap.stores.generations import publish_generation

    if not negatives_to_take_in(src, store, fmt):
        return None
    n_neg, have = _negatives_n_neg(src, fmt), read_valid_manifest(store)["counts"].get("n_neg")
    if n_neg is not None and n_neg != have:
        raise ArtifactError(
            f"{src}: the rewritten negatives hold n_neg={n_neg}, but this dataset was opened "
            f"with n_neg={have}; a running dataset cannot change n_neg (its batches have that "
            f"shape). {_n_neg_fix(src, n_neg, have)}"
        )
    names = _negative_files(fmt)
    current = _negatives_fingerprints(src, fmt)
    log.info("%s: publishing the rewritten negatives of %s as a new generation", src, names)
    with _negative_readers(src, fmt) as (negs, tiers):
        return publish_generation(store, negs, tiers, sources=current)


def _n_neg_fix(src: Path, n_neg: int, have: Any) -> str:
    """How to take in negatives whose ``n_neg`` changed: what to edit, then open again."""
    try:  # never blocks on a FIFO; nesting bounded (NOTE [regular files only] in jasper_mmap/_fs/files.py)
        config = read_json(src / CONFIG, what="config file", fix="", error=ConfigError)
        recorded = config.get("n_neg") if isinstance(config, dict) else None
    except (JasperError, OSError):
        recorded = None
    again = f"open the dataset again (its store is rebuilt with n_neg={n_neg})"
    if recorded is not None and recorded != n_neg:
        edit = f'Set "n_neg": {n_neg} in {src / CONFIG} (it says {recorded!r}), then {again}'
    else:
        edit = again[0].upper() + again[1:]
    return f"{edit}; or write negatives with n_neg={have}."


def _check_sources(store: Path, manifest: dict[str, Any]) -> None:
    """Refuse a store whose recorded source directory exists and changed since conversion."""
    source = manifest.get("source") or {}
    if not isinstance(source, dict) or source_findings(source):
        return  # open_store, which comes next, names the malformed field
    src = Path(source["dir"]) if isinstance(source.get("dir"), str) else None
    files = source.get("files")
    if src is None or not src.is_dir() or not files or not isinstance(files, dict):
        return
    stale = _stale_files(files, src, source.get("format", "pt"))
    if stale:
        raise StoreStaleError(
            f"{store}: its source files {', '.join(stale)} in {src} changed since it was converted. Re-run "
            f"`convert-pt {src} {store} --overwrite`, open {src} itself (it converts when needed), or pass "
            f"check_sources=False to read the store as it is."
        )


def store_location(src: Path, cache_dir: str | Path | None, fmt: str = "pt") -> Path:
    """Where the store of dataset directory ``src`` (from its ``fmt`` files) is kept."""
    suffix = "" if fmt == "pt" else f"_{fmt}"
    if cache_dir is not None:
        # keyed by the real path: a symlink or ``..`` spelling of one directory reaches its one
        # store (stores cached under an older key, the path as given, are converted once again)
        real = src.resolve()
        tag = hashlib.blake2b(str(real).encode(), digest_size=6).hexdigest()
        return as_path(cache_dir, "cache_dir") / f"{real.name}-{tag}{suffix}"
    beside = src / f"{STORE_DIRNAME}{suffix}"
    if os.access(src, os.W_OK):
        return beside
    if _usable_as_it_is(src, beside, fmt):
        log.info("%s is not writable; its store %s is up to date and is used", src, beside)
        return beside
    fallback = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "jasper_mmap"
    log.info("%s is not writable; keeping its store under %s", src, fallback)
    return store_location(src, fallback, fmt)


def _usable_as_it_is(src: Path, store: Path, fmt: str) -> bool:
    """Whether ``store`` (beside a read-only ``src``) is up to date, and any rewritten
    negatives can be published into it."""
    try:
        if _recorded_sources(store) is None or _rebuild_reason(src, store, fmt) is not None:
            return False
        return not negatives_to_take_in(src, store, fmt) or os.access(
            store / NEGATIVES_DIR, os.W_OK
        )
    except (JasperError, OSError, KeyError, TypeError):
        return False  # damaged: a fresh one is made in the cache


def _make_store_parent(src: Path, store: Path, cache_dir: str | Path | None) -> None:
    """Create the directory the store of ``src`` goes into; a clear error when it cannot be."""
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        where = "cache_dir" if cache_dir is not None else "the cache directory"
        err = StoreWriteError(
            f"{store.parent}: cannot create {where} for the store of {src} ({e.strerror}). "
            f"Pass cache_dir= a writable directory (JASPERSteeringDataset(..., cache_dir=...)),"
            f" set XDG_CACHE_HOME, or make {src} writable."
        )
        err.errno = e.errno
        raise err from e


def _holder(lock_file: Any) -> str:
    """Who holds the store's lock (:func:`jasper_mmap._fs.lock.lock_holder`)."""
    return lock_holder(lock_file)


def _convert(src: Path, store: Path, store_format: str, options: dict[str, Any], why: str):
    from jasper_mmap.converters import convert_pt

    log.info("%s: %s; converting the dataset into %s", src, why, store)
    convert_pt(src, store, format=store_format, overwrite=True, progress=None, **options)


def _rebuild_reason(src: Path, store: Path, fmt: str) -> str | None:
    """Why ``store`` must be (re)built from ``src``, or None when it is up to date."""
    recorded = _recorded_sources(store)
    if recorded is None:
        return "no store yet (converted once, reused while the files are unchanged)"
    stale = _stale_files(recorded, src, fmt)
    if stale:
        return f"{', '.join(stale)} changed since the store was built"
    n_neg = _negatives_n_neg(src, fmt)
    have = read_valid_manifest(store)["counts"].get("n_neg")
    if n_neg is not None and n_neg != have and negatives_to_take_in(src, store, fmt):
        return f"the negatives files now hold n_neg={n_neg} (the store has {have})"
    return None


@dataclass(frozen=True)
class Resolved:
    """What a ``dataset_dir`` resolved to."""

    store: Path  # the store to open
    storage_format: str  # "pt" or "hdf5": the source the store was made from
    source_dir: Path | None  # the dataset directory it follows, or None for a store given
    manifest: dict[str, Any] | None = None  # its manifest, when read here (read_raw_manifest)


def _store_format_of(store: Path, requested: str, manifest: dict[str, Any]) -> str:
    source = manifest.get("source") or {}
    recorded = source.get("format", "pt") if isinstance(source, dict) else "pt"
    recorded = recorded if recorded in ("pt", "hdf5") else "pt"
    if requested not in STORAGE_FORMATS:
        detect_storage_format(store, requested)  # the in-RAM dataset's ValueError
    if requested not in ("auto", recorded):
        raise ValueError(
            f"{store}: is a store converted from {recorded} files; storage_format="
            f"{requested!r} cannot apply to it. Pass storage_format='auto', or open the "
            f"dataset directory it was converted from."
        )
    return recorded


def resolve_dataset(
    dataset_dir: str | Path,
    cache_dir: str | Path | None = None,
    store_format: str | None = None,
    check_sources: bool = True,
    *,
    storage_format: str = "auto",
    convert_options: dict[str, Any] | None = None,
    for_publish: bool = False,
) -> Resolved:
    """Resolve ``dataset_dir`` to a store, converting or refreshing it if needed.

    A store passed directly is checked against the dataset directory it was converted from,
    when that directory still exists (``check_sources=False`` skips this). A dataset directory
    is converted (``.pt`` or ``dataset.h5``, per ``storage_format``; see
    :func:`detect_storage_format`) into a cached store, reused while its files are unchanged.
    ``convert_options`` go to :func:`jasper_mmap.converters.convert_pt`. ``for_publish``
    (``publish_negatives``): with ``storage_format="auto"``, a directory holding both ``.pt``
    files and ``dataset.h5`` resolves to the one of its two stores that exists.

    Raises:
        StoreNotFoundError: ``dataset_dir`` does not exist (a ValueError too).
        StoreWriteError: the store's directory cannot be created (e.g. no writable HOME for
            the cache of a read-only dataset directory: the message names ``cache_dir=``).
        ArtifactError: ``for_publish`` and both of a directory's stores exist.
        ArtifactMissingError: it has no config.json, or not the files asked for.
        StoreStaleError: a store whose source files changed since conversion.
        ValueError: an unknown ``storage_format``, or h5py missing for ``"hdf5"``.
    """
    src = as_path(dataset_dir, "the dataset directory (a store, or a directory of .pt files)")
    if not os.path.lexists(src) and moved_aside(src.resolve()):
        read_raw_manifest(src)  # restores it (NOTE [a killed replacement]) or names where it is
    if not src.is_dir():
        what = "is not a directory" if src.exists() else describe_path(src)
        raise StoreNotFoundError(
            f"Dataset directory not found: {src} ({what}). Pass a store made by convert-pt "
            f"or a dataset directory of .pt files or dataset.h5."
        )
    if (src / MANIFEST).exists():
        # ours and of a known version; open_store checks the rest of its structure next
        manifest = read_raw_manifest(src)
        fmt = _store_format_of(src, storage_format, manifest)
        if check_sources:
            _check_sources(src, manifest)
        return Resolved(src, fmt, None, manifest)
    if not (src / CONFIG).exists():
        raise ArtifactMissingError(
            f"Config file not found: {src / CONFIG}. {src} is neither a store (manifest.json) "
            f"nor a dataset directory (config.json + .pt files or dataset.h5); "
            f"docs/dataset_format.md describes the layout."
        )
    fmt = detect_storage_format(src, storage_format)
    if for_publish and storage_format == "auto":
        fmt = _format_to_publish_into(src, cache_dir, fmt)
    store = store_location(src, cache_dir, fmt)
    _make_store_parent(src, store, cache_dir)
    lock = store_lock(
        store,
        "converting",
        shown=src,
        holder=lambda f: _holder(f),
        logger=log,
    )
    with lock:
        why = _rebuild_reason(src, store, fmt)
        have = read_valid_manifest(store).get("backend") if why is None else None
        if have is not None and store_format not in (None, have) and not for_publish:
            raise StoreFormatError(
                f"{src}: its store {store} is a {have} store, and store_format="
                f"{store_format!r} was asked; a store is never replaced for that (it may "
                f"hold published negatives). Pass store_format={have!r} (or leave it out) to "
                f"read it, or another cache_dir= to convert a {store_format} store there."
            )
        if why is None:
            refresh_negatives(src, store, fmt)
        else:
            options = {**(convert_options or {}), "source": fmt}
            _convert(src, store, store_format or "safetensors", options, why)
    return Resolved(store, fmt, src)


def _format_to_publish_into(src: Path, cache_dir: str | Path | None, fmt: str) -> str:
    """The source format whose store a publish into dataset directory ``src`` must reach,
    under ``storage_format="auto"``: ``fmt``, unless the directory holds both ``.pt`` files
    and ``dataset.h5`` and only the other one's store exists (a dataset opened with
    ``storage_format`` set reads that one). Both made: refused, it is not knowable here."""
    present = []
    for f in ("pt", "hdf5"):
        try:
            detect_storage_format(src, f)
            present.append(f)
        except (ValueError, ImportError):
            pass
    if len(present) < 2:
        return fmt
    stores = {f: store_location(src, cache_dir, f) for f in present}
    made = [f for f, store in stores.items() if (store / MANIFEST).exists()]
    if len(made) == 2:
        raise ArtifactError(
            f"{src}: holds both .pt files and {H5_FILE}, and has a store for each "
            f"({stores['pt']} and {stores['hdf5']}); which one your trainer reads is not "
            f"knowable here. Pass storage_format='pt' or 'hdf5' to publish_negatives, the "
            f"value the dataset was opened with."
        )
    if made and made[0] != fmt:
        log.info(
            "%s: publishing into %s, its only store (storage_format=%r)",
            src,
            stores[made[0]],
            made[0],
        )
        return made[0]
    return fmt


def resolve_store(
    dataset_dir: str | Path,
    cache_dir: str | Path | None = None,
    store_format: str | None = None,
    check_sources: bool = True,
    convert_options: dict[str, Any] | None = None,
) -> Path:
    """The store to read for ``dataset_dir`` (see :func:`resolve_dataset`)."""
    return resolve_dataset(
        dataset_dir, cache_dir, store_format, check_sources, convert_options=convert_options
    ).store
