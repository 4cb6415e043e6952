"""The output side of the keyword decoder: rows, the pickle memo, and the values written so far.

:mod:`jasper_mmap.sources.pt.keywords` interprets the opcodes; this module holds what they
build. An inner list or tuple is a :class:`Row` while it is on the pickle stack; once it is
part of the outer list it is *committed*: its length goes to the pending lengths, its values to
the pending values, and pending values are written to the ``spill`` file block by block.

Memory stays bounded whatever the list's length: per memo key the memo keeps only the row's
value offset (int64) and length (int32) in arrays, not a Python object. A memo reference
to a row committed long ago (``[kw] * n``, or the same list object far apart) is re-read from
the pending values or, once written, from ``spill`` with ``os.pread``; a small cache of recently
committed rows spares the read for the common ``[x] * n`` pattern.
"""

from __future__ import annotations

import os
from array import array
from collections import OrderedDict
from collections.abc import Callable
from typing import BinaryIO

import numpy as np

__all__ = ["Row", "OUTER", "Mark", "Memo", "RowSink", "RowStack", "Refused"]

#: memo slot codes (kept in the length array; a length >= 0 is a committed row)
_EMPTY, _INT, _OUTER = -1, -2, -3
#: sparse (far out of order) memo keys kept in a dict, at most this many
_MAX_SPARSE = 1 << 20


class Refused(Exception):
    """The pickle builds something other than a list of lists of int; the message says what."""


