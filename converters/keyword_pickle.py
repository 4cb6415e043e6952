"""A streaming decoder of pickled "list of lists of int" (``pair_keyword_ids.pt``).

The list comes from ``torch.save`` (a zip archive whose ``data.pkl`` is the pickle) or from plain
``pickle``. The decoder understands only the opcodes such a list uses; it never builds the whole
list, never imports or calls anything, and rejects any other opcode with a clear error.
"""

from __future__ import annotations

import io
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from jasper_mmap.errors import ArtifactError

from .pt_reader import LEGACY_FIX, LEGACY_MAGIC, _sniff, _zip_prefix

__all__ = ["iter_keyword_rows"]

_INT_OPS = {b"K"[0]: (1, "<B"), b"M"[0]: (2, "<H"), b"J"[0]: (4, "<i")}
_MEMO_OPS = {b"q"[0]: 1, b"r"[0]: 4}  # BINPUT, LONG_BINPUT (arg = memo index)
_GET_OPS = {b"h"[0]: 1, b"j"[0]: 4}  # BINGET, LONG_BINGET
_MARK, _EMPTY_LIST, _APPEND, _APPENDS = b"("[0], b"]"[0], b"a"[0], b"e"[0]
_PROTO, _FRAME, _STOP, _MEMOIZE, _LONG1 = 0x80, 0x95, b"."[0], 0x94, 0x8A


class _Row:
    """An inner list: its values until it is written out, then only its memo key and length."""

    __slots__ = ("vals", "key")

    def __init__(self) -> None:
        self.vals: list[int] | None = []
        self.key = -1


def _bad(path: Path, what: str) -> ArtifactError:
    return ArtifactError(
        f"{path}: pair_keyword_ids should be a list of lists of int, but {what}. "
        f"Save it with torch.save([[int, ...], ...], path) (or pickle.dump)."
    )


def _pickle_stream(path: Path) -> io.BufferedIOBase:
    kind = _sniff(path)
    if kind == "zip":
        prefix, _ = _zip_prefix(path)
        with zipfile.ZipFile(path) as z:
            others = [n for n in z.namelist() if n.startswith(prefix + "data/")]
            if others:
                raise _bad(path, f"the archive holds tensor data ({len(others)} storages)")
        return zipfile.ZipFile(path).open(prefix + "data.pkl")
    if kind == "pickle":
        return open(path, "rb")  # noqa: SIM115 - closed by the caller
    raise ArtifactError(
        f"{path}: is neither a torch archive nor a pickle. Save the keyword ids with "
        f"torch.save(list_of_lists, path)."
    )


