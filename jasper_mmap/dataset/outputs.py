"""Output buffers of CPU batches, reused only once nothing refers to them.

# NOTE [recycled batch buffers]
A batch is ~3 MB of fresh tensors (B=128, D=384, n_neg=12). Allocating them anew for every
batch makes glibc hand memory back to the kernel and take it again, so every batch pays
~700-1100 page faults (zero-filled 4 KiB pages) before a byte is gathered: measured on the
200k store, `getrusage` minor faults per training step, 1,104 with fresh outputs. A pool keeps
up to ``capacity`` arrays per (shape, dtype) and gathers into one that nobody else refers to.

When is an array free? Every tensor handed out is ``torch.from_numpy`` of ``array`` or of a
numpy slice of it (whose ``.base`` is ``array``: the embedding outputs, NOTE [joined rows] in
dataset.py); its storage keeps one Python reference to ``array``, directly or through the slice,
for as long as the storage lives: through the batch dict,
any view, ``.numpy()``, a tensor autograd saved for backward, or a CPU ``.to()`` that returned
the same tensor. So ``sys.getrefcount(array)`` equal to the pool's own references means no
tensor, view or array made from it is alive, and only then is it reused. A batch kept by the
user (appended to a list, say) is never written; the pool then allocates fresh arrays and
keeps at most ``capacity`` of them per shape, so the memory it holds stays bounded at
``capacity`` x batch bytes (:meth:`BufferPool.nbytes`).
"""

from __future__ import annotations

import os
import sys
import threading
import weakref

import numpy as np
import torch

#
from jasper_mmap.format.spec import STEERING_NAMES
from jasper_mmap.stores import Store

__all__ = ["BatchOutputs", "BufferPool"]

_POOLS: weakref.WeakSet[BufferPool] = weakref.WeakSet()


def _free_refs() -> int:
    """What ``sys.getrefcount`` says, in :meth:`BufferPool.empty`'s loop, of an array only the
    pool refers to (3 on CPython 3.11: the list, the loop variable, the call's argument)."""
    arrays = [np.empty(1)]
    for array in arrays:
        return sys.getrefcount(array)
    raise AssertionError  # unreachable


_FREE_REFS = _free_refs()


class BufferPool:
    """Reusable output arrays for CPU batches (NOTE [recycled batch buffers]).

    Args:
        capacity: arrays kept per (shape, dtype); a request beyond them is a fresh array.
    """

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._arrays: dict[tuple, list[np.ndarray]] = {}
        _POOLS.add(self)

    def empty(self, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        """An array of ``shape`` and ``dtype`` that nothing else refers to (contents arbitrary)."""
        key = (tuple(shape), np.dtype(dtype).str)
        with self._lock:  # the caller's reference exists before another thread can look
            arrays = self._arrays.setdefault(key, [])
            for array in arrays:
                if sys.getrefcount(array) <= _FREE_REFS:
                    return array
            array = np.empty(shape, dtype)
            if len(arrays) < self.capacity:
                arrays.append(array)
            return array

    def __getstate__(self) -> dict:
        return {"capacity": self.capacity}  # a pool is per process: pickles empty

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["capacity"])

    def nbytes(self) -> int:
        """Bytes of the arrays the pool keeps (free or in use)."""
        with self._lock:
            return sum(a.nbytes for arrays in self._arrays.values() for a in arrays)

    def clear(self) -> None:
        """Forget every array (those still in use stay valid; they are freed with their tensors)."""
        with self._lock:
            self._arrays.clear()


def _after_fork_in_child() -> None:
    # a gather thread of the parent may have held a pool's lock at the fork: it would never
    # be released in the child (NOTE [forked children] in jasper_mmap/dataset/control.py)
    for pool in list(_POOLS):
        pool._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


NP_DTYPES = {torch.float32: np.float32, torch.int64: np.int64}


class BatchOutputs:
    """Allocates a batch's outputs as tensors where they will be used, and gathers into them
    (only through :meth:`Store.gather_unchecked` and :meth:`Store.gather_mixed_unchecked`).

    In a DataLoader worker process the batch travels to the main process through shared
    memory, and torch copies every tensor there when the batch is queued; so there each output
    is allocated in shared memory and the gather writes into it (no copy: +25% samples/s with 2
    workers on the 200k store). With ``pin`` (CUDA, ``pin_memory=True``) outputs are pinned
    tensors from torch's caching host allocator (NOTE [thread loading] in jasper_mmap/loading/threads.py).
    Otherwise (the main process) into recycled buffers of ``pool``.
    """

    def __init__(self, store: Store, generation: int, pin: bool, pool: BufferPool) -> None:
        self.store, self.generation, self.pool = store, generation, pool
        worker = torch.utils.data.get_worker_info() is not None
        self.mode = "shared" if worker else "pinned" if pin else "plain"

    def _empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An output tensor of the batch, where this mode allocates them (contents arbitrary)."""
        if self.mode == "plain":  # a recycled buffer: NOTE [recycled batch buffers]
            return torch.from_numpy(self.pool.empty(shape, NP_DTYPES[dtype]))
        if self.mode == "shared":
            return torch.empty(shape, dtype=dtype).share_memory_()
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def steering(
        self, variants: np.ndarray, pairs: np.ndarray, shape: tuple[int, int]
    ) -> torch.Tensor:
        """The batch's steering rows: zeros for variant 0, else the pair's row of the
        variant's table (``Store.gather_mixed_unchecked``: one gather where the tables are adjacent)."""
        out = self._empty(shape, torch.float32)
        self.store.gather_mixed_unchecked(STEERING_NAMES, variants - 1, pairs, out.numpy())
        return out

    def block(self, shape: tuple[int, int]) -> tuple[np.ndarray, torch.Tensor | None]:
        """One float32 output the batch's embedding outputs are row slices of: the array to
        gather into, and the tensor over it where outputs must be slices of a tensor made
        here (pinned or shared memory); None in plain memory (a recycled array of the pool)."""
        if self.mode == "plain":
            return self.pool.empty(shape, np.float32), None
        tensor = self._empty(shape, torch.float32)
        return tensor.numpy(), tensor

    def adopt(self, values: np.ndarray) -> torch.Tensor:
        """A tensor of the batch computed in numpy (the variants)."""
        t = torch.from_numpy(values)
        if self.mode == "plain":
            return t
        return self._empty(tuple(t.shape), t.dtype).copy_(t)

    def __call__(
        self, name: str, rows: np.ndarray, shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        """Rows ``rows`` (range-checked by the caller: ``Store.check_rows``) of ``name``."""
        out = self._empty(shape, dtype)
        self.store.gather_unchecked(name, rows, out.numpy(), generation=self.generation)
        return out
