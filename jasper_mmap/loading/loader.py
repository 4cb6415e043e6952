"""``create_loader``, ``set_epoch``, ``validate_first_batch`` and the worker seeding.

``create_loader`` builds a ``torch.utils.data.DataLoader`` on the batched path: the DataLoader
calls ``dataset.__getitems__`` with a batch's indices (a few vectorized gathers) and
:func:`collate_batch` passes the batch through untouched.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from jasper_mmap.dataset.batches import BATCH_KEYS, LoadedBatch, SampleBatch
from jasper_mmap.dataset.control import mark_loader_worker
from jasper_mmap.dataset.dataset import JASPERSteeringDataset
from jasper_mmap.errors import JasperError
from jasper_mmap.loading.fetching import FetchedBatches
from jasper_mmap.loading.order import (
    OrderedBatches,
    ResumableRandomSampler,
    ResumableSequentialSampler,
    _Resumable,
)
from jasper_mmap.loading.resume import STATE_VERSION, check_state, data_identity, probs_dict
from jasper_mmap.loading.threads import ThreadedBatches
from jasper_mmap.loading.tuner import GatherTuner
from jasper_mmap.steering import VARIANTS

__all__ = [
    "create_loader",
    "JasperLoader",
    "WORKER_MODES",
    "set_epoch",
    "validate_first_batch",
    "first_batch_summary",
    "collate_batch",
    "seed_worker",
    "BatchValidationError",
]

log = logging.getLogger(__name__)


class BatchValidationError(JasperError, AssertionError, ValueError):
    """A batch has a missing key, a wrong shape or dtype, NaN/Inf, or a value out of range.

    An AssertionError, as the in-RAM dataset's ``validate_first_batch`` raised (its docs tell
    users to catch that), and a ValueError.
    """


def collate_batch(data: Any) -> Any:
    """Collate for the batched path: a :class:`SampleBatch` is already a batch (returned as
    a :class:`LoadedBatch`, a dict that remembers the control version it was gathered under)."""
    if isinstance(data, SampleBatch):
        if data.version is None:
            return data.batch
        return LoadedBatch(data.batch, data.version, data.indices)
    return torch.utils.data.default_collate(data)


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: distinct, derived seeds for torch, numpy and random in each worker.

    torch already gives worker ``i`` the seed ``base_seed + i``; numpy's global RNG is not
    reseeded by torch, so every forked worker would otherwise draw the same numbers.
    """
    seed = torch.initial_seed()  # base_seed + worker_id, set by the DataLoader
    np.random.seed(seed % 2**32)
    random.seed(seed)


class _OurWorker:
    """The ``worker_init_fn`` a JasperLoader's worker processes run: marks the worker process as ours, so the dataset's
    control block keeps following the main process there (NOTE [forked children] in
    control.py), then runs the user's ``worker_init_fn``. Picklable for spawn workers."""

    def __init__(self, init: Any) -> None:
        self.init = init

    def __call__(self, worker_id: int) -> None:
        mark_loader_worker()
        if self.init is not None:
            self.init(worker_id)


WORKER_MODES = ("thread", "process")


