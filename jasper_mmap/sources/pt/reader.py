"""Read ``.pt`` artifacts without ever holding one whole in RAM, and without running pickles.

Tensors: the small ``data.pkl`` record of the zip archive is unpickled by the restricted
unpickler of :mod:`jasper_mmap.sources.pt.tensor_pickle`, which admits only the globals a plain
tensor needs (the same allow-list idea as ``torch.load(weights_only=True)``, each global
replaced by a harmless stand-in), and never imports torch (a second and ~200 MB per process). It
yields dtype, shape, strides, storage offset and storage record; every one is checked against
the record's size before any row is read, so corrupt metadata gives an ArtifactError naming the
file, never bytes from outside the tensor. The zip's local header gives the byte offset of the
storage record; rows are then read with ``os.pread``. We do not use ``torch.load(mmap=True)``:
it maps the file with a private writable mapping, which Linux charges against the commit limit
in full and refuses for files larger than RAM.

float8 tensors come back decoded to float32 (numpy has no float8) through a 256-entry table
built from each format's definition (bit-exact with torch's ``.float()``, NaN payloads
included); a tensor saved with its negative or conjugate bit set comes back resolved.

Keyword ids (a pickled list of lists) are decoded by :mod:`jasper_mmap.sources.pt.keywords`.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jasper_mmap.errors import ArtifactError
from jasper_mmap.sources.pt.archive import LEGACY_FIX, corrupt_error, is_legacy, sniff, zip_prefix
from jasper_mmap.sources.pt.tensor_pickle import (
    DTYPE_ITEMSIZE,
    Malformed,
    TensorMeta,
    Unsafe,
    read_tensor_meta,
)

__all__ = ["TensorArtifact", "open_tensor"]

log = logging.getLogger(__name__)


#: numpy dtype of the elements in the file (bfloat16 as uint16 bits, float8 as uint8 codes)
_RAW = {
    **{k: k for k in ("float32", "float64", "float16", "int64", "int32", "int16", "int8")},
    **{k: k for k in ("uint8", "uint16", "uint32", "uint64", "bool", "complex64", "complex128")},
    "bfloat16": "uint16",
    **dict.fromkeys(["float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"], "u1"),
}


#: float8 formats: exponent bits, mantissa bits, exponent bias, special values
_FLOAT8 = {
    "float8_e4m3fn": (4, 3, 7, "fn"),
    "float8_e5m2": (5, 2, 15, "ieee"),
    "float8_e4m3fnuz": (4, 3, 8, "fnuz"),
    "float8_e5m2fnuz": (5, 2, 16, "fnuz"),
}


def _float8_table(exp_bits: int, man_bits: int, bias: int, special: str) -> np.ndarray:
    """float32 value of each of the 256 codes of a float8 format.

    ``fn``: no infinities, NaN where exponent and mantissa bits are all ones; ``ieee``: IEEE 754
    infinities and NaNs; ``fnuz``: no infinities and no negative zero, code 0x80 is the NaN.
    NaN bit patterns are those torch's ``.float()`` produces.
    """
    c = np.arange(256, dtype=np.int64)
    s, e, m = c >> 7, (c >> man_bits) & ((1 << exp_bits) - 1), c & ((1 << man_bits) - 1)
    magnitude = np.where(
        e == 0,
        m * 2.0 ** (1 - bias - man_bits),  # subnormals
        (m + 2.0**man_bits) * 2.0 ** (e - bias - man_bits),
    )
    out = np.where(s == 1, -magnitude, magnitude).astype(np.float32)
    top = e == (1 << exp_bits) - 1
    if special == "ieee":
        out[top & (m == 0)] = np.where(s[top & (m == 0)] == 1, -np.inf, np.inf)
        nan = top & (m != 0)
    elif special == "fn":
        nan = top & (m == (1 << man_bits) - 1)
    else:
        nan = c == 0x80
    bits = out.view(np.uint32)
    if special == "fnuz":
        bits[nan] = 0x7F800001
    else:
        bits[nan] = (s[nan] << 31 | 0x7FC00000 | m[nan] << (23 - man_bits)).astype(np.uint32)
    out.flags.writeable = False
    return out


_FLOAT8_TABLES = {name: _float8_table(*spec) for name, spec in _FLOAT8.items()}


@dataclass
class TensorArtifact:
    """A tensor inside a ``.pt`` file, read row-block by row-block.

    Attributes:
        path: the ``.pt`` file.
        shape: tensor shape.
        dtype: torch dtype name (``"torch.float32"``...).
        np_dtype: numpy dtype of the arrays ``read_rows`` returns: the elements' own (in the
            file's byte order), bfloat16 as ``uint16`` bits, float8 decoded to float32.
    """

    path: Path
    shape: tuple[int, ...]
    dtype: str
    np_dtype: np.dtype
    _offset: int  # byte offset of element [0, 0, ...] in the file
    _strides: tuple[int, ...]  # element strides
    _contiguous: bool
    _raw: np.dtype | None = None  # dtype of the stored elements, when not np_dtype (float8)
    _neg: bool = False  # the negative bit: values are the stored ones negated
    _conj: bool = False  # the conjugate bit

    @property
    def nbytes(self) -> int:
        """Bytes of the whole tensor as ``read_rows`` returns it."""
        return math.prod(self.shape) * self.np_dtype.itemsize

    @property
    def row_bytes(self) -> int:
        """Bytes of one row as ``read_rows`` returns it."""
        return math.prod(self.shape[1:]) * self.np_dtype.itemsize

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Return rows ``start:stop`` as a new C-contiguous array of ``np_dtype``."""
        if not 0 <= start <= stop <= self.shape[0]:
            raise IndexError(f"rows {start}:{stop} of a tensor of {self.shape[0]} rows")
        raw = np.empty((stop - start, *self.shape[1:]), dtype=self._raw or self.np_dtype)
        if raw.nbytes:
            if self._contiguous:
                self._pread(raw, start)
            else:
                self._gather(raw, start, stop)
        if self._raw is not None:
            raw = _FLOAT8_TABLES[self.dtype.removeprefix("torch.")][raw]
        if self._neg and self.dtype == "torch.bfloat16":
            raw ^= np.uint16(0x8000)  # bfloat16 as raw bits: flip the sign bit
        elif self._neg:
            np.negative(raw, out=raw)
        if self._conj:
            np.conjugate(raw, out=raw)
        return raw

    def _pread(self, out: np.ndarray, start: int) -> None:
        pos = self._offset + start * math.prod(self.shape[1:]) * out.itemsize
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

    def _gather(self, out: np.ndarray, start: int, stop: int) -> None:
        """Strided rows (a non-contiguous view was saved) through a read-only map."""
        item = out.itemsize
        first = self._offset + start * self._strides[0] * item
        span = item * (1 + sum((n - 1) * s for n, s in zip(out.shape, self._strides, strict=True)))
        mm = np.memmap(self.path, mode="r", dtype=np.uint8, offset=first, shape=(span,))
        base = np.ndarray((span // item,), dtype=out.dtype, buffer=mm)
        strided = np.lib.stride_tricks.as_strided(
            base, shape=out.shape, strides=tuple(s * item for s in self._strides), writeable=False
        )
        out[...] = strided
        del strided, base, mm


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
        name_len, extra_len = struct.unpack("<HH", head[26:30]) if len(head) == 30 else (0, 0)
        stored_name = f.read(name_len)
    if head[:4] != b"PK\x03\x04" or stored_name != info.orig_filename.encode():
        raise ArtifactError(
            f"{path}: zip local header of {name} is damaged. Re-run the dataset builder."
        )
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def _describe(path: Path) -> tuple[TensorMeta, int, int, str]:
    """The tensor's metadata, its storage record's (byte offset, size) and the byte order."""
    prefix, order = zip_prefix(path)
    try:
        with zipfile.ZipFile(path) as z:
            pkl = z.getinfo(prefix + "data.pkl")
            if pkl.file_size > 1 << 20:
                raise Malformed(f"its pickle record is {pkl.file_size} bytes (a tensor's is tiny)")
            meta = read_tensor_meta(z.read(pkl))
            base, size = _record_offset(z, path, f"{prefix}data/{meta.key}")
    except Unsafe as e:
        raise ArtifactError(
            f"{path}: refused to load: its pickle asks for something other than plain "
            f"tensors ({str(e)[:200]}). It was not executed. Re-save the tensor with "
            f"torch.save from trusted code."
        ) from None
    except Malformed as e:
        raise ArtifactError(
            f"{path}: should hold one tensor, but {e}. Save the tensor itself with "
            f"torch.save(tensor, path)."
        ) from None
    except ArtifactError:
        raise
    except Exception as e:  # noqa: BLE001 - any other failure of a corrupt record
        if isinstance(e, OSError) and e.errno not in (None, errno.EINVAL):
            raise
        raise corrupt_error(path, e) from None
    return meta, base, size, order


def open_tensor(path: Path) -> TensorArtifact:
    """Describe the tensor in ``path`` without reading its data (and without importing torch).

    Raises:
        ArtifactMissingError: the file does not exist.
        ArtifactError: legacy format, not a torch archive, truncated, unsafe pickle, not a
            single tensor, a dtype without numpy equivalent, or metadata (offset, size, stride,
            storage key, numel, dtype) that does not fit the storage record.
    """
    kind = sniff(path)
    if kind == "pickle":
        if is_legacy(path):
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
    meta, base, record_bytes, order = _describe(path)
    _check_bounds(path, meta, base, record_bytes)
    item = DTYPE_ITEMSIZE[meta.dtype]
    raw = np.dtype(_RAW[meta.dtype]).newbyteorder(order if item > 1 else "=")
    shape, stride = meta.size, meta.stride
    contiguous = all(
        stride[k] == math.prod(shape[k + 1 :]) for k in range(len(shape)) if shape[k] > 1
    )
    return TensorArtifact(
        path=path,
        shape=shape,
        dtype=f"torch.{meta.dtype}",
        np_dtype=np.dtype(np.float32) if meta.dtype in _FLOAT8 else raw,
        _offset=base + meta.offset * item,
        _strides=stride,
        _contiguous=contiguous,
        _raw=raw if meta.dtype in _FLOAT8 else None,
        _neg=meta.neg,
        _conj=meta.conj,
    )


def _check_bounds(path: Path, meta: TensorMeta, base: int, record_bytes: int) -> None:
    """The tensor must lie inside its storage, and the storage inside its record and file."""
    storage_bytes = meta.numel * DTYPE_ITEMSIZE[meta.storage_dtype]
    if record_bytes != storage_bytes or base + record_bytes > os.path.getsize(path):
        raise ArtifactError(
            f"{path}: its storage record holds {record_bytes} bytes but its pickle says the "
            f"storage has {storage_bytes}, or the file ends inside it (truncated or corrupt). "
            f"Re-run the dataset builder to write it again."
        )
    item, numel = DTYPE_ITEMSIZE[meta.dtype], math.prod(meta.size)
    reach = 1 + sum((n - 1) * s for n, s in zip(meta.size, meta.stride, strict=True))
    too_big = max(numel, math.prod(meta.size[1:])) * item >= 1 << 62  # (numpy's limit)
    if too_big or (numel and (meta.offset + reach) * item > storage_bytes):
        raise ArtifactError(
            f"{path}: tensor of shape {list(meta.size)[:8]}, strides {list(meta.stride)[:8]} "
            f"and storage offset {meta.offset} does not fit its storage of {storage_bytes} "
            f"bytes (corrupt metadata). Re-save it with torch.save(tensor, path)."
        )
