"""The small interface every store backend implements: open lazily, gather rows by index.

A :class:`Store` holds the store's path and its (small) manifest. Backend handles — memory
maps, zarr arrays — are opened on first use in each process and dropped when pickled, so a
store object costs a few kilobytes to send to a DataLoader worker (see NOTE [worker start-up]
in ``jasper_mmap/dataset/control.py``). Every file is opened under the store directory
this process took, which must be the store first opened (NOTE [store identity]).
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jasper_mmap.errors import (
    JasperError,
    SampleIndexError,
    SampleIndexTypeError,
    StoreCorruptError,
    StoreKeyError,
    StoreNotFoundError,
    StoreReplacedError,
)
from jasper_mmap.format.dtypes import to_float32
from jasper_mmap.format.manifest import read_generation_desc, read_valid_manifest
from jasper_mmap.format.spec import NEGATIVE_ARRAYS
from jasper_mmap.stores.identity import PROC_FD, StoreDir, manifest_state, token_at
from jasper_mmap.stores.leases import LeasedGeneration, acquire_lease

__all__ = ["NEGATIVE_ARRAYS", "Store", "StoreWriter", "in_gather_thread", "mark_gather_thread"]


log = logging.getLogger(__name__)


_THREAD = threading.local()


def mark_gather_thread() -> None:
    """Mark the calling thread as one of a loader's gather threads: its gathers stay on it
    (numpy) instead of using torch's intra-op threads (NOTE [intra-op gathers])."""
    _THREAD.gather = True


def in_gather_thread() -> bool:
    """Whether :func:`mark_gather_thread` marked the calling thread."""
    return getattr(_THREAD, "gather", False)


