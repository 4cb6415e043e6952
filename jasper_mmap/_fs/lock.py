"""The store-level writer lock beside a store (NOTE [one writer per store] in jasper_mmap/_fs/publish.py)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from jasper_mmap.errors import (
    StoreExistsError,
    write_error,
)

__all__ = [
    "WAIT_LOG_SECONDS",
    "close_lock_fd",
    "held_flock",
    "lock_holder",
    "lock_path_of",
    "open_lock_fd",
    "store_lock",
]

log = logging.getLogger(__name__)


#: how often a process waiting for another's store lock says so again
WAIT_LOG_SECONDS = 30.0


_held = threading.local()  # per thread: {(pid, lock path): depth} (NOTE [one writer per store])


#: descriptors of the store locks this process holds: closed in a fork child (NOTE [one writer
#: per store]), so no child, however long it lives, keeps a lock its parent let go of
_lock_fds: set[int] = set()


#: held while a lock descriptor is opened and registered, or unlocked, closed and unregistered,
#: and across every fork (``os.register_at_fork``): a fork from another thread never falls
#: between the two steps, where the child would inherit a descriptor it does not know of
_fork_guard = threading.RLock()


#: the lock paths being opened by this thread's guarded section: a fork inside it (from this
#: very thread) closes, in the child, every descriptor that leads to one of them
_opening: set[str] = set()


def _lock_fds_before_fork() -> None:
    _fork_guard.acquire()


def _lock_fds_after_fork_in_parent() -> None:
    _fork_guard.release()


def _close_lock_fds_in_child() -> None:
    global _fork_guard
    for fd in list(_lock_fds):
        with contextlib.suppress(OSError):
            os.close(fd)  # no LOCK_UN: that would release the parent's lock too
    _lock_fds.clear()
    if _opening:  # forked between an open and its registration, in the same thread
        with contextlib.suppress(OSError):
            for name in os.listdir("/proc/self/fd"):
                with contextlib.suppress(OSError, ValueError):
                    if os.readlink(f"/proc/self/fd/{name}") in _opening:
                        os.close(int(name))
        _opening.clear()
    _fork_guard = threading.RLock()  # the parent's thread held it at the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_lock_fds_before_fork,
        after_in_parent=_lock_fds_after_fork_in_parent,
        after_in_child=_close_lock_fds_in_child,
    )


@contextlib.contextmanager
def _opening_lock(*paths: Path) -> Iterator[None]:
    """The guarded section around opening and registering a lock descriptor (``_fork_guard``,
    ``_opening``)."""
    with _fork_guard:
        names = {str(p) for p in paths} - _opening
        _opening.update(names)
        try:
            yield
        finally:
            _opening.difference_update(names)


def open_lock_fd(path: Path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` a lock file and register the descriptor as a lock's, in one step no fork
    falls between (NOTE [one writer per store]); :func:`held_flock` or
    :func:`close_lock_fd` closes it."""
    with _opening_lock(path):
        fd = os.open(path, flags, mode)
        _lock_fds.add(fd)
    return fd


def close_lock_fd(fd: int, unlock: bool = False) -> None:
    """Unregister and close a lock descriptor (``unlock``: ``LOCK_UN`` first), in one step no
    fork falls between; never raises."""
    with _fork_guard:
        if unlock:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
        with contextlib.suppress(OSError):
            os.close(fd)
        _lock_fds.discard(fd)


def lock_path_of(store: str | Path) -> Path:
    """The lock file of ``store``: ``.<name>.lock`` beside its real path."""
    real = Path(store).expanduser().absolute().resolve()
    return real.parent / f".{real.name}.lock"


def _read_head(lock_file: Any) -> str:
    """The first 4 KiB of a lock file, given as a descriptor or a file object."""
    if isinstance(lock_file, int):
        return os.pread(lock_file, 4096, 0).decode("utf-8", "replace")
    lock_file.seek(0)
    head = lock_file.read(4096)
    return head.decode("utf-8", "replace") if isinstance(head, bytes) else head


def lock_holder(lock_file: Any) -> str:
    """Who holds a store lock, from what the holder wrote into the lock file (a descriptor
    or a file object)."""
    try:
        info = json.loads(_read_head(lock_file) or "{}")
        ago = time.time() - float(info["since"])
        doing = info.get("doing", "converting")
        return f"process {info['pid']} on {info['host']}, {doing} for {ago:.0f} s"
    except (ValueError, KeyError, TypeError, AttributeError, OSError, RecursionError):
        return "another process"  # RecursionError: 4 KiB holds 2,000 levels of nesting


def _refuse_lock(path: Path, store: Path, what: str) -> StoreExistsError:
    return StoreExistsError(
        f"{path}: the lock file of store {store} {what}; writers of the store never use it "
        f"(it could lead to a file of yours). Move it away, then run again (writers create "
        f"their own there)."
    )


#: errnos of opening a lock file name taken by a directory (EISDIR) or a socket (ENXIO)
_NOT_REGULAR = (errno.EISDIR, errno.ENXIO, errno.ENODEV, errno.ENOTDIR)


