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
listing the directory and comparing prefixes (:func:`_entries`), never by glob patterns.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shlex
import shutil
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import (
    JasperError,
    StoreExistsError,
    StoreNotFoundError,
    StoreWriteError,
    write_error,
)
from .files import file_kind, read_json

__all__ = [
    "partial_dir",
    "partial_name",
    "remove_stale_partial_files",
    "publish_dir",
    "remove_stale_partials",
    "remove_stale_partials_in",
    "settle_swapped_out",
    "swapped_out",
    "moved_aside",
    "moved_aside_advice",
    "warn_stale_partials",
    "fsync_dir",
    "fsync_tree",
    "check_destination",
    "is_store",
    "publishing",
    "store_lock",
    "held_flock",
    "lock_holder",
    "WAIT_LOG_SECONDS",
]

log = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _host_tag() -> str:
    """Where PIDs of this process mean something: the host name and the PID namespace (two
    containers of one machine may share a host name, ``--uts=host``, but not their PIDs)."""
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = ""
    return hashlib.sha1(f"{socket.gethostname()}|{pid_ns}".encode()).hexdigest()[:8]


#: this host and PID namespace, in partial names (:func:`partial_name`)
HOST_TAG = _host_tag()


def partial_name(name: str) -> str:
    """A fresh hidden name for a file or directory to become ``name``:
    ``.<name>.partial-<pid>-<token>-<host>`` (who wrote it, for the cleanup of later runs)."""
    return f".{name}.partial-{os.getpid()}-{secrets.token_hex(4)}-{HOST_TAG}"


def partial_dir(dst: Path) -> Path:
    """Return a fresh, hidden temporary directory beside ``dst`` (created)."""
    tmp = dst.parent / partial_name(dst.name)
    try:
        tmp.mkdir()
    except OSError as e:  # /proc, a read-only or full filesystem: said with the fix
        err = write_error(tmp, e, "a temporary directory")
        if err is e:
            err = StoreWriteError(
                f"{dst.parent}: cannot create a directory there to write {dst.name} into "
                f"({e.strerror}). Choose a destination on a writable filesystem."
            )
            err.errno = e.errno
        raise err from e
    return tmp


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie. A killed writer stays a zombie
    until its parent reaps it, which a container's PID 1 may do late or never; its partial
    directory is garbage all the same."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return not os.path.isdir("/proc/self")  # with /proc: gone since the kill(0)
    except OSError:
        return True
    # "pid (comm) state ...": comm may hold spaces and parentheses, so read after the last ")"
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] != b"Z"


def _entries(directory: Path, prefix: str = ".", marker: str = ".partial-") -> list[Path]:
    """The entries of ``directory`` whose names start with ``prefix`` and hold ``marker``
    (``.partial-``, or ``.old-`` for stores swapped out by :func:`_replace`): a listing, not a
    glob (NOTE [names are not patterns]). A missing directory has none."""
    try:
        with os.scandir(directory) as it:
            names = [e.name for e in it]
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []
    return [Path(directory, n) for n in names if n.startswith(prefix) and marker in n[1:]]


def remove_stale_partials(dst: Path) -> list[Path]:
    """Remove ``.<dst>.partial-*`` directories whose writer process no longer exists, and
    settle the stores such a writer swapped out (:func:`settle_swapped_out`)."""
    removed = _remove_dead(_entries(dst.parent, f".{dst.name}.partial-"))
    settle_swapped_out(dst)
    return removed


def remove_stale_partials_in(directory: Path) -> list[Path]:
    """Remove every ``.*.partial-*`` file or directory in ``directory`` whose writer is gone
    (temporary files of :func:`jasper_mmap.layout.write_json_atomic` included)."""
    return _remove_dead(_entries(Path(directory)))


def remove_stale_partial_files(final: Path) -> list[Path]:
    """Remove the partial files (not directories) of ``final`` whose writer is gone."""
    found = _entries(final.parent, f".{final.name}.partial-")
    return _remove_dead(p for p in found if p.is_file() and not p.is_symlink())


