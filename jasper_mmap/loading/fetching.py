"""Batches of a dataset on object storage, fetched into the node cache ahead of their use.

# NOTE [fetch ahead]
For a dataset read through a node's mirror (NOTE [node cache] in jasper_mmap/remote/cache.py),
the loader's batch sampler is wrapped: with worker processes, each batch's unit rows are in the
mirror before its indices go to a worker, fetched in the loader's process (a worker, forked,
cannot use the object store; gather threads and the loop fetch what they miss), and a daemon
thread hands the units of the next ``AHEAD`` batches to a pool of ``concurrency`` fetches as
soon as they are read ahead, so that many requests are always in flight. Without it the first
epoch would wait on every unit in turn; with it, it waits on the download as a whole.
Progress goes to the log
every ``PROGRESS_EVERY`` seconds while units are fetched, and a summary (units and bytes
fetched, GETs, cache hits, evictions) when the batches have been read.
"""

from __future__ import annotations

import collections
import logging
import queue
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
#: while units are missing (a cold cache, no budget): batches read ahead at most, to keep
#: twice ``concurrency`` units in flight (64 batches of 128 samples span ~6 units of 8 MiB)
AHEAD_COLD = 4096


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
        todo: queue.Queue = queue.Queue()
        stop = threading.Event()
        pending: list[Any] = []
        cold = [True]  # the last chunk read ahead had units to fetch
        deep = remote.cache_limit is None  # a budget keeps the window (NOTE [eviction])

        def more() -> bool:
            if len(window) < AHEAD:
                return True
            if not (deep and cold[0]) or len(window) >= AHEAD_COLD:
                return False
            if todo.qsize() > 1:  # the thread has not looked at what was read ahead yet
                return False
            return sum(not f.done() for f in list(pending)) < 2 * remote.concurrency

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

        def fetch_ahead() -> None:
            # units go to a pool as soon as their batches are read ahead, ``concurrency`` in
            # flight at a time, never waiting for a chunk to finish (a fetched unit is skipped)
            submitted: set[tuple[str, int]] = set()
            with ThreadPoolExecutor(remote.concurrency) as pool:
                while not stop.is_set():
                    try:
                        item = todo.get(timeout=PROGRESS_EVERY)
                    except queue.Empty:
                        progress(final=False)
                        continue
                    if item is None:
                        break
                    progress(final=False)
                    try:
                        pairs = self._pairs(item)
                        generation = ds._control.snapshot().generation
                        if remote.cache_limit is not None:  # NOTE [eviction]: room first
                            ahead = np.concatenate([pairs, self._pairs(list(window))])
                            need = _need(remote, ahead, generation)  # in flight, or to be
                            remote.evict_to(remote.cache_limit - need, remote.units_of(ahead))
                            submitted.clear()  # an evicted unit may be needed again
                        jobs = remote.missing_units(pairs, generation)
                        cold[0] = bool(jobs)
                        for job in jobs:
                            if (job[0], job[2]) not in submitted:
                                submitted.add((job[0], job[2]))
                                pending.append(pool.submit(remote.fetch_unit, job))
                        pending[:] = [f for f in pending if not f.done()]  # ensure re-raises
                    except Exception:  # raised again by the batch that needs the unit
                        log.debug("fetch ahead failed", exc_info=True)
                for f in pending:
                    f.cancel()

        worker = threading.Thread(target=fetch_ahead, name="jasper-fetch-ahead", daemon=True)
        window: collections.deque = collections.deque()  # read by the thread: made first
        worker.start()
        try:
            done = False
            while True:
                while not done and more():
                    chunk = []
                    for b in it:
                        chunk.append(b)
                        if len(chunk) >= AHEAD // 4:
                            break
                    if not chunk:
                        done = True
                        break
                    todo.put(chunk)
                    window.extend(chunk)
                if not window:
                    return
                batch = window.popleft()
                if self.ensure_each:  # worker processes cannot fetch: here, before they gather
                    remote.ensure(self._pairs([batch]), ds._control.snapshot().generation)
                yield batch
        finally:
            stop.set()
            todo.put(None)
            worker.join(timeout=60)
            progress(final=True)