class Store(abc.ABC):
    """Read side of a store. Subclasses implement :meth:`_open_array`.

    Thread-safe: handles are opened under a lock, and a batch pins the negatives generation
    it reads (:meth:`pinned`), so concurrent gathers never see a generation released under
    them. Every generation this process reads is leased (NOTE [generation leases]). It reads
    the store it opened or raises StoreReplacedError (NOTE [store identity]), from any
    method that opens a file, and from :meth:`live_generation`.

    Args:
        path: the store directory.
        manifest: its parsed manifest (read from ``path`` when omitted).
        verified: the live negatives generation :func:`~jasper_mmap.stores.open_store` has
            just checked (``integrity.store_problems``), with its description: its first
            lease skips reading and checking it again.
    """

    backend: str = ""

    def __init__(
        self,
        path: str | Path,
        manifest: dict[str, Any] | None = None,
        verified: dict[int, dict[str, Any]] | None = None,
    ) -> None:
        self.path = Path(path)
        self.manifest = manifest if manifest is not None else read_valid_manifest(self.path)
        # generations open_store has just checked: their first lease here skips the same check
        self._verified = dict(verified or {})
        self._generation: int | None = None  # the generation served when none is named
        self._gens: dict[int, LeasedGeneration] = {}  # per process: leased generations
        # (name, generation) -> the backend's handle; generation None for all but the negatives
        self._handles: dict[tuple[str, int | None], Any] = {}
        self._lock = threading.RLock()
        self._pid = os.getpid()
        self._identity: tuple[str | None, tuple | None] | None = None  # NOTE [store identity]
        self._dir: StoreDir | None = None
        self._root()  # the directory is taken now, right after open_store checked it

    # -- pickling: paths and small state only ------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # maps, leases, the directory and what was checked at open are per process
        state.update(_handles={}, _gens={}, _lock=None, _verified={}, _dir=None)
        return state

    # -- the directory opened: NOTE [store identity] ------------------------------------------
    def _root(self) -> Path:
        """Where this process opens the store's files: the directory taken first."""
        d = self._dir
        if d is None:
            with self._guard():
                if self._dir is None:
                    self._dir = self._take_dir()
                d = self._dir
        return d.root

    def opened_path(self, rel: str) -> Path:
        """Where this process opens the store's file ``rel`` (relative to the store): under
        the directory it opened (NOTE [store identity]). For messages use :attr:`path`."""
        return self._root() / rel

    def _replaced(self, what: str) -> StoreReplacedError:
        return StoreReplacedError(
            f"{self.path}: the store opened here {what} (convert-pt --overwrite, a move or a "
            f"removal); nothing of the store now at this path is read in its place. Open the "
            f"dataset (or store) again to read the store now at {self.path}."
        )

    def _take_dir(self) -> StoreDir:
        """Open the store directory and check it is the store first opened (if any was)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            if self._identity is not None:
                raise self._replaced("is gone from its path") from None
            raise StoreNotFoundError(
                f"{self.path}: store directory cannot be opened ({e.strerror}). Check the path."
            ) from None
        try:
            state = manifest_state(fd)
            if self._identity is None:
                token = self.manifest.get("store_id")
                self._identity = (token if isinstance(token, str) else None, state)
            elif state is None or state != self._identity[1]:
                token = self._identity[0]
                if token is None or token_at(fd) != token:
                    raise self._replaced("was replaced by another store since it was opened")
                self._identity = (token, state)  # the same store, its manifest rewritten
            root = Path(f"/proc/self/fd/{fd}") if PROC_FD else self.path
            return StoreDir(fd, root)
        except BaseException:
            os.close(fd)
            raise

    def _check_same(self) -> None:
        """Raise StoreReplacedError if the directory held was deleted, or the path now names
        another directory (two ``stat`` calls)."""
        d = self._dir
        if d is None:
            return
        held = os.fstat(d.fd)
        try:
            here = os.stat(self.path)
        except OSError:
            here = None
        if held.st_nlink == 0:
            raise self._replaced("was deleted (replaced or removed) after it was opened")
        if here is None or (here.st_dev, here.st_ino) != (held.st_dev, held.st_ino):
            raise self._replaced("is no longer the one at its path")

    @contextlib.contextmanager
    def _at_root(self) -> Iterator[Path]:
        """Yield :meth:`_root`; our errors raised inside name ``self.path`` instead of the
        root, and one raised because the store was replaced meanwhile says so."""
        root = self._root()
        try:
            yield root
        except JasperError as e:
            if not isinstance(e, StoreReplacedError):
                self._check_same()
            raise _renamed(e, str(root), str(self.path)) from None

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock, self._pid = threading.RLock(), os.getpid()

    def _guard(self) -> threading.RLock:
        """This process's lock (a forked child gets a fresh one: the parent's may be held)."""
        if self._pid != os.getpid():
            self._lock, self._pid = threading.RLock(), os.getpid()
        return self._lock

    # -- metadata ------------------------------------------------------------------------------
    @property
    def counts(self) -> dict[str, int]:
        """Row counts and dimensions recorded at conversion (``n_pairs``, ``embedding_dim``...)."""
        return self.manifest["counts"]

    @property
    def generation(self) -> int:
        """The negatives generation served when none is named: the live one at first use,
        until :meth:`use_generation`."""
        with self._guard():
            if self._generation is None:
                self._generation = self._lease_live()
            return self._generation

    @property
    def negatives_pointer(self) -> dict[str, Any]:
        """Description of :attr:`generation` (its arrays, sources and files)."""
        return self._leased(self.generation).desc

    def live_generation(self) -> int:
        """The generation ``negatives/CURRENT.json`` names now (one small file read).

        Raises:
            StoreReplacedError: the path no longer names the store opened (NOTE [store
                identity]): its publications go to another store now.
        """
        with self._at_root() as root:
            self._check_same()
            return int(read_generation_desc(root)["generation"])

    def _lease_live(self) -> int:
        """Lease the live generation (retried: it can be superseded and removed meanwhile)."""
        for _ in range(9):
            g = self.live_generation()
            try:
                self._leased(g)
                return g
            except StoreNotFoundError:
                pass
        g = self.live_generation()
        self._leased(g)
        return g

    def _leased(self, generation: int) -> LeasedGeneration:
        with self._guard():
            gen = self._gens.get(generation)
            if gen is None:
                # open_store checked it just now (when it was live): not read and checked again
                desc = self._verified.pop(generation, None)  # later leases of it check again
                with self._at_root() as root:
                    gen = acquire_lease(root, generation, self.manifest, desc)
                self._gens[generation] = gen
            return gen

    def use_generation(self, generation: int) -> None:
        """Serve ``generation`` from now on (leasing it); let go of generations no batch pins.

        Raises:
            StoreNotFoundError: that generation was removed (NOTE [generation leases]).
        """
        with self._guard():
            if self._generation == generation and generation in self._gens:
                return  # already served and leased by this process
            self._leased(generation)
            self._generation = generation
            for g in [g for g, gen in self._gens.items() if g != generation and not gen.pins]:
                self._release(g)

    def serve(self, generation: int) -> int:
        """:meth:`use_generation`, falling back to the live generation if ``generation`` was
        removed (with a warning); returns the generation now served."""
        with self._guard():
            try:
                self.use_generation(generation)
            except StoreNotFoundError:
                live = self._lease_live()
                log.warning(
                    "%s: negatives generation %d was removed before this process used it; "
                    "serving the live generation %d",
                    self.path,
                    generation,
                    live,
                )
                self.use_generation(live)
            return self._generation

    @contextlib.contextmanager
    def pinned(self, generation: int | None = None, *, serve: bool = False) -> Iterator[int]:
        """Keep ``generation`` (default: :attr:`generation`) leased and mapped for a block.

        With ``serve``, first :meth:`serve` it (so a removed one falls back to the live one).
        Yields the generation pinned; gathers inside pass it as ``generation=``.

        Raises:
            StoreNotFoundError: that generation was removed (without ``serve``).
        """
        with self._guard():
            g = self.generation if generation is None else generation
            if serve:
                g = self.serve(g)
            self._leased(g).pins += 1
        try:
            yield g
        finally:
            with self._guard():
                gen = self._gens.get(g)
                if gen is not None:
                    gen.pins -= 1
                    if not gen.pins and g != self._generation:
                        self._release(g)

    def _release(self, generation: int) -> None:
        """Drop the maps and the lease of ``generation`` (under the lock)."""
        gen = self._gens.pop(generation)
        for key in [k for k in self._handles if k[1] == generation]:
            del self._handles[key]
        self._release_files({e["file"] for e in gen.desc["arrays"].values()})
        gen.lease.close()  # releases the shared lock: the generation may now be removed

    def _release_files(self, files: set[str]) -> None:  # noqa: B027 - optional hook
        """Backend hook: forget per-file handles of ``files`` (relative paths)."""

    def names(self) -> list[str]:
        """Names of every array in the store, negatives included."""
        return sorted(set(self.manifest["arrays"]) | set(NEGATIVE_ARRAYS))

    def entry(self, name: str, generation: int | None = None) -> dict[str, Any]:
        """Manifest entry of array ``name`` (negatives: from ``generation``'s description,
        default :attr:`generation`)."""
        if name in NEGATIVE_ARRAYS:
            g = self.generation if generation is None else generation
            return self._leased(g).desc["arrays"][name]
        try:
            return self.manifest["arrays"][name]
        except KeyError:
            raise StoreKeyError(
                f"{self.path}: the store has no array {name!r}; it has {self.names()}"
            ) from None

    def has(self, name: str) -> bool:
        """Whether the store holds array ``name`` (optional splits may be absent)."""
        return name in NEGATIVE_ARRAYS or name in self.manifest["arrays"]

    def shape(self, name: str, generation: int | None = None) -> tuple[int, ...]:
        """Shape of array ``name`` as recorded in the manifest (no file access)."""
        return tuple(self.entry(name, generation)["shape"])

    # -- data ------------------------------------------------------------------------------
    def raw(self, name: str, generation: int | None = None) -> Any:
        """The backend's lazily opened handle of ``name`` (memmap view or zarr array).

        Negatives come from ``generation`` (default :attr:`generation`), which is leased.
        """
        key, g = self._handle_key(name, generation)
        handle = self._handles.get(key)
        if handle is None:
            with self._guard():
                handle = self._handles.get(key)
                if handle is None:
                    entry = self.entry(name, g) if name in NEGATIVE_ARRAYS else self.entry(name)
                    with self._at_root():  # backends open files under _root()
                        handle = self._handles[key] = self._open_array(name, entry)
        return handle

    def _handle_key(
        self, name: str, generation: int | None
    ) -> tuple[tuple[str, int | None], int | None]:
        """The key of ``name``'s handle, ``(name, generation)``, and the generation it is read
        from (negatives; None for every other array)."""
        if name not in NEGATIVE_ARRAYS:
            return (name, None), None
        g = self.generation if generation is None else generation
        return (name, g), g

    def gather(
        self,
        name: str,
        index: np.ndarray | list[int],
        out: np.ndarray | None = None,
        generation: int | None = None,
    ) -> np.ndarray:
        """Return rows ``index`` of array ``name`` (floats as float32), in ``out`` if given.

        Negatives come from ``generation`` (default :attr:`generation`).

        Raises:
            SampleIndexError: an index is negative or not below the array's length.
        """
        idx = self.check_rows(name, index, generation)
        return self.gather_unchecked(name, idx, out, generation)

    def check_rows(
        self, name: str, index: np.ndarray | list[int], generation: int | None = None
    ) -> np.ndarray:
        """``index`` as an int64 array, once checked to address rows of ``name``.

        Raises:
            SampleIndexError: an index is negative or not below the array's length.
        """
        raw = np.asarray(index)
        if raw.size and raw.dtype.kind not in "iu":  # never cast: 0.5 would read row 0
            raise SampleIndexTypeError(
                f"{self.path}: rows of {name!r} should be integers, but got {raw.dtype} "
                f"values ({raw.ravel()[:3].tolist()}). Pass integer row indices."
            )
        idx = raw.astype(np.int64, copy=False)
        n = self.shape(name, generation)[0]
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            bad = idx[(idx < 0) | (idx >= n)]
            raise SampleIndexError(
                f"{self.path}: rows of {name!r} should be in [0, {n}), but got {bad[:5].tolist()}"
            )
        return idx

    def gather_unchecked(
        self,
        name: str,
        idx: np.ndarray,
        out: np.ndarray | None = None,
        generation: int | None = None,
    ) -> np.ndarray:
        """:meth:`gather` without the range check, for int64 ``idx`` that :meth:`check_rows`
        accepted for ``name`` or for an array of the same length (a batch checks each index
        array once and reads several arrays with it). Out-of-range rows are not detected."""
        stored = self.entry(name, generation)["stored_dtype"]
        if out is not None and stored in ("float32", "int64"):
            return self._gather_raw(name, idx, out, generation)  # into the caller's buffer
        result = to_float32(self._gather_raw(name, idx, None, generation), stored)
        if out is None:
            return result
        out[...] = result
        return out

    def gather_mixed_unchecked(
        self, names: tuple[str, ...], which: np.ndarray, idx: np.ndarray, out: np.ndarray
    ) -> np.ndarray:
        """Row ``idx[i]`` of array ``names[which[i]]`` into ``out[i]``; zeros where
        ``which[i] < 0``. The arrays have the same shape and dtype (the steering tables),
        ``which`` is in ``[-1, len(names))`` and ``idx`` was checked against the arrays'
        length (:meth:`check_rows`): neither is checked here."""
        out[which < 0] = 0
        for k, name in enumerate(names):
            chosen = which == k
            if chosen.any():
                out[chosen] = self.gather_unchecked(name, idx[chosen])
        return out

    def joined(self, names: tuple[str, ...]) -> tuple[int, ...] | None:
        """Where each of the arrays ``names`` begins in one joined row space that
        :meth:`gather_joined_unchecked` reads with one gather, or None: here always None (a backend that
        maps its files joins arrays lying back to back in one file)."""
        return None

    def gather_joined_unchecked(
        self, names: tuple[str, ...], idx: np.ndarray, out: np.ndarray
    ) -> np.ndarray:
        """Rows ``idx`` of the joined rows of ``names``; only where :meth:`joined` is not None."""
        raise NotImplementedError(f"{self.path}: {self.backend} stores join no arrays")

    @property
    def reads_ahead(self) -> bool:
        """True for a store whose maps are advised ``"random"`` (larger than half of RAM):
        its batches :meth:`prefetch` reads ahead. False otherwise, and for backends that do
        not map (NOTE [read-ahead advice] in jasper_mmap/stores/safetensors_store.py)."""
        return False

    def prefetch(  # noqa: B027 - optional hook
        self,
        rows: dict[str, np.ndarray],
        dense: frozenset[str] = frozenset(),
        epoch: int = 0,
        generation: int | None = None,
    ) -> None:
        """Hint that rows ``{array: indices}`` will be gathered soon (asynchronous read-ahead).

        Backends that read through memory maps start the reads of all these rows at once, so a
        batch from a cold store costs a few round trips to the disk instead of one per row.
        Arrays named in ``dense`` are read in large windows around each row, each window once
        per ``epoch`` (most of them is read over a pass anyway: NOTE [dense arrays] in
        dataset.py). Negatives are those of ``generation`` (default :attr:`generation`): the
        batch's. The default does nothing.
        """

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Return the contiguous rows ``start:stop`` of ``name`` as a numpy array (a copy)."""
        raw = self._read_raw(name, start, stop)
        return to_float32(np.array(raw), self.entry(name)["stored_dtype"])

    def close(self) -> None:
        """Drop every handle and lease this process holds; the store can be used again."""
        with self._guard():
            for gen in self._gens.values():
                gen.lease.close()
            self._gens.clear()
            self._handles.clear()
            self._generation = None
            # taken again (and checked) at the next use; the descriptor itself is closed when
            # nothing uses it any more (a zarr array still held reads under its root)
            self._dir = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- backend hooks -----------------------------------------------------------------------
    @abc.abstractmethod
    def _open_array(self, name: str, entry: dict[str, Any]) -> Any:
        """Open array ``name`` described by manifest ``entry``; check its size in O(1)."""

    def _gather_raw(
        self,
        name: str,
        idx: np.ndarray,
        out: np.ndarray | None = None,
        generation: int | None = None,
    ) -> np.ndarray:
        rows = self.raw(name, generation)[idx]
        if out is None:
            return rows
        out[...] = rows
        return out

    def _read_raw(self, name: str, start: int, stop: int | None) -> np.ndarray:
        return self.raw(name)[start:stop]

    def _check_shape(self, name: str, entry: dict[str, Any], shape: tuple[int, ...], where: str):
        if tuple(shape) != tuple(entry["shape"]):
            raise StoreCorruptError(
                f"{where}: array {name!r} should have shape {tuple(entry['shape'])} as the "
                f"manifest says, but has {tuple(shape)}. Re-create the store with "
                f"`convert-pt SRC {self.path} --overwrite`."
            )


