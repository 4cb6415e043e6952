"""Publish a directory with one atomic rename; clean up what interrupted runs left behind.

Writers build everything under ``.<name>.partial-<pid>-<token>`` beside the destination, a
name no reader ever opens, then make it visible with one ``rename``. Replacing an existing
directory uses Linux ``renameat2(RENAME_EXCHANGE)``, which swaps the two names atomically, so
readers see either the old or the new directory, never neither; where that call is missing
(other kernels, other filesystems) it falls back to two renames with a short window.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import secrets
import shutil
from pathlib import Path

__all__ = ["partial_dir", "publish_dir", "remove_stale_partials", "fsync_dir", "fsync_tree"]

log = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def partial_dir(dst: Path) -> Path:
    """Return a fresh, hidden temporary directory beside ``dst`` (created)."""
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    return tmp


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(dst: Path) -> list[Path]:
    """Remove ``.<dst>.partial-*`` directories whose writer process no longer exists."""
    removed = []
    for p in dst.parent.glob(f".{dst.name}.partial-*"):
        try:
            pid = int(p.name.rsplit("partial-", 1)[1].split("-")[0])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
            log.info("removed %s left by an interrupted run (pid %d)", p, pid)
    return removed


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (once, before publishing it)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def _exchange(a: Path, b: Path) -> bool:
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    rc = libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def publish_dir(tmp: Path, dst: Path, replace: bool) -> None:
    """Make ``tmp`` visible as ``dst`` with one rename; with ``replace``, swap out the old one.

    The old directory (when replaced) is deleted after the swap.
    """
    fsync_dir(tmp)
    if dst.exists() and replace:
        if _exchange(tmp, dst):
            fsync_dir(dst.parent)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = dst.parent / f".{dst.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(dst, old)
        os.rename(tmp, dst)
        fsync_dir(dst.parent)
        shutil.rmtree(old, ignore_errors=True)
        return
    os.rename(tmp, dst)  # fails if dst appeared meanwhile (non-empty dir) or is a file
    fsync_dir(dst.parent)
