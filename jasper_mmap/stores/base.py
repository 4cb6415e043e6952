"""The small interface every store backend implements: open lazily, gather rows by index.

A :class:`Store` holds the store's path and its (small) manifest. Backend handles — memory
maps, zarr arrays — are opened on first use in each process and dropped when pickled, so a
store object costs a few kilobytes to send to a DataLoader worker (see NOTE [worker start-up]
in ``jasper_mmap/dataset.py`` once it exists).
"""

from __future__ import annotations

import abc
import fcntl
from pathlib import Path
from typing import Any

import numpy as np

from .._dtypes import to_float32
from ..errors import SampleIndexError, StoreCorruptError
from ..layout import NEGATIVES_DIR, generation_name, read_manifest, read_pointer

__all__ = ["Store", "StoreWriter", "NEGATIVE_ARRAYS"]

NEGATIVE_ARRAYS = ("hard_negatives", "negative_tiers")


class Store(abc.ABC):
    """Read side of a store. Subclasses implement :meth:`_open_array`.

    Args:
        path: the store directory.
        manifest: its parsed manifest (read from ``path`` when omitted).
    """

    backend: str = ""

    def __init__(self, path: str | Path, manifest: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.manifest = manifest if manifest is not None else read_manifest(self.path)
        self._pointer: dict[str, Any] | None = None
        self._handles: dict[str, Any] = {}

    # -- pickling: paths and small state only ------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = {}  # maps and leases are per process
        return state

    # -- metadata ------------------------------------------------------------------------------
    @property
    def counts(self) -> dict[str, int]:
        """Row counts and dimensions recorded at conversion (``n_pairs``, ``embedding_dim``...)."""
        return self.manifest["counts"]

    @property
    def negatives_pointer(self) -> dict[str, Any]:
        """Description of the negatives generation this object reads.

        The live one (``negatives/CURRENT.json``) at first use, until :meth:`use_generation`.
        """
        if self._pointer is None:
            self._pointer = read_pointer(self.path)
        return self._pointer

    @property
    def generation(self) -> int:
        """The negatives generation this object reads."""
        return int(self.negatives_pointer["generation"])

    def live_generation(self) -> int:
        """The generation ``negatives/CURRENT.json`` names now (one small file read)."""
        return int(read_pointer(self.path)["generation"])

    def use_generation(self, generation: int) -> None:
        """Read negatives from ``generation`` from now on; drops the old generation's maps.

        Raises:
            StoreNotFoundError: that generation was removed (see NOTE [negatives generations]).
        """
        if self._pointer is not None and self.generation == generation:
            return
        pointer = read_pointer(self.path, generation)
        self._drop_negatives()
        self._pointer = pointer

    def _drop_negatives(self) -> None:
        if self._pointer is None:
            return
        files = {e["file"] for e in self._pointer["arrays"].values()}
        for key in [k for k in self._handles if k.startswith(f"{NEGATIVES_DIR}/")]:
            del self._handles[key]
        self._release_files(files)
        lease = self._handles.pop("__lease__", None)
        if lease is not None:
            lease.close()  # releases the shared lock: the generation may now be removed

    def _release_files(self, files: set[str]) -> None:  # noqa: B027 - optional hook
        """Backend hook: forget per-file handles of ``files`` (relative paths)."""

    def _take_lease(self) -> None:
        """Hold a shared lock on the generation's description while its data is mapped."""
        if "__lease__" in self._handles:
            return
        path = self.path / NEGATIVES_DIR / f"{generation_name(self.generation)}.json"
        try:
            f = open(path, "rb")  # noqa: SIM115 - kept open as the lease
        except FileNotFoundError:
            return  # stores written before leases existed; nothing to protect
        fcntl.flock(f, fcntl.LOCK_SH)
        self._handles["__lease__"] = f

    def names(self) -> list[str]:
        """Names of every array in the store, negatives included."""
        return sorted(set(self.manifest["arrays"]) | set(NEGATIVE_ARRAYS))

    def entry(self, name: str) -> dict[str, Any]:
        """Manifest entry of array ``name`` (negatives: from the live generation's pointer)."""
        if name in NEGATIVE_ARRAYS:
            return self.negatives_pointer["arrays"][name]
        try:
            return self.manifest["arrays"][name]
        except KeyError:
            raise KeyError(
                f"{self.path}: the store has no array {name!r}; it has {self.names()}"
            ) from None

    def has(self, name: str) -> bool:
        """Whether the store holds array ``name`` (optional splits may be absent)."""
        return name in NEGATIVE_ARRAYS or name in self.manifest["arrays"]

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of array ``name`` as recorded in the manifest (no file access)."""
        return tuple(self.entry(name)["shape"])

    # -- data ------------------------------------------------------------------------------
    def raw(self, name: str) -> Any:
        """The backend's lazily opened handle of ``name`` (memmap view or zarr array)."""
        key = name
        if name in NEGATIVE_ARRAYS:
            key = f"{NEGATIVES_DIR}/{self.generation}/{name}"
        handle = self._handles.get(key)
        if handle is None:
            if name in NEGATIVE_ARRAYS:
                self._take_lease()
            handle = self._open_array(name, self.entry(name))
            self._handles[key] = handle
        return handle

    def gather(
        self, name: str, index: np.ndarray | list[int], out: np.ndarray | None = None
    ) -> np.ndarray:
        """Return rows ``index`` of array ``name`` (floats as float32), in ``out`` if given.

        Raises:
            SampleIndexError: an index is negative or not below the array's length.
        """
        idx = np.asarray(index, dtype=np.int64)
        n = self.shape(name)[0]
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            bad = idx[(idx < 0) | (idx >= n)]
            raise SampleIndexError(
                f"{self.path}: rows of {name!r} should be in [0, {n}), but got {bad[:5].tolist()}"
            )
        stored = self.entry(name)["stored_dtype"]
        if out is not None and stored in ("float32", "int64"):
            return self._gather_raw(name, idx, out)  # straight into the caller's buffer
        result = to_float32(self._gather_raw(name, idx), stored)
        if out is None:
            return result
        out[...] = result
        return out

    def prefetch(self, rows: dict[str, np.ndarray]) -> None:  # noqa: B027 - optional hook
        """Hint that rows ``{array: indices}`` will be gathered soon (asynchronous read-ahead).

        Backends that read through memory maps start the reads of all these rows at once, so a
        batch from a cold store costs a few round trips to the disk instead of one per row.
        The default does nothing.
        """

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Return the contiguous rows ``start:stop`` of ``name`` as a numpy array (a copy)."""
        raw = self._read_raw(name, start, stop)
        return to_float32(np.array(raw), self.entry(name)["stored_dtype"])

    def close(self) -> None:
        """Drop every handle this process opened; the store can be used again afterwards."""
        lease = self._handles.pop("__lease__", None)
        if lease is not None:
            lease.close()
        self._handles.clear()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- backend hooks -----------------------------------------------------------------------
    @abc.abstractmethod
    def _open_array(self, name: str, entry: dict[str, Any]) -> Any:
        """Open array ``name`` described by manifest ``entry``; check its size in O(1)."""

    def _gather_raw(self, name: str, idx: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        rows = self.raw(name)[idx]
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
