"""A streaming decoder of a pickled "list of lists of int" (``pair_keyword_ids.pt``).

The list comes from ``torch.save`` (a zip archive whose ``data.pkl`` is the pickle, any
``pickle_protocol``) or from plain ``pickle.dump`` with protocol 0 to 5. What is valid is what
the pickle *builds*, as ``torch.load(weights_only=True)`` would build it: an outer list or tuple
of inner lists or tuples of ints (bools count as the ints 0 and 1, as they do in Python and in
``torch.load``'s result). The same inner object may appear at many rows (pickle then writes
memo references), far apart too.

The decoder interprets only the opcodes that build lists, tuples and ints (every protocol's
forms of them, including the text forms of protocol 0), never imports or calls anything, and
refuses any other opcode (strings, floats, dicts, globals, calls, tensors...) naming what it
found, without executing it. It streams: rows are committed as soon as they can no longer
change, also inside one huge APPENDS batch or an outer tuple (whose items pickle keeps on its
stack until the closing TUPLE), so memory is bounded by one row, one input block and one output
block, plus 12 bytes per memo key (see :mod:`jasper_mmap.sources.pt.keyword_rows`).

Deliberate limits, none of which ``pickle.dump``/``torch.save`` ever write: a pickle that leaves
objects on its stack at STOP, an inner list appended to after it became part of the outer list,
an integer encoded in more than 1 MiB, more than ``_MAX_STACK`` pending objects, an opcode that
crosses the end of its pickle frame (pickle's own readers refuse that too).

NOTE [expansion]: a memo reference costs 2-5 bytes of pickle however long the row it names, so
a small file can describe an enormous store (one 10,000-id list shared by every pair: 401 KB of
pickle, 764 MB of keyword arrays). That is nearly always the builder bug ``rows = [[]] * n``
followed by ``rows[i].append(k)``, which gives every pair the same growing list. Honest lists
cost at most about 8 bytes of output (int64 offsets and values) per byte of pickle (an empty
row is 1 byte and one offset). So decoding stops with an ``ArtifactError`` that names the
expansion factor once the output passes both ``EXPANSION_FLOOR`` bytes and ``MAX_EXPANSION``
times the pickle's size; it is checked per output block, so at most about one block more is
written. Raise ``MAX_EXPANSION`` (module attribute) to convert such a file anyway.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickletools
import struct
import tempfile
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np

from jasper_mmap.errors import ArtifactError
from jasper_mmap.sources.pt.archive import LEGACY_FIX, is_legacy, sniff, zip_prefix
from jasper_mmap.sources.pt.keyword_rows import Mark, Refused, Row, RowSink, RowStack

__all__ = ["decode_keyword_rows", "KeywordsCancelled"]

log = logging.getLogger(__name__)

#: values (and rows) per output block handed to ``on_rows``
BLOCK_VALUES = 1 << 17
#: bytes read from the pickle at a time (cancellation is checked once per read)
_READ = 1 << 16
#: most objects the pickle stack may hold (one inner list of a million ids is not a keyword list)
_MAX_STACK = 1 << 20
#: longest accepted text line (protocol 0 ints) and integer encoding
_MAX_LINE, _MAX_LONG = 4400, 1 << 20
_INT64 = 1 << 63
#: NOTE [expansion]: most bytes of keyword arrays (int64 offsets + values) per byte of pickle,
#: checked once the output has passed ``EXPANSION_FLOOR`` bytes
MAX_EXPANSION = 64.0
EXPANSION_FLOOR = 64 << 20
#: first bytes of a protocol 0/1 pickle of a list or tuple: MARK, EMPTY_LIST, EMPTY_TUPLE
_OLD_PICKLE_STARTS = (b"(", b"]", b")")
_I32, _U32 = struct.Struct("<i").unpack_from, struct.Struct("<I").unpack_from
_U64 = struct.Struct("<Q").unpack_from
_TRUNCATED = "the pickle ends inside an opcode (truncated file)"
#: what a refused opcode would build, for the message
_FOUND = {
    **dict.fromkeys(["FLOAT", "BINFLOAT"], "a float"),
    **dict.fromkeys(
        ["STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE"]
        + ["BINUNICODE8"],
        "a string",
    ),
    **dict.fromkeys(["BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"], "bytes"),
    **dict.fromkeys(["NEXT_BUFFER", "READONLY_BUFFER"], "an out-of-band buffer"),
    **dict.fromkeys(["EMPTY_DICT", "DICT", "SETITEM", "SETITEMS"], "a dict"),
    **dict.fromkeys(["EMPTY_SET", "ADDITEMS", "FROZENSET"], "a set"),
    "NONE": "None",
    **dict.fromkeys(["GLOBAL", "STACK_GLOBAL", "INST", "EXT1", "EXT2", "EXT4"], "a Python global"),
    **dict.fromkeys(["REDUCE", "BUILD", "OBJ", "NEWOBJ", "NEWOBJ_EX"], "an object construction"),
    **dict.fromkeys(["PERSID", "BINPERSID"], "a tensor storage reference"),
    **dict.fromkeys(["POP", "POP_MARK", "DUP"], "a POP/DUP stack operation"),
}


def _stack_global(dec: _Decoder, limit: int) -> str | None:
    """``module.name`` when the SHORT_BINUNICODE being refused starts a STACK_GLOBAL's pair
    of strings (protocol 4 names a global so); the decoder stands at its length byte."""
    dec._need(limit)
    buf, i, parts = dec.buf, dec.i, []
    while i < len(buf):
        n = buf[i]
        parts.append(buf[i + 1 : i + 1 + n].decode(errors="replace")[:80])
        i += 1 + n
        i += buf[i : i + 1] == b"\x94"  # MEMOIZE
        if len(parts) == 2:
            return ".".join(parts) if buf[i : i + 1] == b"\x93" else None
        if buf[i : i + 1] != b"\x8c":
            return None
        i += 1
    return None


class KeywordsCancelled(Exception):
    """Decoding was stopped through its ``stop`` event."""


def _bad(path: Path, what: str) -> ArtifactError:
    return ArtifactError(
        f"{path}: pair_keyword_ids should be a list of lists of int, but {what}. "
        f"Save it with torch.save([[int, ...], ...], path) (or pickle.dump)."
    )


@contextlib.contextmanager
def _pickle_stream(path: Path):
    """Open the pickle of ``path``: a torch archive's ``data.pkl``, or the file itself."""
    kind = sniff(path)
    if kind == "zip":
        prefix, _ = zip_prefix(path)
        with zipfile.ZipFile(path) as z:
            storages = [n for n in z.namelist() if n.startswith(prefix + "data/")]
            if storages:
                raise _bad(path, f"the archive holds tensor data ({len(storages)} storages)")
            with z.open(prefix + "data.pkl") as f:
                yield f, z.getinfo(prefix + "data.pkl").file_size
        return
    if kind == "pickle" and is_legacy(path):
        raise ArtifactError(f"{path}: not a zip-format torch archive. {LEGACY_FIX}")
    if kind == "unknown":
        with open(path, "rb") as f:
            head = f.read(8)
        if head[:1] not in _OLD_PICKLE_STARTS:
            raise ArtifactError(
                f"{path}: is neither a torch archive nor a pickled list (it starts with "
                f"{head!r}). Save the keyword ids with torch.save(list_of_lists, path)."
            )
    with open(path, "rb") as f:
        yield f, os.fstat(f.fileno()).st_size


