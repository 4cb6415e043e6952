"""Publish a directory with one atomic rename; clean up what interrupted runs left behind.

Writers build everything under ``.<name>.partial-<pid>-<token>-<host>`` beside the destination,
a name no reader ever opens, then make it visible with one ``rename``. A later run removes a
partial whose writer is gone: judged by its PID, and only where ``<host>`` (a tag of the host
name and PID namespace) is this process's, since a PID means nothing on another machine, or in
another container, sharing the filesystem. Names without a host tag (older versions) are
judged by PID alone. Replacing an existing directory uses Linux ``renameat2(RENAME_EXCHANGE)``, which swaps the two names atomically, so
readers see either the old or the new directory, never neither; where that call is missing
(other kernels, other filesystems) it falls back to two renames with a short window.

# NOTE [never destroy what we did not make]
Every writer that can replace a directory (``convert_pt``, ``make_store``, ``make_pt_dir``)
first calls :func:`check_destination`. It resolves symlinks, so the checks below apply to the
directory that would really be replaced, and the temporary directory is made beside that one
(a symlinked destination replaces the store it points to; no ``.partial`` is left beside the
link). It refuses a destination that is, or contains, one of the writer's inputs, whatever path
leads there; it refuses any non-empty directory that is not one of ours (``is_ours``), with or
without ``overwrite``. :func:`publish_dir` checks again what it swapped out before deleting it,
so a directory that appeared at the destination meanwhile is put back, not deleted.

# NOTE [one writer per store]
Every writer of a store (:func:`publish_dir` replacing it, for ``convert_pt --overwrite`` and
:func:`publishing`; ``publish_negatives`` and its clean-up; the auto-convert of a dataset
directory) holds :func:`store_lock`: an exclusive ``flock`` on ``.<name>.lock`` BESIDE the store, on its real
path (the store directory itself is what an overwrite swaps, so a lock inside it would be
swapped away with it). A writer opens and checks the store only once it holds the lock, so it
acts on the store it opened, never on one swapped in meanwhile. The lock is re-entrant per
thread (the auto-convert holds it and calls ``convert_pt``, which takes it again); two threads,
or two processes, exclude each other. A waiter logs who holds it (the holder writes its pid,
host and task into the file). A converter holds it across the swap and the deletion of the
old store only, so a publish never waits on a whole ``convert-pt`` run (the auto-convert holds
it throughout: DDP ranks must not convert twice); a first conversion (a rename that replaces
no store) takes no lock and leaves no lock file.
The lock file is opened without following links and only if it is a regular file (a
directory, socket or FIFO there is refused with the fix); holder information is written only
into an empty file or one that already holds ours, and never into a file with a second name
(a hard link), so no file of a user is ever truncated. It is written unbuffered on the
descriptor and is advisory: a full disk leaves it unwritten, and releasing never writes. Where the parent is read-only the existing lock file is locked through
a read-only descriptor (``flock`` needs no write access), and where none exists there the store
directory itself is locked: nobody who cannot write the parent can swap the store. A writer
that created the lock file removes it before it lets go, so no file is left beside a store; a
waiter that then gets the lock checks that the name still leads to the file it locked, and
starts again otherwise (so a removed lock file never lets two writers in). A lock file that was
there before (another version's, or a holder's that was killed) is left as it is.
Release is an explicit ``flock(LOCK_UN)``, which frees the lock for every descriptor that
shares the open file description. A child forked while the lock is held does not hold it: the
descriptor is ``O_CLOEXEC`` and is closed in the child at fork (``os.register_at_fork``; a
lock is opened and registered, and unlocked, closed and unregistered, under a lock the fork
hooks take, so a fork from another thread never falls between the two steps), the
re-entrancy count is keyed by pid, and a child unwinding its parent's ``with`` releases
nothing; so the lock is free once the parent lets go of it or dies, whatever its workers do,
and a child that takes the lock waits for its parent like any other process.
Not guarded: writers of older versions (they take only ``negatives/.publish.lock``), a
writer that cannot write the parent (it locks the store directory) against one that can,
``mv``/``rm`` by hand.

# NOTE [names are not patterns]
Destination names may hold ``*``, ``?``, ``[`` (``store[1]``, ``run**2``): leftovers are found by
listing the directory and comparing prefixes (:func:`marked_entries`), never by glob patterns.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import secrets
import shlex
import shutil
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

from jasper_mmap._fs.files import file_kind
from jasper_mmap._fs.lock import store_lock
from jasper_mmap._fs.partials import HOST_TAG, moved_aside, partial_name
from jasper_mmap.errors import (
    StoreExistsError,
    StoreNotFoundError,
)

__all__ = ["check_destination", "fsync_dir", "fsync_tree", "publish_dir"]

log = logging.getLogger(__name__)


_AT_FDCWD = -100


_RENAME_EXCHANGE = 2


def _fsync(path: str | os.PathLike) -> None:
    """fsync a regular file or a directory; anything else is skipped. Opened ``O_NONBLOCK``:
    a FIFO there opens at once (a plain open would wait forever for a writer), and a socket
    fails the open (ENXIO); neither holds data to sync."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ENXIO:
            return
        raise
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode) or stat.S_ISDIR(os.fstat(fd).st_mode):
            os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it survives a crash (never blocks on a FIFO)."""
    _fsync(path)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (once, before publishing it); FIFOs,
    sockets and devices in it are skipped, never waited on."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync(os.path.join(dirpath, name))
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


def is_empty_dir(path: Path) -> bool:
    with os.scandir(path) as it:
        return next(it, None) is None


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_destination(
    dst: str | Path,
    *,
    overwrite: bool,
    is_ours: Callable[[Path], bool],
    inputs: Iterable[str | Path] = (),
    what: str = "a jasper_mmap store",
) -> Path:
    """Check that a writer may publish at ``dst``; return the real path to publish at.

    See NOTE [never destroy what we did not make]. An absent or empty directory is always
    fine; an existing one of ours needs ``overwrite``; anything else is refused.

    Raises:
        StoreExistsError: ``dst`` is a file, holds or is one of ``inputs``, is a non-empty
            directory that is not ``what``, or is ours and ``overwrite`` is false.
        StoreNotFoundError: the parent directory of ``dst`` does not exist.
    """
    given = Path(dst).expanduser().absolute()
    try:
        real = given.resolve()
    except (RuntimeError, OSError) as e:  # a symlink loop (RuntimeError before Python 3.13)
        raise StoreExistsError(
            f"{given}: the destination cannot be resolved ({e}): it is, or leads through, a "
            f"symbolic link loop. Remove or fix the link, or choose another path."
        ) from None
    shown = given if real == given else f"{given} (a link to {real})"
    for src in inputs:
        src_real = Path(src).expanduser().resolve()
        if _within(src_real, real):
            rel = "is" if src_real == real else "contains"
            raise StoreExistsError(
                f"{shown}: the destination {rel} the input {src_real}; writing there would "
                f"destroy it. Choose a destination outside the input, e.g. {real.parent}/"
                f"{src_real.name}_store."
            )
    if not real.exists() and os.path.lexists(real.parent) and not real.parent.is_dir():
        kind = (
            file_kind(os.stat(real.parent).st_mode) if real.parent.exists() else "a dangling link"
        )
        raise StoreExistsError(
            f"{shown}: the destination's parent {real.parent} is not a directory ({kind}). "
            f"Choose a destination inside a directory."
        )
    if not real.exists() and not real.parent.is_dir():
        raise StoreNotFoundError(
            f"{shown}: the destination's parent directory {real.parent} does not exist. "
            f"Create it first."
        )
    if real.exists() and not real.is_dir():
        raise StoreExistsError(
            f"{shown}: the destination is a file, not a directory. Choose another path."
        )
    if not overwrite and (not real.exists() or is_empty_dir(real)):
        # NOTE [a killed replacement]: a store moved aside by a killed (or unknown) replacement
        # is what was there; a conversion never resurrects it silently, nor publishes over it
        # only to fail at the end
        aside = moved_aside(real)
        if aside:
            olds = ", ".join(str(old) for old, _, _ in aside)
            first = shlex.quote(str(aside[0][0]))
            raise StoreExistsError(
                f"{shown}: nothing is there now, but {olds} holds the store that a replacement "
                f"of it (pid {aside[0][1]}, killed or not known to be gone) moved aside. Put it "
                f"back (mv {first} {shlex.quote(str(real))}; opening {real} does that where its "
                f"writer is known to be gone), or pass --overwrite (overwrite=True) to convert "
                f"over it."
            )
    if real.is_dir() and not is_empty_dir(real):
        if not is_ours(real):
            manifest = real / "manifest.json"
            if os.path.lexists(manifest) and not manifest.is_file():
                kind = file_kind(os.lstat(manifest).st_mode)
                raise StoreExistsError(
                    f"{real}: a damaged store: its manifest.json is {kind}, not a regular "
                    f"file, so it is never replaced. If nothing in it is yours, remove it "
                    f"(rm -r {shlex.quote(str(real))}), then run again."
                )
            names = sorted(p.name for p in real.iterdir())[:3]
            raise StoreExistsError(
                f"{shown}: the destination is a non-empty directory that is not {what} "
                f"(it holds {names}...). It is never replaced; choose a new or empty directory."
            )
        if not overwrite:
            raise StoreExistsError(
                f"{shown}: the destination already exists and is {what}. Pass --overwrite "
                f"(overwrite=True) to replace it, or choose another path."
            )
    return real


def publish_dir(tmp: Path, dst: Path, replace: bool, is_ours: Callable[[Path], bool]) -> None:
    """Make ``tmp`` visible as ``dst`` with one rename; with ``replace``, swap out the old one.

    ``dst`` must be the real path :func:`check_destination` returned. The old directory (when
    replaced) is deleted after the swap, but only if ``is_ours`` still holds for it; otherwise
    it is put back and StoreExistsError is raised. The swap and the deletion hold ``dst``'s
    writer lock (NOTE [one writer per store]).

    Raises:
        StoreExistsError: another process published a non-empty ``dst`` meanwhile.
    """
    fsync_dir(tmp)
    if dst.exists() and replace and not is_empty_dir(dst):
        # NOTE [one writer per store]: no publisher acts on the old store across the swap and
        # its deletion (a plain rename below needs no lock: it replaces no store)
        with store_lock(dst, "replacing the store"):
            if dst.exists() and not is_empty_dir(dst):
                _replace(tmp, dst, is_ours)
                return
    try:
        os.rename(tmp, dst)  # replaces an empty directory; fails on a non-empty one or a file
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise StoreExistsError(
                f"{dst}: another process published something there while this one was "
                f"writing; it was left as it is and nothing of this run was published."
            ) from None
        raise
    fsync_dir(dst.parent)


def _replace(tmp: Path, dst: Path, is_ours: Callable[[Path], bool]) -> None:
    if _exchange(tmp, dst):
        _delete_swapped_out(tmp, dst, is_ours, swap_back=lambda: _exchange(tmp, dst))
        return
    # NOTE [a killed replacement]: tagged like a partial, so a later writer can settle it
    old = dst.parent / f".{dst.name}.old-{os.getpid()}-{secrets.token_hex(4)}-{HOST_TAG}"
    os.rename(dst, old)
    os.rename(tmp, dst)
    _delete_swapped_out(old, dst, is_ours, swap_back=None)


def _delete_swapped_out(old: Path, dst: Path, is_ours, swap_back) -> None:
    fsync_dir(dst.parent)
    if is_ours(old) or is_empty_dir(old):
        if swap_back is None:  # NOTE [a killed replacement]: a partial's name first, so a
            doomed = old.parent / partial_name(dst.name)  # kill mid-deletion leaves a
            os.rename(old, doomed)  # partial that the next run removes, not a broken store
            old = doomed
        shutil.rmtree(old, ignore_errors=True)
        return
    if swap_back is not None and swap_back():
        fsync_dir(dst.parent)
        shutil.rmtree(old, ignore_errors=True)  # ``old`` is our new directory again
        raise StoreExistsError(
            f"{dst}: changed into something that is not ours while this run was writing; it "
            f"was put back unchanged and nothing was published."
        )
    log.warning("%s replaced something that was not ours; it is kept at %s", dst, old)
