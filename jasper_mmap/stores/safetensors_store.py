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

# NOTE [intra-op gathers]
A batch is mostly row gathers of 2-D float32 arrays (1,664 rows of 1.5 KiB from ``source_embs``
at B=128, n_neg=12). Gathered in the training loop's own thread (``num_workers=0``, or a loader
gathering in the loop; NOTE [thread loading]) they are ``torch.index_select`` on a tensor view
of the map, written into the caller's buffer: torch splits the rows over its intra-op threads,
the ones the training step itself uses, so no thread is added (idle, 2 cores: those 1,664
rows in 323 us against 636 us with ``numpy.take``). The loader's gather threads keep
``numpy.take`` (one thread each): an OpenMP parallel region started from another thread gets
a team of its own, so N gather threads would each add torch's intra-op threads to the step's
(``mark_gather_thread``). Both give the same bytes: a gather
copies rows, it computes nothing.
On a machine whose cores are busy torch's intra-op threads collapse: each parallel region
waits for its slowest thread to get a core. So the in-loop path is chosen per
gather by :class:`_GatherChooser`: with one intra-op thread always ``numpy.take``; otherwise
each large gather is timed per byte moved, ``index_select`` kept while it is the cheaper, the
other path probed by one gather every 8 calls (the interval doubling to 256 while probes
lose), and a switch made when the other is 1.25x cheaper per byte. Under load
(scripts/bench_busy.py, 2 cores, a busy loop per core, num_workers=0) the rule runs at ~0.84 of
``numpy.take``'s rate and 12x ``index_select``'s. The measurements behind this and the open
re-measurement of the idle case: docs/design/intra-op-gathers.md.
"""

from __future__ import annotations

import itertools
import json
import mmap
import os
import struct
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from jasper_mmap._fs.files import open_regular
from jasper_mmap.errors import StoreCorruptError
from jasper_mmap.format.dtypes import entry_nbytes, numpy_dtype, safetensors_code
from jasper_mmap.format.safetensors_header import (
    ALIGN,
    RECREATE_FIX,
    layout_problems,
    read_header,
    tensor_problems,
)
from jasper_mmap.format.schema import raise_problems, store_fix
from jasper_mmap.stores.base import NEGATIVE_ARRAYS, Store, StoreWriter, in_gather_thread
from jasper_mmap.stores.readahead import (
    DENSE_WINDOW,
    array_address,
    choose_advice,
    map_address,
    willneed,
)

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


#: smaller gathers (bytes) are faster with numpy: torch's call costs ~15 us. Measured (random
#: rows of a 300 MB array, 2 threads): 32 x 1.5 KiB rows 11 us numpy, 14 us torch; 64 rows 19
#: and 19 us; 128 rows 37 and 25 us; 1,664 rows 341 and 180 us; 128 x 96 B rows 4 and 6 us
_INTRA_OP_BYTES = 96 << 10


_UNSET = object()


#: the clock large in-loop gathers are timed with (a test replaces it)
_clock = time.perf_counter


class _GatherChooser:
    """Which path the next large in-loop gather takes: ``"torch"`` (index_select on the
    intra-op threads) or ``"numpy"`` (np.take, one thread); NOTE [intra-op gathers].

    Each gather is timed against the bytes it moved; the cost per byte of the path in use
    is smoothed, the other path's is refreshed by one probe gather every ``interval`` calls
    (doubling, up to :attr:`PROBE_MAX`, while the probes lose). A path is left for the other
    when the other is :attr:`MARGIN` times cheaper; a path in use that turns that much
    costlier than the other's last figure probes the other at the next call. With one
    intra-op thread torch has no parallelism to offer: numpy, untimed. Both paths give the
    same bytes; only the time differs.
    """

    PROBE_FIRST = 8
    PROBE_MAX = 256
    MARGIN = 1.25
    ALPHA = 0.3

    def __init__(self) -> None:
        self.cost: dict[str, float | None] = {"torch": None, "numpy": None}
        self.current = "torch"
        self.interval = self.PROBE_FIRST
        self.countdown = 2  # numpy's figure early on

    def choose(self, threads: int) -> str:
        if threads <= 1:
            return "numpy"
        self.countdown -= 1
        if self.countdown <= 0:
            return "numpy" if self.current == "torch" else "torch"
        return self.current

    def record(self, path: str, seconds: float, nbytes: int) -> None:
        c = seconds / max(nbytes, 1)
        other = "numpy" if path == "torch" else "torch"
        if path != self.current:  # a probe: its fresh figure decides
            self.cost[path] = c
            if c * self.MARGIN < (self.cost[self.current] or float("inf")):
                self.current, self.interval = path, self.PROBE_FIRST
            else:
                self.interval = min(2 * self.interval, self.PROBE_MAX)
            self.countdown = self.interval
            return
        old = self.cost[path]
        self.cost[path] = c if old is None else old + self.ALPHA * (c - old)
        theirs = self.cost[other]
        if theirs is not None and self.cost[path] > self.MARGIN * theirs:
            self.countdown = min(self.countdown, 1)  # probe the other at the next call


_CHOOSER = _GatherChooser()


def _torch() -> Any:
    import torch  # the dataset has imported it already; the converter and CLI never need it

    return torch


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


class SafetensorsStore(Store):
    """Reads a safetensors-backend store through read-only memory maps."""

    backend = "safetensors"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # per process, like Store._handles (dropped by __getstate__ and close):
        self._maps: dict[str, _MappedFile] = {}  # file (relative path) -> its map
        # arrays (names) -> their joined rows and offsets (None: not joinable); :meth:`joined`
        self._joins: dict[tuple[str, ...], tuple[np.ndarray, tuple[int, ...]] | None] = {}
        # a handle key (Store._handle_key) or (names, None) of joined rows -> a tensor over it
        self._torch_views: dict[tuple[str | tuple[str, ...], int | None], Any] = {}
        # (epoch, {(file, name): windows asked}) of NOTE [dense arrays]
        self._windows: tuple[int, dict[tuple[str, str], np.ndarray]] | None = None
        super().__init__(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(_maps={}, _joins={}, _torch_views={}, _windows=None)
        return state

    @property
    def reads_ahead(self) -> bool:
        """Whether this store's maps are advised ``"random"`` and its batches read ahead
        (NOTE [read-ahead advice])."""
        return self._advice() == "random"

    def _advice(self) -> str:
        cached = self.__dict__.get("_advice_value")
        if cached is not None:
            return cached
        total = sum(entry_nbytes(e) for e in self.manifest["arrays"].values())
        self._advice_value = choose_advice(total)
        return self._advice_value

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

    def _gather_raw(
        self,
        name: str,
        idx: np.ndarray,
        out: np.ndarray | None = None,
        generation: int | None = None,
    ) -> np.ndarray:
        src = self.raw(name, generation)
        return self._rows(src, self._handle_key(name, generation)[0], idx, out)

    def _rows(
        self, src: np.ndarray, key: tuple[Any, int | None], idx: np.ndarray, out: np.ndarray | None
    ):
        """Rows ``idx`` of ``src`` (a map's array, handle ``key``), the fastest way here."""
        if (
            out is not None
            and src.ndim == 2
            and out.dtype == src.dtype
            and out.flags.c_contiguous
            and idx.size * src.strides[0] >= _INTRA_OP_BYTES
            and not in_gather_thread()
        ):  # NOTE [intra-op gathers]
            torch = _torch()
            threads = torch.get_num_threads()
            path = _CHOOSER.choose(threads)
            if path == "numpy":
                t = _clock()
                np.take(src, idx, axis=0, out=out, mode="clip")
            else:
                view, index = self._torch_view(key, src), torch.from_numpy(idx)
                dest = torch.from_numpy(out)
                t = _clock()
                torch.index_select(view, 0, index, out=dest)
            if threads > 1:
                _CHOOSER.record(path, _clock() - t, out.nbytes)
            return out
        # indices were range-checked (check_rows); mode="clip" keeps numpy from buffering ``out``
        return np.take(src, idx, axis=0, out=out, mode="clip")

    def gather_mixed_unchecked(
        self, names: tuple[str, ...], which: np.ndarray, idx: np.ndarray, out: np.ndarray
    ) -> np.ndarray:
        """One gather where the arrays lie back to back in one file (the steering tables as
        the converter writes them): row ``offsets[which[i]] + idx[i]`` of their joined rows
        (:meth:`joined`). Otherwise one gather per array (the base class)."""
        joined = self._joined(names)
        if joined is None or out.dtype != joined[0].dtype:
            return super().gather_mixed_unchecked(names, which, idx, out)
        view, offsets = joined
        rows = np.asarray(offsets, dtype=np.int64)[np.maximum(which, 0)] + idx
        zero = which < 0
        rows[zero] = 0  # zeroed after the gather: read the first row, a cached page
        self._rows(view, (names, None), rows, out)
        out[zero] = 0
        return out

    def joined(self, names: tuple[str, ...]) -> tuple[int, ...] | None:
        """Where each of the arrays ``names`` begins in their joined rows, if they lie back
        to back in one file (in any order), 2-D, with one row width and dtype; None
        otherwise, and for the negatives (a reload replaces them). The converter writes
        ``question_embs`` and ``source_embs`` so, and the three steering tables (NOTE [joined
        rows] in jasper_mmap/dataset/batches.py)."""
        joined = self._joined(names)
        return None if joined is None else joined[1]

    def gather_joined_unchecked(
        self, names: tuple[str, ...], idx: np.ndarray, out: np.ndarray
    ) -> np.ndarray:
        """Rows ``idx`` of the joined rows of ``names`` (:meth:`joined` is not None) into
        ``out`` (their dtype). ``idx`` addresses rows of the arrays, each range-checked
        against its own array (:meth:`check_rows`) and moved by that array's offset: it is not
        checked here."""
        joined = self._joined(names)
        if joined is None:
            raise NotImplementedError(f"{self.path}: the arrays {names} are not joined")
        return self._rows(joined[0], (names, None), idx, out)

    def _joined(self, names: tuple[str, ...]) -> tuple[np.ndarray, tuple[int, ...]] | None:
        """:meth:`joined`'s view of the rows and the offsets; made once, kept with the maps
        (dropped on close)."""
        joined = self._joins.get(names, _UNSET)
        if joined is not _UNSET:
            return joined
        if any(name in NEGATIVE_ARRAYS for name in names):
            return None  # a generation's arrays: replaced by every reload, never joined
        with self._guard():  # a close from another thread waits until the view is made
            arrays = [self.raw(name) for name in names]
            while any(
                self._handles.get((n, None)) is not a for n, a in zip(names, arrays, strict=True)
            ):
                arrays = [self.raw(name) for name in names]  # closed meanwhile: all from now
            self._joins[names] = joined = self._join(names, arrays)
        return joined

    def _join(
        self, names: tuple[str, ...], arrays: list[np.ndarray]
    ) -> tuple[np.ndarray, tuple[int, ...]] | None:
        first = arrays[0]
        files = {self.entry(name)["file"] for name in names}
        if not (
            len(files) == 1
            and all(a.ndim == 2 and a.size and a.flags.c_contiguous for a in arrays)
            and all(a.shape[1] == first.shape[1] and a.dtype == first.dtype for a in arrays)
        ):
            return None
        order = sorted(range(len(arrays)), key=lambda k: array_address(arrays[k]))
        start = array_address(arrays[order[0]])
        starts = list(itertools.accumulate((arrays[k].nbytes for k in order), initial=start))
        if any(array_address(arrays[k]) != at for k, at in zip(order, starts[:-1], strict=True)):
            return None  # not back to back
        mapped = self._maps[files.pop()]
        view = np.frombuffer(
            mapped.map,
            dtype=first.dtype,
            count=sum(a.size for a in arrays),
            offset=start - map_address(mapped.map),
        ).reshape(-1, first.shape[1])
        return view, tuple((array_address(a) - start) // first.strides[0] for a in arrays)

    def _torch_view(self, key: tuple[Any, int | None], src: np.ndarray) -> Any:
        """A read-only tensor over ``src`` (a map's array, handle ``key``), made once per map;
        kept in ``_torch_views`` under the same key, so it is dropped with the map (release of
        its generation, close)."""
        view = self._torch_views.get(key)
        if view is None:
            with self._guard(), warnings.catch_warnings():
                # torch warns that it cannot mark the tensor read-only; nothing writes to it
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                view = self._torch_views[key] = _torch().from_numpy(src)
        return view

    def prefetch(
        self,
        rows: dict[str, np.ndarray],
        dense: frozenset[str] = frozenset(),
        epoch: int = 0,
        generation: int | None = None,
    ) -> None:
        """``MADV_WILLNEED`` on the pages of the given rows, when the store exceeds RAM/2; for
        an array in ``dense``, on the aligned ``DENSE_WINDOW`` around each row instead, once
        per window and ``epoch`` in this process (NOTE [dense arrays] in jasper_mmap/stores/readahead.py).

        # NOTE [batch prefetch]
        A worker that gathers rows of a cold map waits for one page fault at a time. Telling
        the kernel about every page of the batch first lets it read them all concurrently;
        the gather then finds them in the page cache. Below RAM/2 the store is expected to be
        cached and the extra system calls (one per distinct page) are skipped. The calls go
        through ctypes, without the GIL: a blocked ``madvise`` must not stall the other gather
        threads and the training loop.
        """
        if self._advice() != "random":
            return
        for name, idx in rows.items():
            # the array and its file of one generation: the batch's (a reload may switch
            # the served one meanwhile)
            arr, file = self.raw(name, generation), self.entry(name, generation)["file"]
            if not idx.size or arr.base is None:
                continue
            mapped = self._maps[file]
            row, base = arr.strides[0], map_address(mapped.map)  # the map stays open: arr views it
            first = array_address(arr) - base
            offsets = first + np.asarray(idx, dtype=np.int64) * row
            # rows outside the array are skipped (the dataset range-checks them before; a
            # caller that did not is told by gather/check_rows, which name them)
            offsets = offsets[(offsets >= first) & (offsets < first + arr.nbytes)]
            span = -(-row // mmap.PAGESIZE) * mmap.PAGESIZE  # a row may cross a block's end
            if name in dense:  # NOTE [dense arrays]: a window each, the first time
                windows = np.unique(offsets // DENSE_WINDOW)
                asked_epoch, asked = self._windows or (None, None)
                if asked is None or asked_epoch != epoch:  # asked again each epoch
                    asked = {}
                    self._windows = (epoch, asked)
                seen = asked.get((file, name))
                if seen is None:
                    seen = asked[file, name] = np.zeros(len(mapped.map) // DENSE_WINDOW + 1, bool)
                new = windows[~seen[windows]]
                seen[new] = True
                willneed(mapped.map, base, new * DENSE_WINDOW, DENSE_WINDOW + span)
                continue
            pages = np.unique(offsets // mmap.PAGESIZE)
            willneed(mapped.map, base, pages * mmap.PAGESIZE, mmap.PAGESIZE + span)

    def _release(self, generation: int) -> None:
        for key in [k for k in self._torch_views if k[1] == generation]:
            del self._torch_views[key]
        super()._release(generation)

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
            self._joins, self._torch_views, self._windows = {}, {}, None
            super().close()
        for mapped in files.values():
            if mapped.map is not None:
                try:
                    mapped.map.close()
                except BufferError:
                    pass  # a caller still holds a view; the map closes when it is released
