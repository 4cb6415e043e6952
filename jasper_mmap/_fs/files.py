"""Opening the files we read: regular files only, never blocking; JSON of bounded nesting.

# NOTE [regular files only]
A FIFO, socket or device in place of one of our files (``manifest.json``, ``config.json``,
``negatives/CURRENT.json``, a ``gen-N.json``, a safetensors file, a ``zarr.json``) would make a
plain ``open`` wait forever for a writer (FIFO) or read endless bytes (``/dev/zero``). Every
file jasper_mmap opens for reading goes through :func:`open_regular`: ``O_NONBLOCK`` on the
open (a FIFO opens at once, with no writer), then ``fstat`` of the descriptor just opened, and
anything but a regular file is refused naming what it is. ``O_NONBLOCK`` is then cleared (it
means nothing for a regular file). Checking the descriptor, not the path, leaves no window for
a swap between the check and the read.

:func:`read_json` reads our JSON files through it and bounds their nesting
(:data:`MAX_JSON_DEPTH`): our files nest a few levels, and a deeply nested one would otherwise
raise ``RecursionError`` in the parser, or later in code that walks or prints it. It also
bounds their size (:data:`MAX_JSON_BYTES`): a sparse multi-gigabyte ``CURRENT.json`` is
refused from its ``fstat``, not read into memory.

:func:`describe_path` says what is at a path that is not what we wanted (a FIFO, a device, a
symbolic link loop, a link to nothing...), so a message never calls such a path missing or
lets ``os``/``pathlib`` raise about it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
from pathlib import Path
from typing import IO, Any

from jasper_mmap._fs.partials import (
    partial_name,
)
from jasper_mmap.errors import JasperError, StoreFormatError, StoreNotFoundError, write_error

#

__all__ = [
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "open_regular",
    "read_json",
    "file_kind",
    "describe_path",
    "json_depth",
    "as_path",
]

#: deepest nesting accepted in our JSON files (ours nest at most 5 levels)
MAX_JSON_DEPTH = 64
#: largest JSON file read (a manifest lists every data file: ~4 MB for a 372 GB zarr store)
MAX_JSON_BYTES = 256 << 20

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def file_kind(mode: int) -> str:
    """``"a regular file"``, ``"a FIFO (named pipe)"``, ``"a directory"``... for ``st_mode``."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def describe_path(path: str | os.PathLike) -> str:
    """What is at ``path``, for messages: ``"does not exist"``, ``"is a FIFO (named pipe)"``,
    ``"is a directory"``, ``"is a symbolic link loop"``, ``"is a symbolic link to 'X', which
    does not exist"``, ``"cannot be examined (Permission denied)"``... Never raises; reads
    nothing but the path's (and its link's) metadata.
    """
    try:
        if os.fspath(path) in ("", b""):
            return "is an empty path"
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError) as e:
        try:
            os.lstat(path)
        except OSError:
            if isinstance(e, NotADirectoryError):
                return "cannot exist (a directory on its path is a file)"
            return "does not exist"
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return f"is a symbolic link to {target!r}, which does not exist"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symbolic link loop (links that point at each other)"
        return f"cannot be examined ({e.strerror})"
    except (ValueError, TypeError) as e:  # NUL in the name, not a path
        return f"is not a usable path ({e})"
    return f"is {file_kind(st.st_mode)}"


