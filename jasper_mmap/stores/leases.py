"""Leases of negatives generations: a shared ``flock`` on a generation's description while this
process maps it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

from jasper_mmap._fs.files import open_regular
from jasper_mmap.errors import (
    StoreNotFoundError,
)
from jasper_mmap.format.integrity import check_generation
from jasper_mmap.format.manifest import read_generation_desc
from jasper_mmap.format.spec import NEGATIVES_DIR, generation_name


class LeasedGeneration:
    """A negatives generation this process leases: its description and the locked file."""

    __slots__ = ("desc", "lease", "pins")

    def __init__(self, desc: dict[str, Any], lease: Any) -> None:
        self.desc, self.lease, self.pins = desc, lease, 0


def acquire_lease(
    store_dir: Path,
    generation: int,
    manifest: dict[str, Any] | None = None,
    desc: dict[str, Any] | None = None,
) -> LeasedGeneration:
    """Lease ``generation``: a shared ``flock`` on its description, held while it is mapped.

    Its description is read and checked against ``manifest`` (when given), unless ``desc``
    is the description just read and checked (by ``open_store``): generation numbers are
    never reused and a description is never rewritten, so it is the file now locked.

    # NOTE [generation leases]
    The collector in ``negatives.py`` removes a generation only while it holds an exclusive
    lock on its description, and unlinks the description last. So: open, lock shared, and if
    the file was unlinked in between (``st_nlink == 0``) the generation is gone. Once the
    shared lock is held the generation stays on disk until the lease is closed.

    Raises:
        StoreNotFoundError: the generation was removed (or never existed).
    """
    path = store_dir / NEGATIVES_DIR / f"{generation_name(generation)}.json"
    gone = StoreNotFoundError(
        f"{path}: negatives generation {generation} was removed after newer ones were "
        f"published (or never existed). Call reload_negatives() to serve the live one."
    )
    try:  # kept open as the lease; a regular file only (NOTE [regular files only])
        f = open_regular(path, what="negatives generation description", missing=None)
    except FileNotFoundError:
        raise gone from None
    try:
        fcntl.flock(f, fcntl.LOCK_SH)
        if os.fstat(f.fileno()).st_nlink == 0:
            raise gone
        if desc is None:
            desc = read_generation_desc(store_dir, generation)
            if manifest is not None:  # its files, sizes and headers, before anything is mapped
                check_generation(store_dir, desc, manifest, path)
    except BaseException:
        f.close()
        raise
    return LeasedGeneration(desc, f)
