"""The store directory a process opened (NOTE [store identity])."""

from __future__ import annotations

import os
from pathlib import Path

from jasper_mmap._fs.files import read_json
from jasper_mmap.errors import (
    JasperError,
)
from jasper_mmap.format.spec import MANIFEST

# NOTE [store identity]
# ``convert-pt --overwrite`` replaces a store with one rename and then deletes the old
# directory; a store can also be moved or removed by hand. An open Store reads the store it
# opened, never the one now at its path, or fails with StoreReplacedError. Two things hold that:
# - Within a process every file is opened through a descriptor of the store directory, taken
#   when the Store is created (or first used in a process that unpickled it): ``_root()`` is
#   ``/proc/self/fd/N``, which names that directory whatever its path names now. A file first
#   opened later (a safetensors file not mapped yet, every zarr chunk, a generation's files)
#   comes from the directory opened, or is missing once that directory was deleted, and a
#   failure there says the store was replaced when it was (``_check_same``).
# - Across processes (a DataLoader worker unpickles the Store without the descriptor) the
#   identity recorded when the directory was first taken travels with the Store: the
#   manifest's ``store_id`` (a random token written at conversion) and the state (device,
#   inode, size, mtime, ctime) of ``manifest.json``. A process taking the directory again
#   compares them: the same manifest file is the same store; another manifest file with the
#   same token too; anything else is StoreReplacedError. Stores written before the token have
#   only the state. ``live_generation()`` (hot reload) first checks that the path still names
#   the directory held: publications at the path go to another store now.
# Without /proc (not Linux) the root is the path and only these checks guard. Not guarded:
# the instant between reading the manifest and creating the Store in ``open_store`` (checked
# by path just before); a store rewritten in place file by file (we never do that).
PROC_FD = os.path.isdir("/proc/self/fd")


def manifest_state(dir_fd: int) -> tuple | None:
    try:
        st = os.stat(MANIFEST, dir_fd=dir_fd)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def token_at(dir_fd: int) -> str | None:
    """The ``store_id`` of the manifest in directory ``dir_fd`` (None if unreadable/absent)."""
    try:
        manifest = read_json(MANIFEST, what="manifest.json", fix="", dir_fd=dir_fd)
    except JasperError:
        return None
    token = manifest.get("store_id") if isinstance(manifest, dict) else None
    return token if isinstance(token, str) else None


class StoreDir:
    """This process's descriptor of a store directory, and the root to open files under;
    closed when the last holder lets go (the Store, and every zarr array read under it)."""

    __slots__ = ("fd", "root")

    def __init__(self, fd: int, root: Path) -> None:
        self.fd, self.root = fd, root

    def __del__(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except (OSError, TypeError):  # TypeError: at interpreter exit, os may be gone
                pass