def open_regular(
    path: str | os.PathLike,
    *,
    what: str = "file",
    fix: str = "",
    error: type[Exception] = StoreFormatError,
    missing: type[Exception] | None = StoreNotFoundError,
    dir_fd: int | None = None,
    shown: str | os.PathLike | None = None,
) -> IO[bytes]:
    """Open ``path`` for reading (binary), refusing anything but a regular file, never blocking.

    ``dir_fd``: open ``path`` relative to that directory descriptor. ``shown``: the name used
    in messages (default ``path``). A missing file raises ``missing`` (None: the
    FileNotFoundError itself); a FIFO, socket, device or directory, or a file that cannot be
    opened (permissions, I/O error), raises ``error``. Messages are
    ``{shown}: {what} {problem}. {fix}``.
    """
    name = shown if shown is not None else path
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except (FileNotFoundError, NotADirectoryError):
        if missing is None:
            raise
        raise missing(f"{name}: {what} is missing. {fix}".rstrip()) from None
    except OSError as e:
        if e.errno == errno.ENXIO:  # a socket (or a device with nothing behind it)
            try:
                kind = file_kind(os.stat(path, dir_fd=dir_fd).st_mode)
            except OSError:
                kind = "not a regular file"
            raise error(f"{name}: {what} is {kind}, not a regular file. {fix}".rstrip()) from None
        raise error(f"{name}: {what} cannot be opened ({e.strerror}). {fix}".rstrip()) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"{name}: {what} is {file_kind(mode)}, not a regular file. {fix}".rstrip())
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def json_depth(obj: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of parsed JSON ``obj`` (a scalar is 0), counted up to ``limit + 1``:
    iterative, so any depth is measured without recursion."""
    deepest = 0
    stack = [(obj, 1)] if isinstance(obj, dict | list) else []
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > limit:
            return depth
        for v in node.values() if isinstance(node, dict) else node:
            if isinstance(v, dict | list):
                stack.append((v, depth + 1))
    return deepest


def read_json(
    path: str | os.PathLike,
    *,
    what: str,
    fix: str,
    error: type[Exception] = StoreFormatError,
    missing: type[Exception] | None = StoreNotFoundError,
    dir_fd: int | None = None,
    shown: str | os.PathLike | None = None,
) -> Any:
    """Parse the JSON file ``path`` (UTF-8), opened with :func:`open_regular`.

    Raises:
        ``missing``: the file does not exist (None: FileNotFoundError).
        ``error``: not a regular file, unreadable, not valid JSON or UTF-8, or nested deeper
            than :data:`MAX_JSON_DEPTH`.
    """
    name = shown if shown is not None else path
    with open_regular(
        path, what=what, fix=fix, error=error, missing=missing, dir_fd=dir_fd, shown=shown
    ) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_JSON_BYTES:
                raise error(
                    f"{name}: {what} is {size} bytes, more than any of ours ({MAX_JSON_BYTES}); "
                    f"it is not read. {fix}"
                )
            raw = f.read(MAX_JSON_BYTES + 1)
        except OSError as e:
            raise error(f"{name}: {what} cannot be read ({e.strerror}). {fix}") from None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        if isinstance(e, RecursionError):
            e = f"nested deeper than {MAX_JSON_DEPTH} levels"
        raise error(f"{name}: {what} is not valid JSON ({e}). {fix}") from None
    if json_depth(obj) > MAX_JSON_DEPTH:
        raise error(
            f"{name}: {what} is not valid JSON for us (nested deeper than {MAX_JSON_DEPTH} "
            f"levels). {fix}"
        )
    return obj


#: longest path the kernel takes (PATH_MAX), and the usual longest name (NAME_MAX)
_PATH_MAX, _NAME_MAX = 4096, 255


def as_path(value: Any, what: str, error: type[JasperError] = StoreNotFoundError) -> Path:
    """``value`` (a ``str``, ``bytes`` or ``os.PathLike`` giving either) as an absolute
    ``Path``, ``~`` expanded, or ``error`` (ours, also the builtin users catch) saying what is
    wrong with it: not a path, empty (never the current directory), a NUL character, a
    ``~user`` with no such user, a name or path past the kernel's limits. Bytes are decoded
    with ``os.fsdecode`` (names that are not UTF-8 included). ``what`` names the argument in
    the message ("the dataset directory")."""
    fix = f"Pass {what} as a path (str or pathlib.Path)."
    try:
        raw = os.fspath(value)
    except TypeError:  # not a path, or a PathLike whose __fspath__ returns something else
        raise error(
            f"{value!r:.80}: {what} should be a path (a str, bytes or os.PathLike), but is "
            f"not a path. {fix}"
        ) from None
    if not isinstance(raw, str | bytes):
        raise error(
            f"{value!r:.80}: {what} should be a path, but its __fspath__ gives a "
            f"{type(raw).__name__}. {fix}"
        )
    text = os.fsdecode(raw)
    if text == "":
        raise error(
            f"{value!r:.80}: {what} should be a path, but is empty (an empty path is not "
            f"the current directory). {fix}"
        )
    if "\0" in text:
        raise error(f"{text!r:.200}: {what} holds a NUL character, which no path can. {fix}")
    try:
        path = Path(text).expanduser()
    except RuntimeError:  # "~nosuchuser/x"
        user = text[1:].split(os.sep, 1)[0]
        raise error(
            f"{text}: {what} starts with ~{user}, but there is no user {user!r} to expand it "
            f"to. Write the directory out in full."
        ) from None
    path = path.absolute()
    encoded = os.fsencode(str(path))
    if len(encoded) >= _PATH_MAX:
        raise error(
            f"{str(path)[:80]}...: {what} is {len(encoded)} bytes long, past the {_PATH_MAX} a "
            f"path may have. Choose a shorter path."
        )
    for part in path.parts:
        if len(os.fsencode(part)) > _NAME_MAX:
            raise error(
                f"{path}: {what} has a name of {len(os.fsencode(part))} bytes "
                f"({part[:40]}...), past the {_NAME_MAX} a file name may have. Choose a "
                f"shorter name."
            )
    return path


def write_json_atomic(path: Path, obj: Any, what: str | None = None) -> None:
    """Write ``obj`` as JSON to ``path`` via a temporary file and one atomic ``os.replace``.

    On any failure the temporary file is removed and ``path`` is left as it was.

    Raises:
        StoreWriteError: the disk is full, the filesystem read-only, permission denied.
        OSError, TypeError, ValueError: anything else (``obj`` not JSON-serializable...).
    """
    path = Path(path)
    tmp = path.with_name(partial_name(path.name))
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink()
        except OSError:
            pass  # never created, or already renamed
        if isinstance(e, OSError) and not isinstance(e, JasperError):
            raise write_error(path, e, what or path.name) from e
        raise