def _dead(candidates: Iterable[Path], marker: str = "partial-") -> Iterator[tuple[Path, int]]:
    """``(path, writer pid)`` of each ``...partial-PID-TOKEN[-HOST]`` (or ``...old-...``, with
    ``marker="old-"``) written on this host (or with no host tag) whose writer is gone."""
    for p in candidates:
        try:
            fields = p.name.rsplit(marker, 1)[1].split("-")
            pid = int(fields[0])
        except (IndexError, ValueError):
            continue
        if len(fields) >= 3 and fields[2] != HOST_TAG:
            continue  # another host's (or container's): its PID cannot be checked here
        if pid != os.getpid() and not _pid_alive(pid):
            yield p, pid


def swapped_out(dst: Path) -> list[tuple[Path, int]]:
    """``(directory, writer pid)`` of each ``.<dst>.old-PID-TOKEN[-HOST]`` beside ``dst`` whose
    writer is gone: a store that a killed ``--overwrite`` moved away where the filesystem has
    no ``renameat2(RENAME_EXCHANGE)`` (NOTE [a killed replacement]). Symlinks are not."""
    found = _entries(Path(dst).parent, f".{Path(dst).name}.old-", ".old-")
    return [(p, pid) for p, pid in _dead(found, "old-") if p.is_dir() and not p.is_symlink()]


def moved_aside(dst: Path) -> list[tuple[Path, int, str | None]]:
    """``(directory, writer pid, why it is kept)`` of EVERY ``.<dst>.old-PID-TOKEN[-HOST]``
    directory beside ``dst`` (symlinks are not): ``why`` is None for a dead writer's
    (:func:`swapped_out`, settled by the next writer or opener), else why it is never
    restored or removed here (another host or PID namespace, or a PID that is running: its
    writer may be alive, or the PID reused). NOTE [a killed replacement]."""
    dst = Path(dst)
    dead = {p for p, _ in swapped_out(dst)}
    found = []
    for p in _entries(dst.parent, f".{dst.name}.old-", ".old-"):
        if p.is_symlink() or not p.is_dir():
            continue
        try:
            fields = p.name.rsplit("old-", 1)[1].split("-")
            pid = int(fields[0])
        except (IndexError, ValueError):
            continue
        if p in dead:
            why = None
        elif len(fields) >= 3 and fields[2] != HOST_TAG:
            why = "written on another host or in another PID namespace (a container)"
        else:
            why = f"process {pid} is running: its writer, or another process given its PID"
        found.append((p, pid, why))
    return found


def moved_aside_advice(dst: Path) -> str:
    """A sentence naming each moved-aside store of ``dst`` that is never settled here
    (:func:`moved_aside`), with the ``mv`` that puts it back; "" when there is none."""
    dst = Path(dst)
    parts = [
        f"{old} is a whole store that a replacement of {dst} (pid {pid}) moved aside and is "
        f"kept ({why}; it cannot be known whether that writer is gone). If no conversion to "
        f"{dst} is running, put it back: mv {shlex.quote(str(old))} {shlex.quote(str(dst))}"
        + ("" if not os.path.lexists(dst) else f" (after moving {dst} away)")
        for old, pid, why in moved_aside(dst)
        if why is not None
    ]
    return " ".join(f"{x}." for x in parts)


