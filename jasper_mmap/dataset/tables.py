"""The in-RAM dataset's table attributes (``question_embs``, ``pair_index``, ...), over the maps.

Users and the upstream trainer read ``dataset.centroid_embs`` and friends. Here each is made
on first access (opening the dataset stays O(1)) in memory of its own that a write can never
crash (NOTE [writable table memory]): a table up to :data:`SMALL_TABLE_BYTES` is copied into
ordinary memory; a larger one is a private copy-on-write map of the store's file (no copy, no
growth of anonymous memory until something writes into it). In-place writes through the
tensor are still refused with TableReadOnlyError (NOTE [read-only tables]): they would not
change the batches. Tables stored at reduced precision keep that dtype
(``float16``/``bfloat16``), since widening would copy. A zarr store has no map: its tables are
read into memory when first accessed. ``hard_negatives``/``negative_tiers`` are those of the
negatives generation the dataset serves. ``pair_keyword_ids`` is a list-like object that
decodes one pair's list at a time.
"""

from __future__ import annotations

import errno
import mmap
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jasper_mmap.errors import (
    StoreReplacedError,
    StoreStaleError,
    TableMemoryError,
    TableReadOnlyError,
)
from jasper_mmap.stores import NEGATIVE_ARRAYS, Store
from jasper_mmap.stores.regions import MAP_NORESERVE

__all__ = [
    "TABLES",
    "KeywordLists",
    "ReadOnlyTable",
    "SMALL_TABLE_BYTES",
    "table_array",
    "table_tensor",
]

#: dataset attribute -> store array (``split_indices`` is the split's own array)
TABLES = {
    "question_embs": "question_embs",
    "source_embs": "source_embs",
    "keyword_embs": "keyword_embs",
    "centroid_embs": "centroid_embs",
    "pair_index": "pair_index",
    "pair_cluster_id": "pair_cluster_id",
    "pair_relevance": "pair_relevance",
    "steering_centroid": "steering_centroid",
    "steering_keyword_weighted": "steering_keyword_weighted",
    "steering_residual": "steering_residual",
    "centroid_distances": "centroid_distances",
    "hard_negatives": "hard_negatives",
    "negative_tiers": "negative_tiers",
    "split_indices": None,
    "pair_keyword_ids": None,
}


def _as_tensor(arr: np.ndarray, stored: str) -> torch.Tensor:
    with warnings.catch_warnings():  # the map is read-only: torch warns that it cannot write
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if stored == "bfloat16" else t


def table_tensor(store: Store, name: str, generation: int, attr: str | None = None) -> torch.Tensor:
    """Array ``name`` of ``store`` as a tensor in memory a write cannot crash (NOTE [writable
    table memory]), refusing in-place writes (:class:`ReadOnlyTable`; ``attr`` names it in
    the error).

    Raises:
        TableMemoryError: a table larger than :data:`SMALL_TABLE_BYTES` could not be mapped
            copy-on-write (the kernel refused the private mapping).
        StoreStaleError: the store's file was replaced since the store mapped it.
    """
    attr = attr or name
    return tensor_of(table_array(store, name, generation, attr), store, name, generation, attr)


def tensor_of(raw: np.ndarray, store: Store, name: str, generation: int, attr: str) -> torch.Tensor:
    """The table tensor over ``raw`` (array ``name``'s rows as stored, in memory of its own)."""
    stored = store.entry(name, generation if name in NEGATIVE_ARRAYS else None)["stored_dtype"]
    table = ReadOnlyTable.over(_as_tensor(raw, stored), attr, store.path)
    table._table_owned = raw.nbytes if raw.flags.owndata else 0
    return table