def _open_lock(path: Path, store: Path) -> tuple[int, bool, bool]:
    """Open ``store``'s lock file, created when absent: ``(descriptor, writable, created
    here)``. A raw descriptor, never a Python file: nothing is buffered, so nothing is ever
    flushed (or fails to be, on a full disk) when it is closed."""
    flags = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # a FIFO must not block the open
    created = False
    try:
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | flags, 0o644)
                writable = created = True
                break
            except FileExistsError:
                pass
            try:
                fd, writable = os.open(path, os.O_RDWR | flags), True
                break
            except FileNotFoundError:
                continue  # its creator removed it between our two opens: create it again
    except OSError as e:
        if e.errno == errno.ELOOP or (e.errno == errno.EEXIST and path.is_symlink()):
            raise _refuse_lock(path, store, "is a symbolic link") from None
        if e.errno in _NOT_REGULAR:
            raise _refuse_lock(path, store, "is not a regular file") from None
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise write_error(path, e, f"the lock file of store {store}") from e
        try:  # a read-only parent: flock needs no write access
            fd, writable = os.open(path, os.O_RDONLY | flags), False
        except FileNotFoundError:
            try:  # none there: nobody who cannot write the parent can swap the store
                fd = os.open(store, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                raise write_error(path, e, f"the lock file of store {store}") from e
            return fd, False, False
        except OSError as e2:
            if e2.errno == errno.ELOOP:
                raise _refuse_lock(path, store, "is a symbolic link") from None
            if e2.errno in _NOT_REGULAR:
                raise _refuse_lock(path, store, "is not a regular file") from None
            raise write_error(path, e, f"the lock file of store {store}") from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _refuse_lock(path, store, "is not a regular file")
    os.set_blocking(fd, True)
    return fd, writable, created


def _still_there(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file locked through ``fd`` (a holder that created the
    lock file removes it when done; NOTE [one writer per store])."""
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        return True  # the store directory itself (read-only parent)
    try:
        now = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _say_holder(lock_file: Any, doing: str) -> None:
    """Write who holds the lock into it: only into an empty file or one that holds ours, and
    only if it has no other name (a hard link could lead to a file of a user). Unbuffered
    (``pwrite`` on the descriptor): advisory, so a full disk or a short write is ignored, and
    nothing is left to flush at release."""
    fd = lock_file if isinstance(lock_file, int) else lock_file.fileno()
    try:
        if os.fstat(fd).st_nlink > 1:
            return  # another name leads to this file: never written
        old = _read_head(fd)
        if old.strip():
            info = json.loads(old)
            if not isinstance(info, dict) or "pid" not in info:
                return  # not ours: never truncated
        data = json.dumps(
            {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "doing": doing}
        ).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
    except (OSError, ValueError, RecursionError) as e:  # a full disk: the lock holds all the same
        log.debug("%s: could not record the lock's holder (%s)", fd, e)


def _release(fd: int, path: Path, created: bool, owner: int) -> None:
    """Let go of a store lock: ``LOCK_UN`` (for every holder of the open file description, so
    nothing that shares it keeps the store locked), then close. Never raises. In a fork child
    that unwinds its parent's ``with`` (``owner`` is the parent) nothing is done: the
    descriptor was closed at fork and the lock is the parent's."""
    if os.getpid() != owner:
        return
    with contextlib.suppress(OSError):
        if created and _still_there(fd, path):  # ours alone: removed while still held,
            path.unlink()  # so no file is left behind
    close_lock_fd(fd, unlock=True)


@contextlib.contextmanager
def store_lock(
    store: str | Path,
    doing: str,
    *,
    shown: str | Path | None = None,
    log_every: Callable[[], float] = lambda: WAIT_LOG_SECONDS,
    holder: Callable[[Any], str] = lock_holder,
    logger: logging.Logger = log,
) -> Iterator[Path]:
    """Hold ``store``'s writer lock (NOTE [one writer per store]); yield its real path.

    ``doing`` (e.g. "converting") is what a waiter is told the holder does; ``shown`` is the
    path its waiting message names (default: the store). Re-entrant within a thread.

    Raises:
        StoreWriteError: the lock file cannot be created (disk full, read-only parent with
            no store there yet, permission denied).
        StoreExistsError: the lock file's name is taken by a symlink or a non-regular file.
    """
    real = Path(store).expanduser().absolute().resolve()
    path = real.parent / f".{real.name}.lock"
    depth = _held.__dict__.setdefault("depth", {})
    key = (os.getpid(), str(path))
    if depth.get(key):
        depth[key] += 1
        try:
            yield real
        finally:
            depth[key] -= 1
        return
    t0, said = time.monotonic(), None
    while True:
        with _opening_lock(path, real):  # no fork between the open and the registration
            fd, writable, created = _open_lock(path, real)
            _lock_fds.add(fd)  # from here on, a fork child closes its copy
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if said is None or time.monotonic() - said >= log_every():
                        logger.info(
                            "%s: waiting for %s (waited %.0f s so far)",
                            shown or real,
                            holder(fd),
                            time.monotonic() - t0,
                        )
                        said = time.monotonic()
                    time.sleep(0.1)
            if _still_there(fd, path):
                break
        except BaseException:
            close_lock_fd(fd)
            raise
        close_lock_fd(fd)  # its creator removed it when done: lock the one there now
    owner = os.getpid()
    try:
        if writable:
            _say_holder(fd, doing)
        depth[key] = 1
        yield real
    finally:
        if os.getpid() == owner:
            depth.pop(key, None)
        _release(fd, path, created, owner)


@contextlib.contextmanager
def held_flock(fd: int) -> Iterator[int]:
    """Hold an exclusive ``flock`` on ``fd`` (which this takes over and closes), released
    like the store lock: ``LOCK_UN``, never kept by a fork child (NOTE [one writer per
    store]). For ``negatives/.publish.lock``, the lock older versions' publishers take."""
    owner = os.getpid()
    with _fork_guard:
        _lock_fds.add(fd)  # already there when opened by open_lock_fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        if os.getpid() == owner:
            close_lock_fd(fd, unlock=True)