class _Outer:
    """The outer list (or tuple) once identified; rows appended to it are committed at once."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "OUTER"


OUTER = _Outer()


class Row:
    """An inner list or tuple of ints.

    Attributes:
        vals: its ints, or ``None`` for a committed row fetched again from the memo (its values
            are then in the output at ``off``, ``n``).
        tup: a tuple (immutable) rather than a list.
        sealed: no more ints may be appended (a tuple, or a list already committed).
        off, n: value offset and length in the output once committed (``off`` is -1 before).
        keys: memo keys that refer to it while it is not committed.
        outer: it became the outer list (an empty list that was given rows).
    """

    __slots__ = ("vals", "tup", "sealed", "off", "n", "keys", "outer")

    def __init__(self, vals: list[int] | None, tup: bool, off: int = -1, n: int = 0) -> None:
        self.vals, self.tup, self.sealed = vals, tup, tup or vals is None
        self.off, self.n, self.keys, self.outer = off, n, None, False


class Memo:
    """Pickle memo keys -> ints, rows (live object or committed offset/length) or the outer.

    Keys of rows not yet committed map to the Row in ``live``; every other key is two numbers
    in the ``off`` (int64) and ``ln`` (int32) arrays: 12 bytes per key.
    """

    def __init__(self) -> None:
        self.off = array("q", bytes(8 * 1024))
        self.ln = array("i", [_EMPTY]) * 1024
        self.live: dict[int, Row] = {}
        self.sparse: dict[int, tuple[int, int]] = {}
        self.count = 0  # distinct keys stored (MEMOIZE uses it as its key)

    def _slot(self, key: int) -> tuple[int, int]:
        if key < len(self.ln):
            return self.off[key], self.ln[key]
        return self.sparse.get(key, (0, _EMPTY))

    def _set(self, key: int, off: int, ln: int) -> None:
        n = len(self.ln)
        if n <= key <= 2 * n + (1 << 16):  # dense keys, as pickle writes them: grow
            grow = max(n, key + 1 - n)
            self.off.frombytes(bytes(8 * grow))
            self.ln.extend(array("i", [_EMPTY]) * grow)
        if key < len(self.ln):
            self.off[key], self.ln[key] = off, ln
        elif len(self.sparse) < _MAX_SPARSE or key in self.sparse:
            self.sparse[key] = (off, ln)
        else:
            raise Refused(f"its memo keys are scattered up to {key} (a hand-made pickle)")

    def put(self, key: int, obj: object) -> None:
        """Store the stack top ``obj`` under ``key`` (PUT, BINPUT, LONG_BINPUT, MEMOIZE)."""
        live = self.live
        if key not in live and self._slot(key)[1] == _EMPTY:
            self.count += 1
        if type(obj) is Row and obj.off < 0:
            live[key] = obj
            obj.keys = [key] if obj.keys is None else [*obj.keys, key]
            return
        live.pop(key, None)
        if type(obj) is int:
            self._set(key, obj, _INT)
        elif obj is OUTER:
            self._set(key, 0, _OUTER)
        else:  # a committed row
            self._set(key, obj.off, obj.n)

    def get(self, key: int) -> object:
        """The object stored under ``key`` (a committed row comes back as a new sealed Row)."""
        row = self.live.get(key)
        if row is not None:
            return row
        off, ln = self._slot(key)
        if ln >= 0:
            return Row(None, False, off, ln)
        if ln == _INT:
            return off
        if ln == _OUTER:
            return OUTER
        raise Refused(f"it refers to memo entry {key}, which was never stored (corrupt pickle)")

    def committed(self, row: Row) -> None:
        """``row`` was committed: its memo keys now hold its offset and length."""
        for key in row.keys or ():
            if self.live.get(key) is row:
                del self.live[key]
                self._set(key, row.off, row.n)
        row.keys = None

    def became_outer(self, row: Row) -> None:
        """``row`` became the outer list: its memo keys now refer to the outer."""
        for key in row.keys or ():
            if self.live.get(key) is row:
                del self.live[key]
                self._set(key, 0, _OUTER)
        row.keys = None


class RowSink:
    """Committed rows: pending (lengths, values) lists; values written to ``spill`` per block."""

    #: recently committed rows kept for memo references: entries, and values per entry
    CACHE_ROWS, CACHE_VALUES = 1024, 4096

    def __init__(self, spill: BinaryIO, block: int, on_block: Callable[[], None]) -> None:
        self.spill, self.block, self.on_block = spill, block, on_block
        self.lens: list[int] = []
        self.vals: list[int] = []
        self.written = 0  # values already in spill
        self.total = 0  # values committed (written + pending)
        self.cache: OrderedDict[int, list[int]] = OrderedDict()  # value offset -> values

    def commit(self, row: Row) -> None:
        """Append ``row`` to the output (a row committed before is copied again)."""
        vals = row.vals
        if vals is None:
            vals = self.values_at(row.off, row.n)
        n, lens, out = len(vals), self.lens, self.vals
        if row.off < 0:
            row.off, row.n, row.sealed = self.total, n, True
            if row.keys and 0 < n <= self.CACHE_VALUES and self.CACHE_ROWS:  # may recur
                if len(self.cache) >= self.CACHE_ROWS:
                    self.cache.popitem(last=False)
                self.cache[row.off] = vals
        lens.append(n)
        out.extend(vals)
        self.total += n
        if len(out) >= self.block or len(lens) >= self.block:
            self.on_block()

    def values_at(self, off: int, n: int) -> list[int]:
        """The ``n`` values committed at value offset ``off`` (pending, cached or in spill)."""
        if off >= self.written:
            return self.vals[off - self.written : off - self.written + n]
        hit = self.cache.get(off)
        if hit is not None and len(hit) == n:
            return hit
        raw = os.pread(self.spill.fileno(), 8 * n, 8 * off)
        return np.frombuffer(raw, dtype="<i8").tolist()

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        """Pending rows as int64 ``(lengths, values)``; the values are written to ``spill``."""
        lens = np.array(self.lens, dtype=np.int64)
        vals = np.array(self.vals, dtype=np.int64)
        self.spill.write(vals.astype("<i8", copy=False).tobytes())
        self.spill.flush()
        self.written += vals.size
        self.lens, self.vals = [], []
        return lens, vals


class Mark:
    """A MARK on the stack; ``rows`` counts the rows pushed above it (committed ones too)."""

    __slots__ = ("rows",)

    def __init__(self) -> None:
        self.rows = 0


_NESTED = "an inner list holds a list or tuple (nested deeper than a list of lists)"


def _what(x: object) -> str:
    return "an int" if type(x) is int else "itself" if x is OUTER or x.outer else "a list"


class RowStack:
    """The pickle stack, restricted to what a list of lists of ints can build.

    Rows are committed to ``sink`` as soon as they can no longer change: when appended to the
    outer list, and, inside a MARK region that can only become the outer list's items (a MARK
    at the bottom of the stack, or right above the outer list), as soon as the next row is
    pushed above them. A row may therefore be pushed only where a valid pickle can hold one
    (anything else is refused at once), which keeps at most a few rows uncommitted.
    """

    def __init__(self, sink: RowSink) -> None:
        self.sink, self.memo = sink, Memo()
        self.stack: list[object] = []  # ints, Row, OUTER, Mark
        self.marks: list[int] = []  # stack positions of the Mark entries
        self.outer_open = False  # OUTER is a list that may still receive rows

    def mark(self) -> None:
        self.marks.append(len(self.stack))
        self.stack.append(Mark())

    def push_row(self, row: Row) -> None:
        """Push an inner list or tuple, committing the row below it in an outer region."""
        stack, marks = self.stack, self.marks
        if marks:
            m = marks[-1]
            if m > 1 or (m == 1 and not (stack[0] is OUTER and self.outer_open)):
                if m > 1 or not self._outer_at_bottom():
                    raise Refused(_NESTED)
            stack[m].rows += 1
            below = stack[-1]
            if type(below) is Row:
                stack.pop()
                self._commit(below)
            elif type(below) is not Mark:
                raise Refused(f"the outer list holds {_what(below)} where a list belongs")
        elif stack and not (len(stack) == 1 and stack[0] is OUTER and self.outer_open):
            if len(stack) > 2 or any(type(x) is not Row for x in stack):
                raise Refused(_NESTED if type(stack[-1]) is Row else "lists and ints are mixed")
        stack.append(row)

    def _outer_at_bottom(self) -> bool:
        """Whether stack[0] is, or can become, the outer list (an empty list turns into it)."""
        first = self.stack[0]
        if first is OUTER:
            return self.outer_open
        if type(first) is not Row or first.sealed or first.off >= 0 or first.vals:
            return False
        first.outer = first.sealed = True
        self.stack[0], self.outer_open = OUTER, True
        self.memo.became_outer(first)
        return True

    def _commit(self, row: object) -> None:
        if type(row) is not Row or row.outer:
            raise Refused(f"the outer list holds {_what(row)} where a list belongs")
        first = row.off < 0
        self.sink.commit(row)
        if first and row.keys:
            self.memo.committed(row)

    def _add_rows(self, target: object, rows: list[object]) -> None:
        at_bottom = len(self.stack) == 1 and self.stack[0] is target
        if not ((target is OUTER and self.outer_open) or (at_bottom and self._outer_at_bottom())):
            raise Refused(_NESTED)
        for row in rows:
            self._commit(row)

    def _extend(self, target: object, ints: list[int]) -> None:
        if type(target) is not Row or target.tup or target.outer:
            what = "an int" if type(target) is int else "a tuple" if type(target) is Row else None
            raise Refused(
                f"it appends to {what} (corrupt pickle)"
                if what
                else "the outer list holds an int where a list belongs"
            )
        if target.sealed:
            raise Refused(
                "an inner list is appended to after it became part of the outer list "
                "(pickle.dump never writes this)"
            )
        target.vals.extend(ints)

    def append(self) -> None:
        """APPEND: the top item into the list below it."""
        stack = self.stack
        if len(stack) - (self.marks[-1] + 1 if self.marks else 0) < 2:
            raise Refused("an APPEND opcode has no list to append to (corrupt pickle)")
        item = stack.pop()
        if type(item) is int:
            self._extend(stack[-1], [item])
        else:
            self._add_rows(stack[-1], [item])

    def _pop_mark(self, opcode: str) -> tuple[int, list[object]]:
        """Pop the last MARK and the items above it; return (rows pushed above it, items)."""
        if not self.marks:
            raise Refused(f"an {opcode} opcode has no MARK (corrupt pickle)")
        m = self.marks.pop()
        rows, items = self.stack[m].rows, self.stack[m + 1 :]
        del self.stack[m:]
        return rows, items

    def appends(self) -> None:
        """APPENDS: the items above the last MARK into the list below it."""
        rows, items = self._pop_mark("APPENDS")
        stack = self.stack
        if not stack or type(stack[-1]) is Mark:
            raise Refused("an APPENDS opcode has no list to append to (corrupt pickle)")
        if not items and not rows and (stack[-1] is OUTER and self.outer_open):
            return
        if rows:  # (ints above the MARK are then refused as items of the outer list)
            self._add_rows(stack[-1], items)
        else:
            self._extend(stack[-1], items)

    def close_mark(self, tup: bool) -> None:
        """TUPLE or LIST: the items above the last MARK become a tuple or list."""
        m = self.marks[-1] if self.marks else -1
        rows, items = self._pop_mark("TUPLE" if tup else "LIST")
        if not rows:
            self.push_row(Row(items, tup))
            return
        if m != 0:
            raise Refused(_NESTED)
        for row in items:
            self._commit(row)
        self.stack.append(OUTER)
        self.outer_open = not tup

    def tuple_n(self, k: int) -> None:
        """TUPLE1, TUPLE2, TUPLE3: the top ``k`` items become a tuple."""
        stack = self.stack
        if len(stack) - (self.marks[-1] + 1 if self.marks else 0) < k:
            raise Refused(f"a TUPLE{k} opcode lacks its {k} items (corrupt pickle)")
        items = stack[-k:]
        del stack[-k:]
        if all(type(x) is int for x in items):
            self.push_row(Row(items, True))
            return
        if self.marks or stack:
            raise Refused(_NESTED)
        for row in items:
            self._commit(row)
        stack.append(OUTER)
        self.outer_open = False

    def put(self, key: int) -> None:
        """PUT, BINPUT, LONG_BINPUT, MEMOIZE: remember the stack top under ``key``."""
        if not self.stack or type(self.stack[-1]) is Mark:
            raise Refused("it memoizes a MARK or an empty stack (corrupt pickle)")
        top = self.stack[-1]
        self.memo.put(key, OUTER if type(top) is Row and top.outer else top)

    def get(self, key: int) -> None:
        """GET, BINGET, LONG_BINGET: push what the memo holds under ``key``."""
        obj = self.memo.get(key)
        if type(obj) is int:
            self.stack.append(obj)
        elif obj is OUTER:
            raise Refused("the outer list contains itself")
        else:
            self.push_row(obj)

    def finish(self) -> None:
        """STOP: exactly the outer list (or an empty list or tuple) must be left."""
        stack = self.stack
        if self.marks or len(stack) != 1:
            raise Refused(f"its pickle leaves {len(stack)} objects on its stack at STOP")
        top = stack[0]
        if type(top) is Row and not top.outer and top.off < 0 and not top.vals:
            return  # an empty list or tuple: zero rows
        if top is not OUTER:
            what = "an int" if type(top) is int else "a list of ints, not a list of lists"
            raise Refused(f"it holds {what}")
