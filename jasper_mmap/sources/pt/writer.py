"""Write ``.pt`` files that ``torch.load`` reads, streaming, so they can be larger than RAM.

``torch.save`` needs the whole tensor in memory. A torch archive is a zip file holding a small
pickle (``data.pkl``) that describes the tensor and refers to its storage by key, and the
storage's raw bytes as the uncompressed record ``data/0``; so the pickle can be written first
and the bytes streamed after it. Used by the synthetic generators to produce datasets larger
than RAM for the converter; ``torch.load(path, weights_only=True)`` reads the result (tested).
A list of lists of int (``pair_keyword_ids.pt``) is written the same way, as a torch archive
whose ``data.pkl`` is streamed (:func:`write_lists_pt`), so ``torch.load`` reads it too;
:func:`write_lists_pickle` writes the plain-pickle form some builders use (``torch.load`` cannot
read that one).
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from jasper_mmap._fs.partials import partial_name

__all__ = ["write_tensor_pt", "write_lists_pt", "write_lists_pickle"]

_STORAGE = {
    "float32": "FloatStorage",
    "float64": "DoubleStorage",
    "float16": "HalfStorage",
    "int64": "LongStorage",
    "int32": "IntStorage",
}


class _Storage:
    def __init__(self, dtype: str, numel: int) -> None:
        self.dtype, self.numel = dtype, numel


class _Tensor:
    def __init__(self, storage: _Storage, shape: tuple[int, ...]) -> None:
        self.storage, self.shape = storage, shape

    def __reduce__(self):
        import torch._utils

        stride = tuple(
            int(np.prod(self.shape[i + 1 :], dtype=np.int64)) for i in range(len(self.shape))
        )
        return torch._utils._rebuild_tensor_v2, (
            self.storage,
            0,
            self.shape,
            stride,
            False,
            OrderedDict(),
        )


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: object):
        if isinstance(obj, _Storage):
            import torch

            return ("storage", getattr(torch, _STORAGE[obj.dtype]), "0", "cpu", obj.numel)
        return None


def write_tensor_pt(
    path: str | Path, shape: tuple[int, ...], dtype: str, blocks: Iterable[np.ndarray]
) -> Path:
    """Write a tensor of ``shape``/``dtype`` whose rows come in ``blocks``, as a torch archive.

    The file is written under a temporary name and renamed when complete.
    """
    path = Path(path)
    numel = int(np.prod(shape, dtype=np.int64))
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(_Tensor(_Storage(dtype, numel), tuple(int(s) for s in shape)))
    prefix = path.stem.replace(".", "_") or "archive"
    tmp = path.with_name(partial_name(path.name))
    want, got = numel * np.dtype(dtype).itemsize, 0
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        z.writestr(f"{prefix}/data.pkl", buf.getvalue())
        z.writestr(f"{prefix}/byteorder", "little")
        with z.open(f"{prefix}/data/0", "w", force_zip64=True) as f:
            for block in blocks:
                data = np.ascontiguousarray(block, dtype=np.dtype(dtype).newbyteorder("<"))
                f.write(memoryview(data).cast("B"))
                got += data.nbytes
        z.writestr(f"{prefix}/version", "3\n")
    if got != want:
        tmp.unlink()
        raise ValueError(
            f"{path}: blocks held {got} bytes, but shape {shape} of {dtype} needs {want}"
        )
    os.replace(tmp, path)
    return path


def _pickle_int(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if 0 <= v < 65536:
        return b"M" + struct.pack("<H", v)
    return b"J" + struct.pack("<i", v)


def _list_opcodes(rows: Iterable[np.ndarray]) -> Iterator[bytes]:
    """Protocol-2 pickle opcodes of a list of lists of int, 1000 rows per APPENDS (as pickle)."""
    yield b"\x80\x02](" + b""  # PROTO 2, EMPTY_LIST (outer), MARK
    pending = 0
    for row in rows:
        ints = b"".join(_pickle_int(int(v)) for v in row)
        yield b"](" + ints + b"e" if len(row) else b"]"
        pending += 1
        if pending == 1000:
            yield b"e("
            pending = 0
    yield b"e."  # APPENDS, STOP


def _write_opcodes(f, rows: Iterable[np.ndarray]) -> None:
    chunk = []
    for piece in _list_opcodes(rows):
        chunk.append(piece)
        if len(chunk) >= 4096:
            f.write(b"".join(chunk))
            chunk = []
    f.write(b"".join(chunk))


def write_lists_pickle(path: str | Path, rows: Iterable[np.ndarray]) -> Path:
    """Write a list of lists of int as a plain pickle, streaming (``pickle.load`` reads it;
    ``torch.load`` does not: use :func:`write_lists_pt` for a file it reads)."""
    path = Path(path)
    tmp = path.with_name(partial_name(path.name))
    with open(tmp, "wb") as f:
        _write_opcodes(f, rows)
    os.replace(tmp, path)
    return path


def write_lists_pt(path: str | Path, rows: Iterable[np.ndarray]) -> Path:
    """Write a list of lists of int as ``torch.save`` does (a torch archive whose ``data.pkl``
    is the list's pickle), streaming; ``torch.load(path, weights_only=True)`` reads it."""
    path = Path(path)
    prefix = path.stem.replace(".", "_") or "archive"
    tmp = path.with_name(partial_name(path.name))
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        with z.open(f"{prefix}/data.pkl", "w", force_zip64=True) as f:
            _write_opcodes(f, rows)
        z.writestr(f"{prefix}/byteorder", "little")
        z.writestr(f"{prefix}/version", "3\n")
    os.replace(tmp, path)
    return path
