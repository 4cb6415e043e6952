"""What the stores that read through read-only maps share: row gathers (numpy or torch, NOTE
[intra-op gathers]), joined rows, and the batch prefetch (NOTE [batch prefetch]).

A backend (safetensors: one map per file; zarr: a file per shard, side by side in one range of
addresses, NOTE [one range for many files]) gives, for one array or for arrays joined end to end,
a 2-D numpy array over its maps and where each wanted row lies in it (:class:`RowPlace`); the
rest is here, so a batch is gathered the same way whatever the backend.

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

import mmap
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from jasper_mmap.format.dtypes import entry_nbytes
from jasper_mmap.stores.base import NEGATIVE_ARRAYS, Store, in_gather_thread
from jasper_mmap.stores.readahead import DENSE_WINDOW, choose_advice, map_address, willneed

__all__ = ["MappedStore", "RowPlace"]

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


@dataclass(frozen=True)
class RowPlace:
    """Rows of one array, or of arrays joined end to end, over read-only maps.

    ``view`` is a 2-D array over the maps; row ``r`` (of the joined rows: array ``k``'s row
    ``i`` is ``offsets[k] + i``) is ``view[at(r)]``. ``buffer`` is the memory the view lies in
    (a map, or a range of maps) for read-ahead, and ``file`` names it for the dense windows.
    """

    view: np.ndarray
    offsets: tuple[int, ...]
    buffer: Any
    file: str
    #: rows per chunk and the ``view`` row of each chunk's first row; None: ``view[r]`` is row r
    chunk: int = 0
    chunk_rows: np.ndarray | None = None

    def at(self, rows: np.ndarray) -> np.ndarray:
        """Where rows ``rows`` (checked int64 indices) lie in :attr:`view`."""
        if self.chunk_rows is None:
            return rows  # the joined rows are the view's rows
        q, r = np.divmod(rows, self.chunk)
        q = self.chunk_rows[q]
        q += r
        return q


class MappedStore(Store):
    """A store whose arrays lie in read-only maps: gathers, joins and read-ahead in one place.

    Backends implement :meth:`_place` (one array: ``names`` of one name, or arrays joined end to
    end) and open their maps in :meth:`_open_array` or :meth:`_place` as they need.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # per process, like Store._handles (dropped by __getstate__ and close):
        # (names, generation) -> their rows over the maps (None: not joinable); :meth:`joined`
        self._places: dict[tuple[tuple[str, ...], int | None], RowPlace | None] = {}
        # a handle key (Store._handle_key) or (names, None) of joined rows -> a tensor over it
        self._torch_views: dict[tuple[str | tuple[str, ...], int | None], Any] = {}
        # (epoch, {(file, name): windows asked}) of NOTE [dense arrays]
        self._windows: tuple[int, dict[tuple[str, str], np.ndarray]] | None = None
        super().__init__(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(_places={}, _torch_views={}, _windows=None)
        return state

    # -- read-ahead advice ------------------------------------------------------------------
    @property
    def reads_ahead(self) -> bool:
        """Whether this store's maps are advised ``"random"`` and its batches read ahead
        (NOTE [read-ahead advice] in jasper_mmap/stores/safetensors_store.py)."""
        return self._advice() == "random"

    def _advice(self) -> str:
        cached = self.__dict__.get("_advice_value")
        if cached is not None:
            return cached
        total = 0
        for e in self.manifest["arrays"].values():
            try:
                total += entry_nbytes(e)
            except (KeyError, TypeError, ValueError):  # verify reads a store that failed open
                continue
        self._advice_value = choose_advice(total)
        return self._advice_value

    # -- where rows lie ---------------------------------------------------------------------
    def _place(self, names: tuple[str, ...], generation: int | None) -> RowPlace | None:
        """Rows of ``names`` over this process's maps; None where they cannot be joined (or,
        for one array, where the backend does not map it). Backend hook."""
        raise NotImplementedError

    def _placed(self, names: tuple[str, ...], generation: int | None = None) -> RowPlace | None:
        """:meth:`_place`, made once per process and kept with the maps (dropped on close and
        with the generation of the negatives)."""
        place = self._places.get((names, generation), _UNSET)  # the common case, at once
        if place is not _UNSET:
            return place
        if any(name in NEGATIVE_ARRAYS for name in names):
            if len(names) > 1:
                return None  # a generation's arrays: replaced by every reload, never joined
            generation = self.generation if generation is None else generation
        else:
            generation = None
        key = (names, generation)
        place = self._places.get(key, _UNSET)
        if place is not _UNSET:
            return place
        with self._guard():  # a close from another thread waits until the place is made
            place = self._places.get(key, _UNSET)
            if place is _UNSET:
                place = self._places[key] = self._place(names, generation)
        return place

    # -- gathers ----------------------------------------------------------------------------
    def _gather_raw(
        self,
        name: str,
        idx: np.ndarray,
        out: np.ndarray | None = None,
        generation: int | None = None,
    ) -> np.ndarray:
        place = self._placed((name,), generation)
        if place is None:
            return super()._gather_raw(name, idx, out, generation)
        return self._rows(place.view, self._handle_key(name, generation)[0], place.at(idx), out)

    def _read_raw(self, name: str, start: int, stop: int | None) -> np.ndarray:
        place = self._placed((name,))
        if place is None:
            return super()._read_raw(name, start, stop)
        lo, hi, _ = slice(start, stop).indices(self.shape(name)[0])
        hi = max(lo, hi)
        if place.chunk_rows is None:  # rows in order: a view
            return place.view[place.offsets[0] + lo : place.offsets[0] + hi]
        return np.take(place.view, place.at(np.arange(lo, hi, dtype=np.int64)), axis=0)

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
        """One gather where the arrays are joined (the steering tables as the converter writes
        them): row ``offsets[which[i]] + idx[i]`` of their joined rows (:meth:`joined`).
        Otherwise one gather per array (the base class)."""
        place = self._placed(names)
        if place is None or out.dtype != place.view.dtype:
            return super().gather_mixed_unchecked(names, which, idx, out)
        rows = np.asarray(place.offsets, dtype=np.int64)[np.maximum(which, 0)] + idx
        zero = which < 0
        rows[zero] = 0  # zeroed after the gather: read the first row, a cached page
        self._rows(place.view, (names, None), place.at(rows), out)
        out[zero] = 0
        return out

    def joined(self, names: tuple[str, ...]) -> tuple[int, ...] | None:
        """Where each of the arrays ``names`` begins in their joined rows, if the backend can
        gather them with one gather (2-D, one row width and dtype, and, for safetensors, back
        to back in one file); None otherwise, and for the negatives (a reload replaces them).
        The converter writes ``question_embs`` and ``source_embs`` so, and the three steering
        tables (NOTE [joined rows] in jasper_mmap/dataset/batches.py)."""
        if any(name in NEGATIVE_ARRAYS for name in names):
            return None  # replaced by every reload
        place = self._placed(names)
        return None if place is None else place.offsets

    def gather_joined_unchecked(
        self, names: tuple[str, ...], idx: np.ndarray, out: np.ndarray
    ) -> np.ndarray:
        """Rows ``idx`` of the joined rows of ``names`` (:meth:`joined` is not None) into
        ``out`` (their dtype). ``idx`` addresses rows of the arrays, each range-checked
        against its own array (:meth:`check_rows`) and moved by that array's offset: it is not
        checked here."""
        place = self._placed(names)
        if place is None:
            raise NotImplementedError(f"{self.path}: the arrays {names} are not joined")
        return self._rows(place.view, (names, None), place.at(idx), out)

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

    # -- read-ahead -------------------------------------------------------------------------
    def prefetch(
        self,
        rows: dict[str, np.ndarray],
        dense: frozenset[str] = frozenset(),
        epoch: int = 0,
        generation: int | None = None,
    ) -> None:
        """``MADV_WILLNEED`` on the pages of the given rows, when the store exceeds RAM/2; for
        an array in ``dense``, on the aligned ``DENSE_WINDOW`` around each row instead, once
        per window and ``epoch`` in this process (NOTE [dense arrays] in
        jasper_mmap/stores/readahead.py).

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
            # the rows of one generation: the batch's (a reload may switch the served one)
            place = self._placed((name,), generation)
            if place is None or not idx.size or not place.view.size:
                continue
            buf = place.buffer
            row, base = place.view.strides[0], map_address(buf)  # buf stays open: view sees it
            first = place.view.__array_interface__["data"][0] - base
            idx = np.asarray(idx, dtype=np.int64)
            # rows outside the array are skipped (the dataset range-checks them before; a
            # caller that did not is told by gather/check_rows, which name them)
            idx = idx[(idx >= 0) & (idx < self.shape(name, generation)[0])]
            offsets = first + place.at(idx) * row
            span = -(-row // mmap.PAGESIZE) * mmap.PAGESIZE  # a row may cross a block's end
            if name in dense:  # NOTE [dense arrays]: a window each, the first time
                windows = np.unique(offsets // DENSE_WINDOW)
                asked_epoch, asked = self._windows or (None, None)
                if asked is None or asked_epoch != epoch:  # asked again each epoch
                    asked = {}
                    self._windows = (epoch, asked)
                seen = asked.get((place.file, name))
                if seen is None:
                    seen = asked[place.file, name] = np.zeros(len(buf) // DENSE_WINDOW + 1, bool)
                new = windows[~seen[windows]]
                seen[new] = True
                willneed(buf, base, new * DENSE_WINDOW, DENSE_WINDOW + span)
                continue
            pages = np.unique(offsets // mmap.PAGESIZE)
            willneed(buf, base, pages * mmap.PAGESIZE, mmap.PAGESIZE + span)

    # -- release ----------------------------------------------------------------------------
    def _release(self, generation: int) -> None:
        for key in [k for k in self._torch_views if k[1] == generation]:
            del self._torch_views[key]
        for key in [k for k in self._places if k[1] == generation]:
            del self._places[key]
        super()._release(generation)

    def close(self) -> None:
        with self._guard():
            self._places, self._torch_views, self._windows = {}, {}, None
            super().close()
