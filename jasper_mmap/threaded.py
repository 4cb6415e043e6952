"""Parallel, prefetched, in-order batch gathering on threads of the main process.

# NOTE [thread loading]
A batch of this dataset is a handful of ``numpy.take`` calls over memory maps, and ``take``
releases the GIL, so threads gather batches in parallel. Worker processes would gather just as
fast but then pay to move every batch: torch puts each output tensor in a new shared-memory
segment that the main process maps and faults in, which costs more than the gather itself
(measured: ~15k samples/s with 2-4 worker processes against ~70-90k for one thread; see the
README's Performance section). So ``create_loader(num_workers=N)`` runs N gather threads
(at most the CPUs the process may use; ``JasperLoader.gather_threads``):

* Order: batch ``k`` is submitted when batch ``k - depth`` is handed out and handed out in
  sampler order, so at most ``depth`` = ``prefetch_factor * N`` batches are in flight or
  waiting (memory: ``depth`` x the batch's bytes; :meth:`ThreadedBatches.bound_bytes`).
* Ownership: every batch is freshly allocated and belongs to the caller; nothing is reused
  behind their back. With ``pin_memory`` and CUDA, the outputs are gathered straight into
  pinned tensors from torch's caching host allocator, which reuses a block only after the
  copies recorded on it have finished, so ``.cuda(non_blocking=True)`` is safe.
* Same batches: a batch is ``dataset.get_batch(indices)``, a pure function of the indices and
  the control block it reads at its start (epoch, forced variant, negatives generation), so
  every ``num_workers`` and both modes give the same bytes. ``reload_negatives()`` and
  ``set_epoch()`` reach batches started after the call; up to ``depth`` batches already
  started carry the old state, as with worker processes.
* Lifetime: the threads belong to one iterator (one epoch). Finishing, breaking out of the
  loop (the iterator is dropped), an exception or ``KeyboardInterrupt`` cancel what has not
  started and join the threads; at interpreter exit ``concurrent.futures`` joins them after
  the at most ``depth`` queued batches. They are not daemon threads, so none is killed inside
  a C call at exit. An exception raised while gathering is re-raised by ``next()`` in the
  training loop with its original traceback.
"""

from __future__ import annotations

import collections
import logging
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["ThreadedBatches"]

log = logging.getLogger(__name__)


def _gather(dataset: Any, collate: Any, indices: list[int], pin: bool) -> Any:
    return collate(dataset.__getitems__(indices, pin_memory=pin))


def _shutdown(pool: ThreadPoolExecutor, pending: collections.deque) -> None:
    for fut in pending:
        fut.cancel()
    pending.clear()
    pool.shutdown(wait=True, cancel_futures=True)


class ThreadedBatches:
    """The iterator of one epoch of a thread-mode loader (NOTE [thread loading]).

    Args:
        dataset: a :class:`~jasper_mmap.JASPERSteeringDataset` (``__getitems__``).
        batches: the epoch's batches of indices (the loader's batch sampler, iterated).
        collate: the loader's collate function (the batch passes through by default).
        threads: gather threads.
        depth: batches in flight or waiting at most.
        pin: gather into pinned memory (CUDA available and asked for).
    """

    def __init__(
        self, dataset: Any, batches: Any, collate: Any, threads: int, depth: int, pin: bool
    ) -> None:
        self._dataset, self._batches, self._collate = dataset, iter(batches), collate
        self._pin, self._depth = pin, max(1, depth)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="jasper-gather")
        self._pending: collections.deque[Future] = collections.deque()
        # joins the threads when the iterator is dropped (break), collected, or at exit
        self._finalizer = weakref.finalize(self, _shutdown, self._pool, self._pending)
        for _ in range(self._depth):
            if not self._submit():
                break

    def _submit(self) -> bool:
        try:
            indices = next(self._batches)
        except StopIteration:
            return False
        fut = self._pool.submit(_gather, self._dataset, self._collate, indices, self._pin)
        self._pending.append(fut)
        return True

    def __iter__(self) -> ThreadedBatches:
        return self

    def __next__(self) -> Any:
        if not self._pending:
            self.close()
            raise StopIteration
        fut = self._pending.popleft()
        try:
            batch = fut.result()
        except BaseException:
            self.close()  # KeyboardInterrupt, or the gather's own error: stop the rest
            raise
        self._submit()
        return batch

    def __len__(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        """Cancel what has not started and join the threads (idempotent)."""
        self._finalizer()

    @property
    def alive(self) -> bool:
        """Whether the threads may still run (until :meth:`close`, the end, or an error)."""
        return self._finalizer.alive