class JasperLoader(DataLoader):
    """A ``torch.utils.data.DataLoader`` whose ``num_workers`` are gather threads by default.

    ``worker_mode="thread"``: ``num_workers`` threads of this process gather batches in
    parallel, ``prefetch_factor`` per thread ahead (:attr:`in_flight`), in sampler order, with
    no per-batch process transport (NOTE [thread loading] in jasper_mmap/loading/threads.py), or the loop gathers
    them itself when :attr:`gather_tuner` measures that to be faster (a CPU training step that
    uses every core; NOTE [gathering in the loop]); ``num_workers=0`` gathers in the loop.
    ``worker_mode="process"``: the DataLoader's own worker processes, for users who add
    per-sample Python work of their own (a custom collate function, say) that threads would
    serialize on the GIL. Batches are bit-identical in every mode.
    """

    def __init__(self, dataset: Any, *, worker_mode: str = "thread", **kwargs: Any) -> None:
        if worker_mode not in WORKER_MODES:
            raise ValueError(
                f"worker_mode should be one of {WORKER_MODES}, but got worker_mode={worker_mode!r}"
            )
        self.worker_mode = worker_mode  # before DataLoader.__init__, which checks the workers
        #: thread mode: measures whether gathering ahead on threads or in the loop is faster
        #: for this loop and does that (NOTE [gathering in the loop]); None: always ahead
        self.gather_tuner: GatherTuner | None = GatherTuner()
        super().__init__(dataset, **kwargs)
        if isinstance(self.sampler, _Resumable) and type(self.batch_sampler) is BatchSampler:
            # each batch computed at once (DataLoader forbids setting this after __init__)
            batches = OrderedBatches(self.sampler, self.batch_size, self.drop_last)
            object.__setattr__(self, "batch_sampler", batches)
        #: (plan, batches handed out, epoch) of the newest iterator: what state_dict counts
        self._position: tuple[Any, int, int] | None = None
        #: load_state_dict ran and no batch was handed out since: set_epoch(loader, the
        #: restored epoch) keeps the restored control state (module-level set_epoch)
        self._resume_pending = False
        #: bumped by load_state_dict: an iterator started before it no longer moves the
        #: position state_dict reports (the resume is where the next iterator starts)
        self._loads = 0

    def _get_iterator(self) -> Any:
        """The DataLoader's iterator; its worker processes (``worker_mode="process"``, or
        ``batch_size=None``) run :class:`_OurWorker` around ``worker_init_fn``, which stays
        the user's own attribute (only the workers this call starts see the wrapper); without
        an accelerator it does not pin (``pin_memory`` stays as given)."""
        init, pin = self.worker_init_fn, self.pin_memory
        if self.num_workers:
            self.worker_init_fn = _OurWorker(init)
        if pin and not _accelerator():  # nothing to pin for: torch would only warn
            self.pin_memory = False
        try:
            return super()._get_iterator()
        finally:
            self.worker_init_fn, self.pin_memory = init, pin

    def check_worker_number_rationality(self) -> None:
        """The DataLoader's warning about more worker processes than cores (processes only)."""
        if self.worker_mode == "process":
            super().check_worker_number_rationality()

    @property
    def _index_sampler(self) -> Any:
        # NOTE [fetch ahead]: a dataset on object storage gets each batch's rows in the node
        # cache, in this process, before the batch is gathered anywhere
        inner = super()._index_sampler
        if getattr(self.dataset, "_remote", None) is not None and self._auto_collation:
            forked = self.worker_mode == "process" and self.num_workers > 0
            return FetchedBatches(inner, self.dataset, ensure_each=forked)
        return inner

    def _epoch_batches(self) -> Iterator[Any]:
        """The sampler's batches of a new epoch, drawn as the DataLoader's own iterators do:
        the sampler iterator first, then one draw of the loader's generator (the workers' base
        seed), so a seeded sampler gives the same order in every mode."""
        batches = iter(self._index_sampler)
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        return batches

    @property
    def gather_threads(self) -> int:
        """Threads that gather in thread mode: ``num_workers``, at most the CPUs this process
        may run on. A gather is CPU work (warm pages) or waits on reads the batch prefetch
        already queued (cold pages), so threads beyond the cores only contend: measured on 2
        cores, 4 threads gathered 81k samples/s where 2 gathered 104k (README, Performance)."""
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
        return max(1, min(self.num_workers, cpus))

    @property
    def in_flight(self) -> int:
        """Batches gathered ahead at most in thread mode (memory: this x one batch's bytes):
        ``prefetch_factor`` per gather thread, as a DataLoader's per worker. Counted per
        thread that runs (:attr:`gather_threads`), not per ``num_workers``: a deeper queue
        only buffers, and on 2 cores with ``num_workers=4`` (2 threads) a depth of 8 batches
        trained at 0.910 / 0.925 of the loader-free bound where 4 gave 0.925 / 0.935 (two
        interleaved A/B sets of 7 rounds; every switch to gathering ahead queues the depth
        at once while the step needs both cores)."""
        return (self.prefetch_factor or 1) * self.gather_threads if self.num_workers else 1

    def __iter__(self) -> Any:
        if not isinstance(self.sampler, _Resumable) or not self._auto_collation:
            return self._batches()
        return _HandOut(self)

    def _batches(self) -> Any:
        """The batches of a new iterator, in this loader's mode."""
        threads = self.worker_mode == "thread" and self._auto_collation
        if not threads:
            return super().__iter__()
        if getattr(self.dataset, "device", torch.device("cpu")).type != "cpu":
            return _inline(self.dataset, self._epoch_batches(), self.collate_fn, False)  # on GPU
        pin = bool(self.pin_memory) and torch.cuda.is_available()
        if self.num_workers == 0:
            return _inline(self.dataset, self._epoch_batches(), self.collate_fn, pin)
        reserve = getattr(self.dataset, "reserve_batch_buffers", None)
        if reserve is not None:  # the batches in flight and the one the loop holds
            reserve(self.in_flight + 2)
        tuner = self.gather_tuner
        store = getattr(self.dataset, "store", None)  # a dataset of ours has one
        if store is not None and store.reads_ahead:
            tuner = None  # larger than RAM: batches wait on the disk; threads keep reads in flight
        return ThreadedBatches(
            self.dataset,
            self._epoch_batches(),
            self.collate_fn,
            self.gather_threads,
            self.in_flight,
            pin,
            tuner,
        )

    # -- resuming: NOTE [resuming] in jasper_mmap/loading/resume.py ---------------------------
    def _resumable(self) -> _Resumable:
        if isinstance(self.sampler, _Resumable) and self.batch_sampler is None:
            raise ValueError(
                f"{_where(self)}: batch_size=None serves single samples, so this loader has no "
                f"batch position to save or restore. Pass a batch_size to create_loader."
            )
        if not isinstance(self.sampler, _Resumable) or not isinstance(
            self.batch_sampler, OrderedBatches
        ):
            torch_shuffle = (
                type(self.sampler) is RandomSampler and type(self.batch_sampler) is BatchSampler
            )
            if torch_shuffle and self.generator is not None:  # the user's RNG draws the order
                what = "are shuffled by torch's RandomSampler from your generator="
                fix = "Pass no generator= (the order is a function of seed= and the epoch)"
            else:
                what = (
                    f"come from a sampler of your own "
                    f"({type(self.batch_sampler or self.sampler).__name__})"
                )
                fix = (
                    "Let create_loader choose the sampler (shuffle=, drop_last=, distributed=), "
                    "or save your sampler's state yourself"
                )
            raise ValueError(
                f"{_where(self)}: this loader's batches {what}, so it has no position to save "
                f"or restore. {fix}."
            )
        return self.sampler

    def state_dict(self) -> dict[str, Any]:
        """Where this loader is: small, JSON-safe, identical on every rank (NOTE [resuming]).

        Counts the batches handed to the training loop (not those gathered ahead). Before
        the first ``iter()``, or after ``load_state_dict``, the position the next iterator
        starts at."""
        sampler, dataset = self._resumable(), self.dataset
        position = self._position
        # the newest iterator's count (it may go on after a set_epoch of its own epoch), unless
        # it can serve no more of the sampler's epoch: set_epoch moved to another epoch, or
        # restarted its finished epoch; then where the next iterator starts
        live = position is not None and position[1] and position[2] == sampler.epoch
        if live and sampler._handed_out is None and position[1] >= position[0].batches:
            live = False
        if live:
            cursor = position[0].cursor_after(position[1])
        else:
            cursor = sampler.cursor
        snap = dataset._control.snapshot()
        return {
            "kind": "jasper_mmap.loader",
            "version": STATE_VERSION,
            "data": data_identity(dataset),
            "order": {
                "seed": sampler.seed,
                "epoch": sampler.epoch,
                "shuffle": sampler.shuffle,
                "drop_last": bool(self.drop_last),
                "partition": sampler.partition_spec(),  # NOTE [partitioned order]
            },
            "cursor": cursor,
            "control": {
                "epoch": snap.epoch,
                "forced": None if snap.forced < 0 else VARIANTS[snap.forced],
                "steering_probs": probs_dict(snap.override),
                "negatives_generation": snap.generation,
            },
        }

    def load_state_dict(self, state: dict[str, Any], negatives: str = "saved") -> None:
        """Resume from ``state`` (:meth:`state_dict`, saved at any world size and batch size):
        the next iterator serves the rest of the saved epoch, in the saved order, with the
        saved control state (curriculum epoch, forced variant, assigned probabilities).

        Args:
            negatives: ``"saved"`` serves the negatives generation the state names (an error
                if it was removed since); ``"live"`` the generation published now.

        Raises:
            ResumeStateError: (a ValueError) not a state of ours, another version, or saved
                for another dataset (naming the field that differs).
            StoreNotFoundError: ``negatives="saved"`` and that generation was removed.
        """
        if negatives not in ("saved", "live"):
            raise ValueError(f'negatives should be "saved" or "live", but got {negatives!r}')
        sampler, dataset = self._resumable(), self.dataset
        state = check_state(state, data_identity(dataset), _where(self))
        order, control = state["order"], state["control"]
        if order.get("shuffle") != sampler.shuffle or order.get("seed") != sampler.seed:
            from jasper_mmap.loading.resume import ResumeStateError

            raise ResumeStateError(
                f"{_where(self)}: the state's order (seed {order.get('seed')!r:.20}, shuffle "
                f"{order.get('shuffle')!r:.8}) is not this loader's (seed {sampler.seed}, "
                f"shuffle {sampler.shuffle}). Create the loader with the run's seed and shuffle."
            )
        if order["drop_last"] != bool(self.drop_last):
            log.warning(
                "%s: the state was saved with drop_last=%s; this loader has drop_last=%s, so "
                "the rest of the epoch is served with drop_last=%s",
                _where(self),
                order["drop_last"],
                bool(self.drop_last),
                bool(self.drop_last),
            )
        saved = order.get("partition")
        if saved != sampler.partition_spec():  # the saved run's order, at any world size
            log.info("%s: resuming with the saved partition %s", _where(self), saved)
            if saved is None:
                sampler.partition = None
            else:
                sampler.partition_by(
                    sampler._pairs or (lambda: split_pairs(dataset)),
                    saved["unit_rows"],
                    saved["parts"],
                    saved["window"],
                    saved["every_epoch"],
                )
        if negatives == "saved":
            dataset.use_negatives_generation(int(control["negatives_generation"]))
        else:
            dataset.reload_negatives()
        dataset.set_epoch(int(control["epoch"]))
        if control.get("steering_probs") is not None:
            dataset.steering_probs = control["steering_probs"]
        dataset.force_steering(control.get("forced"))
        self._position = None
        self._resume_pending = True
        self._loads += 1
        sampler.epoch, sampler.cursor, sampler._handed_out = int(order["epoch"]), 0, None
        sampler.cursor = int(state["cursor"])