def table_array(
    store: Store, name: str, generation: int | None = None, attr: str = "", lazy: bool = False
) -> Any:
    """Array ``name`` of ``store`` as a numpy array in memory a write cannot crash (NOTE
    [writable table memory]): never a view of the store's read-only map. With ``lazy``, a
    zarr array stays the (read-only) zarr array, read where indexed. Raises as
    :func:`table_tensor`."""
    if name in NEGATIVE_ARRAYS:
        entry, raw = store.entry(name, generation), store.raw(name, generation)
    else:
        entry, raw = store.entry(name), store.raw(name)
    if not isinstance(raw, np.ndarray):  # zarr: no map to share; read into memory of its own
        return raw if lazy else np.asarray(raw[...])
    if raw.flags.writeable:
        return raw
    if raw.nbytes <= SMALL_TABLE_BYTES:  # a view of the store's read-only map
        return raw.copy()
    return _private_map(raw, entry["file"], attr or name, name, store)


# NOTE [writable table memory]
# The batch path reads the store through shared read-only maps (PROT_READ), and a write into
# one is a SIGSEGV. ReadOnlyTable refuses the writes it sees (NOTE [read-only tables]), but not
# all: ``layer.weight.data = ds.centroid_embs`` (or ``set_``) makes a Parameter share the
# table's memory, and ``optimizer.step()`` then writes into it through the Parameter, which
# is a plain tensor: exit 139, a common way to initialise a cluster head from the centroids.
# So a table's memory is never the store's read-only map:
# * up to SMALL_TABLE_BYTES (4 MiB: centroids, small keyword tables, the per-pair arrays and
#   splits of a small dataset), a copy in ordinary memory, made on first access;
# * larger (the embedding and steering tables, mostly), a private copy-on-write map of the table's
#   bytes in the store's file (MAP_PRIVATE with PROT_WRITE): reads share the page cache as
#   the store's map does, and a written page becomes this process's own (the file and the
#   batches never change). Linux charges a private writable map's full size against the
#   commit limit unless it is MAP_NORESERVE; measured here (vm.overcommit_memory=0, 23 GiB
#   RAM, no swap), a 64 GiB file mapped MAP_PRIVATE failed with ENOMEM and mapped
#   MAP_PRIVATE|MAP_NORESERVE succeeded. So the map is MAP_NORESERVE: no charge under
#   overcommit 0 and 1. Under vm.overcommit_memory=2 the kernel charges it anyway; where it
#   refuses, the table is refused with TableMemoryError naming the fix, never served over
#   the read-only map. The map is of the file the store mapped (same inode, from
#   /proc/self/maps), never of another that replaced it since (StoreStaleError).
# Written pages of a large table are anonymous memory of the process (as the in-RAM dataset's
# tables were) and are not counted by ``memory_usage_mb``; the copies of small tables are.

#: tables up to this many bytes are copied on first access; larger ones are mapped
#: copy-on-write (NOTE [writable table memory])
SMALL_TABLE_BYTES = 4 << 20


def _mapping_of(address: int) -> tuple[int, int, int, int, int] | None:
    """(start, file offset, device major, minor, inode) of this process's map that holds
    ``address``, from /proc/self/maps; None where it cannot be read or holds no such map."""
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                lo, _, hi = fields[0].partition("-")
                if int(lo, 16) <= address < int(hi, 16):
                    major, _, minor = fields[3].partition(":")
                    return (
                        int(lo, 16),
                        int(fields[2], 16),
                        int(major, 16),
                        int(minor, 16),
                        int(fields[4]),
                    )
    except (OSError, ValueError, IndexError):
        return None
    return None


def _overcommit() -> str:
    try:
        return Path("/proc/sys/vm/overcommit_memory").read_text().strip()
    except OSError:
        return "?"


def _map_copy_on_write(fd: int, length: int, offset: int) -> mmap.mmap:
    """A private writable (copy-on-write) map of ``length`` bytes of ``fd`` at ``offset``,
    not charged against the commit limit where the kernel allows (MAP_NORESERVE)."""
    return mmap.mmap(
        fd,
        length,
        flags=mmap.MAP_PRIVATE | MAP_NORESERVE,
        prot=mmap.PROT_READ | mmap.PROT_WRITE,
        offset=offset,
    )


