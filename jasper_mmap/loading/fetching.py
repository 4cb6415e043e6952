"""Batches of a dataset on object storage, fetched into the node cache ahead of their use.

# NOTE [fetch ahead]
For a dataset read through a node's mirror (NOTE [node cache] in jasper_mmap/remote/cache.py),
the loader's batch sampler is wrapped: in the loader's own process, each batch's unit rows are
in the mirror before its indices go to a gather thread or a worker process (so a worker
process, which cannot use the object store after a fork, never has to fetch), and a daemon
thread fetches the units of the next ``AHEAD`` batches while the current ones are served, the
mirror fetching ``concurrency`` units at a time. Without it the first epoch would wait on
every unit in turn; with it, it waits on the download as a whole.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["FetchedBatches", "AHEAD"]

log = logging.getLogger(__name__)

#: batches whose units are fetched ahead of the one handed out
AHEAD = 64


def _need(remote: Any, pairs: np.ndarray) -> int:
    """Bytes the units of ``pairs`` would add at most."""
    per_unit = sum(remote._unit_bytes(spec) for spec in remote.catalog["groups"].values())
    return int(remote.units_of(pairs).size) * per_unit


class FetchedBatches:
    """A batch sampler whose batches' unit rows are in the node cache when they are yielded."""

    def __init__(self, inner: Any, dataset: Any) -> None:
        self.inner, self.dataset = inner, dataset

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["inner"], name)

    def _pairs(self, batches: list[Any]) -> np.ndarray:
        ds = self.dataset
        idx = np.concatenate([np.asarray(b, dtype=np.int64) for b in batches])
        return ds.store.gather_unchecked(f"{ds.split}_idx", idx[(idx >= 0) & (idx < len(ds))])

    def __iter__(self) -> Iterator[Any]:
        ds = self.dataset
        remote = ds._remote
        it = iter(self.inner)
        todo: queue.Queue = queue.Queue()
        stop = threading.Event()
        failed: list[BaseException] = []

        def fetch_ahead() -> None:
            while not stop.is_set():
                item = todo.get()
                if item is None:
                    return
                try:
                    pairs = self._pairs(item)
                    if remote.cache_limit is not None:  # NOTE [eviction]: room first
                        keep = remote.units_of(np.concatenate([pairs, self._pairs(list(window))]))
                        remote.evict_to(remote.cache_limit - _need(remote, pairs), keep)
                    remote.prefetch(pairs, ds._control.snapshot().generation)
                except BaseException as e:  # raised by the batch that needs the unit
                    failed.append(e)
                    log.debug("fetch ahead failed", exc_info=True)
                    return

        worker = threading.Thread(target=fetch_ahead, name="jasper-fetch-ahead", daemon=True)
        worker.start()
        window: list[Any] = []
        try:
            done = False
            while True:
                while not done and len(window) < AHEAD:
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
                batch = window.pop(0)
                pairs = self._pairs([batch])
                remote.ensure(pairs, ds._control.snapshot().generation)
                yield batch
        finally:
            stop.set()
            todo.put(None)
            worker.join(timeout=60)
