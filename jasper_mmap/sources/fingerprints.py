"""Cheap identities of a dataset directory's own files, to tell when a store is stale.

A fingerprint is a file's size, mtime and a hash of its first and last 64 KiB. A file counts
as unchanged when size and mtime equal the record (as make and rsync assume); when they differ
the hash decides, so a file that was only touched is not a change. Only the dataset's own files
count (the ``.pt`` artifacts of :data:`jasper_mmap.format.spec.ARRAYS`, ``config.json`` and
``dataset.h5``): backups and notes beside them (``hard_negatives_backup_epoch5.pt``) do not.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any

from jasper_mmap._fs.files import open_regular
from jasper_mmap.errors import ArtifactError, ArtifactMissingError
from jasper_mmap.format.spec import ARRAYS, CONFIG, SPLITS
from jasper_mmap.sources.hdf5.layout import H5_FILE

__all__ = [
    "fingerprint",
    "changed",
    "dataset_file_names",
    "source_fingerprints",
    "NEGATIVE_FILES",
]

#: the negatives' source files: handled by negatives generations (NOTE [hot reload])
NEGATIVE_FILES = ("hard_negatives.pt", "negative_tiers.pt")
_EDGE = 65536


def fingerprint(path: Path) -> dict[str, Any]:
    """Size, mtime (ns) and a blake2b hash of the first and last 64 KiB of ``path``."""
    st = os.stat(path)
    h = hashlib.blake2b(digest_size=16)
    with open_regular(
        path, what="source file", error=ArtifactError, missing=ArtifactMissingError
    ) as f:
        h.update(f.read(_EDGE))
        if st.st_size > _EDGE:
            f.seek(max(_EDGE, st.st_size - _EDGE))
            h.update(f.read(_EDGE))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "head_tail_blake2b": h.hexdigest()}


def changed(path: Path | str, recorded: dict[str, Any] | None) -> bool:
    """Whether ``path`` differs from its ``recorded`` fingerprint (missing counts as changed).

    One ``stat`` when size and mtime match the record (the common case, checked at every
    open); the head/tail hash only when the mtime moved.
    """
    if not isinstance(recorded, dict):
        return True
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # missing, a symlink loop, a NUL in the name...
        return True
    if not stat.S_ISREG(st.st_mode) or st.st_size != recorded.get("size"):
        return True
    if st.st_mtime_ns == recorded.get("mtime_ns"):
        return False
    return fingerprint(Path(path))["head_tail_blake2b"] != recorded.get("head_tail_blake2b")


def dataset_file_names(fmt: str = "pt") -> tuple[str, ...]:
    """Names of the files a dataset directory's data come from, for source format ``fmt``
    (``"pt"``: the ``.pt`` artifacts; ``"hdf5"``: ``dataset.h5`` and the split ``.pt`` files
    that win over its splits); its other files are not ours."""
    if fmt == "hdf5":
        return (H5_FILE, *(f"{s}_idx.pt" for s in SPLITS), CONFIG)
    return (*sorted({spec.source for spec in ARRAYS if spec.source is not None}), CONFIG)


def source_fingerprints(src: Path, fmt: str = "pt") -> dict[str, dict[str, Any]]:
    """Fingerprints of the dataset's own files (for ``fmt``) that exist in directory ``src``."""
    return {n: fingerprint(src / n) for n in dataset_file_names(fmt) if (src / n).is_file()}
