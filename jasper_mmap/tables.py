"""The in-RAM dataset's table attributes (``question_embs``, ``pair_index``, ...), over the maps.

Users and the upstream trainer read ``dataset.centroid_embs`` and friends. Here each is a
read-only tensor over the store's memory map, made on first access: no copy, no growth of
anonymous memory, and opening the dataset stays O(1). Writing into one raises
TableReadOnlyError (NOTE [read-only tables]). Tables stored at reduced precision keep that
dtype (``float16``/``bfloat16``), since widening would copy. A zarr store has no map: its
tables are read into memory when first accessed. ``hard_negatives``/``negative_tiers`` are
those of the negatives generation the dataset serves. ``pair_keyword_ids`` is a list-like
object that decodes one pair's list at a time.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from .errors import TableReadOnlyError
from .stores import NEGATIVE_ARRAYS, Store

__all__ = ["TABLES", "KeywordLists", "ReadOnlyTable", "table_tensor"]

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
    """Array ``name`` of ``store`` as a tensor: zero-copy over a memory map when there is one,
    refusing in-place writes (:class:`ReadOnlyTable`; ``attr`` names it in the error)."""
    if name in NEGATIVE_ARRAYS:
        raw, stored = store.raw(name, generation), store.entry(name, generation)["stored_dtype"]
    else:
        raw, stored = store.raw(name), store.entry(name)["stored_dtype"]
    if not isinstance(raw, np.ndarray):  # zarr: no map to share
        raw = np.asarray(raw[...])
    return ReadOnlyTable.over(_as_tensor(raw, stored), attr or name, store.path)


# NOTE [read-only tables]
# A table attribute is a tensor over a read-only map (PROT_READ). torch has no read-only
# tensors: an in-place write into one (``ds.question_embs.mul_(2)``, ``x[0] = 1``, ``out=x``)
# is a SIGSEGV that kills the interpreter without a traceback (numpy's view even says
# ``writeable=True``). ReadOnlyTable refuses such writes with TableReadOnlyError before they
# happen; every other operation runs as on a plain tensor. Results that are views of the same
# storage (slices, ``view``, ``unbind``, ``.numpy()``) stay protected (arrays as
# ``writeable=False``); results with their own storage (``clone()``, ``x * 2``, fancy indexing)
# are plain tensors. Writes would not reach the batches anyway (they are gathered from the
# store's own maps), which is why a zarr store's in-RAM tables are protected too. Pickled or
# ``torch.save``d, a table is a plain tensor. Only the table attributes are protected; the
# batch path never sees this class. It costs ~10-25 us per operation on a table (``t[5]``: 12
# us against 1.3 us, ``x @ x.T`` 35 against 9), which matters only to per-row Python loops
# over tables (copy the rows first). What it cannot catch: writes through ``data_ptr``,
# DLPack, ``untyped_storage()``, writes inside other Python-level torch functions than those
# ``_written`` knows, ``set_``/``.data =`` (they re-point the cached attribute and write
# nothing into the map), ``as_subclass(torch.Tensor)``, or ``torch.from_numpy`` of a table's
# (read-only) numpy view: torch warns about a non-writable array only once per process, and
# jasper_mmap's own maps may have used that warning up. Under torch.compile the class runs
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
                    f"store's memory map; {name} would write into it (which kills the process "
                    f"on a read-only map, and would not change the batches, which are read from "
                    f"the store). Write into a copy instead: "
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