def _private_map(raw: np.ndarray, rel: str, attr: str, name: str, store: Store) -> np.ndarray:
    """``raw`` (array ``name``: a view of ``store``'s read-only map of its file ``rel``) as the
    same bytes of a private copy-on-write map of the same file (NOTE [writable table memory]),
    opened under the directory the store opened (``Store.opened_path``), so a store replaced
    at its path since is never mapped."""
    path = store.path / rel  # for messages
    what, size = f"{attr} ({store.path})", f"{raw.nbytes / 2**30:.2f} GiB"
    fix = (
        f"Read the rows you need with `dataset.store.gather({name!r}, rows)` (a copy of "
        f"those rows), or let the kernel overcommit (sysctl vm.overcommit_memory=0)."
    )
    address = raw.__array_interface__["data"][0]
    mapping = _mapping_of(address)
    if mapping is None:
        raise TableMemoryError(
            f"{what}: a {size} table cannot be mapped copy-on-write: this system does not "
            f"say which file maps it (/proc/self/maps). {fix}"
        )
    start, file_offset, major, minor, inode = mapping
    offset = file_offset + address - start
    aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
    try:
        fd = os.open(store.opened_path(rel), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise StoreReplacedError(
                f"{path}: is gone from the store this dataset opened (convert-pt --overwrite, "
                f"a move or a removal), so {what} cannot be mapped. Open the dataset again."
            ) from None
        raise StoreStaleError(
            f"{path}: cannot be opened again for {what} ({e.strerror}); the store changed "
            f"since this dataset opened it. Open the dataset again."
        ) from None
    try:
        st = os.fstat(fd)
        if (st.st_ino, os.major(st.st_dev), os.minor(st.st_dev)) != (inode, major, minor):
            raise StoreReplacedError(
                f"{path}: was replaced since this dataset opened it (another store's file is "
                f"there now), so {what} would mix two stores. Open the dataset again."
            )
        try:
            m = _map_copy_on_write(fd, offset - aligned + raw.nbytes, aligned)
        except OSError as e:
            if e.errno not in (errno.ENOMEM, errno.EAGAIN, errno.EOVERFLOW):
                raise
            raise TableMemoryError(
                f"{what}: the kernel refused a {size} private copy-on-write map of {path} "
                f"({e.strerror}; vm.overcommit_memory={_overcommit()}, and 2 charges such a "
                f"map in full), and a table is never served over the read-only map, where "
                f"a write through `.data =` would kill the process. {fix}"
            ) from None
    finally:
        os.close(fd)
    arr = np.frombuffer(m, dtype=raw.dtype, count=raw.size, offset=offset - aligned)
    return arr.reshape(raw.shape)


# NOTE [read-only tables]
# A table attribute is the store's data, and a write into it would not change the batches
# (they are gathered from the store's own maps). torch has no read-only tensors, and over the
# store's read-only map (PROT_READ) an in-place write (``ds.question_embs.mul_(2)``, ``x[0] =
# 1``, ``out=x``) was a SIGSEGV without a traceback; tables now live in memory of their own
# (NOTE [writable table memory]), so no write can crash, and ReadOnlyTable still refuses the
# writes it sees with TableReadOnlyError before they happen, so that a user learns they
# would change nothing; every other operation runs as on a plain tensor. Results that are views of the same
# storage (slices, ``view``, ``unbind``, ``.numpy()``) stay protected (arrays as
# ``writeable=False``); results with their own storage (``clone()``, ``x * 2``, fancy indexing)
# are plain tensors. A zarr store's in-RAM tables are protected too. Pickled or
# ``torch.save``d, a table is a plain tensor. Only the table attributes are protected; the
# batch path never sees this class. It costs ~10-25 us per operation on a table (``t[5]``: 12
# us against 1.3 us, ``x @ x.T`` 35 against 9), which matters only to per-row Python loops
# over tables (copy the rows first). What it cannot catch (such writes land in the table's
# own memory: no crash, no change to the file or the batches, but the attribute then differs
# from the store): writes through ``data_ptr``, DLPack, ``untyped_storage()``, writes inside
# other Python-level torch functions than those ``_written`` knows, a Parameter made to share
# the table (``p.data = table``, ``p.set_(table)``) and written by an optimizer,
# ``as_subclass(torch.Tensor)``, or ``torch.from_numpy`` of a table's numpy view made
# writable again. Under torch.compile the class runs
# as a plain tensor (no checks while traced); torch 2.13 itself cannot compile some ops whose
# input is any tensor subclass with ``__torch_function__`` (``nn.Linear``, ``torch.cdist``:
# "Multiple dispatch failed ... returned NotImplemented"), so a compiled module is given
# ``table.clone()`` (or a copy on its device) rather than the table itself.

_NOT_WRITES = {"requires_grad_", "retain_grad", "share_memory_"}
_INPLACE_DUNDERS = {
    f"__i{op}__"
    for op in (
        "add",
        "sub",
        "mul",
        "truediv",
        "floordiv",
        "mod",
        "pow",
        "and",
        "or",
        "xor",
        "lshift",
        "rshift",
        "matmul",
    )
}


def _tensors(value: Any) -> list[Any]:
    """The tensors of an argument: itself, or those in a list/tuple (``_foreach_*``)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


def _arg(args: tuple, kwargs: dict, i: int, name: str) -> Any:
    return args[i] if len(args) > i else kwargs.get(name)


def _written(func: Any, args: tuple, kwargs: dict) -> list[Any]:
    """The tensors ``func(*args, **kwargs)`` writes into: ``out``; the first tensor argument
    (or list of tensors: ``torch._foreach_add_``, fused optimizers) of an in-place call (a
    name ending in ``_``, ``torch.ops.aten.add_.Tensor`` included, ``__setitem__``, ``+=`` and
    friends, or ``inplace=True`` as in ``F.relu``/``nn.ReLU(inplace=True)``/``F.dropout``),
    by position or by keyword (``nn.init.uniform_(tensor=...)``); and what the functions that
    write into an argument internally write: ``F.embedding``'s weight with ``max_norm``,
    ``F.batch_norm``/``F.instance_norm``'s running statistics."""
    name = getattr(func, "__name__", "")
    base = name.split(".")[0]  # an aten overload: "add_.Tensor"
    targets = _tensors(kwargs.get("out"))
    inplace = base.endswith("_") and not base.endswith("__") and base not in _NOT_WRITES
    if inplace or name == "__setitem__" or name in _INPLACE_DUNDERS or kwargs.get("inplace"):
        first = next((t for a in args if (t := _tensors(a))), None)
        if first is None:
            first = next((t for v in kwargs.values() if (t := _tensors(v))), [])
        targets += first
    if name == "embedding" and _arg(args, kwargs, 2, "max_norm") is not None:
        targets += _tensors(_arg(args, kwargs, 1, "weight"))  # renormed in place
    if name in ("batch_norm", "instance_norm"):  # running statistics updated in place when
        flag, default = ("training", False) if name == "batch_norm" else ("use_input_stats", True)
        if default if (value := _arg(args, kwargs, 5, flag)) is None else value:
            targets += _tensors(_arg(args, kwargs, 1, "running_mean"))
            targets += _tensors(_arg(args, kwargs, 2, "running_var"))
    return targets


class ReadOnlyTable(torch.Tensor):
    """A table attribute: a tensor that refuses in-place writes (NOTE [read-only tables])."""

    _table_name: str
    _table_store: Any
    _table_owned: int = 0  # bytes of ordinary memory the table holds (a copied small table)

    @staticmethod
    def over(t: torch.Tensor, name: str, store: Any) -> ReadOnlyTable:
        # an alias of ``t``'s memory, not a view of it: a view's ``_base`` would be a plain
        # tensor over the map, protected again as a new view, and so on (torch.compile walks
        # ``_base`` chains and recursed without end)
        table = torch.Tensor._make_subclass(ReadOnlyTable, t)
        table._table_name, table._table_store = name, store
        return table

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if torch.compiler.is_compiling():  # traced by torch.compile: plain tensor semantics
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        for target in _written(func, args, kwargs):
            if isinstance(target, ReadOnlyTable):
                name = getattr(func, "__name__", str(func))
                raise TableReadOnlyError(
                    f"{target._table_name} ({target._table_store}): is a read-only view of the "
                    f"store's data; {name} would write into it, which would not change the "
                    f"batches (they are read from the store). Write into a copy instead: "
                    f"`x = dataset.{target._table_name}.clone()`; to change the data itself, "
                    f"change the dataset's files and open it again."
                )
        sources = [
            t
            for a in (*args, *kwargs.values())
            for t in _tensors(a)
            if isinstance(t, ReadOnlyTable)
        ]
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
            if not sources:
                return out
            maps = {t.untyped_storage().data_ptr(): t for t in sources}
            return _protect(out, maps)

    def plain(self) -> torch.Tensor:
        """The same tensor (same memory), as a plain ``torch.Tensor``: unprotected."""
        with torch._C.DisableTorchFunctionSubclass():
            return torch.Tensor.as_subclass(self, torch.Tensor)

    def __reduce_ex__(self, protocol: Any) -> Any:  # saved or pickled: a plain tensor
        return self.plain().__reduce_ex__(protocol)

    def __deepcopy__(self, memo: dict) -> torch.Tensor:  # a copy is the user's: plain
        return self.plain().clone()

    def __copy__(self) -> ReadOnlyTable:  # a shallow copy shares the map: still protected
        return ReadOnlyTable.over(self.plain(), self._table_name, self._table_store)

    def __repr__(self, **kwargs: Any) -> str:  # prints as the in-RAM dataset's tables do
        return self.plain().__repr__(**kwargs)


def _protect(out: Any, maps: dict[int, ReadOnlyTable]) -> Any:
    """``out`` with the results that share the storage of a table in ``maps`` (storage
    address -> table) protected as that table is."""
    if isinstance(out, torch.Tensor):
        if isinstance(out, ReadOnlyTable) or out.device.type != "cpu" or not out.numel():
            return out
        table = maps.get(out.untyped_storage().data_ptr())
        return (
            out if table is None else ReadOnlyTable.over(out, table._table_name, table._table_store)
        )
    if isinstance(out, np.ndarray):
        if out.base is not None:
            out.flags.writeable = False  # a view of the map (``.numpy()``, ``np.asarray``)
        return out
    if isinstance(out, tuple | list) and any(isinstance(o, torch.Tensor) for o in out):
        return type(out)(_protect(o, maps) for o in out)
    return out


class KeywordLists(Sequence):
    """``pair_keyword_ids`` as a list of lists of int, decoded one pair at a time.

    Args:
        offsets: ``[N_pairs + 1]`` int64 (row ``i``'s ids are ``values[offsets[i]:offsets[i+1]]``).
        values: ``[nnz]`` int64 keyword rows.
    """

    def __init__(self, offsets: Any, values: Any) -> None:
        self.offsets, self.values = offsets, values

    def __len__(self) -> int:
        return int(self.offsets.shape[0]) - 1

    def __getitem__(self, i: int | slice) -> list[int] | list[list[int]]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        n = len(self)
        k = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= k < n:
            raise IndexError(f"pair {i} out of range [0, {n})")
        lo, hi = (int(v) for v in self.offsets[k : k + 2])
        return np.asarray(self.values[lo:hi]).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        return (self[k] for k in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return len(self) == len(other) and all(
            a == list(b) for a, b in zip(self, other, strict=True)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        head = ", ".join(str(self[k]) for k in range(min(3, len(self))))
        return f"KeywordLists([{head}{', ...' if len(self) > 3 else ''}], pairs={len(self)})"
