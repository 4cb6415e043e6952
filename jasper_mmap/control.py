"""The dataset's control block: the small state every worker reads at the start of each batch.

# NOTE [worker start-up]
The dataset pickles paths, the small manifest/config and this control block; the store's maps
are opened on first use inside each process (``Store.__getstate__`` drops them), so spawn and
forkserver workers cost kilobytes, and forked workers never share a file offset or a zarr
event loop they did not open. The block is a 16-value int64 tensor in shared memory:
``torch.multiprocessing`` hands DataLoader workers a handle to the same memory (fork inherits
it), so ``set_epoch``, ``force_steering``, an assigned ``steering_probs`` and
``reload_negatives`` written by the main process are read by every worker, persistent ones
too, at the start of its next batch. Each dataset has its own block, so two datasets or two
jobs on one machine never collide. Writers bump a version before and after writing (a
seqlock), so a reader never sees half of an update.

# NOTE [forked children]
``os.fork()`` copies the block object but not its memory: a child shares the parent's shared
memory. That is right for a DataLoader worker (it must follow the main process) and wrong for
any other child (a user's own ``multiprocessing`` with the fork start method): its
``set_epoch``/``force_steering`` would change the parent's batches. So a block remembers the
fork count of the process it belongs to (``_FORKS``, bumped in every child by
``os.register_at_fork``), and the first use of an inherited block settles it: in a DataLoader
worker (``get_worker_info()`` is set before the worker reads any batch) it stays shared; in any
other process it is detached into a new shared block holding the same values, which the
child's own workers then inherit or are sent. A process that forks settles its inherited
blocks first, so a child's workers follow the child, not the grandparent. A detached child
also sets torch's intra-op threads to 1 (logged): GNU OpenMP is not fork-safe, and the first
parallel region in a child of a process that used OpenMP (a batch's ``index_select``) waits
for the parent's threads forever. torch's own DataLoader workers do the same.
Spawned or forkserver workers unpickle the block in a fresh process: already theirs.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ControlBlock", "Snapshot"]

log = logging.getLogger(__name__)

#: forks between the first process and this one (NOTE [forked children])
_FORKS = 0
_BLOCKS: weakref.WeakSet[ControlBlock] = weakref.WeakSet()
_SETTLING = threading.Lock()

_EPOCH, _FORCED, _GENERATION, _OVERRIDE, _PROBS, _VERSION = 0, 1, 2, 3, slice(4, 8), 15


@dataclass(frozen=True)
class Snapshot:
    """One consistent reading of the control block, taken once per batch."""

    epoch: int
    forced: int  # -1: stochastic; else the variant every sample gets
    generation: int  # negatives generation to serve
    override: np.ndarray | None  # assigned steering probabilities, until the next set_epoch
    version: int = 0  # the block's write counter at this reading (ControlBlock.version)


class ControlBlock:
    """Shared-memory state of one dataset (NOTE [worker start-up]).

    Read and written through a numpy view of the shared tensor (the same memory): a scalar
    access costs ~0.1 us there against several us through torch indexing, and the block is
    read at every batch.
    """

    def __init__(self, epoch: int = 0, generation: int = 0) -> None:
        self._own(torch.zeros(16, dtype=torch.int64).share_memory_())
        self._write(lambda v: v.__setitem__(_FORCED, -1))
        self.set(epoch=epoch, generation=generation)

    def _own(self, tensor: torch.Tensor) -> None:
        """Use ``tensor`` as this process's block (NOTE [forked children])."""
        self.tensor, self._view, self._forks = tensor, tensor.numpy(), _FORKS
        _BLOCKS.add(self)

    def __getstate__(self) -> dict:
        if self._forks != _FORKS:
            self._settle()  # a forked child sends its own block to its workers
        return {"tensor": self.tensor}

    def __setstate__(self, state: dict) -> None:
        self._own(state["tensor"])

    def _settle(self) -> None:
        """Make an inherited block this process's: shared with the parent in a DataLoader
        worker, a copy of its own elsewhere (NOTE [forked children])."""
        with _SETTLING:
            if self._forks == _FORKS:
                return
            if torch.utils.data.get_worker_info() is not None:
                self._forks = _FORKS  # a DataLoader worker follows the process that made it
                return
            values = self._read()  # the parent may still be writing: a consistent reading
            tensor = torch.tensor(values, dtype=torch.int64).share_memory_()
            self._own(tensor)
            _single_threaded_after_fork()
            log.debug("forked child %d: the dataset's control block is its own", os.getpid())

    _writers = threading.Lock()

    def _write(self, change) -> None:
        if self._forks != _FORKS:
            self._settle()
        with ControlBlock._writers:
            v = self._view
            v[_VERSION] += 1  # odd: a write is under way
            try:
                change(v)
            finally:  # even again, also when the change failed: readers must not spin
                v[_VERSION] += 1

    def set(
        self, *, epoch: int | None = None, forced: int | None = None, generation: int | None = None
    ) -> None:
        """Change some fields; readers see all of them or none at their next batch."""

        def change(v: np.ndarray) -> None:
            for slot, value in ((_EPOCH, epoch), (_FORCED, forced), (_GENERATION, generation)):
                if value is not None:
                    v[slot] = int(value)

        self._write(change)

    def set_override(self, probs: np.ndarray | None) -> None:
        """Draw from ``probs`` (four floats) instead of the curriculum; ``None`` stops it."""

        def change(v: np.ndarray) -> None:
            if probs is None:
                v[_OVERRIDE] = 0
                return
            v[_PROBS] = np.ascontiguousarray(probs, dtype=np.float64).view(np.int64)
            v[_OVERRIDE] = 1

        self._write(change)

    def _read(self) -> list[int]:
        """The block's values, read while no write was under way (a seqlock reading)."""
        v = self._view
        while True:
            values = v.tolist()
            if values[_VERSION] % 2 == 0 and int(v[_VERSION]) == values[_VERSION]:
                return values

    def snapshot(self) -> Snapshot:
        """A consistent reading (retried while a write is under way)."""
        if self._forks != _FORKS:
            self._settle()
        values = self._read()
        override = None
        if values[_OVERRIDE]:
            override = np.array(values[_PROBS], dtype=np.int64).view(np.float64)
        return Snapshot(
            values[_EPOCH], values[_FORCED], values[_GENERATION], override, values[_VERSION]
        )

    @property
    def version(self) -> int:
        """The write counter: equal to a snapshot's ``version`` while nothing was written
        since it was taken (every write changes it; odd while one is under way)."""
        if self._forks != _FORKS:
            self._settle()
        return int(self._view[_VERSION])

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