def _renamed(e: JasperError, old: str, new: str) -> JasperError:
    """``e`` with ``old`` replaced by ``new`` in its message (same class), when it has it."""
    msg = str(e)
    if old not in msg:
        return e
    try:
        out = type(e)(msg.replace(old, new))
    except TypeError:  # a class with its own constructor: keep it as it is
        return e
    out.__cause__ = e.__cause__
    return out


class StoreWriter(abc.ABC):
    """Write side of a backend: declare arrays of a unit, then stream their rows in order.

    Usage::

        w = Writer(tmp_store_dir)
        w.begin_unit("embeddings", [("question_embs", (n, d), "float16"), ...])
        w.write("question_embs", block)   # rows in order, any block size
        entries = w.end_unit()            # name -> manifest entry fields ("file", "key")
    """

    backend: str = ""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @abc.abstractmethod
    def begin_unit(self, unit: str, arrays: list[tuple[str, tuple[int, ...], str]]) -> None:
        """Start unit ``unit`` (a path relative to the store root) holding ``arrays``."""

    @abc.abstractmethod
    def write(self, name: str, block: np.ndarray) -> None:
        """Append ``block`` (raw stored representation) to array ``name`` of the open unit."""

    @abc.abstractmethod
    def end_unit(self) -> dict[str, dict[str, Any]]:
        """Finish the open unit (check every row arrived, flush, fsync); return its entries."""

    def abort(self) -> None:  # noqa: B027 - optional hook
        """Release open files after a failure (the caller removes the directory)."""
