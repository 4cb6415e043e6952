"""safetensors backend: a streaming writer and a read-only memory-mapped reader.

File format (https://github.com/huggingface/safetensors): 8-byte little-endian header length
``N``, ``N`` bytes of JSON header (``{name: {"dtype", "shape", "data_offsets": [b, e]}}``,
offsets relative to the data section), then the raw little-endian data. The header must list
every tensor before any data, and shapes are known up front, so the writer emits the header
first and streams the data in blocks; nothing is held whole in RAM.

The reader maps each file once with ``mmap.mmap(access=ACCESS_READ)`` (a shared, read-only
mapping — never torch's private writable mapping, which Linux charges in full against the commit
limit and which fails for files larger than RAM) and hands out ``np.frombuffer`` views at each
tensor's offset.

# NOTE [read-ahead advice]
Measured on the 200k-pair store (1.47 GB, 2 cores, scripts/bench_loader.py and the README):
with ``MADV_RANDOM`` a first pass of random batches ran at 2.7k samples/s from a warm page
cache and 3.8k from a cold one; with the kernel's default (``MADV_NORMAL``) 111k and 16k. The
default read-around pulls in neighbouring rows that later batches use, and lets the kernel map
whole page-cache folios per fault. It only wastes I/O when the store is much larger than the
page cache, where read-around pages are evicted before they are used. So ``advice="auto"``
keeps the default for a store up to half of RAM and uses ``MADV_RANDOM`` above that;
``JASPER_MMAP_MADVISE=normal|random`` overrides it.

Gathers, the joined rows and the batch prefetch are the mapped stores' (jasper_mmap/stores/mapped.py).
"""

from __future__ import annotations

import itertools
import json
import mmap
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from jasper_mmap._fs.files import open_regular
from jasper_mmap.errors import StoreCorruptError
from jasper_mmap.format.dtypes import numpy_dtype, safetensors_code
from jasper_mmap.format.safetensors_header import (
    ALIGN,
    RECREATE_FIX,
    layout_problems,
    read_header,
    tensor_problems,
)
from jasper_mmap.format.schema import raise_problems, store_fix
from jasper_mmap.stores.base import StoreWriter
from jasper_mmap.stores.mapped import MappedStore, RowPlace
from jasper_mmap.stores.readahead import array_address, map_address

__all__ = ["SafetensorsStore", "SafetensorsWriter"]