def _single_threaded_after_fork() -> None:
    """torch's intra-op threads to 1 in a forked child that is not a DataLoader worker, where
    its parallel backend is OpenMP (NOTE [forked children]); logged, since it is the user's
    process."""
    if torch.get_num_threads() > 1 and "parallel backend: OpenMP" in _parallel_info():
        log.info(
            "forked child %d: torch.set_num_threads(1), as torch's DataLoader workers do "
            "(OpenMP's thread pool does not survive fork; a parallel region would hang)",
            os.getpid(),
        )
        torch.set_num_threads(1)


def _parallel_info() -> str:
    global _PARALLEL_INFO
    if _PARALLEL_INFO is None:
        _PARALLEL_INFO = torch.__config__.parallel_info()
    return _PARALLEL_INFO


_PARALLEL_INFO: str | None = None


def _before_fork() -> None:
    """Settle this process's inherited blocks before a child inherits them (a forked child's
    own workers follow the child)."""
    for block in list(_BLOCKS):
        if block._forks != _FORKS:
            block._settle()


def _after_fork_in_child() -> None:
    global _FORKS, _SETTLING
    _FORKS += 1
    # a lock held by another thread of the parent at the fork would never be released here
    _SETTLING = threading.Lock()
    ControlBlock._writers = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