def settle_swapped_out(dst: Path) -> list[Path]:
    """Put back, or remove, the stores killed replacements of ``dst`` moved away.

    NOTE [a killed replacement]: without ``renameat2(RENAME_EXCHANGE)`` (NFS, CIFS, many FUSE
    filesystems) :func:`_replace` renames the old store to ``.<name>.old-PID-TOKEN-HOST``, then
    the new one into place. A writer killed between the two renames leaves no store at the path;
    one killed after them leaves the whole old store beside the new one. Under the store lock,
    a dead writer's ``.old-`` directory that is a store (:func:`is_store`) is renamed back when
    nothing (or an empty directory) is at the path, and removed when a store is in place; one
    that is not a store is never touched (it is named). One whose writer cannot be known to be
    gone (another host or PID namespace: a container restarted after the kill; or a PID now
    running, perhaps reused) is never restored or removed, but named, with the ``mv`` that
    puts it back, in every message about the missing store (:func:`moved_aside_advice`: opening,
    ``jasper-mmap info``) and by :func:`warn_stale_partials`. A conversion without
    ``--overwrite`` to a path left empty beside any moved-aside store is refused at once,
    naming it (:func:`check_destination`): it never resurrects the old store under a new
    conversion (which then failed at its end), and never publishes over it silently; with
    ``--overwrite`` the old store is restored first and then replaced. Returns the
    directories settled.
    """
    dst = Path(dst)
    if not swapped_out(dst):
        return []
    settled = []
    with store_lock(dst, "restoring the store"):
        for old, pid in swapped_out(dst):  # again, under the lock
            if not is_store(old):
                log.warning(
                    "%s: a directory left by a replacement of %s whose process (pid %d) is "
                    "gone is not a jasper_mmap store; it is kept. Remove it if you do not "
                    "need it: rm -r %s",
                    old,
                    dst,
                    pid,
                    shlex.quote(str(old)),
                )
                continue
            empty = not os.path.lexists(dst) or (
                dst.is_dir() and not dst.is_symlink() and _is_empty_dir(dst)
            )
            if empty:
                os.rename(old, dst)  # replaces an empty directory
                fsync_dir(dst.parent)
                log.warning(
                    "%s: restored the store that a replacement (pid %d, killed) had moved to %s",
                    dst,
                    pid,
                    old,
                )
            elif is_store(dst):
                shutil.rmtree(old, ignore_errors=True)
                log.info(
                    "removed %s, the store a killed replacement of %s (pid %d) had replaced",
                    old,
                    dst,
                    pid,
                )
            else:
                continue
            settled.append(old)
    return settled


def _remove_dead(candidates: Iterable[Path]) -> list[Path]:
    removed = []
    for p, pid in list(_dead(candidates)):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
        log.info("removed %s left by an interrupted run (pid %d)", p, pid)
    return removed


def warn_stale_partials(dst: Path, max_entries: int = 1000) -> list[Path]:
    """Warn about the partial directories of OTHER destinations beside ``dst``; delete nothing.

    A writer removes only its own destination's leftovers (:func:`remove_stale_partials`).
    Another destination's ``.<name>.partial-PID-TOKEN-HOST`` written on this host whose process
    is gone is a killed run's; it is named, with its size (its first ``max_entries`` entries
    counted) and the fix. One without a host tag (older versions) is named too, with the
    caveat that a live writer on another host may own it. Returns the directories named.
    """
    own = f".{dst.name}.partial-"
    named = []
    for p, pid in _dead(_entries(dst.parent)):
        if p.name.startswith(own) or p.is_symlink() or not p.is_dir():
            continue  # dst's own are removed; partial files (json, h5) are other writers'
        target = dst.parent / p.name[1 : p.name.rindex(".partial-")]
        size, complete = _disk_usage(p, max_entries)
        from tqdm import tqdm  # here: importing the package stays free of it

        tagged = p.name.endswith(f"-{HOST_TAG}")
        why = (
            "it is kept: a conversion removes only its own destination's leftovers. Free the"
            if tagged
            else "it is kept, in case a conversion on another host is writing it. If none "
            "is, free the"
        )
        log.warning(
            "%s: a hidden partial directory (%s%s) left by a conversion to %s whose process "
            "(pid %d) is not running on this host; %s space: convert to %s again%s (that run "
            "removes it), or rm -r %s",
            p,
            "" if complete else "at least ",
            tqdm.format_sizeof(size, "B"),
            target,
            pid,
            why,
            shlex.quote(str(target)),
            " with --overwrite" if is_store(target) else "",
            shlex.quote(str(p)),
        )
        named.append(p)
    for p, pid in _dead(_entries(dst.parent, ".", ".old-"), "old-"):
        if p.name.startswith(f".{dst.name}.old-") or p.is_symlink() or not p.is_dir():
            continue  # dst's own are settled by remove_stale_partials
        target = dst.parent / p.name[1 : p.name.rindex(".old-")]
        log.warning("%s", swapped_out_advice(target, p, pid))
        named.append(p)
    # those never settled here (another host/namespace, a running PID), dst's own included
    targets = {dst.name}
    for p in _entries(dst.parent, ".", ".old-"):
        targets.add(p.name[1 : p.name.rindex(".old-")])
    for name in sorted(targets):
        advice = moved_aside_advice(dst.parent / name)
        if advice:
            log.warning("%s", advice)
            named += [old for old, _, why in moved_aside(dst.parent / name) if why is not None]
    return named