class SafetensorsWriter(StoreWriter):
    """Streams one safetensors file per unit: header first, then rows block by block."""

    backend = "safetensors"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self._file = None
        self._order: list[tuple[str, int]] = []  # (name, nbytes) in file order
        self._pos = 0  # index into _order
        self._written = 0  # bytes of the current array written
        self._unit = ""
        self._shapes: dict[str, tuple[tuple[int, ...], str]] = {}

    def begin_unit(self, unit: str, arrays: list[tuple[str, tuple[int, ...], str]]) -> None:
        if self._file is not None:
            raise RuntimeError(f"unit {self._unit!r} is still open")
        header: dict[str, Any] = {}
        offset = 0
        self._order, self._shapes = [], {}
        for name, shape, dtype in arrays:
            nbytes = int(np.prod(shape, dtype=np.int64)) * numpy_dtype(dtype).itemsize
            header[name] = {
                "dtype": safetensors_code(dtype),
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._order.append((name, nbytes))
            self._shapes[name] = (tuple(shape), dtype)
            offset += nbytes
        header["__metadata__"] = {"format": "pt", "writer": "jasper_mmap"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % ALIGN)
        path = self.root / f"{unit}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._unit, self._path = unit, path
        self._file = open(path, "wb")  # noqa: SIM115 - closed in end_unit/abort
        self._file.write(struct.pack("<Q", len(blob)) + blob)
        self._pos, self._written, self._crc = 0, 0, {}
        self._skip_empty()

    def _skip_empty(self) -> None:
        while self._pos < len(self._order) and self._order[self._pos][1] == self._written:
            self._pos, self._written = self._pos + 1, 0

    def write(self, name: str, block: np.ndarray) -> None:
        if self._pos >= len(self._order) or self._order[self._pos][0] != name:
            expected = self._order[self._pos][0] if self._pos < len(self._order) else None
            raise RuntimeError(f"{self._path}: expected rows of {expected!r}, got {name!r}")
        shape, dtype = self._shapes[name]
        if block.dtype != numpy_dtype(dtype) or block.shape[1:] != shape[1:]:
            raise RuntimeError(
                f"{self._path}: block {block.dtype}{block.shape} does not fit {name!r} {dtype}{shape}"
            )
        data = np.ascontiguousarray(block)
        total = self._order[self._pos][1]
        if self._written + data.nbytes > total:
            raise RuntimeError(f"{self._path}: too many rows for {name!r}")
        self._file.write(memoryview(data).cast("B"))
        self._written += data.nbytes
        self._crc[name] = zlib.crc32(memoryview(data).cast("B"), self._crc.get(name, 0))
        self._skip_empty()

    def end_unit(self) -> dict[str, dict[str, Any]]:
        if self._pos != len(self._order):
            name = self._order[self._pos][0]
            raise RuntimeError(
                f"{self._path}: array {name!r} is incomplete ({self._written} bytes)"
            )
        self._file.close()  # the converter fsyncs the whole store once, before publishing
        self._file = None
        rel = self._path.relative_to(self.root).as_posix()
        entries, offset = {}, 0
        for name, nbytes in self._order:
            entries[name] = {
                "file": rel,
                "key": name,
                "crc32": self._crc.get(name, 0),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        return entries

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class _MappedFile:
    """One read-only mapping of a safetensors file and its parsed header."""

    def __init__(
        self,
        path: Path,
        advice: str = "normal",
        fix: str = RECREATE_FIX,
        store_dir: Path | None = None,
    ) -> None:
        self.data_start, self.header = read_header(path, fix)
        with open_regular(path, what="store file", fix=fix, error=StoreCorruptError) as f:
            size = os.fstat(f.fileno()).st_size
            problems = layout_problems(path, self.header, self.data_start, size, fix)
            raise_problems(problems, store_dir or path.parent)
            self.map = None
            if size > self.data_start:
                self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                if advice == "random" and hasattr(mmap, "MADV_RANDOM"):
                    self.map.madvise(mmap.MADV_RANDOM)


class SafetensorsStore(MappedStore):
    """Reads a safetensors-backend store through read-only memory maps."""

    backend = "safetensors"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # per process, like Store._handles (dropped by __getstate__ and close):
        self._maps: dict[str, _MappedFile] = {}  # file (relative path) -> its map
        super().__init__(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(_maps={})
        return state

    def _open_array(self, name: str, entry: dict[str, Any]) -> np.ndarray:
        path = self._root() / entry["file"]  # the directory opened: NOTE [store identity]
        fix = store_fix(self.path, self.manifest)
        mapped = self._maps.get(entry["file"])
        if mapped is None:
            mapped = self._maps[entry["file"]] = _MappedFile(path, self._advice(), fix, self.path)
        raise_problems(tensor_problems(path, mapped.header, name, entry, fix), self.path)
        meta = mapped.header[entry["key"]]
        dtype = numpy_dtype(entry["stored_dtype"])
        begin, end = meta["data_offsets"]
        shape = tuple(meta["shape"])
        if end == begin:
            return np.empty(shape, dtype=dtype)
        arr = np.frombuffer(
            mapped.map,
            dtype=dtype,
            count=(end - begin) // dtype.itemsize,
            offset=mapped.data_start + begin,
        )
        return arr.reshape(shape)

    def _place(self, names: tuple[str, ...], generation: int | None) -> RowPlace | None:
        """One array: its view of the file's map (None for an empty one). Arrays joined:
        a view of their rows where they lie back to back in one file (in any order), 2-D,
        with one row width and dtype; None otherwise."""
        keys = [self._handle_key(name, generation)[0] for name in names]
        arrays = [self.raw(name, generation) for name in names]
        while any(self._handles.get(k) is not a for k, a in zip(keys, arrays, strict=True)):
            arrays = [self.raw(name, generation) for name in names]  # closed meanwhile: again
        files = {self.entry(name, generation)["file"] for name in names}
        first = arrays[0]
        if len(files) != 1 or any(a.base is None or not a.size for a in arrays):
            return None  # not one file, or an empty array (not mapped)
        file = files.pop()
        mapped = self._maps[file]
        if len(names) == 1:
            return RowPlace(first, (0,), mapped.map, file)
        if not (
            all(a.ndim == 2 and a.flags.c_contiguous for a in arrays)
            and all(a.shape[1] == first.shape[1] and a.dtype == first.dtype for a in arrays)
        ):
            return None
        order = sorted(range(len(arrays)), key=lambda k: array_address(arrays[k]))
        start = array_address(arrays[order[0]])
        starts = list(itertools.accumulate((arrays[k].nbytes for k in order), initial=start))
        if any(array_address(arrays[k]) != at for k, at in zip(order, starts[:-1], strict=True)):
            return None  # not back to back
        view = np.frombuffer(
            mapped.map,
            dtype=first.dtype,
            count=sum(a.size for a in arrays),
            offset=start - map_address(mapped.map),
        ).reshape(-1, first.shape[1])
        offsets = tuple((array_address(a) - start) // first.strides[0] for a in arrays)
        return RowPlace(view, offsets, mapped.map, file)

    def _release_files(self, files: set[str]) -> None:
        mapped = self._maps
        for name in files:
            m = mapped.pop(name, None)
            if m is not None and m.map is not None:
                try:
                    m.map.close()
                except BufferError:
                    pass  # a view is still alive; the map closes when it is released

    def close(self) -> None:
        with self._guard():
            files, self._maps = self._maps, {}
            super().close()
        for mapped in files.values():
            if mapped.map is not None:
                try:
                    mapped.map.close()
                except BufferError:
                    pass  # a caller still holds a view; the map closes when it is released