def _where(loader: JasperLoader) -> str:
    return str(getattr(loader.dataset, "dataset_dir", "loader"))


class _HandOut:
    """The iterator a resumable loader hands out (NOTE [resuming], NOTE [control at
    hand-out]): counts the batches handed to the loop, starts the epoch at the sampler's
    cursor, starts again if the sampler's epoch or cursor changed before its first batch,
    and gathers a batch again when the control state changed after it was gathered.

    # NOTE [control at hand-out]
    Batches are gathered ahead (threads, worker processes, prefetch). A control change
    (``set_epoch``, ``force_steering``, ``steering_probs``, ``reload_negatives``) bumps the
    control block's version; each batch remembers the version read before it was gathered, and
    a batch whose version is no longer current when the loop asks for it is gathered again in
    the loop's thread from the same indices. So a change takes effect from the next batch
    handed out, whatever ``num_workers``, mode or prefetch depth, and the stream of batches is
    a function of the calls the loop made, nothing else.
    """

    def __init__(self, loader: JasperLoader) -> None:
        self.loader, self.handed, self.inner = loader, 0, None
        self._start()

    def _start(self) -> None:
        s = self.loader.sampler
        if self.inner is not None and hasattr(self.inner, "close"):
            self.inner.close()
        self.key = (s.epoch, s.cursor)
        self.loads = self.loader._loads
        self.plan = s.plan()
        s._handed_out = 0
        self.loader._position = (self.plan, 0, s.epoch)
        self.inner = self.loader._batches()

    def __iter__(self) -> _HandOut:
        return self

    def __len__(self) -> int:
        return max(0, self.plan.batches - self.handed)

    def __next__(self) -> Any:
        loader, s = self.loader, self.loader.sampler
        if not self.handed and ((s.epoch, s.cursor) != self.key or self.loads != loader._loads):
            self._start()  # set_epoch (or a resume) after iter(), before its first batch
        batch = next(self.inner)
        version = getattr(batch, "control_version", None)
        dataset = loader.dataset
        if version is not None and version != dataset._control.version:
            pin = bool(loader.pin_memory) and torch.cuda.is_available()
            batch = loader.collate_fn(dataset.__getitems__(batch.indices, pin_memory=pin))
        self.handed += 1
        if self.loads != loader._loads:  # load_state_dict ran since this iterator started
            return batch
        if self.handed == 1:
            s.cursor = 0  # consumed: a new iter() starts its epoch at batch 0
            loader._resume_pending = False
        s._handed_out = self.handed
        loader._position = (self.plan, self.handed, self.key[0])
        return batch

    def close(self) -> None:
        if self.inner is not None and hasattr(self.inner, "close"):
            self.inner.close()

    def __getattr__(self, name: str) -> Any:
        if name in ("inner", "loader"):
            raise AttributeError(name)
        return getattr(self.inner, name)  # the inner iterator's (mode, alive, _workers...)


