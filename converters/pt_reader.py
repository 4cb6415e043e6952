"""Read ``.pt`` artifacts without ever holding one whole in RAM, and without running pickles.

Tensors: the small ``data.pkl`` record of the zip archive is unpickled by a restricted
unpickler that admits only the globals a plain tensor needs (``torch._utils._rebuild_tensor_v2``,
``torch.<Type>Storage``, ``collections.OrderedDict``), each replaced by a harmless stand-in:
the same allow-list idea as ``torch.load(weights_only=True)``, but it never imports torch (a
second and ~200 MB per process). It yields shape, dtype, strides and storage offset; the zip's
local header gives the byte offset of the storage record. Rows are then read with ``os.pread``.
We do not use ``torch.load(mmap=True)``: it maps the file with a private writable mapping,
which Linux charges against the commit limit in full and refuses for files larger than RAM.

Keyword ids (a Python list of lists of int, from ``torch.save`` or plain ``pickle``): a small
streaming decoder of the pickle opcodes such a list uses. It never builds the whole list, never
imports or calls anything, and rejects any other opcode with a clear error.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jasper_mmap.errors import ArtifactError, ArtifactMissingError

__all__ = ["TensorArtifact", "open_tensor", "iter_keyword_rows", "fingerprint", "LEGACY_FIX"]

log = logging.getLogger(__name__)

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_FIX = (
    "It was saved by torch < 1.6 (legacy format), which cannot be read without loading it whole. "
    "Re-save it once with a current torch: "
    "`torch.save(torch.load(p, weights_only=True), p)`, then convert again."
)

_TORCH_TO_NUMPY = {
    "torch.float32": "f4",
    "torch.float64": "f8",
    "torch.float16": "f2",
    "torch.bfloat16": "u2",
    "torch.int64": "i8",
    "torch.int32": "i4",
    "torch.int16": "i2",
    "torch.int8": "i1",
    "torch.uint8": "u1",
    "torch.bool": "?",
}


def fingerprint(path: Path) -> dict[str, object]:
    """Cheap identity of a source file: size, mtime and a hash of its first and last 64 KiB."""
    st = os.stat(path)
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        h.update(f.read(65536))
        if st.st_size > 65536:
            f.seek(max(65536, st.st_size - 65536))
            h.update(f.read(65536))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "head_tail_blake2b": h.hexdigest()}


def _is_legacy(path: Path) -> bool:
    """Whether ``path`` starts with the pickled magic number of torch's pre-1.6 format."""
    with open(path, "rb") as f:
        head = f.read(16)
    return head[:4] == b"\x80\x02\x8a\x0a" and int.from_bytes(head[4:14], "little") == LEGACY_MAGIC


