"""Parallel, prefetched, in-order batch gathering: on threads of the main process, or in the
loop itself when that is faster.

# NOTE [thread loading]
A batch of this dataset is a handful of ``numpy.take`` calls over memory maps, and ``take``
releases the GIL, so threads gather batches in parallel. Worker processes would gather just as
fast but then pay to move every batch: torch puts each output tensor in a new shared-memory
segment that the main process maps and faults in, which costs more than the gather itself
(measured: ~15k samples/s with 2-4 worker processes against ~70-90k for one thread; see the
README's Performance section). So ``create_loader(num_workers=N)`` runs N gather threads
(at most the CPUs the process may use; ``JasperLoader.gather_threads``):

* Order: batch ``k`` is submitted when batch ``k - depth`` is handed out and handed out in
  sampler order, so at most ``depth`` = ``prefetch_factor`` x threads batches are in flight or
  waiting (memory: ``depth`` x the batch's bytes). The sampler is read a plan's worth of
  batches at a time (up to ``PLAN_BATCHES``, NOTE [batch plans] in jasper_mmap/dataset/batches.py): a few
  kilobytes of indices and bookkeeping per batch, no rows.
* Ownership: a batch belongs to the caller; its outputs are recycled only once nothing
  refers to them (NOTE [recycled batch buffers] in jasper_mmap/dataset/outputs.py), so nothing is reused behind
  their back. With ``pin_memory`` and CUDA, the outputs are gathered straight into
  pinned tensors from torch's caching host allocator, which reuses a block only after the
  copies recorded on it have finished, so ``.cuda(non_blocking=True)`` is safe.
* Same batches: a batch is ``dataset.get_batch(indices)``, a pure function of the indices and
  the control block it reads at its start (epoch, forced variant, negatives generation), so
  every ``num_workers`` and both modes give the same bytes; a batch served from a plan is
  those bytes too (made anew if the block changed since the plan). ``reload_negatives()``
  and ``set_epoch()`` reach batches started after the call; up to ``depth`` batches already
  started carry the old state, as with worker processes.
* Lifetime: the threads belong to one iterator (one epoch). Finishing, breaking out of the
  loop (the iterator is dropped), an exception or ``KeyboardInterrupt`` cancel what has not
  started and join the threads; at interpreter exit ``concurrent.futures`` joins them after
  the at most ``depth`` queued batches. They are not daemon threads, so none is killed inside
  a C call at exit. An exception raised while gathering is re-raised by ``next()`` in the
  training loop with its original traceback.

# NOTE [gathering in the loop]
Threads gather ahead only with CPU to spare. A CPU training step uses every core: torch's
intra-op (OpenMP) threads run its kernels and spin between them, so a gather thread can only
take a core from them, and the step waits for it at its next parallel region. Measured with the
seed's training loop on 2 cores (scripts/bench_train.py): 2 gather threads 0.80 of the
loader-free bound, gathering in the loop 0.81; with the gathers on torch's own threads
(NOTE [intra-op gathers]) in the loop, 0.87. Where the consumer leaves cores idle (a GPU step,
the loader alone) threads ahead win: 196k samples/s against 139k in the loop. Which case a
loop is in is not knowable up front, so the loader measures it (:class:`GatherTuner`, as
tf.data's autotuning does). It times windows of batches. The way chosen runs window after
window; after 1, 4, 16, 64 of them (``growth`` 4, at most ``probe_every``, not counting the
window after the last probe) one window tries the other way (a probe), and the window after
it is the chosen way again. The probe wins only if it beat the mean of the two windows
around it (a probe that an epoch's end cuts short is dropped): a training loop's own speed
drifts by a tenth or more within seconds on a shared machine, and a probe compared with
windows seconds away was decided by that drift. The growing interval measures a fresh
loader's cold first windows again soon. A probe costs one window (and the batches of its
switch) in the slower way. With bracketed probes a decision holds, so they come at most every
64 windows (~25 s of the seed's CPU loop). The earlier probe schedules and the traces that
replaced them: docs/design/gathering-in-the-loop.md. Both ways give the same batches in the
same order (NOTE [thread loading]); only where and when a batch is gathered changes, and
never more than ``depth`` ahead.

Not for a store larger than half of RAM (read-ahead advice "random"): there batches wait on the
disk, the threads keep more reads in flight, and a pass speeds up as the page cache fills, so
a later window looks faster whichever way it used, so the comparison is biased. Such a loader
always gathers ahead. Measured on the 32 GB store (scripts/bench_large.py, full passes,
thread:4, alternated): always ahead 32,417 and 28,466 samples/s, tuned 27,513 and 28,512;
within this disk's noise, so the rule rests on the reasons above, not on these figures.
"""

from __future__ import annotations

import collections
import logging
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from jasper_mmap.loading.tuner import GatherTuner
from jasper_mmap.stores.base import mark_gather_thread