def _accelerator() -> bool:
    """Whether pinned memory has a device to serve (CUDA, or torch's current accelerator)."""
    if torch.cuda.is_available():
        return True
    acc = getattr(torch, "accelerator", None)
    return acc is not None and acc.current_accelerator() is not None


def _inline(dataset: Any, batches: Any, collate: Any, pin: bool) -> Iterator[Any]:
    for indices in batches:
        yield collate(dataset.__getitems__(indices, pin_memory=pin))


def create_loader(
    dataset_dir: str | Path,
    split: str,
    batch_size: int,
    num_workers: int = 0,
    distributed: bool = False,
    epoch: int = 0,
    drop_last: bool | None = None,
    pin_memory: bool = True,
    *,
    worker_mode: str = "thread",
    partition: bool | None = None,
    canonical_parts: int | None = None,
    unit_rows: int | None = None,
    cache_limit: int | None = None,
    window_every_epoch: bool = False,
    **dataloader_kwargs: Any,
) -> JasperLoader:
    """A DataLoader over ``JASPERSteeringDataset(dataset_dir, split, epoch)`` on the batched path.

    Train shuffles and drops the last partial batch by default; val/test do neither. The
    order is a function of (seed, epoch) only (NOTE [epoch order] in
    jasper_mmap/loading/order.py), and ``loader.state_dict()`` / ``load_state_dict`` resume it
    exactly (NOTE [resuming]). With ``distributed=True`` the split is sharded across ranks as
    ``DistributedSampler`` deals it (rank and world size from ``torch.distributed``, or
    ``num_replicas=`` and ``rank=``). ``sampler=``, ``batch_sampler=`` or ``generator=``
    (torch's order) replace that sampler; such a loader has no position to save.
    ``partition`` (default: on for a shuffled split of a store on object storage) orders the
    epochs by a canonical partition of the pair rows into ``canonical_parts`` parts (default:
    the world size) of units of ``unit_rows`` pairs (default: the store's), so that each node
    fetches and caches only its share (NOTE [partitioned order] in jasper_mmap/loading/order.py).
    ``cache_limit`` (bytes): the node cache's budget; a node whose share does not fit evicts
    units least recently used (NOTE [eviction] in jasper_mmap/remote/cache.py), which needs
    ``window_every_epoch=True`` on every node (each epoch then goes through a part a window of
    units at a time); a budget below what the batches in flight need is refused at once.
    ``num_workers`` gather threads (``worker_mode="thread"``, the default) or worker processes
    (``worker_mode="process"``); see :class:`JasperLoader`. ``pin_memory`` (with CUDA) gathers
    straight into pinned memory. ``dataloader_kwargs`` go to the DataLoader and override these
    defaults (``shuffle``, ``prefetch_factor``, ``persistent_workers``,
    ``multiprocessing_context``, ...); dataset options (``seed``, ``cache_dir``,
    ``store_format``, ``storage_format``, ``use_mmap``, ``report_generation``, ...) are taken
    out first.

    Returns:
        A :class:`JasperLoader` (a ``torch.utils.data.DataLoader``), with ``.dataset_obj``
        (the dataset) and ``.sampler_obj`` (the sharding sampler with ``distributed=True``,
        else None; ``.sampler`` is the sampler in every case).
    """
    ds_keys = (
        "seed",
        "cache_dir",
        "store_format",
        "storage_format",
        "use_mmap",
        "device",
        "report_generation",
        "preload",
        "preload_budget_bytes",
        "check_sources",
        "allow_nonfinite",
        "storage_options",
    )
    ds_kwargs = {k: dataloader_kwargs.pop(k) for k in ds_keys if k in dataloader_kwargs}
    dataset = JASPERSteeringDataset(dataset_dir, split, epoch, **ds_kwargs)
    if dataset.device.type != "cpu":
        if num_workers and worker_mode == "process":
            raise ValueError(
                f"num_workers should be 0 for a dataset preloaded to {dataset.device} with "
                f"worker_mode='process' (batches are gathered on the device in this process), "
                f"but got num_workers={num_workers}"
            )
        pin_memory = False
    train = split == "train"
    drop_last = train if drop_last is None else drop_last
    shuffle = dataloader_kwargs.pop("shuffle", train)
    replicas, rank = (
        dataloader_kwargs.pop("num_replicas", None),
        dataloader_kwargs.pop("rank", None),
    )
    if distributed:
        replicas, rank = _world(replicas, rank)
    elif replicas not in (None, 1) or rank not in (None, 0):
        raise ValueError(
            f"num_replicas and rank shard the split across ranks: pass distributed=True with "
            f"them (got num_replicas={replicas!r}, rank={rank!r})"
        )
    sampler = None
    remote = getattr(dataset, "_remote", None)
    own = ("sampler", "batch_sampler") + (("generator",) if shuffle else ())
    if all(dataloader_kwargs.get(k) is None for k in own):
        # NOTE [epoch order]: one sampler for every mode, its order a function of (seed, epoch)
        kind = ResumableRandomSampler if shuffle else ResumableSequentialSampler
        sampler = kind(dataset, dataset.seed, epoch, replicas or 1, rank or 0)
        if partition is None:
            partition = remote is not None and shuffle
        if partition and shuffle:
            if unit_rows is None:
                unit_rows = remote.unit_rows if remote is not None else store_unit_rows(dataset)
            sampler.partition_by(
                lambda: split_pairs(dataset),
                unit_rows,
                canonical_parts or replicas or 1,
                every_epoch=window_every_epoch,
            )
    elif partition:
        raise ValueError(
            "partition=True orders create_loader's own sampler: pass no sampler=, "
            "batch_sampler= or generator= with it"
        )
    elif distributed:
        raise ValueError(
            "distributed=True shards the split with create_loader's own sampler: pass no "
            "sampler=, batch_sampler= or generator= with it (or shard in your sampler and "
            "pass distributed=False)"
        )
    # else: the user's sampler, or torch's RandomSampler drawing from the user's generator
    # (the order a plain DataLoader gives): no position to save (state_dict says so)
    if cache_limit is not None and remote is not None:
        _check_cache_limit(remote, cache_limit, replicas or 1, sampler, batch_size)
        remote.cache_limit = int(cache_limit)
    kwargs: dict[str, Any] = {
        "batch_size": batch_size,
        "shuffle": shuffle if sampler is None and "sampler" not in dataloader_kwargs else False,
        "sampler": sampler,
        "num_workers": num_workers,
        "drop_last": drop_last,
        "collate_fn": collate_batch,
        "pin_memory": pin_memory,
        "worker_init_fn": seed_worker,
    }
    if dataloader_kwargs.get("batch_sampler") is not None:  # it decides batches alone
        for key in ("batch_size", "shuffle", "sampler", "drop_last"):
            kwargs.pop(key)
    kwargs.update(dataloader_kwargs)
    loader = JasperLoader(dataset, worker_mode=worker_mode, **kwargs)
    loader.dataset_obj = dataset
    loader.sampler_obj = sampler if distributed else None
    log.info(
        "Created %s DataLoader: %d samples, batch_size=%s, num_workers=%d (%s), distributed=%s",
        split,
        len(dataset),
        batch_size,
        num_workers,
        "threads" if worker_mode == "thread" else "processes",
        distributed,
    )
    return loader