def _sniff(path: Path) -> str:
    """Return ``zip``, ``pickle`` or ``unknown`` from the first bytes; missing -> error."""
    if not path.is_file():
        what = "is not a file" if path.exists() else "is missing"
        raise ArtifactMissingError(
            f"{path}: required artifact {what}. Re-run the dataset builder "
            f"or copy the file into the dataset directory."
        )
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise ArtifactError(
            f"{path}: is empty (0 bytes). Re-run the dataset builder to write it again."
        )
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def _zip_prefix(path: Path) -> tuple[str, str]:
    """Return ``(archive prefix, byteorder)`` of a torch zip archive, or raise ArtifactError."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
            if not pkl:
                raise ArtifactError(
                    f"{path}: is a zip file but not a torch archive (no */data.pkl record). "
                    f"Save the object with torch.save."
                )
            prefix = pkl[0][: -len("data.pkl")]
            order = (
                z.read(prefix + "byteorder").decode() if prefix + "byteorder" in names else "little"
            )
            return prefix, order
    except zipfile.BadZipFile as e:
        raise ArtifactError(
            f"{path}: torch archive is truncated or corrupt ({e}). "
            f"Re-run the dataset builder to write it again."
        ) from None


@dataclass
class TensorArtifact:
    """A tensor inside a ``.pt`` file, read row-block by row-block.

    Attributes:
        path: the ``.pt`` file.
        shape: tensor shape.
        dtype: torch dtype name (``"torch.float32"``...).
        np_dtype: numpy dtype of the raw elements (bfloat16 as ``uint16`` bits).
    """

    path: Path
    shape: tuple[int, ...]
    dtype: str
    np_dtype: np.dtype
    _offset: int  # byte offset of element [0, 0, ...] in the file
    _strides: tuple[int, ...]  # element strides
    _contiguous: bool

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.np_dtype.itemsize

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.np_dtype.itemsize

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Return rows ``start:stop`` as a new C-contiguous array of ``np_dtype``."""
        n = stop - start
        out = np.empty((n, *self.shape[1:]), dtype=self.np_dtype)
        if n == 0 or out.nbytes == 0:
            return out
        if self._contiguous:
            pos = self._offset + start * self.row_bytes
            view = memoryview(out).cast("B")
            with open(self.path, "rb", buffering=0) as f:
                got = 0
                while got < out.nbytes:
                    k = os.preadv(f.fileno(), [view[got:]], pos + got)
                    if k == 0:
                        raise ArtifactError(
                            f"{self.path}: file ends inside the tensor data (truncated). "
                            f"Re-run the dataset builder to write it again."
                        )
                    got += k
            return out
        item = self.np_dtype.itemsize
        mm = np.memmap(self.path, mode="r", dtype=np.uint8)
        base = (
            mm[self._offset :].view(self.np_dtype)
            if (len(mm) - self._offset) % item == 0
            else mm[self._offset : self._offset + (len(mm) - self._offset) // item * item].view(
                self.np_dtype
            )
        )
        strided = np.lib.stride_tricks.as_strided(
            base, shape=self.shape, strides=tuple(s * item for s in self._strides), writeable=False
        )
        out[...] = strided[start:stop]
        del strided, base, mm
        return out


class _StorageRef:
    __slots__ = ("dtype", "key", "numel")

    def __init__(self, dtype: str, key: str, numel: int) -> None:
        self.dtype, self.key, self.numel = dtype, key, numel


class _TensorRef:
    def __init__(
        self, storage: object, offset: object, size: object, stride: object, *_: object
    ) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class _StorageType:
    def __init__(self, dtype: str) -> None:
        self.dtype = dtype


#: torch.save writes typed storages as GLOBAL "torch <Name>Storage"
_STORAGES = {
    "FloatStorage": "torch.float32",
    "DoubleStorage": "torch.float64",
    "HalfStorage": "torch.float16",
    "BFloat16Storage": "torch.bfloat16",
    "LongStorage": "torch.int64",
    "IntStorage": "torch.int32",
    "ShortStorage": "torch.int16",
    "CharStorage": "torch.int8",
    "ByteStorage": "torch.uint8",
    "BoolStorage": "torch.bool",
}