def iter_keyword_rows(path: Path, block: int = 1 << 20) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(row_lengths, values)`` int64 blocks of the list of lists in ``path``, in order.

    Memory is bounded: one input block, one outer APPENDS batch (pickle writes 1000 items per
    batch), the last ``_RECENT`` inner lists, and one status byte per inner list. Raises
    ArtifactError for anything that is not a list of lists of int (legacy torch files, tensors,
    strings, globals...) without executing it.
    """
    with _pickle_stream(path) as f:
        yield from _KeywordDecoder(f, path, block)


_RECENT = 4096
_UNKNOWN, _EMPTY_DONE, _FULL_DONE = 0, 1, 2


class _KeywordDecoder:
    """Iterator over (lengths, values) blocks; see :func:`iter_keyword_rows`."""

    def __init__(self, f: io.BufferedIOBase, path: Path, block: int) -> None:
        self.f, self.path, self.block = f, path, block
        self.stack: list[object] = []  # ints, _Row, "outer", None (MARK)
        self.recent: dict[int, _Row] = {}  # memo key -> row, for the last _RECENT rows
        self.status = np.zeros(1024, dtype=np.uint8)  # memo key -> _EMPTY_DONE / _FULL_DONE
        self.memo_keys = 0
        self.lens: list[int] = []
        self.vals: list[int] = []

    def _memo(self, key: int) -> None:
        top = self.stack[-1]
        self.memo_keys = max(self.memo_keys, key + 1)
        if isinstance(top, _Row):
            top.key = key
            self.recent[key] = top
            if len(self.recent) > 2 * _RECENT:
                for k in sorted(self.recent)[:_RECENT]:
                    del self.recent[k]

    def _get(self, key: int) -> None:
        row = self.recent.get(key)
        if row is None:
            state = self.status[key] if key < len(self.status) else _UNKNOWN
            if state != _EMPTY_DONE:
                raise _bad(
                    self.path,
                    "it re-uses one non-empty inner list object many rows apart; "
                    "save distinct lists ([list(x) for x in ids])",
                )
            row = _Row()
        self.stack.append(row)

    def _emit(self, rows: list[object]) -> None:
        for row in rows:
            if not isinstance(row, _Row):
                raise _bad(self.path, f"the outer list holds a {type(row).__name__}")
            if row.vals is None:
                raise _bad(
                    self.path,
                    "one non-empty inner list object appears several times; "
                    "save distinct lists ([list(x) for x in ids])",
                )
            self.lens.append(len(row.vals))
            self.vals.extend(row.vals)
            if row.key >= 0:
                if row.key >= len(self.status):
                    self.status = np.concatenate([self.status, np.zeros_like(self.status)])
                self.status[row.key] = _EMPTY_DONE if not row.vals else _FULL_DONE
            if row.vals:
                row.vals = None  # a flushed non-empty row keeps no values

    def _append(self, many: bool) -> None:
        stack = self.stack
        if many:
            try:
                m = len(stack) - 1 - stack[::-1].index(None)
            except ValueError:
                raise _bad(self.path, "an APPENDS opcode has no MARK") from None
            items, target = stack[m + 1 :], stack[m - 1] if m >= 1 else None
            del stack[m:]
        else:
            if len(stack) < 2:
                raise _bad(self.path, "an APPEND has no list to append to")
            items, target = [stack.pop()], stack[-1]
        if isinstance(target, _Row):
            if target.vals is None or not all(type(v) is int for v in items):
                raise _bad(self.path, "an inner list holds something other than ints")
            target.vals.extend(items)
        elif target == "outer":
            self._emit(items)
        else:
            raise _bad(self.path, "an append targets something other than a list")

    def _finish(self) -> None:
        stack = self.stack
        if len(stack) == 1 and type(stack[0]) is int and stack[0] == LEGACY_MAGIC:
            raise ArtifactError(f"{self.path}: {LEGACY_FIX}")
        if stack != ["outer"]:
            what = type(stack[0]).__name__ if stack else "nothing"
            raise _bad(self.path, f"the pickle holds a {what}")

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        try:
            yield from self._run()
        except (struct.error, IndexError):
            raise _bad(self.path, "the pickle ends inside an opcode (truncated file)") from None
        except OverflowError:
            raise _bad(self.path, "it holds an integer too large for int64") from None

    def _run(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        buf, i, eof = b"", 0, False
        stack = self.stack
        while True:
            if len(buf) - i < 300 and not eof:  # room for the longest opcode we accept
                more = self.f.read(self.block)
                eof = not more
                buf, i = buf[i:] + more, 0
            if i >= len(buf):
                raise _bad(self.path, "the pickle ends before its STOP opcode (truncated file)")
            op = buf[i]
            i += 1
            if op in _INT_OPS:
                n, fmt = _INT_OPS[op]
                stack.append(struct.unpack_from(fmt, buf, i)[0])
                i += n
            elif op == _APPENDS or op == _APPEND:
                self._append(op == _APPENDS)
                if len(self.vals) >= self.block // 8 or len(self.lens) >= self.block // 8:
                    yield np.array(self.lens, dtype=np.int64), np.array(self.vals, dtype=np.int64)
                    self.lens, self.vals = [], []
            elif op == _MARK:
                stack.append(None)
            elif op == _EMPTY_LIST:
                stack.append(_Row() if stack else "outer")
            elif op in _MEMO_OPS:
                n = _MEMO_OPS[op]
                self._memo(buf[i] if n == 1 else struct.unpack_from("<I", buf, i)[0])
                i += n
            elif op == _MEMOIZE:
                self._memo(self.memo_keys)
            elif op in _GET_OPS:
                n = _GET_OPS[op]
                self._get(buf[i] if n == 1 else struct.unpack_from("<I", buf, i)[0])
                i += n
            elif op == _LONG1:
                n = buf[i]
                stack.append(int.from_bytes(buf[i + 1 : i + 1 + n], "little", signed=True))
                i += 1 + n
            elif op == _PROTO:
                i += 1
            elif op == _FRAME:
                i += 8
            elif op == _STOP:
                break
            else:
                raise _bad(
                    self.path,
                    f"its pickle uses opcode {bytes([op])!r} at byte {i - 1}, which "
                    f"such a list never needs (nothing was executed)",
                )
        self._finish()
        if self.lens:
            yield np.array(self.lens, dtype=np.int64), np.array(self.vals, dtype=np.int64)