def _check_cache_limit(remote: Any, limit: int, world: int, sampler: Any, batch: int) -> None:
    """Refuse a node cache budget below what the batches in flight need, or below this node's
    share without windowed epochs (NOTE [eviction])."""
    from jasper_mmap.loading.fetching import AHEAD
    from jasper_mmap.remote.cache import fixed_bytes

    cat = remote.catalog
    fixed = fixed_bytes(cat)
    unit = remote.unit_bytes(remote.generation)
    units = max(1, int(cat["units"]))
    part = getattr(sampler, "partition", None) if sampler is not None else None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    share = units
    if part is not None and part.parts % world == 0:
        share = min(units, -(-units * local // world) + part.parts)
    in_flight = min(units, AHEAD * batch * local)  # uniform order: a unit a sample
    if part is not None and part.every_epoch:  # the batches read ahead span their samples'
        # units in windows of ``window`` units: at most two partial windows beyond them
        spanned = -(-AHEAD * batch * units // max(1, part.m * part.parts))
        in_flight = min(units, (2 * part.window + spanned) * local)
    in_flight = min(in_flight, share)  # never more than the node ever reads
    numbers = (
        f"{_size(fixed)} of files every node keeps whole, units of {_size(unit)}: "
        f"{share} for this node's share, {in_flight} in flight"
    )
    if limit < fixed + share * unit and not (part is not None and part.every_epoch):
        raise ValueError(
            f"{remote.url}: cache_limit={limit} ({_size(limit)}) is below this node's share "
            f"({_size(fixed + share * unit)}: {numbers}), so units will be evicted and "
            f"fetched again each epoch; pass window_every_epoch=True on every node (the order "
            f"must be the same everywhere) so each epoch goes through a window of units at a "
            f"time, or raise cache_limit."
        )
    if limit < fixed + in_flight * unit:
        raise ValueError(
            f"{remote.url}: cache_limit={limit} ({_size(limit)}) is below what this node's "
            f"cache needs at least ({_size(fixed + in_flight * unit)}: {numbers}). Raise "
            f"cache_limit, or convert with --dtype bfloat16 (half the bytes)."
        )


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def split_pairs(dataset: Any) -> np.ndarray:
    """The pair rows of the dataset's split, in split order."""
    return dataset.store.gather_unchecked(f"{dataset.split}_idx", np.arange(len(dataset)))


def store_unit_rows(dataset: Any) -> int:
    """The unit a local store would be uploaded with (NOTE [remote catalog])."""
    from jasper_mmap.format.spec import NEGATIVE_ARRAYS
    from jasper_mmap.remote.catalog import PARTIAL_NAMES, default_unit_rows

    store = dataset.store
    entries = {n: store.entry(n) for n in PARTIAL_NAMES - set(NEGATIVE_ARRAYS) if store.has(n)}
    entries |= {n: store.entry(n, store.generation) for n in NEGATIVE_ARRAYS}
    return default_unit_rows(store.path, entries, store.backend)


def _world(replicas: int | None, rank: int | None) -> tuple[int, int]:
    """``(num_replicas, rank)``: as given, else torch.distributed's (as DistributedSampler)."""
    if replicas is None or rank is None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "distributed=True needs torch.distributed's default process group "
                "(init_process_group), or num_replicas= and rank= passed to create_loader"
            )
        replicas = dist.get_world_size() if replicas is None else replicas
        rank = dist.get_rank() if rank is None else rank
    return replicas, rank


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Set the epoch of the loader's dataset (curriculum) and of its sampler (shuffling).

    Right after ``load_state_dict`` (no batch handed out since), the restored epoch keeps the
    restored position and control state (assigned probabilities, forced variant): a loop that
    calls ``set_epoch(loader, epoch)`` at each epoch's start resumes exactly (NOTE [resuming]).
    """
    dataset = getattr(loader, "dataset_obj", loader.dataset)
    sampler = getattr(loader, "sampler_obj", None) or loader.sampler
    restored = (
        getattr(loader, "_resume_pending", False)
        and getattr(sampler, "epoch", None) == epoch
        and dataset._control.snapshot().epoch == epoch
    )
    if not restored:
        dataset.set_epoch(epoch)
        if hasattr(loader, "_resume_pending"):
            loader._resume_pending = False
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


#: checked as the in-RAM dataset checks them (tiers are not: it never did)
_RANGES = {
    "relevance": (0.0, 1.0),
    "centroid_distance": (0.0, 2.0),
    "steering_variant": (0, 3),
}
_DTYPES = {
    "cluster_id": torch.int64,
    "steering_variant": torch.int64,
    "negative_tiers": torch.int64,
}


def _rows(mask: torch.Tensor) -> list[int]:
    return torch.nonzero(mask.reshape(mask.shape[0], -1).any(dim=1)).flatten()[:5].tolist()


def _cluster_count(dataset: Any) -> int | None:
    """The number of clusters: our dataset's store counts them (also after close(), when its
    tables are gone); another dataset's ``centroid_embs`` (None: not known)."""
    counts = None
    if getattr(dataset, "store_path", None) is not None:  # ours: the manifest's counts
        counts = getattr(getattr(dataset, "store", None), "counts", None)
    if isinstance(counts, Mapping) and "n_clusters" in counts:
        return int(counts["n_clusters"])
    try:
        return len(dataset.centroid_embs)
    except (AttributeError, TypeError):
        return None


def validate_first_batch(loader: DataLoader) -> bool:
    """Fetch the first batch and check keys, shapes, dtypes, NaN/Inf (in every floating
    output) and value ranges.

    Returns:
        True (the summary is :func:`first_batch_summary`).

    Raises:
        BatchValidationError: an AssertionError (and ValueError) naming the key and the first
            offending rows; also when the loader yields no batch at all, when the first
            batch is empty, is not a mapping, holds something other than tensors (a numpy
            array) or single samples (``batch_size=None``).
    """
    first_batch_summary(loader)
    return True


def _peek(loader: DataLoader) -> Any:
    """The first batch of a new iterator of ``loader``, leaving a resumable loader where it
    was: a pending resume (load_state_dict) and state_dict() are as before the peek, so the
    training loop that follows starts where it would have (NOTE [resuming])."""
    sampler = getattr(loader, "sampler", None)
    if not isinstance(loader, JasperLoader) or not isinstance(sampler, _Resumable):
        return next(iter(loader))
    saved = (
        sampler.epoch,
        sampler.cursor,
        sampler._handed_out,
        loader._position,
        loader._resume_pending,
    )
    it = iter(loader)
    try:
        return next(it)
    finally:
        if hasattr(it, "close"):
            it.close()
        (
            sampler.epoch,
            sampler.cursor,
            sampler._handed_out,
            loader._position,
            loader._resume_pending,
        ) = saved


def first_batch_summary(loader: DataLoader) -> dict[str, Any]:
    """:func:`validate_first_batch`'s checks; returns batch size, embedding dim, n_neg and the
    variant counts of the first batch.

    Raises:
        BatchValidationError: as :func:`validate_first_batch`.
    """
    dataset = getattr(loader, "dataset_obj", getattr(loader, "dataset", None))
    origin = getattr(dataset, "store_path", None)
    where = f"{origin}: " if origin is not None else ""
    try:
        batch = _peek(loader)
    except StopIteration:
        n = len(dataset) if hasattr(dataset, "__len__") else "?"
        raise BatchValidationError(
            f"{where}the loader yields no batches (the dataset has {n} samples; "
            f"batch_size={getattr(loader, 'batch_size', '?')}, "
            f"drop_last={getattr(loader, 'drop_last', '?')}), so there is no "
            f"first batch to check. Use a batch_size of at most the split's size, "
            f"drop_last=False, or a split that has samples."
        ) from None
    keys_fix = (
        "Return the nine keys from the collate function (create_loader's collate_batch does)."
    )
    if not isinstance(batch, Mapping):
        raise BatchValidationError(
            f"{where}the first batch should be a mapping of the keys {list(BATCH_KEYS)}, but "
            f"got a {type(batch).__name__}. {keys_fix}"
        )
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        have = sorted(repr(k) for k in batch)[:20]  # any keys: repr, never compared raw
        raise BatchValidationError(
            f"{where}batch is missing keys {missing}; it has [{', '.join(have)}]. {keys_fix}"
        )
    for key in BATCH_KEYS:
        t = batch[key]
        if not isinstance(t, torch.Tensor):
            kind = "a numpy array" if isinstance(t, np.ndarray) else f"a {type(t).__name__}"
            raise BatchValidationError(
                f"{where}{key} should be a torch.Tensor, but got {kind}, not a tensor. Return "
                f"tensors from the collate function (torch.from_numpy for arrays)."
            )
    for key, ndim in (("question_emb", 2), ("negative_tiers", 2)):
        if batch[key].ndim != ndim:
            raise BatchValidationError(
                f"{where}{key} should have {ndim} dimensions (batch first), but got shape "
                f"{tuple(batch[key].shape)}: the loader yields single samples, not batches "
                f"(batch_size=None?). Use a batch_size (create_loader's loaders have one)."
            )
    b, d = batch["question_emb"].shape
    if b == 0:
        raise BatchValidationError(
            f"{where}the first batch holds no samples (shape {tuple(batch['question_emb'].shape)})"
            f", so nothing in it can be checked. Make the sampler's batches non-empty."
        )
    n_neg = batch["negative_tiers"].shape[1]
    shapes = {
        "question_emb": (b, d),
        "target_source_emb": (b, d),
        "steering": (b, d),
        "negative_embs": (b, n_neg, d),
        "cluster_id": (b,),
        "relevance": (b,),
        "centroid_distance": (b,),
        "steering_variant": (b,),
        "negative_tiers": (b, n_neg),
    }
    n_clusters = _cluster_count(dataset)
    fix = "Check the source arrays (`jasper-mmap verify STORE`), fix them and convert again."
    for key, shape in shapes.items():
        t = batch[key]
        if tuple(t.shape) != shape:
            raise BatchValidationError(
                f"{where}{key} should have shape {shape}, but got {tuple(t.shape)}. {fix}"
            )
        want = _DTYPES.get(key, torch.float32)
        if t.dtype != want:
            raise BatchValidationError(f"{where}{key} should be {want}, but got {t.dtype}. {fix}")
        # every floating output, not only the embeddings: NaN fails every range comparison
        # below, so a NaN relevance or distance would pass them
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise BatchValidationError(
                f"{where}{key} holds NaN/Inf in batch rows {_rows(~torch.isfinite(t))}. {fix}"
            )
        lo, hi = _RANGES.get(key, (None, None))
        if key == "cluster_id" and n_clusters is not None:
            lo, hi = 0, n_clusters - 1
        if lo is not None and ((t < lo - 1e-4) | (t > hi + 1e-4)).any():
            bad = (t < lo - 1e-4) | (t > hi + 1e-4)
            raise BatchValidationError(
                f"{where}{key} should be in [{lo}, {hi}], but batch rows {_rows(bad)} hold "
                f"{t[bad][:5].tolist()}. {fix}"
            )
    counts = torch.bincount(batch["steering_variant"], minlength=4).tolist()
    summary = {"batch_size": b, "embedding_dim": d, "n_neg": n_neg, "variant_counts": counts}
    log.info("first batch is valid: %s", summary)
    return summary
