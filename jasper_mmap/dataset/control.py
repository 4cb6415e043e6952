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
A block belongs to the process that made it (its *owner*, a random token of that process,
renewed in every forked child and pickled with the block). Any other process that holds it
(a fork or a multiprocessing child of any start method that received the dataset, a Pool's
worker, a grandchild forked inside a DataLoader worker) reads the owner's values, and gets
a block of its own, holding the same values, the first time it writes it (``set_epoch``,
``force_steering``, ``steering_probs =``, ``reload_negatives``), pickles it or forks: its
changes never reach the owner's batches, and its own workers follow it, not the owner.
A copy made in the owner's own process (``copy.deepcopy``, a ``pickle`` or ``torch.save``
round trip) is a new dataset object: it gets a new block in shared memory, holding the same
values and owned by this process, so the copy's workers (fork or spawn, persistent too) follow
the copy's ``set_epoch``/``force_steering``, and the copy never changes the original's batches.
The exception is our own DataLoader worker processes (:class:`~jasper_mmap.loading.loader.JasperLoader`
with processes, fork or spawn, persistent or not): its ``worker_init_fn`` marks the worker
(:func:`mark_loader_worker`, with the worker's own token, so a process the worker forks is
not marked), and a marked worker keeps sharing the block, writes included (DESIGN.md
guarantee 5). Not ``torch.utils.data.get_worker_info()``: a module global that fork copies
into a worker's children. A user's own DataLoader over the dataset (not a JasperLoader)
works as before: its workers read the main process's block; one that writes gets its own.
The first use of a block in a forked process that is not our worker sets torch's intra-op
threads to 1 (logged): GNU OpenMP is not fork-safe, and the first parallel region in a
child of a process that used OpenMP (a batch's ``index_select``) waits for the parent's
threads forever. torch's own DataLoader workers do the same.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ControlBlock", "Snapshot", "mark_loader_worker"]

log = logging.getLogger(__name__)

#: forks between the first process and this one (NOTE [forked children])
_FORKS = 0
#: this process's identity: an owner token, renewed in every forked child
_TOKEN = os.urandom(16)
#: the token of the process marked as one of our DataLoader workers (None: not marked)
_WORKER: bytes | None = None
_BLOCKS: weakref.WeakSet[ControlBlock] = weakref.WeakSet()
_SETTLING = threading.Lock()

_EPOCH, _FORCED, _GENERATION, _OVERRIDE, _PROBS, _VERSION = 0, 1, 2, 3, slice(4, 8), 15


def mark_loader_worker() -> None:
    """Mark this process as one of our DataLoader workers: the blocks it received keep
    following the main process, writes included (NOTE [forked children]). Called by
    :class:`~jasper_mmap.loading.loader.JasperLoader`'s ``worker_init_fn``; a process this one forks
    is not marked (the token is renewed there)."""
    global _WORKER
    _WORKER = _TOKEN


def _marked_worker() -> bool:
    return _WORKER is not None and _WORKER == _TOKEN


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

    def _own(self, tensor: torch.Tensor, owner: bytes | None = None) -> None:
        """Use ``tensor`` as the block, owned by ``owner`` (this process when None; NOTE
        [forked children])."""
        self.tensor, self._view = tensor, tensor.numpy()
        self._owner = _TOKEN if owner is None else owner
        self._used_in = _TOKEN if self._owner == _TOKEN else None  # first use checked
        _BLOCKS.add(self)

    def __getstate__(self) -> dict:
        self._detach_if_foreign()  # a child sends its own block to its workers
        return {"tensor": self.tensor, "owner": self._owner}

    def __setstate__(self, state: dict) -> None:
        # an older pickle without an owner: another process's block
        owner, tensor = state.get("owner", b""), state["tensor"]
        if owner == _TOKEN:
            # a copy made in the owner's own process (copy.deepcopy, a pickle or torch.save
            # round trip): a new dataset object, so a new block in shared memory holding the
            # same values (the tensor received may be private memory; NOTE [forked children])
            values = torch.as_tensor(tensor, dtype=torch.int64).tolist()
            tensor, owner = torch.tensor(values, dtype=torch.int64).share_memory_(), None
        self._own(tensor, owner)

    def _first_use(self) -> None:
        """The first use of a block in a process that did not make it (NOTE [forked
        children]): reads follow the owner; a forked process that is not our worker runs
        torch single-threaded."""
        with _SETTLING:
            if self._used_in is _TOKEN:
                return
            if _FORKS and not _marked_worker():
                _single_threaded_after_fork()
            self._used_in = _TOKEN

    def _detach_if_foreign(self) -> None:
        """Before a write, a pickling or a fork: a process that is neither the block's owner
        nor one of our DataLoader workers gets its own block holding the same values (NOTE
        [forked children])."""
        if self._owner == _TOKEN or _marked_worker():
            return
        with _SETTLING:
            if self._owner == _TOKEN:
                return
            values = self._read()  # the owner may still be writing: a consistent reading
            tensor = torch.tensor(values, dtype=torch.int64).share_memory_()
            self._own(tensor)
            log.debug("process %d: the dataset's control block is its own", os.getpid())
        if _FORKS:
            _single_threaded_after_fork()

    _writers = threading.Lock()

    def _write(self, change) -> None:
        self._detach_if_foreign()
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
        if self._used_in is not _TOKEN:
            self._first_use()
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
        if self._used_in is not _TOKEN:
            self._first_use()
        return int(self._view[_VERSION])

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


def _single_threaded_after_fork() -> None:
    """torch's intra-op threads to 1 in a forked child that is not our DataLoader worker, where
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
    """Detach the blocks this process holds but does not own before a child inherits them
    (a child's own workers follow the child; NOTE [forked children])."""
    for block in list(_BLOCKS):
        block._detach_if_foreign()


def _after_fork_in_child() -> None:
    global _FORKS, _SETTLING, _TOKEN
    _FORKS += 1
    _TOKEN = os.urandom(16)  # a new process: it owns nothing, and is not a marked worker
    # a lock held by another thread of the parent at the fork would never be released here
    _SETTLING = threading.Lock()
    ControlBlock._writers = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
