"""Read ``.pt`` artifacts without ever holding one whole in RAM, and without running pickles.

Tensors: the small ``data.pkl`` record of the zip archive is unpickled by a restricted
unpickler that admits only the globals a plain tensor needs (``torch._utils._rebuild_tensor_v2``,
``torch.<Type>Storage``, ``collections.OrderedDict``), each replaced by a harmless stand-in:
the same allow-list idea as ``torch.load(weights_only=True)``, but it never imports torch (a
second and ~200 MB per process). It yields shape, dtype, strides and storage offset; the zip's
local header gives the byte offset of the storage record. Rows are then read with ``os.pread``.
We do not use ``torch.load(mmap=True)``: it maps the file with a private writable mapping,
which Linux charges against the commit limit in full and refuses for files larger than RAM.

Keyword ids (a pickled list of lists) are decoded by :mod:`jasper_mmap.converters.keyword_pickle`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jasper_mmap.errors import ArtifactError, ArtifactMissingError

__all__ = ["TensorArtifact", "open_tensor", "fingerprint", "source_fingerprints", "LEGACY_FIX"]

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


def source_fingerprints(src: Path) -> dict[str, dict[str, object]]:
    """Fingerprints of every ``.pt`` file and ``config.json`` of a dataset directory."""
    files = {p.name: fingerprint(p) for p in sorted(src.glob("*.pt"))}
    files["config.json"] = fingerprint(src / "config.json")
    return files


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
