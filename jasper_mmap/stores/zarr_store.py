"""zarr backend: the store directory is one zarr v3 group, one array per name.

# NOTE [zarr chunking]
Chunks span full rows (a chunk is ``rows x D``) and are grouped into ~8 MiB shards (the
``sharding_indexed`` codec) so a large store is not millions of files; no compressor
(embeddings do not compress, and decoding would cost more than the bytes saved). The chunk
size is ``ZARR_CHUNK_BYTES`` = 128 KiB (85 rows at D=384 float32), chosen from
``scripts/bench_zarr_chunks.py`` on a [200000, 384] float32 array, warm page cache, random
batches of 1536 rows: 1 row/chunk 3.0k rows/s, 16 KiB 4.8k, 128 KiB 5.5k, 1 MiB 11.0k rows/s
(numpy.memmap: 2.3M rows/s); sequential reads 9, 79, 546, 1526 MB/s; writes 29.4, 4.2, 2.0,
1.5 s. zarr pays ~0.2 ms per chunk touched, which outweighs the bytes decoded, so larger chunks
read faster from a warm cache; but every random row costs a whole chunk of I/O from a cold
store, 8x more at 1 MiB than at 128 KiB. 128 KiB is the compromise. For random-row training
from local disk use the safetensors backend (200-400x faster here); zarr is for chunk-local
or remote (fsspec) access. Bfloat16 has no zarr data type, so such arrays are stored as their
``uint16`` bit patterns with attribute ``"logical_dtype": "bfloat16"``.
"""

from __future__ import annotations

import math
import os
import stat
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.storage import LocalStore

from jasper_mmap._fs.files import file_kind
from jasper_mmap.errors import JasperError, StoreCorruptError, StoreNotFoundError
from jasper_mmap.format.dtypes import numpy_dtype
from jasper_mmap.format.schema import store_fix
from jasper_mmap.format.zarr_metadata import _META_NAMES
from jasper_mmap.stores.base import Store, StoreWriter

__all__ = ["ZARR_CHUNK_BYTES", "ZARR_SHARD_BYTES", "ZarrStore", "ZarrWriter", "chunk_rows"]

ZARR_CHUNK_BYTES = 128 * 1024


ZARR_SHARD_BYTES = 8 * 1024 * 1024