def decode_keyword_rows(
    path: Path,
    on_rows: Callable[[np.ndarray, np.ndarray], None],
    *,
    spill: BinaryIO | None = None,
    block: int = BLOCK_VALUES,
    stop: threading.Event | None = None,
) -> None:
    """Decode the list of lists in ``path``, handing int64 ``(row_lengths, values)`` blocks
    to ``on_rows`` in order.

    Args:
        path: ``pair_keyword_ids.pt`` (torch archive or plain pickle).
        on_rows: called per block of about ``block`` values (or rows).
        spill: a binary file open for writing and reading; every block's values are written
            to it (a memo reference to a row committed long ago is re-read from there). A
            temporary file when ``None``.
        block: values (and rows) per block.
        stop: when set, decoding stops soon with :class:`KeywordsCancelled`.

    Raises:
        ArtifactError: anything that is not a list of lists of int (legacy torch files, tensors,
            strings, globals...), named in the message; nothing is executed.
    """
    with contextlib.ExitStack() as stack:
        if spill is None:
            spill = stack.enter_context(tempfile.TemporaryFile())
        f, size = stack.enter_context(_pickle_stream(path))
        _Decoder(f, size, path, spill, on_rows, block, stop).run()


class _Decoder:
    """The opcode interpreter; see :func:`decode_keyword_rows`."""

    def __init__(self, f, size, path, spill, on_rows, block, stop) -> None:
        self.f, self.size, self.path, self.on_rows, self.stop = f, size, path, on_rows, stop
        self.sink = RowSink(spill, block, self._flush)
        self.rows = RowStack(self.sink)
        self.bools = False
        self.out_rows = 0  # rows handed to on_rows or about to be (NOTE [expansion])
        self.buf, self.i, self.base, self.eof = b"", 0, 0, False
        self.frame_end: int | None = None  # end of the current pickle frame (FRAME opcode)

    def _flush(self) -> None:
        if self.sink.lens:
            self._check_expansion()
            self.on_rows(*self.sink.take())
        if self.stop is not None and self.stop.is_set():
            raise KeywordsCancelled()

    def _check_expansion(self) -> None:
        """NOTE [expansion]: refuse a pickle whose memo references multiply its size."""
        self.out_rows += len(self.sink.lens)
        out = 8 * (self.out_rows + 1 + self.sink.total)
        if out <= EXPANSION_FLOOR or out <= MAX_EXPANSION * max(self.size, 1):
            return
        raise ArtifactError(
            f"{self.path}: pair_keyword_ids expands from {self.size} bytes of pickle to over "
            f"{out} bytes of keyword arrays after {self.out_rows} rows (x{out / max(self.size, 1):.0f}, "
            f"limit x{MAX_EXPANSION:g}): its rows refer to the same list object again and again "
            f"(pickle memo references), as `rows = [[]] * n` followed by `rows[i].append(k)` "
            f"does, which gives every pair one shared growing list. Build one list per pair "
            f"(`[[] for _ in range(n)]`) and save it again; if the lists are right, set "
            f"jasper_mmap.sources.pt.keywords.MAX_EXPANSION = float('inf') before converting."
        )

    def _pos(self) -> int:
        return self.base + self.i

    def _need(self, n: int) -> None:
        """Make ``buf[i : i + n]`` available unless the input ends first."""
        if len(self.buf) - self.i >= n or self.eof:
            return
        parts, have = [self.buf[self.i :]], len(self.buf) - self.i
        while have < n:
            more = self.f.read(max(_READ, n - have))
            if not more:
                self.eof = True
                break
            parts.append(more)
            have += len(more)
        self.base += self.i
        self.buf, self.i = b"".join(parts), 0
        if self.stop is not None and self.stop.is_set():
            raise KeywordsCancelled()
        if len(self.rows.stack) > _MAX_STACK:
            raise _bad(self.path, f"its pickle keeps over {_MAX_STACK} objects pending")

    def run(self) -> None:
        try:
            self._loop()
            self.rows.finish()
        except Refused as e:
            raise _bad(self.path, str(e)) from None
        except (IndexError, struct.error):
            if not self.eof:
                raise
            raise _bad(self.path, _TRUNCATED) from None
        self._flush()
        if self.bools:
            log.warning(
                "%s: pair_keyword_ids holds bools (True/False); read as keyword ids 1/0, "
                "as Python and torch.load treat them",
                self.path,
            )

    # -- the opcode loop ------------------------------------------------------------------

    def _loop(self) -> None:
        """Interpret opcodes until STOP. One function with local names on purpose: this loop
        runs once per opcode (~10 per row), and the common opcodes are handled inline."""
        rows = self.rows
        stack, marks, memo = rows.stack, rows.marks, rows.memo
        push_row, put, get = rows.push_row, rows.put, rows.get
        buf, i, limit = self.buf, self.i, -1
        while True:
            if i > limit:  # room for the longest fixed-size opcode (LONG1), or a frame's end
                self.buf, self.i = buf, i
                limit = self._slow_path()
                buf, i = self.buf, self.i
            op = buf[i]
            i += 1
            if op == 0x4B:  # K BININT1
                stack.append(buf[i])
                i += 1
            elif op == 0x5D:  # ] EMPTY_LIST
                push_row(Row([], False))
            elif op == 0x28:  # ( MARK
                marks.append(len(stack))
                stack.append(Mark())
            elif op == 0x65:  # e APPENDS
                rows.appends()
            elif op == 0x4D:  # M BININT2
                stack.append(buf[i] | buf[i + 1] << 8)
                i += 2
            elif op == 0x71 or op == 0x94:  # q BINPUT, MEMOIZE
                if op == 0x71:
                    put(buf[i])
                    i += 1
                else:
                    put(memo.count)
            elif op == 0x68:  # h BINGET
                get(buf[i])
                i += 1
            elif op == 0x4A:  # J BININT
                stack.append(_I32(buf, i)[0])
                i += 4
            elif op == 0x61:  # a APPEND
                rows.append()
            elif 0x85 <= op <= 0x87:  # TUPLE1, TUPLE2, TUPLE3
                rows.tuple_n(op - 0x84)
            elif op == 0x74 or op == 0x29:  # t TUPLE, ) EMPTY_TUPLE
                if op == 0x74:
                    self.rows.close_mark(True)
                else:
                    push_row(Row([], True))
            elif op == 0x72 or op == 0x6A:  # r LONG_BINPUT, j LONG_BINGET
                key = _U32(buf, i)[0]
                i += 4
                if op == 0x72:
                    put(key)
                else:
                    get(key)
            elif op == 0x88 or op == 0x89:  # NEWTRUE, NEWFALSE
                stack.append(1 if op == 0x88 else 0)
                self.bools = True
            elif op == 0x2E:  # . STOP
                return
            else:
                self.buf, self.i = buf, i
                self._rare(op)
                buf, i, limit = self.buf, self.i, -1

    def _slow_path(self) -> int:
        """Refill the buffer and check frame ends; return the position of the next check."""
        if self.frame_end is not None and self._pos() >= self.frame_end:
            if self._pos() > self.frame_end:  # pickle refuses this (its _Unframer does)
                raise _bad(self.path, "an opcode crosses the end of its pickle frame (corrupt)")
            self.frame_end = None
        self._need(300)
        if self.i >= len(self.buf):
            raise _bad(self.path, "the pickle ends before its STOP opcode (truncated file)")
        limit = len(self.buf) - (1 if self.eof else 300)
        if self.frame_end is not None:
            limit = min(limit, self.frame_end - self.base - 1)
        return limit

    def _rare(self, op: int) -> None:
        """Opcodes of other protocols' forms (text ints, LONG1/4, LIST, PUT/GET, FRAME...)."""
        if op == 0x8A or op == 0x8B:  # LONG1, LONG4
            self._long(op == 0x8A)
        elif op in (0x49, 0x4C, 0x70, 0x67):  # INT, LONG, PUT, GET: protocol 0 text forms
            self._text(op)
        elif op == 0x6C:  # l LIST
            self.rows.close_mark(False)
        elif op == 0x80:  # PROTO
            self._need(1)
            if self.buf[self.i] > 5:
                raise _bad(self.path, f"it uses pickle protocol {self.buf[self.i]} (known: 0-5)")
            self.i += 1
        elif op == 0x95:  # FRAME
            self._frame()
        else:
            raise _bad(self.path, self._refused(op))

    def _long(self, short: bool) -> None:
        """LONG1 (one length byte) or LONG4: a little-endian two's complement integer."""
        self._need(4)
        n = self.buf[self.i] if short else _I32(self.buf, self.i)[0]
        self.i += 1 if short else 4
        if not 0 <= n <= _MAX_LONG:
            raise _bad(self.path, f"it holds an integer encoded in {n} bytes")
        self._need(n)
        data = self.buf[self.i : self.i + n]
        if len(data) < n:
            raise _bad(self.path, _TRUNCATED)
        self.i += n
        self._push_int(int.from_bytes(data, "little", signed=True))

    def _text(self, op: int) -> None:
        """INT, LONG, PUT, GET with their decimal text argument (as pickle parses it)."""
        line = self._line()
        if op == 0x49 and line in (b"00", b"01"):  # pickle's False and True
            self.bools = True
            self.rows.stack.append(int(line == b"01"))
        elif op in (0x49, 0x4C):
            self._push_int(self._text_int(line[:-1] if line.endswith(b"L") else line, 0))
        else:
            key = self._text_int(line, 10)
            if key < 0:
                raise _bad(self.path, f"it uses the negative memo key {key} (corrupt pickle)")
            if op == 0x70:
                self.rows.put(key)
            else:
                self.rows.get(key)

    def _frame(self) -> None:
        """FRAME: transparent, but its bytes must exist and no opcode may cross its end."""
        if self.frame_end is not None:
            raise _bad(self.path, "a pickle frame begins inside the previous one (corrupt)")
        self._need(8)
        n = _U64(self.buf, self.i)[0]
        self.i += 8
        if n > self.size - self._pos():
            raise _bad(self.path, _TRUNCATED)
        self.frame_end = self._pos() + n

    def _line(self) -> bytes:
        """The text argument of a protocol 0 opcode, without its newline."""
        self._need(_MAX_LINE + 1)
        j = self.buf.find(b"\n", self.i, self.i + _MAX_LINE + 1)
        if j < 0:
            if len(self.buf) - self.i <= _MAX_LINE:
                raise _bad(self.path, _TRUNCATED)
            raise _bad(self.path, f"a text opcode argument is over {_MAX_LINE} bytes long")
        line, self.i = self.buf[self.i : j], j + 1
        return line

    def _text_int(self, text: bytes, base: int) -> int:
        try:
            return int(text, base)
        except ValueError:
            raise _bad(self.path, f"a text integer reads {text[:40]!r}, not a number") from None

    def _push_int(self, v: int) -> None:
        if not -_INT64 <= v < _INT64:
            shown = v if v.bit_length() < 200 else f"a {v.bit_length()}-bit number"
            raise _bad(self.path, f"it holds an integer too large for int64 ({shown})")
        self.rows.stack.append(v)

    def _refused(self, op: int) -> str:
        """What a refused opcode builds, for the message."""
        code, pos = pickletools.code2op.get(chr(op)), self._pos() - 1
        if code is None:
            return f"its pickle has the byte {bytes([op])!r} at byte {pos}, not an opcode"
        what = _FOUND.get(code.name, "something other than lists and ints")
        if code.name in ("GLOBAL", "INST"):
            with contextlib.suppress(IndexError, ValueError):
                self._need(_MAX_LINE + 1)
                module, name = self.buf[self.i :].split(b"\n", 2)[:2]
                what += f" {(module + b'.' + name).decode(errors='replace')[:160]}"
        elif code.name == "SHORT_BINUNICODE":  # protocol 4 names a global by two strings
            found = _stack_global(self, 600)
            if found:
                what, code = f"a Python global {found}", pickletools.code2op["\x93"]
        return f"its pickle holds {what} (opcode {code.name} at byte {pos}; nothing was executed)"