def swapped_out_advice(target: Path, old: Path, pid: int) -> str:
    """What to say of ``old``, a store a killed replacement of ``target`` moved away
    (NOTE [a killed replacement])."""
    there = os.path.lexists(target)
    return (
        f"{old}: a whole store that a replacement of {target} (pid {pid}, no longer running) "
        f"moved aside and did not finish with; "
        + (
            f"{target} holds the new one. The next write to {target} (convert-pt --overwrite, "
            f"publish_negatives) removes it; or remove it yourself: rm -r {shlex.quote(str(old))}"
            if there
            else f"nothing is at {target} now. The next write to {target} (convert-pt, "
            f"publish_negatives) or opening it restores it; or put it back yourself: "
            f"mv {shlex.quote(str(old))} {shlex.quote(str(target))}"
        )
        + "."
    )


def _disk_usage(root: Path, max_entries: int) -> tuple[int, bool]:
    """Bytes used by ``root``'s first ``max_entries`` entries; whether that was all of them."""
    total, seen, stack = 0, 0, [root]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    seen += 1
                    if seen > max_entries:
                        return total, False
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    total += getattr(st, "st_blocks", 0) * 512 or st.st_size
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
        except OSError:
            continue
    return total, True


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


def is_store(path: Path) -> bool:
    """Whether ``path`` is a jasper_mmap store: a directory whose manifest names our format."""
    from .layout import FORMAT_NAME, MANIFEST

    try:  # never blocks on a FIFO; nesting bounded (NOTE [regular files only] in files.py)
        manifest = read_json(Path(path) / MANIFEST, what="manifest", fix="")
        return isinstance(manifest, dict) and manifest.get("format") == FORMAT_NAME
    except (JasperError, OSError):
        return False


def _is_empty_dir(path: Path) -> bool:
    with os.scandir(path) as it:
        return next(it, None) is None


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_destination(
    dst: str | Path,
    *,
    overwrite: bool,
    is_ours: Callable[[Path], bool] = is_store,
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
    if not overwrite and (not real.exists() or _is_empty_dir(real)):
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
    if real.is_dir() and not _is_empty_dir(real):
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


def publish_dir(
    tmp: Path, dst: Path, replace: bool, is_ours: Callable[[Path], bool] = is_store
) -> None:
    """Make ``tmp`` visible as ``dst`` with one rename; with ``replace``, swap out the old one.

    ``dst`` must be the real path :func:`check_destination` returned. The old directory (when
    replaced) is deleted after the swap, but only if ``is_ours`` still holds for it; otherwise
    it is put back and StoreExistsError is raised. The swap and the deletion hold ``dst``'s
    writer lock (NOTE [one writer per store]).

    Raises:
        StoreExistsError: another process published a non-empty ``dst`` meanwhile.
    """
    fsync_dir(tmp)
    if dst.exists() and replace and not _is_empty_dir(dst):
        # NOTE [one writer per store]: no publisher acts on the old store across the swap and
        # its deletion (a plain rename below needs no lock: it replaces no store)
        with store_lock(dst, "replacing the store"):
            if dst.exists() and not _is_empty_dir(dst):
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
    if is_ours(old) or _is_empty_dir(old):
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


@contextlib.contextmanager
def publishing(
    dst: str | Path,
    *,
    overwrite: bool,
    is_ours: Callable[[Path], bool] = is_store,
    what: str = "a jasper_mmap store",
) -> Iterator[tuple[Path, Path]]:
    """Check ``dst``, yield ``(temporary directory, real destination)``, publish on success.

    The block writes into the temporary directory; when it returns, the directory is fsynced
    and published at the destination with one rename (:func:`publish_dir`; a replacement under
    the destination's writer lock, NOTE [one writer per store]). On any exception it is
    removed and nothing is published.
    """
    real = check_destination(dst, overwrite=overwrite, is_ours=is_ours, what=what)
    remove_stale_partials(real)
    tmp = partial_dir(real)
    try:
        yield tmp, real
        fsync_tree(tmp)
        publish_dir(tmp, real, replace=overwrite, is_ours=is_ours)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # already gone once published


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
