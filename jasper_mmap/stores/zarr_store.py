"""zarr backend: the store directory is one zarr v3 group, one array per name.

# NOTE [zarr chunking]
Chunks span full rows (a chunk is ``rows x D``) and are grouped into ~8 MiB shards (the
``sharding_indexed`` codec) so a large store is not millions of files; an array over
MAX_SHARDS * 8 MiB gets larger shards instead of more (each shard is a map in every reading
process). No compressor: embeddings do not compress, and training reads rows, not chunks,
through maps of the shard files (NOTE [zarr shards as rows]), so no chunk is ever decoded on
the batch path and the chunk size does not change its speed. It matters to readers that go
through zarr-python (other tools, ``zarr.open_group``), which pay ~0.2 ms per chunk touched:
``ZARR_CHUNK_BYTES`` = 128 KiB (85 rows at D=384 float32) was chosen for them from
``scripts/bench_zarr_chunks.py`` on a [200000, 384] float32 array, warm page cache, random
batches of 1536 rows through zarr-python: 1 row/chunk 3.0k rows/s, 16 KiB 4.8k, 128 KiB 5.5k,
1 MiB 11.0k rows/s; sequential reads 9, 79, 546, 1526 MB/s; but every random row costs a
whole chunk of I/O from a cold store through zarr-python, 8x more at 1 MiB than at 128 KiB.
Bfloat16 has no zarr data type, so such arrays are stored as their ``uint16`` bit patterns
with attribute ``"logical_dtype": "bfloat16"``.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import mmap
import os
import stat
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.storage import LocalStore

from jasper_mmap._fs.files import file_kind, read_json
from jasper_mmap.errors import JasperError, StoreCorruptError, StoreNotFoundError
from jasper_mmap.format.dtypes import numpy_dtype
from jasper_mmap.format.schema import store_fix
from jasper_mmap.format.zarr_metadata import (
    META_NAMES,
    MISSING,
    ShardLayout,
    decode_shard_index,
    encode_shard_index,
    shard_layout,
)
from jasper_mmap.stores.base import StoreWriter
from jasper_mmap.stores.mapped import MappedStore, RowPlace
from jasper_mmap.stores.readahead import advise_random, map_address
from jasper_mmap.stores.regions import Region, region_array, regions_supported, slot_bytes

__all__ = ["ZARR_CHUNK_BYTES", "ZARR_SHARD_BYTES", "ZarrStore", "ZarrWriter", "chunk_rows"]

log = logging.getLogger(__name__)

ZARR_CHUNK_BYTES = 128 * 1024


ZARR_SHARD_BYTES = 8 * 1024 * 1024

#: the page size a shard's bytes are a multiple of (the reader's, on most machines)
_PAGE = 4096

#: shards of an array larger than MAX_SHARDS * ZARR_SHARD_BYTES grow instead of multiplying: each
#: is one map per process (NOTE [one range for many files]; Linux allows 65,530 by default)
MAX_SHARDS = 2048


def chunk_rows(
    shape: tuple[int, ...],
    itemsize: int,
    chunk_bytes: int = ZARR_CHUNK_BYTES,
    shard_bytes: int = ZARR_SHARD_BYTES,
) -> tuple[int, int]:
    """Return ``(rows per chunk, rows per shard)`` for an array of ``shape``. A shard holds a
    whole number of 4 KiB pages of rows (NOTE [zarr shards as rows]: its rows then follow the
    previous shard's in the reader's range, with no gap)."""
    row_bytes = max(1, itemsize * int(np.prod(shape[1:], dtype=np.int64)))
    rows = max(1, chunk_bytes // row_bytes)
    per_page = _PAGE // math.gcd(rows * row_bytes, _PAGE)  # chunks whose bytes fill pages
    chunks = max(1, shard_bytes // (rows * row_bytes))
    shard = rows * (-(-chunks // per_page) * per_page)
    n = max(1, shape[0])
    rows = min(rows, n)
    shard = min(shard, math.ceil(n / rows) * rows)
    return rows, shard


class _ShardStream:
    """One array being written: rows go straight into its shard files (NOTE [zarr shards as
    rows]), each closed with its index once its rows are in."""

    def __init__(
        self, root: Path, path: str, shape: tuple[int, ...], dtype: np.dtype, layout: ShardLayout
    ) -> None:
        self.root, self.path, self.shape, self.layout = root, path, shape, layout
        self.dtype = dtype
        self.pos, self.crc = 0, 0  # rows written; crc32 of the array's bytes (the manifest's)
        self.shard_crcs: list[int] = []  # crc32 of each shard's rows (not its padding, index)
        self.file: Any = None
        self.in_shard = 0  # rows written into the open shard file

    def write(self, block: np.ndarray) -> None:
        if block.dtype != self.dtype or tuple(block.shape[1:]) != self.shape[1:]:
            raise RuntimeError(
                f"{self.root}: block {block.dtype}{block.shape} does not fit {self.path!r} "
                f"{self.dtype}{self.shape}"
            )
        data = memoryview(np.ascontiguousarray(block)).cast("B")
        rows, row = block.shape[0], self.layout.row_bytes
        if self.pos + rows > self.shape[0]:
            raise RuntimeError(f"{self.root}: too many rows for {self.path!r}")
        self.crc = zlib.crc32(data, self.crc)
        done = 0
        while done < rows:
            if self.file is None:
                key = self.layout.keys[self.pos // self.layout.shard_rows]
                target = self.root / self.path / key
                target.parent.mkdir(parents=True, exist_ok=True)
                self.file, self.in_shard = open(target, "wb"), 0  # noqa: SIM115 - closed below
            n = min(rows - done, self.layout.shard_rows - self.in_shard)
            part = data[done * row : (done + n) * row]
            self.file.write(part)
            if not self.in_shard:
                self.shard_crcs.append(0)
            self.shard_crcs[-1] = zlib.crc32(part, self.shard_crcs[-1])
            done, self.pos, self.in_shard = done + n, self.pos + n, self.in_shard + n
            if self.in_shard == self.layout.shard_rows or self.pos == self.shape[0]:
                self._close_shard()

    def _close_shard(self) -> None:
        """Pad the last chunk with zeros (zarr's fill value) and write the index: chunks in
        order from offset 0, those past the array's end absent (as zarr-python writes them)."""
        lay = self.layout
        chunks = -(-self.in_shard // lay.chunk_rows)
        pad = chunks * lay.chunk_bytes - self.in_shard * lay.row_bytes
        if pad:
            self.file.write(bytes(pad))
        index = np.full((lay.chunks_per_shard, 2), MISSING, dtype=np.uint64)
        index[:chunks, 0] = np.arange(chunks, dtype=np.uint64) * lay.chunk_bytes
        index[:chunks, 1] = lay.chunk_bytes
        self.file.write(encode_shard_index(index))
        self.file.close()  # the converter fsyncs the whole store once, before publishing
        self.file = None

    def abort(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class ZarrWriter(StoreWriter):
    """Writes arrays into the zarr v3 group rooted at the store directory: zarr-python
    writes the metadata, the rows go straight into the shard files (NOTE [zarr shards as
    rows]), in the layout zarr-python writes and reads."""

    backend = "zarr"

    def __init__(
        self, root: Path, chunk_bytes: int | None = None, shard_bytes: int | None = None
    ) -> None:
        super().__init__(root)
        self.group = zarr.open_group(str(self.root), mode="a", zarr_format=3)
        self.chunk_bytes = chunk_bytes or ZARR_CHUNK_BYTES
        self.shard_bytes = shard_bytes or ZARR_SHARD_BYTES
        self._arrays: dict[str, _ShardStream] = {}
        self._unit = ""

    def begin_unit(self, unit: str, arrays: list[tuple[str, tuple[int, ...], str]]) -> None:
        self._unit, self._arrays = unit, {}
        prefix = "" if unit in ("embeddings", "pairs", "steering", "splits") else unit
        group = self.group.require_group(prefix) if prefix else self.group
        for name, shape, dtype in arrays:
            np_dtype = numpy_dtype(dtype)
            nbytes = math.prod(shape) * np_dtype.itemsize
            shard_bytes = max(self.shard_bytes, -(-nbytes // MAX_SHARDS))
            rows, shard = chunk_rows(shape, np_dtype.itemsize, self.chunk_bytes, shard_bytes)
            group.create_array(
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
            entry = {"shape": list(shape), "stored_dtype": dtype}
            layout = shard_layout(json.loads((self.root / path / "zarr.json").read_bytes()), entry)
            if layout is None:  # zarr-python changed what it writes: fail loudly, here
                raise RuntimeError(f"{self.root / path}: zarr wrote metadata of another layout")
            self._arrays[name] = _ShardStream(self.root, path, tuple(shape), np_dtype, layout)

    def write(self, name: str, block: np.ndarray) -> None:
        self._arrays[name].write(block)

    def end_unit(self) -> dict[str, dict[str, Any]]:
        entries = {}
        for name, st in self._arrays.items():
            if st.pos != st.shape[0]:
                raise RuntimeError(f"{self.root}: array {st.path!r} is incomplete ({st.pos} rows)")
            entries[name] = {
                "file": st.path,
                "key": name,
                "crc32": st.crc,
                "shard_crc32": st.shard_crcs,  # verify names the damaged shard file
            }
        self._arrays = {}
        return entries

    def abort(self) -> None:
        for st in self._arrays.values():
            st.abort()


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
        if got is None and key.rsplit("/", 1)[-1] not in META_NAMES:
            raise _MissingChunk(self.root, key)
        return got


class ZarrStore(MappedStore):
    """Reads a zarr-backend store: rows stored as convert-pt writes them through read-only
    maps of the shard files (NOTE [zarr shards as rows]); any other layout, and whole arrays
    handed out as tables (:meth:`raw`), through ``zarr.open_group``.

    A store whose manifest records its files (NOTE [recorded files]) is read through
    :class:`_StrictLocalStore`, so a chunk file removed after opening raises instead of
    reading as zeros; every read error (checksum, decode) is re-raised naming the file.
    Files are opened under the directory opened (NOTE [store identity] in
    jasper_mmap/stores/identity.py).
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
        if self._placed((name,), generation) is not None:
            return super()._gather_raw(name, idx, out, generation)
        arr = self.raw(name, generation)  # another layout: zarr-python
        if idx.size == 0:
            rows = np.empty((0, *arr.shape[1:]), dtype=arr.dtype)
        else:
            rows = arr.oindex[idx]
        if out is None:
            return rows
        out[...] = rows
        return out

    def _read_raw(self, name: str, start: int, stop: int | None) -> np.ndarray:
        if self._placed((name,)) is not None:
            return super()._read_raw(name, start, stop)
        return self.raw(name)[start:stop]

    # -- NOTE [zarr shards as rows] -------------------------------------------------------
    def _place(self, names: tuple[str, ...], generation: int | None) -> RowPlace | None:
        """The rows of ``names`` (one array, or several joined end to end) over one range of
        maps of their shard files; None where an array is not in the layout convert-pt writes
        (read through zarr-python, with a warning once), or the arrays cannot be joined."""
        if not regions_supported() or not self.manifest.get("files"):
            self._warn_slow(names[0], "this system or this store's manifest")
            return None  # written before every file was recorded: chunks may be absent
        entries = [self.entry(name, generation) for name in names]
        with self._at_root() as root:
            layouts = []
            for name, entry in zip(names, entries, strict=True):
                meta = read_json(
                    root / entry["file"] / "zarr.json",
                    what="zarr array metadata",
                    fix=self._fix(),
                    error=StoreCorruptError,
                )
                layout = shard_layout(meta, entry)
                if layout is None:
                    if len(names) == 1:
                        self._warn_slow(name, "its chunk layout")
                    return None
                layouts.append(layout)
            dtype = numpy_dtype(entries[0]["stored_dtype"])
            row_shape = tuple(entries[0]["shape"][1:])
            if len(names) > 1 and not all(
                len(e["shape"]) == 2
                and tuple(e["shape"][1:]) == row_shape
                and e["stored_dtype"] == entries[0]["stored_dtype"]
                for e in entries
            ):
                return None
            if sum(e["shape"][0] for e in entries) > _MAX_PLACES * math.gcd(
                *(lay.chunk_rows for lay in layouts)
            ):
                return None  # chunks too unlike to join: the row table would be too large
            shards = [
                _open_shards(root, self.path, name, e, lay, self._fix())
                for name, e, lay in zip(names, entries, layouts, strict=True)
            ]
            try:
                place = _map_side_by_side(names, entries, layouts, shards, dtype, row_shape)
            except OSError as e:  # out of addresses or of maps (vm.max_map_count)
                self._warn_slow(names[0], f"mapping its shard files failed ({e})")
                return None
            finally:
                for opened in shards:
                    for fd, _, _ in opened:
                        os.close(fd)
        if self._advice() == "random":  # NOTE [read-ahead advice], as for safetensors maps
            advise_random(map_address(place.buffer), len(place.buffer))
        return place

    def _warn_slow(self, name: str, why: str) -> None:
        if self.path in _WARNED:
            return
        _WARNED.add(self.path)
        log.warning(
            "%s: array %r is read through zarr-python because of %s: each batch reads whole "
            "chunks, ~100x slower than the rows convert-pt's layout maps. Run "
            "`convert-pt SRC %s --format zarr --overwrite` to rewrite the store in that layout.",
            self.path,
            name,
            why,
            self.path,
        )


#: joined arrays whose row table would pass this many entries are gathered one by one
_MAX_PLACES = 1 << 22

#: stores already warned about in this process (ZarrStore._warn_slow)
_WARNED: set[Path] = set()


# NOTE [zarr shards as rows]
# convert-pt writes each zarr array in full-width uncompressed chunks, grouped into shards
# whose index (offset and length of each chunk, then its crc32c) ends the file; a chunk is
# ``rows x row_bytes`` raw little-endian bytes, so a shard's data is its rows in order, padded to
# whole chunks, and every shard but the last holds a whole number of 4 KiB pages of rows. The
# reader reads each shard's index once per process and generation, checks it (below), and maps
# every shard file of an array read-only into one range of addresses (NOTE [one range for many
# files] in jasper_mmap/stores/regions.py): shard ``s + 1`` right where shard ``s``'s rows end,
# so the array's rows lie in order exactly as in a safetensors file, and a batch is the same
# gather (torch or numpy, joined rows, read-ahead, dense windows) with no per-row arithmetic.
# Shards of other sizes (another page size, a store written before this rule) get a slot each
# and a row table: a row's place is ``start[row // unit] + row % unit``.
# Before mapping, every shard file must be a regular file holding its index, the index's crc32c
# must match, and every chunk of the array's rows must be present, whole, row-aligned and
# inside the file: otherwise the read fails naming the file, never serving zeros. zarr-python
# wrote (and reads) the same bytes; other layouts (compressed or checksummed chunks, an index
# at the start) are read through it, with a warning. Measured (scripts/bench_formats.py, 200k
# pairs, warm): zarr loads at 0.9-1.1x safetensors' rate (docs/performance.md).


def _open_shards(
    root: Path, shown: Path, name: str, entry: dict[str, Any], lay: ShardLayout, fix: str
) -> list[tuple[int, int, np.ndarray]]:
    """``(descriptor, size, index)`` of each shard file of array ``name``, checked (NOTE
    above); every descriptor is closed if one fails. Errors name the file under ``shown``."""
    n, opened = entry["shape"][0], []
    try:
        for s, key in enumerate(lay.keys):
            rel = f"{entry['file']}/{key}"
            where = shown / rel
            try:
                fd = os.open(root / rel, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            except (FileNotFoundError, NotADirectoryError):
                raise StoreNotFoundError(
                    f"{where}: chunk file of array {name!r} is missing (the store records it). "
                    f"{fix}"
                ) from None
            except OSError as e:  # a symlink loop, no permission...
                raise StoreCorruptError(
                    f"{where}: chunk file of array {name!r} cannot be opened ({e.strerror}). {fix}"
                ) from None
            opened.append((fd, 0, None))
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise StoreCorruptError(
                    f"{where}: chunk file of array {name!r} is {file_kind(st.st_mode)}, not a "
                    f"regular file. {fix}"
                )
            if st.st_size < lay.index_bytes:
                raise StoreCorruptError(
                    f"{where}: shard file of array {name!r} holds {st.st_size} bytes, less than "
                    f"its index ({lay.index_bytes} bytes). {fix}"
                )
            blob = os.pread(fd, lay.index_bytes, st.st_size - lay.index_bytes)
            index = decode_shard_index(blob, lay.chunks_per_shard)
            if index is None:
                raise StoreCorruptError(
                    f"{where}: the shard index's checksum (crc32c) does not match: the shard "
                    f"file of array {name!r} is damaged. {fix}"
                )
            rows = min(lay.shard_rows, n - s * lay.shard_rows)
            used = index[: -(-rows // lay.chunk_rows)]
            absent = (used == MISSING).any(axis=1)
            off, length = used.astype(np.int64).T  # MISSING reads as -1: refused below
            data_end = st.st_size - lay.index_bytes
            bad = (
                absent
                | (length != lay.chunk_bytes)
                | (off < 0)
                | (off % lay.row_bytes != 0)
                | (off > data_end - lay.chunk_bytes)
            )
            if bad.any():
                c = int(np.flatnonzero(bad)[0])
                raise StoreCorruptError(
                    f"{where}: chunk {c} of this shard of array {name!r} "
                    + ("is absent" if absent[c] else f"is {length[c]} bytes at offset {off[c]}")
                    + f" where {lay.chunk_bytes} bytes at a row boundary inside the file were "
                    f"expected. {fix}"
                )
            opened[-1] = (fd, st.st_size, off)
    except BaseException:
        for fd, _, _ in opened:
            os.close(fd)
        raise
    return opened


def _map_side_by_side(
    names: tuple[str, ...],
    entries: list[dict[str, Any]],
    layouts: list[ShardLayout],
    shards: list[list[tuple[int, int, np.ndarray]]],
    dtype: np.dtype,
    row_shape: tuple[int, ...],
) -> RowPlace:
    """Map every shard of ``names`` into one :class:`Region` (NOTE [one range for many files]).

    Where every array is *contiguous* (each shard's chunks in order from its first byte, and
    all but the last shard a whole number of pages), shard ``s + 1`` is mapped right where
    shard ``s``'s rows end (over its index, which is read with ``pread``), so an array's rows
    lie in the range exactly as in a safetensors file: row ``r`` of array ``k`` is row
    ``offsets[k] + r`` of the view, with no row table. Otherwise each shard gets a slot of its
    own and a row table (one entry per ``gcd`` of the arrays' chunk rows) says where each
    run of rows begins; array ``k``'s rows in the joined numbering follow those of array
    ``k - 1`` padded to whole chunks."""
    row_bytes = layouts[0].row_bytes
    align = math.lcm(mmap.PAGESIZE, row_bytes)
    if all(_contiguous(lay, opened) for lay, opened in zip(layouts, shards, strict=True)):
        spans = [
            (len(o) - 1) * lay.shard_rows * row_bytes + o[-1][1] if o else 0
            for lay, o in zip(layouts, shards, strict=True)
        ]
        bases = list(itertools.accumulate((-(-s // align) * align for s in spans), initial=0))
        region = Region(bases[-1])
        for k, (opened, lay) in enumerate(zip(shards, layouts, strict=True)):
            full = lay.shard_rows * row_bytes  # a shard's rows (its chunks are inside the file)
            for s, (fd, size, _) in enumerate(opened):
                # all but the last shard: only its rows (a valid shard may hold unused bytes
                # before its index; the next shard is mapped where its rows end)
                length = size if s == len(opened) - 1 else min(size, full)
                region.map_file(fd, bases[k] + s * full, length)
        offsets, unit, lut = tuple(b // row_bytes for b in bases[:-1]), 0, None
    else:
        unit = math.gcd(*(lay.chunk_rows for lay in layouts))
        slots = [slot_bytes(max((n for _, n, _ in o), default=0), row_bytes) for o in shards]
        bases = list(
            itertools.accumulate(
                (len(o) * s for o, s in zip(shards, slots, strict=True)), initial=0
            )
        )
        region = Region(bases[-1])
        starts, at_rows, joined = [], [], 0
        for k, (opened, slot, lay) in enumerate(zip(shards, slots, layouts, strict=True)):
            within = np.arange(lay.chunk_rows // unit, dtype=np.int64) * unit * row_bytes
            for s, (fd, size, chunk_offsets) in enumerate(opened):
                at = bases[k] + s * slot
                region.map_file(fd, at, size)
                starts.append(((at + chunk_offsets)[:, None] + within).ravel() // row_bytes)
            at_rows.append(joined)
            joined += -(-entries[k]["shape"][0] // lay.chunk_rows) * lay.chunk_rows
        offsets = tuple(at_rows)
        lut = np.concatenate(starts) if starts else np.zeros(0, np.int64)
    buffer = region_array(region)
    # whole rows only: a range holds at least a page, more than an array of 0 rows fills
    rows = buffer[: len(buffer) // row_bytes * row_bytes]
    view = rows.view(dtype).reshape(-1, *row_shape)
    return RowPlace(view, offsets, buffer, entries[0]["file"], unit, lut)


def _contiguous(lay: ShardLayout, opened: list[tuple[int, int, np.ndarray]]) -> bool:
    """Whether every shard's chunks lie in order from its first byte, and every shard but the
    last holds a whole number of this machine's pages of rows."""
    full = lay.shard_rows * lay.row_bytes
    if len(opened) > 1 and full % mmap.PAGESIZE:
        return False
    return all(
        np.array_equal(offs, np.arange(offs.size, dtype=np.int64) * lay.chunk_bytes)
        for _, _, offs in opened
    )


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
