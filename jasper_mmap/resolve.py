"""Turn what a user passes as ``dataset_dir`` into a store path, converting ``.pt`` dirs once.

A store directory (it has ``manifest.json``) is used as it is. A ``.pt`` dataset directory is
converted once into a store kept beside the data (``DATASET/.jasper_mmap_store``), or under
``cache_dir`` when given, or under ``~/.cache/jasper_mmap`` when the dataset directory is not
writable. The store is reused while the ``.pt`` files and ``config.json`` match the fingerprints
(size, mtime, first/last 64 KiB) recorded in its manifest, and rebuilt when any changed. A file
lock keeps two processes (DDP ranks, two jobs) from converting the same directory at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from pathlib import Path

from .errors import ArtifactMissingError, StoreNotFoundError, StoreStaleError
from .layout import CONFIG, MANIFEST, read_manifest

__all__ = ["resolve_store", "refresh_negatives", "STORE_DIRNAME", "NEGATIVE_FILES"]

log = logging.getLogger(__name__)

STORE_DIRNAME = ".jasper_mmap_store"
#: handled by negatives generations (NOTE [hot reload]), not by rebuilding the store
NEGATIVE_FILES = ("hard_negatives.pt", "negative_tiers.pt")


def _changed(path: Path, recorded: dict | None) -> bool:
    """Whether ``path`` differs from its recorded fingerprint.

    Size and mtime equal to the record mean unchanged (as make and rsync assume); otherwise the
    first/last 64 KiB hash decides, so a file that was only touched is not a change.
    """
    from jasper_mmap.converters.pt_reader import fingerprint

    if recorded is None or not path.is_file():
        return True
    st = path.stat()
    if st.st_size == recorded.get("size") and st.st_mtime_ns == recorded.get("mtime_ns"):
        return False
    return fingerprint(path)["head_tail_blake2b"] != recorded.get("head_tail_blake2b") or (
        st.st_size != recorded.get("size")
    )


def _recorded_sources(store: Path) -> dict | None:
    """The source fingerprints in ``store``'s manifest; None if there is no usable store."""
    if not (store / MANIFEST).exists():
        return None
    try:
        return read_manifest(store)["source"]["files"]
    except (KeyError, TypeError, ValueError, OSError):
        return None


def _stale_files(recorded: dict, src: Path) -> list[str]:
    """Names of ``src``'s files (negatives aside) that differ from their ``recorded`` fingerprints."""
    names = ({p.name for p in src.glob("*.pt")} | set(recorded) | {CONFIG}) - set(NEGATIVE_FILES)
    return sorted(n for n in names if _changed(src / n, recorded.get(n)))


def refresh_negatives(src: Path, store: Path) -> int | None:
    """Publish ``src``'s negatives ``.pt`` files as a new generation if they changed.

    Returns:
        The new generation, or None when the live one already matches the files.
    """
    from jasper_mmap.converters.pt_reader import fingerprint

    from .layout import read_pointer
    from .negatives import publish_negatives

    recorded = read_pointer(store).get("sources") or {}
    if not any(_changed(src / n, recorded.get(n)) for n in NEGATIVE_FILES):
        return None
    current = {n: fingerprint(src / n) for n in NEGATIVE_FILES}
    log.info(
        "%s: %s changed; publishing them as a new negatives generation",
        src,
        " / ".join(NEGATIVE_FILES),
    )
    return publish_negatives(store, *(src / n for n in NEGATIVE_FILES), sources=current)


def _check_sources(store: Path) -> None:
    """Refuse a store whose recorded source directory exists and changed since conversion."""
    source = read_manifest(store).get("source") or {}
    src = Path(source["dir"]) if source.get("dir") else None
    files = source.get("files")
    if src is None or not src.is_dir() or not files or not isinstance(files, dict):
        return
    stale = _stale_files(files, src)
    if stale:
        raise StoreStaleError(
            f"{store}: its source files {', '.join(stale)} in {src} changed since it was converted. Re-run "
            f"`convert-pt {src} {store} --overwrite`, open {src} itself (it converts when needed), or pass "
            f"check_sources=False to read the store as it is."
        )


def _store_location(src: Path, cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        tag = hashlib.blake2b(str(src).encode(), digest_size=6).hexdigest()
        return Path(cache_dir).expanduser().absolute() / f"{src.name}-{tag}"
    if os.access(src, os.W_OK):
        return src / STORE_DIRNAME
    fallback = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "jasper_mmap"
    log.info("%s is not writable; keeping its store under %s", src, fallback)
    return _store_location(src, fallback)


def resolve_store(
    dataset_dir: str | Path,
    cache_dir: str | Path | None = None,
    store_format: str = "safetensors",
    check_sources: bool = True,
) -> Path:
    """Return the store to read for ``dataset_dir``, converting or refreshing it if needed.

    A store passed directly is checked against the ``.pt`` files it was converted from, when
    that directory still exists (``check_sources=False`` skips this).

    Raises:
        StoreNotFoundError: ``dataset_dir`` does not exist or is not a directory.
        ArtifactMissingError: it is neither a store nor a dataset directory with config.json.
        StoreStaleError: a store whose source ``.pt`` files changed since conversion.
    """
    src = Path(dataset_dir).expanduser().absolute()
    if not src.is_dir():
        what = "is not a directory" if src.exists() else "does not exist"
        raise StoreNotFoundError(
            f"{src}: dataset directory {what}. Pass a store made by convert-pt or a "
            f"directory of .pt artifacts."
        )
    if (src / MANIFEST).exists():
        if check_sources:
            _check_sources(src)
        return src
    if not (src / CONFIG).exists():
        raise ArtifactMissingError(
            f"{src}: has neither manifest.json (a store) nor config.json (a .pt "
            f"dataset). Check the path; see FORMAT.md for the dataset layout."
        )
    store = _store_location(src, cache_dir)
    store.parent.mkdir(parents=True, exist_ok=True)
    with open(store.parent / f".{store.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        recorded = _recorded_sources(store)
        stale = None if recorded is None else _stale_files(recorded, src)
        if stale == []:
            log.debug("%s: store %s is up to date", src, store)
            refresh_negatives(src, store)
            return store
        from jasper_mmap.converters import convert_pt

        if stale is None:
            log.info(
                "%s: converting the .pt files into %s (once; reused while they are unchanged)",
                src,
                store,
            )
        else:
            log.info(
                "%s: %s changed since %s was built; rebuilding it", src, ", ".join(stale), store
            )
        convert_pt(src, store, format=store_format, overwrite=True, progress=None)
    return store