class _TensorUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` of a one-tensor torch archive into a :class:`_TensorRef`.

    ``find_class`` admits only the tensor-rebuild function, storage types and OrderedDict, each
    mapped to a harmless stand-in, so nothing from the file is ever imported or called (the same
    allow-list idea as ``torch.load(weights_only=True)``, without importing torch).
    """

    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _TensorRef
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch" and name in _STORAGES:
            return _StorageType(_STORAGES[name])
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")

    def persistent_load(self, pid: object) -> _StorageRef:
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[4], int)
        ):
            raise pickle.UnpicklingError(f"persistent id {str(pid)[:80]} is not a tensor storage")
        return _StorageRef(pid[1].dtype, str(pid[2]), pid[4])


def _record_offset(z: zipfile.ZipFile, path: Path, name: str) -> tuple[int, int]:
    """(byte offset, size) of the stored (uncompressed) record ``name`` inside the zip file."""
    try:
        info = z.getinfo(name)
    except KeyError:
        raise ArtifactError(
            f"{path}: torch archive lacks the record {name} its pickle refers to "
            f"(truncated or corrupt). Re-run the dataset builder."
        ) from None
    if info.compress_type != zipfile.ZIP_STORED:
        raise ArtifactError(
            f"{path}: record {name} is compressed; torch archives store data "
            f"uncompressed. Save the tensor with torch.save."
        )
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        head = f.read(30)
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        raise ArtifactError(
            f"{path}: zip local header of {name} is damaged. Re-run the dataset builder."
        )
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def _describe(path: Path) -> tuple[_TensorRef, int, int, str]:
    """Unpickle the tensor's metadata; return (tensor ref, storage offset, storage bytes, order)."""
    prefix, order = _zip_prefix(path)
    try:
        with zipfile.ZipFile(path) as z:
            raw = z.read(prefix + "data.pkl")
            ref = _TensorUnpickler(io.BytesIO(raw)).load()
            if not isinstance(ref, _TensorRef):
                raise ArtifactError(
                    f"{path}: should hold one tensor, but holds a {type(ref).__name__}. "
                    f"Save the tensor itself with torch.save(tensor, path)."
                )
            if not isinstance(ref.storage, _StorageRef):
                raise pickle.UnpicklingError("tensor without a storage")
            base, size = _record_offset(z, path, f"{prefix}data/{ref.storage.key}")
    except pickle.UnpicklingError as e:
        raise ArtifactError(
            f"{path}: refused to load: its pickle asks for something other than plain "
            f"tensors ({str(e)[:200]}). It was not executed. Re-save the tensor with "
            f"torch.save from trusted code."
        ) from None
    except (zipfile.BadZipFile, EOFError, ValueError, TypeError, struct.error) as e:
        if isinstance(e, ArtifactError):
            raise
        raise ArtifactError(
            f"{path}: torch archive is corrupt or truncated ({type(e).__name__}: "
            f"{str(e)[:200]}). Re-run the dataset builder to write it again."
        ) from None
    return ref, base, size, order


def open_tensor(path: Path) -> TensorArtifact:
    """Describe the tensor in ``path`` without reading its data (and without importing torch).

    Raises:
        ArtifactMissingError: the file does not exist.
        ArtifactError: legacy format, not a torch archive, truncated, unsafe pickle, or not a
            single tensor.
    """
    kind = _sniff(path)
    if kind == "pickle":
        if _is_legacy(path):
            raise ArtifactError(f"{path}: not a zip-format torch archive. {LEGACY_FIX}")
        raise ArtifactError(
            f"{path}: is a plain pickle, not a torch archive (it was not unpickled). "
            f"Save the tensor with torch.save(tensor, path)."
        )
    if kind != "zip":
        raise ArtifactError(
            f"{path}: is not a torch archive (it does not start with a zip or pickle "
            f"header). Save the tensor with torch.save."
        )
    ref, base, nbytes, order = _describe(path)
    dtype = ref.storage.dtype
    np_dtype = np.dtype(_TORCH_TO_NUMPY[dtype]).newbyteorder("<" if order == "little" else ">")
    shape, stride, offset = ref.size, ref.stride, ref.offset
    if not (
        isinstance(shape, tuple)
        and isinstance(stride, tuple)
        and isinstance(offset, int)
        and len(shape) == len(stride)
        and all(type(v) is int and v >= 0 for v in shape + stride)
    ):
        raise ArtifactError(
            f"{path}: tensor metadata is malformed (size={shape!r}, stride={stride!r}). "
            f"Re-save the tensor with torch.save."
        )
    if nbytes < ref.storage.numel * np_dtype.itemsize:
        raise ArtifactError(
            f"{path}: storage record is shorter than the tensor needs (truncated). "
            f"Re-run the dataset builder to write it again."
        )
    if base + nbytes > os.path.getsize(path):
        raise ArtifactError(
            f"{path}: file ends inside the tensor data (truncated). "
            f"Re-run the dataset builder to write it again."
        )
    last = (
        offset + sum((n - 1) * st for n, st in zip(shape, stride, strict=True))
        if all(shape)
        else offset
    )
    if last >= max(ref.storage.numel, 1) and all(shape):
        raise ArtifactError(
            f"{path}: tensor reaches past its storage (corrupt metadata). Re-save it."
        )
    contiguous = all(
        stride[k] == int(np.prod(shape[k + 1 :], dtype=np.int64))
        for k in range(len(shape))
        if shape[k] > 1
    )
    return TensorArtifact(
        path=path,
        shape=shape,
        dtype=dtype,
        np_dtype=np_dtype,
        _offset=base + offset * np_dtype.itemsize,
        _strides=stride,
        _contiguous=contiguous,
    )


# -- keyword ids: a streaming decoder of "list of lists of int" pickles ---------------------------

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
