"""Batches of a dataset on object storage, fetched into the node cache ahead of their use.

# NOTE [fetch ahead]
For a dataset read through a node's mirror (NOTE [node cache] in jasper_mmap/remote/cache.py),
the loader's batch sampler is wrapped: a daemon thread reads the sampler ahead of the loader,
whatever the loader is doing, and hands the units of each chunk of batches it reads to a pool
of ``concurrency`` fetches at once (``QUEUED * concurrency`` queued or in flight at most; up to
``AHEAD_COLD`` batches ahead while units are missing and there is no budget, else ``AHEAD``).
The units of the next window of the partitioned order are thus asked for while this window's
are still coming, and the link is never idle between windows (when the thread read ahead only
as the loader asked for batches, a cold epoch over a 2 Gbit/s link took 1.30x the plain
download; now 1.17x). With worker processes, each batch's unit rows are in the mirror before
its indices go to a worker, fetched in the loader's process (a worker, forked, cannot use the
object store; gather threads and the loop fetch what they miss). Progress goes to the log
every ``PROGRESS_EVERY`` seconds while units are fetched, and a summary (units and bytes
fetched, GETs, cache hits, evictions) when the batches have been read.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

__all__ = ["FetchedBatches", "AHEAD"]

log = logging.getLogger(__name__)

#: batches whose units are fetched ahead of the one handed out
AHEAD = 64
#: seconds between two progress lines in the log while units are being fetched
PROGRESS_EVERY = 10.0
#: while units are missing (a cold cache, no budget): batches read ahead at most, for the units
#: of the next window of the partitioned order to be asked for while this window's still come
#: (64 batches of 128 samples span ~6 units of 8 MiB; a window of 16 units, ~550 batches)
AHEAD_COLD = 4096
#: unit fetches queued or in flight at most, in multiples of ``concurrency``, while reading ahead
QUEUED = 4


def _need(remote: Any, pairs: np.ndarray, generation: int) -> int:
    """Bytes the units of ``pairs`` not yet here (some perhaps being fetched) will add."""
    return sum(remote._unit_bytes(spec) for _, spec, _ in remote.missing_units(pairs, generation))


class FetchedBatches:
    """A batch sampler whose batches' unit rows are in the node cache when they are yielded."""

    def __init__(self, inner: Any, dataset: Any, ensure_each: bool = True) -> None:
        self.inner, self.dataset, self.ensure_each = inner, dataset, ensure_each

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["inner"], name)

    def _pairs(self, batches: list[Any]) -> np.ndarray:
        ds = self.dataset
        if not batches:
            return np.empty(0, dtype=np.int64)
        idx = np.concatenate([np.asarray(b, dtype=np.int64) for b in batches])
        return ds.store.gather_unchecked(f"{ds.split}_idx", idx[(idx >= 0) & (idx < len(ds))])

    def __iter__(self) -> Iterator[Any]:
        ds = self.dataset
        remote = ds._remote
        it = iter(self.inner)
        cond = threading.Condition()
        ready: collections.deque = collections.deque()  # read ahead, not yet handed out
        state: dict[str, Any] = {"end": False, "error": None, "stop": False}
        pending: list[Any] = []
        deep = remote.cache_limit is None  # a budget keeps the window (NOTE [eviction])
        start, said = remote.summary(), [time.monotonic()]
        t0 = said[0]

        def progress(final: bool) -> None:
            now = remote.summary()
            units = now["units_fetched"] - start["units_fetched"]
            if not final and (not units or time.monotonic() - said[0] < PROGRESS_EVERY):
                return
            said[0] = time.monotonic()
            log.info(
                "%s: %s %d units fetched (%.1f MB in %d GETs) in %.1f s, %d cache hits, %d evicted",
                remote.url,
                "batches read:" if final else "fetching ahead:",
                units,
                (now["bytes_fetched"] - start["bytes_fetched"]) / 1e6,
                now["gets"] - start["gets"],
                said[0] - t0,
                now["units_hit"] - start["units_hit"],
                now["units_evicted"] - start["units_evicted"],
            )

        def wake(_: Any = None) -> None:
            with cond:
                cond.notify_all()

        def more(cold: bool) -> bool:  # (under cond)
            if len(ready) < AHEAD:
                return True
            if not (deep and cold) or len(ready) >= AHEAD_COLD:
                return False
            return sum(not f.done() for f in pending) < QUEUED * remote.concurrency

        def read_ahead() -> None:
            # this thread reads the batch sampler ahead of the loader, whatever the loader is
            # waiting on, and hands the units of each chunk of batches to a pool as soon as
            # they are read, ``concurrency`` in flight at a time (a fetched unit is skipped):
            # the next window's units are asked for while this window's are still coming
            submitted: set[tuple[str, int]] = set()
            cold = True  # the last chunk read had units to fetch
            with ThreadPoolExecutor(remote.concurrency) as pool:
                try:
                    while True:
                        with cond:
                            while not state["stop"] and not more(cold):
                                cond.wait(timeout=PROGRESS_EVERY)
                                progress(final=False)
                            if state["stop"]:
                                break
                        chunk = list(itertools.islice(it, AHEAD // 4))
                        with cond:
                            if not chunk:
                                state["end"] = True
                                cond.notify_all()
                                while not state["stop"] and not all(f.done() for f in pending):
                                    cond.wait(timeout=PROGRESS_EVERY)  # (the last fetches)
                                    progress(final=False)
                                break
                            ready.extend(chunk)
                            # (a budget keeps the units of what is read ahead: NOTE [eviction])
                            queued = None if deep else list(ready)
                            cond.notify_all()
                        progress(final=False)
                        try:
                            pairs = self._pairs(chunk)
                            generation = ds._control.snapshot().generation
                            if queued is not None:  # NOTE [eviction]: room first
                                ahead = self._pairs(queued)  # (the chunk is in it)
                                need = _need(remote, ahead, generation)  # in flight, or to be
                                remote.evict_to(remote.cache_limit - need, remote.units_of(ahead))
                                submitted.clear()  # an evicted unit may be needed again
                            jobs = remote.missing_units(pairs, generation)
                            cold = bool(jobs)
                            for job in jobs:
                                if (job[0], job[2]) not in submitted:
                                    submitted.add((job[0], job[2]))
                                    f = pool.submit(remote.fetch_unit, job)
                                    f.add_done_callback(wake)
                                    pending.append(f)
                            pending[:] = [f for f in pending if not f.done()]  # ensure re-raises
                        except Exception:  # raised again by the batch that needs the unit
                            log.debug("fetch ahead failed", exc_info=True)
                except BaseException as e:  # the sampler's own error: the loader's to raise
                    with cond:
                        state["error"] = e
                        cond.notify_all()
                finally:
                    for f in pending:
                        f.cancel()

        reader = threading.Thread(target=read_ahead, name="jasper-fetch-ahead", daemon=True)
        reader.start()
        try:
            while True:
                with cond:
                    while not ready and not state["end"] and state["error"] is None:
                        cond.wait()
                    if not ready:
                        if state["error"] is not None:
                            raise state["error"]
                        return
                    batch = ready.popleft()
                    if len(ready) == AHEAD // 2:  # room for two chunks: the reader reads on
                        cond.notify_all()
                if self.ensure_each:  # worker processes cannot fetch: here, before they gather
                    remote.ensure(self._pairs([batch]), ds._control.snapshot().generation)
                yield batch
        finally:
            with cond:
                state["stop"] = True
                cond.notify_all()
            reader.join(timeout=60)
            progress(final=True)
