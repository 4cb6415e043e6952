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
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ControlBlock", "Snapshot"]

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
        self.tensor = torch.zeros(16, dtype=torch.int64).share_memory_()
        self._view = self.tensor.numpy()
        self._write(lambda v: v.__setitem__(_FORCED, -1))
        self.set(epoch=epoch, generation=generation)

    def __getstate__(self) -> dict:
        return {"tensor": self.tensor}

    def __setstate__(self, state: dict) -> None:
        self.tensor = state["tensor"]
        self._view = self.tensor.numpy()

    _writers = threading.Lock()

    def _write(self, change) -> None:
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

    def snapshot(self) -> Snapshot:
        """A consistent reading (retried while a write is under way)."""
        v = self._view
        while True:
            values = v.tolist()
            if values[_VERSION] % 2 == 0 and int(v[_VERSION]) == values[_VERSION]:
                break
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
        return int(self._view[_VERSION])

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()