__all__ = ["PLAN_BATCHES", "PLAN_SAMPLES", "ThreadedBatches"]

log = logging.getLogger(__name__)


#: a plan covers at most this many batches and, beyond its first batch, this many samples
PLAN_BATCHES, PLAN_SAMPLES = 16, 2048


class _SamplerError:
    """Where the sampler failed, queued after the batches it gave before (raised in order)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _gather(dataset: Any, collate: Any, work: tuple[Any, int, Any], pin: bool) -> Any:
    """One batch: ``work`` is (plan, j, indices), batch ``j`` of ``plan`` (None: unplanned)."""
    plan, j, indices = work
    if isinstance(plan, _SamplerError):
        raise plan.error
    if plan is None:
        return collate(dataset.__getitems__(indices, pin_memory=pin))
    return collate(dataset.planned_batch(plan, j, pin_memory=pin))


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
        tuner: chooses between gathering ahead and in the loop (NOTE [gathering in the
            loop]); None gathers ahead always.
    """

    def __init__(
        self,
        dataset: Any,
        batches: Any,
        collate: Any,
        threads: int,
        depth: int,
        pin: bool,
        tuner: GatherTuner | None = None,
    ) -> None:
        self._dataset, self._batches, self._collate = dataset, iter(batches), collate
        self._pin, self._depth, self._tuner = pin, max(1, depth), tuner
        self._pool = ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="jasper-gather", initializer=mark_gather_thread
        )
        self._pending: collections.deque[Future] = collections.deque()
        self._planned: collections.deque[tuple[Any, int, Any]] = collections.deque()
        self._plan = getattr(
            dataset, "plan_batches", None
        )  # NOTE [batch plans] in jasper_mmap/dataset/batches.py
        self._exhausted = False
        # joins the threads when the iterator is dropped (break), collected, or at exit
        self._finalizer = weakref.finalize(self, _shutdown, self._pool, self._pending)
        if tuner is not None:
            tuner.start_epoch()
        if not self._inline:
            try:
                self._fill()
            except BaseException:  # KeyboardInterrupt while planning: leave no thread behind
                self.close()
                raise

    def _indices(self) -> Any:
        """The sampler's next batch of indices, or None at the end of the epoch."""
        if not self._exhausted:
            try:
                return next(self._batches)
            except StopIteration:
                self._exhausted = True
        return None

    def _work(self) -> tuple[Any, int, Any] | None:
        """The next batch to gather: (plan, j, indices), or None at the end of the epoch.

        Batches come from the sampler a plan's worth at a time (up to ``PLAN_BATCHES``), and
        the dataset does their bookkeeping at once (NOTE [batch plans] in jasper_mmap/dataset/batches.py)."""
        if not self._planned:
            chunk: list[Any] = []
            samples, failed = 0, None
            try:
                while len(chunk) < (PLAN_BATCHES if self._plan is not None else 1):
                    if chunk and samples + len(chunk[0]) > PLAN_SAMPLES:
                        break
                    indices = self._indices()
                    if indices is None:
                        break
                    chunk.append(indices)
                    samples += len(indices)
            except Exception as error:  # the sampler's: raised after the batches it gave
                self._exhausted = True
                failed = (_SamplerError(error), 0, None)
            plan = self._plan(chunk) if chunk and self._plan is not None else None
            self._planned.extend((plan, j, indices) for j, indices in enumerate(chunk))
            if failed is not None:
                self._planned.append(failed)
        return self._planned.popleft() if self._planned else None

    def _fill(self) -> None:
        """Submit batches until ``depth`` are in flight or waiting (or the epoch ends)."""
        while len(self._pending) < self._depth:
            work = self._work()
            if work is None:
                return
            fut = self._pool.submit(_gather, self._dataset, self._collate, work, self._pin)
            self._pending.append(fut)

    @property
    def _inline(self) -> bool:
        """Whether batches are gathered in the loop now (the tuner's choice)."""
        return self._tuner is not None and self._tuner.inline

    @property
    def mode(self) -> str:
        """``"ahead"`` (gather threads) or ``"inline"`` (gathered in the loop) right now."""
        return "inline" if self._inline else "ahead"

    def __iter__(self) -> ThreadedBatches:
        return self

    def __next__(self) -> Any:
        if not self._finalizer.alive:
            raise StopIteration  # closed: ended, broken off, or failed
        try:
            if self._pending:  # batches gathered ahead go first, in order
                batch = self._pending.popleft().result()
            elif self._inline and (work := self._work()) is not None:
                batch = _gather(self._dataset, self._collate, work, self._pin)
            else:
                self.close()
                raise StopIteration
            if self._tuner is not None:
                self._tuner.handed_out(self._depth)
            if not self._inline:
                self._fill()
        except StopIteration:
            raise
        except BaseException:
            self.close()  # KeyboardInterrupt, or the gather's own error: stop the rest
            raise
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
