"""Names for work in progress (``.<name>.partial-<pid>-<token>-<host>``) and the clean-up of
what dead writers left (NOTE [names are not patterns] in jasper_mmap/_fs/publish.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shlex
import shutil
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path

from jasper_mmap.errors import (
    StoreWriteError,
    write_error,
)

__all__ = [
    "HOST_TAG",
    "moved_aside",
    "moved_aside_advice",
    "partial_dir",
    "partial_name",
    "remove_stale_partial_files",
    "remove_stale_partials_in",
    "swapped_out",
    "swapped_out_advice",
]

log = logging.getLogger(__name__)


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


def marked_entries(directory: Path, prefix: str = ".", marker: str = ".partial-") -> list[Path]:
    """The entries of ``directory`` whose names start with ``prefix`` and hold ``marker``
    (``.partial-``, or ``.old-`` for stores swapped out by :func:`_replace`): a listing, not a
    glob (NOTE [names are not patterns]). A missing directory has none."""
    try:
        with os.scandir(directory) as it:
            names = [e.name for e in it]
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []
    return [Path(directory, n) for n in names if n.startswith(prefix) and marker in n[1:]]


def remove_stale_partials_in(directory: Path) -> list[Path]:
    """Remove every ``.*.partial-*`` file or directory in ``directory`` whose writer is gone
    (temporary files of :func:`jasper_mmap._fs.files.write_json_atomic` included)."""
    return remove_dead(marked_entries(Path(directory)))


def remove_stale_partial_files(final: Path) -> list[Path]:
    """Remove the partial files (not directories) of ``final`` whose writer is gone."""
    found = marked_entries(final.parent, f".{final.name}.partial-")
    return remove_dead(p for p in found if p.is_file() and not p.is_symlink())


def dead_writers(
    candidates: Iterable[Path], marker: str = "partial-"
) -> Iterator[tuple[Path, int]]:
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
    found = marked_entries(Path(dst).parent, f".{Path(dst).name}.old-", ".old-")
    return [(p, pid) for p, pid in dead_writers(found, "old-") if p.is_dir() and not p.is_symlink()]


def moved_aside(dst: Path) -> list[tuple[Path, int, str | None]]:
    """``(directory, writer pid, why it is kept)`` of EVERY ``.<dst>.old-PID-TOKEN[-HOST]``
    directory beside ``dst`` (symlinks are not): ``why`` is None for a dead writer's
    (:func:`swapped_out`, settled by the next writer or opener), else why it is never
    restored or removed here (another host or PID namespace, or a PID that is running: its
    writer may be alive, or the PID reused). NOTE [a killed replacement]."""
    dst = Path(dst)
    dead = {p for p, _ in swapped_out(dst)}
    found = []
    for p in marked_entries(dst.parent, f".{dst.name}.old-", ".old-"):
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


def remove_dead(candidates: Iterable[Path]) -> list[Path]:
    removed = []
    for p, pid in list(dead_writers(candidates)):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
        log.info("removed %s left by an interrupted run (pid %d)", p, pid)
    return removed


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