def chunk_rows(
    shape: tuple[int, ...],
    itemsize: int,
    chunk_bytes: int = ZARR_CHUNK_BYTES,
    shard_bytes: int = ZARR_SHARD_BYTES,
) -> tuple[int, int]:
    """Return ``(rows per chunk, rows per shard)`` for an array of ``shape``."""
    row_bytes = max(1, itemsize * int(np.prod(shape[1:], dtype=np.int64)))
    rows = max(1, chunk_bytes // row_bytes)
    shard = rows * max(1, shard_bytes // (rows * row_bytes))
    n = max(1, shape[0])
    rows = min(rows, n)
    shard = min(shard, math.ceil(n / rows) * rows)
    return rows, shard


class ZarrWriter(StoreWriter):
    """Writes arrays into the zarr v3 group rooted at the store directory, shard by shard."""

    backend = "zarr"

    def __init__(
        self, root: Path, chunk_bytes: int = ZARR_CHUNK_BYTES, shard_bytes: int = ZARR_SHARD_BYTES
    ) -> None:
        super().__init__(root)
        self.group = zarr.open_group(str(self.root), mode="a", zarr_format=3)
        self.chunk_bytes, self.shard_bytes = chunk_bytes, shard_bytes
        self._arrays: dict[str, dict[str, Any]] = {}
        self._unit = ""

    def begin_unit(self, unit: str, arrays: list[tuple[str, tuple[int, ...], str]]) -> None:
        self._unit, self._arrays = unit, {}
        prefix = "" if unit in ("embeddings", "pairs", "steering", "splits") else unit
        group = self.group.require_group(prefix) if prefix else self.group
        for name, shape, dtype in arrays:
            np_dtype = numpy_dtype(dtype)
            rows, shard = chunk_rows(shape, np_dtype.itemsize, self.chunk_bytes, self.shard_bytes)
            arr = group.create_array(
                name,
                shape=shape,
                dtype=np_dtype,
                chunks=(rows, *shape[1:]),
                shards=(shard, *shape[1:]),
                compressors=None,
                fill_value=0,
                attributes={"logical_dtype": dtype},
                config={"write_empty_chunks": True},  # every shard exists: NOTE [recorded files]
            )
            path = f"{prefix}/{name}" if prefix else name
            self._arrays[name] = {
                "arr": arr,
                "path": path,
                "shard": shard,
                "shape": tuple(shape),
                "buf": [],
                "buffered": 0,
                "pos": 0,
                "crc": 0,
            }

    def write(self, name: str, block: np.ndarray) -> None:
        st = self._arrays[name]
        st["buf"].append(np.ascontiguousarray(block))
        st["buffered"] += block.shape[0]
        while st["buffered"] >= st["shard"]:
            self._flush(st, st["shard"])

    def _flush(self, st: dict[str, Any], n: int) -> None:
        data = np.concatenate(st["buf"]) if len(st["buf"]) > 1 else st["buf"][0]
        head, rest = data[:n], data[n:]
        if st["pos"] + n > st["shape"][0]:
            raise RuntimeError(f"{self.root}: too many rows for {st['path']!r}")
        st["arr"][st["pos"] : st["pos"] + n] = head
        st["crc"] = zlib.crc32(memoryview(np.ascontiguousarray(head)).cast("B"), st["crc"])
        st["pos"] += n
        st["buf"] = [rest] if rest.shape[0] else []
        st["buffered"] = rest.shape[0]

    def end_unit(self) -> dict[str, dict[str, Any]]:
        entries = {}
        for name, st in self._arrays.items():
            if st["buffered"]:
                self._flush(st, st["buffered"])
            if st["pos"] != st["shape"][0]:
                raise RuntimeError(
                    f"{self.root}: array {st['path']!r} is incomplete ({st['pos']} rows)"
                )
            entries[name] = {"file": st["path"], "key": name, "crc32": st["crc"]}
        self._arrays = {}
        return entries


class _MissingChunk(StoreNotFoundError):
    """A chunk/shard file that the store records is gone (raised through zarr's reads)."""

    def __init__(self, root: Path, key: str) -> None:
        super().__init__(f"{root / key}: chunk file is missing (the store records it)")
        self.key = key


class _StrictLocalStore(LocalStore):
    """A read-only ``LocalStore`` that fails on a missing chunk file instead of returning None
    (which zarr serves as the fill value: zeros). For stores whose every chunk file exists
    (NOTE [recorded files] in jasper_mmap/format/integrity.py); metadata keys keep zarr's behaviour."""

    async def get(self, key: str, prototype=None, byte_range=None):
        got = await super().get(key, prototype, byte_range)
        if got is None and key.rsplit("/", 1)[-1] not in _META_NAMES:
            raise _MissingChunk(self.root, key)
        return got


class ZarrStore(Store):
    """Reads a zarr-backend store with ``zarr.open_group``; rows via orthogonal indexing.

    A store whose manifest records its files (NOTE [recorded files]) is read through
    :class:`_StrictLocalStore`, so a chunk file removed after opening raises instead of
    reading as zeros; every read error (checksum, decode) is re-raised naming the file.
    Chunks are read under the directory opened (NOTE [store identity] in jasper_mmap/stores/identity.py).
    """

    backend = "zarr"
    _zarr_group: Any = None  # per process, like Store._handles (dropped by pickling and close)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_zarr_group", None)
        return state

    def close(self) -> None:
        with self._guard():
            self._zarr_group = None
            super().close()

    def _fix(self) -> str:
        return store_fix(self.path, self.manifest)

    def _group(self) -> Any:
        group = self._zarr_group
        if group is not None:
            return group
        root = self._root()  # the directory opened: NOTE [store identity]
        try:
            meta = os.stat(root / "zarr.json")  # never let zarr open a FIFO there
            if not stat.S_ISREG(meta.st_mode):
                raise StoreCorruptError(
                    f"{self.path}/zarr.json: zarr group metadata is {file_kind(meta.st_mode)}, "
                    f"not a regular file. {self._fix()}"
                )
            if self.manifest.get("files"):
                local = _StrictLocalStore(root, read_only=True)
                group = zarr.open_group(store=local, mode="r", zarr_format=3)
            else:  # written before every file was recorded: missing chunks are legitimate
                group = zarr.open_group(str(root), mode="r", zarr_format=3)
        except JasperError:
            raise
        except FileNotFoundError as e:
            raise StoreNotFoundError(
                f"{self.path}/zarr.json: zarr group is missing ({e}). {self._fix()}"
            ) from None
        except Exception as e:  # zarr raises many kinds for damaged metadata
            raise StoreCorruptError(
                f"{self.path}/zarr.json: zarr group cannot be opened ({type(e).__name__}: "
                f"{e}). {self._fix()}"
            ) from e
        self._zarr_group = group
        return group

    def _open_array(self, name: str, entry: dict[str, Any]) -> Any:
        group = self._group()
        where = f"{self.path}/{entry['file']}"
        try:
            arr = group[entry["file"]]
        except KeyError:
            raise StoreCorruptError(
                f"{where}: zarr array listed in the manifest is missing. {self._fix()}"
            ) from None
        except Exception as e:
            raise StoreCorruptError(
                f"{where}/zarr.json: zarr array cannot be opened ({type(e).__name__}: {e}). "
                f"{self._fix()}"
            ) from e
        if not isinstance(arr, zarr.Array):
            raise StoreCorruptError(f"{where}: should be a zarr array, not a group. {self._fix()}")
        self._check_shape(name, entry, tuple(arr.shape), where)
        if arr.dtype != numpy_dtype(entry["stored_dtype"]):
            raise StoreCorruptError(
                f"{where}: dtype {arr.dtype} differs from the manifest's "
                f"{entry['stored_dtype']}. {self._fix()}"
            )
        return _CheckedArray(arr, name, self.path, self._fix(), self)

    def _gather_raw(
        self,
        name: str,
        idx: np.ndarray,
        out: np.ndarray | None = None,
        generation: int | None = None,
    ) -> np.ndarray:
        arr = self.raw(name, generation)
        if idx.size == 0:
            rows = np.empty((0, *arr.shape[1:]), dtype=arr.dtype)
        else:
            rows = arr.oindex[idx]
        if out is None:
            return rows
        out[...] = rows
        return out


class _CheckedArray:
    """A zarr array whose reads (``a[key]``, ``a.oindex[rows]``) re-raise every failure as our
    error naming the file: a missing chunk as StoreNotFoundError, anything zarr raises for a
    damaged one (checksum, decode) as StoreCorruptError. Other attributes are the array's."""

    def __init__(self, arr: zarr.Array, name: str, root: Path, fix: str, store: ZarrStore) -> None:
        self._arr, self._name, self._root, self._fix = arr, name, root, fix
        # the directory the array reads under stays open while the array lives, and a failed
        # read says when the store was replaced (NOTE [store identity])
        self._dir, self._check_same = store._dir, store._check_same

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._arr, attr)

    def __len__(self) -> int:
        return self._arr.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        return self._read_checked(lambda: self._arr[key], key)

    @property
    def oindex(self) -> Any:
        """Orthogonal indexing, checked like ``a[key]``."""
        outer = self

        class _OIndex:
            def __getitem__(self, key: Any) -> np.ndarray:
                return outer._read_checked(lambda: outer._arr.oindex[key], key)

        return _OIndex()

    def _read(self, fn, key: Any) -> np.ndarray:
        try:
            return fn()
        except Exception:
            self._check_same()  # raises StoreReplacedError when that is the cause
            raise

    def _read_checked(self, fn, key: Any) -> np.ndarray:
        try:
            return self._read(fn, key)
        except _MissingChunk as e:
            raise StoreNotFoundError(
                f"{self._root / e.key}: chunk file of array {self._name!r} is missing (it was "
                f"there when the store was opened). {self._fix}"
            ) from None
        except JasperError:
            raise
        except Exception as e:
            raise StoreCorruptError(
                f"{self._root / self._arr.path}: reading rows of {self._name!r} failed "
                f"({type(e).__name__}: {e}); damaged chunk file(s) {self._touched(key)}. "
                f"{self._fix}"
            ) from e

    def _touched(self, key: Any) -> list[str] | str:
        try:
            return self._files(key)
        except Exception:  # only naming files for a message: never hide the real error
            return f"under {self._root / self._arr.path}"

    def _files(self, key: Any) -> list[str]:
        """The chunk (shard) files the read of ``key`` touched (at most 3, for messages)."""
        first = key[0] if isinstance(key, tuple) and key else key
        n = self._arr.shape[0] if self._arr.ndim else 1
        if isinstance(first, slice):
            lo, hi, _ = first.indices(n)
            rows = np.array([lo, max(lo, hi - 1)])
        elif first is Ellipsis or (isinstance(first, tuple) and not first):
            rows = np.array([0, max(0, n - 1)])
        else:
            rows = np.atleast_1d(np.asarray(first, dtype=np.int64)) % max(1, n)
        per_file = (self._arr.shards or self._arr.chunks or (1,))[0]
        coords = np.unique(rows // max(1, per_file))[:3].tolist()
        tail = (0,) * max(0, self._arr.ndim - 1)
        key_of = self._arr.metadata.encode_chunk_key
        return [str(self._root / self._arr.path / key_of((int(c), *tail))) for c in coords]
