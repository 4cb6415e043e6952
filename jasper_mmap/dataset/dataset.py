"""``JASPERSteeringDataset``: the in-RAM dataset's API, reading rows lazily from a store.

The constructor, attributes, curriculum, errors and logging are those of the in-RAM dataset
(RAG_supporters' ``JASPERSteeringDataset``), so a user changes one import. What differs on
purpose is listed in the README ("Switching from the in-RAM dataset"): rows are read through
memory maps by default, a batch is one vectorized gather, and the steering draw is a pure
function of (seed, epoch, sample) (NOTE [counter-based steering RNG] in jasper_mmap/steering.py). Changes
reach DataLoader workers through the control block (NOTE [worker start-up] in jasper_mmap/dataset/control.py).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jasper_mmap.dataset.batches import BatchEngine, BatchPlan, SampleBatch, UnitsEvicted
from jasper_mmap.dataset.control import ControlBlock
from jasper_mmap.dataset.outputs import BufferPool
from jasper_mmap.dataset.preload import Preloaded, memory_mode
from jasper_mmap.dataset.resolve import resolve_dataset
from jasper_mmap.dataset.tables import (
    TABLES,
    KeywordLists,
    table_array,
    table_tensor,
    tensor_of,
)
from jasper_mmap.errors import (
    ArtifactMissingError,
    DeviceUnavailableError,
    SampleIndexTypeError,
)
from jasper_mmap.format.config import read_store_config
from jasper_mmap.format.spec import CONFIG, NEGATIVE_ARRAYS, SPLITS
from jasper_mmap.remote import RemoteMirror, is_remote
from jasper_mmap.remote.cache import patiently
from jasper_mmap.remote.catalog import PARTIAL_NAMES
from jasper_mmap.steering import (
    VARIANTS,
    SteeringSchedule,
    check_epoch,
    check_seed,
    distribution,
    variant_index,
)
from jasper_mmap.stores import Store, open_store

__all__ = ["JASPERSteeringDataset"]

log = logging.getLogger(__name__)


_OPENING = threading.Lock()


def _after_fork_in_child() -> None:
    global _OPENING
    _OPENING = threading.Lock()  # another thread of the parent may have held it at the fork


os.register_at_fork(after_in_child=_after_fork_in_child)


class JASPERSteeringDataset(BatchEngine, torch.utils.data.Dataset):
    """Pre-computed (question, steering, target, negatives) samples, read lazily from a store.

    Args:
        dataset_dir: a store made by ``convert-pt``, or a dataset directory of ``.pt`` files or
            an upstream ``dataset.h5`` (then converted once into a store kept beside it and
            reused while the files are unchanged; see :func:`jasper_mmap.dataset.resolve.resolve_store`).
        split: ``"train"``, ``"val"`` or ``"test"``.
        epoch: initial epoch of the steering curriculum.
        device: ``None``/``"cpu"``: batches are CPU tensors. A CUDA device: the split is
            preloaded onto it (:mod:`jasper_mmap.dataset.preload`) and batches are gathered there.
        storage_format: the source files of a dataset directory: ``"auto"`` (``dataset.h5``
            when it exists and h5py is installed, else the ``.pt`` files), ``"pt"`` or
            ``"hdf5"``. :attr:`storage_format` says which was used.
        use_mmap: ``None``/``True``: read rows through memory maps (the default; the in-RAM
            dataset decided by size). ``False``: hold the split in RAM (a CPU preload).
            :attr:`use_mmap` says which is in effect.
        seed: seed of the steering draw; default ``config.json``'s ``random_seed``, else 42.
        cache_dir: where to keep the store converted from a dataset directory.
        store_format: backend of that store (``"safetensors"`` or ``"zarr"``); default: the
            cached store's, else safetensors. A cached store of the other backend is refused
            (``StoreFormatError``), never replaced: it may hold published negatives.
        report_generation: add a tenth key, ``negatives_generation`` ([B] int64), naming the
            negatives generation each batch was served from (NOTE [hot reload]).
        preload: same as ``use_mmap=False`` (kept for older code).
        preload_budget_bytes: refuse a preload needing more (default for CUDA: the device's
            free memory minus a margin).
        check_sources: refuse a store whose source directory still exists and changed since
            conversion (``StoreStaleError``); False reads it as it is.
        allow_nonfinite: when a dataset directory is converted, accept NaN/Inf embedding
            rows (as ``convert-pt --allow-nonfinite``).

    Raises:
        ValueError: (also ``FileNotFoundError`` where a file is missing) the directory, its
            config, its data files or the split do not exist; ``storage_format`` is invalid or
            its files are absent; the data are invalid (indices out of range, ...).
    """

    def __init__(
        self,
        dataset_dir: str | Path,
        split: str = "train",
        epoch: int = 0,
        device: str | torch.device | None = None,
        storage_format: str = "auto",
        use_mmap: bool | None = None,
        *,
        seed: int | None = None,
        cache_dir: str | Path | None = None,
        store_format: str | None = None,
        report_generation: bool = False,
        preload: bool | None = None,
        preload_budget_bytes: int | None = None,
        check_sources: bool = True,
        allow_nonfinite: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(
                f"Split file not found: {_shown_path(dataset_dir)}/{split}_idx.pt. Valid splits "
                f"are: train, val, test (got split={split!r})"
            )
        self.split = split
        self.url: str | None = None
        self._remote: RemoteMirror | None = None
        if is_remote(dataset_dir):  # NOTE [node cache]: read through this node's mirror
            self.url = str(dataset_dir).rstrip("/")
            self._remote = RemoteMirror(self.url, cache_dir, storage_options)
            dataset_dir, cache_dir, check_sources = self._remote.open(), None, False
        resolved = resolve_dataset(  # refuses what is not a path, naming it
            dataset_dir,
            cache_dir,
            store_format,
            check_sources,
            storage_format=storage_format,
            convert_options={"allow_nonfinite": allow_nonfinite},
        )
        self.dataset_dir = Path(os.fsdecode(dataset_dir))  # a path (resolve_dataset checked)
        self.store_path, self.storage_format = resolved.store, resolved.storage_format
        self._source_dir = resolved.source_dir  # the dataset directory it follows, if any
        self._store: Store | None = open_store(self.store_path, resolved.manifest)
        self._len = self._split_length(self._store.manifest)
        self.config = read_store_config(self.store_path)
        if seed is not None:
            self.seed = check_seed(seed, "seed=", "Pass a seed in that range.")
        else:  # the config of a store converted before the converter bounded it, too
            origin = self._config_origin()
            self.seed = check_seed(
                self.config.get("random_seed", 42),
                f"{origin}: random_seed",
                "Fix random_seed in that config.json (or pass seed=).",
            )
        self.schedule = SteeringSchedule.from_config(self.config, self._config_origin())
        self.device = torch.device(device if device is not None else "cpu")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"device={str(device)!r} was asked for, but CUDA is not available to this "
                f"process (torch {torch.__version__}). Pass device=None for the memory-mapped "
                f"CPU dataset (or use_mmap=False to hold the split in RAM), or run on a "
                f"machine with a CUDA GPU and a CUDA build of torch."
            )
        self.preload = memory_mode(self.device, use_mmap, preload)
        self.use_mmap = not self.preload
        self.preload_budget_bytes = preload_budget_bytes
        self.report_generation = report_generation
        self._tables: dict[str, Any] = {}
        self._pool = BufferPool()  # NOTE [recycled batch buffers]; one per process
        self._epoch_probs: dict[int, np.ndarray] = {}  # schedule.probs(epoch), checked once
        self._closed = False
        self._preloaded: Preloaded | None = None
        if self.preload:
            self._fetch_split(self._store.generation)
            self._preloaded = Preloaded(self._store, split, self.device, preload_budget_bytes)
        self._control = ControlBlock(0, self._store.generation)
        self._apply_epoch(epoch)  # logged in the init line below, as the in-RAM dataset does
        log.info(
            "Dataset initialized: %d samples, embedding_dim=%d, n_neg=%d, device=%s, "
            "memory=%.1f MB (%s, %s split of %s)",
            self._len,
            self.embedding_dim,
            self.n_neg,
            self.device,
            self.memory_usage_mb,
            "memory-mapped" if self.use_mmap else "preloaded",
            split,
            self.dataset_dir,
        )

    def _fetch_split(self, generation: int) -> None:
        """A dataset on object storage: every unit of the split in this node's mirror (a
        preload or a whole table reads them all)."""
        if self._remote is not None:
            rows = self.store.gather_unchecked(f"{self.split}_idx", np.arange(self._len))
            self._remote.prefetch(rows, generation)

    def _split_length(self, manifest: dict[str, Any]) -> int:
        entry = manifest["arrays"].get(f"{self.split}_idx")
        if entry is None:
            raise ArtifactMissingError(
                f"Split file not found: {self.dataset_dir / f'{self.split}_idx.pt'} (the store "
                f"{self.store_path} has splits {sorted(manifest.get('splits', {}))}). Add "
                f"{self.split}_idx.pt to the dataset directory, or use another split."
            )
        return int(entry["shape"][0])

    # -- the in-RAM dataset's attributes ---------------------------------------------------
    @property
    def store(self) -> Store:
        """The store, opened lazily in this process (once, also when threads race here)."""
        store = self._store
        if store is None:
            with _OPENING:
                if self._store is None:
                    self._store = open_store(self.store_path)
                store = self._store
        return store

    @property
    def embedding_dim(self) -> int:
        return int(self.store.counts["embedding_dim"])

    @property
    def n_neg(self) -> int:
        return int(self.store.counts["n_neg"])

    @property
    def epoch(self) -> int:
        """The curriculum epoch (same as :attr:`current_epoch`)."""
        return self._control.snapshot().epoch

    @property
    def current_epoch(self) -> int:
        """The curriculum epoch; assigning it is :meth:`set_epoch`."""
        return self.epoch

    @current_epoch.setter
    def current_epoch(self, epoch: int) -> None:
        self.set_epoch(epoch)

    @property
    def steering_probs(self) -> dict[str, float]:
        """Variant probabilities in effect: the curriculum's at the current epoch (the in-RAM
        dataset's formula, as it computes them), or those assigned since the last
        :meth:`set_epoch`. A forced variant (:meth:`force_steering`) overrides both."""
        snap = self._control.snapshot()
        if snap.override is not None:
            return dict(zip(VARIANTS, snap.override.tolist(), strict=True))
        return self.schedule.as_dict(snap.epoch)

    @steering_probs.setter
    def steering_probs(self, probs: dict[str, float]) -> None:
        where = f"steering_probs assigned to the {self.split} dataset"
        fix = "Assign probabilities that are finite, non-negative and sum to 1."
        self._control.set_override(distribution(probs, where, fix))
        log.info("Steering probabilities set to %s until the next set_epoch", _fmt(probs))

    @property
    def memory_usage_mb(self) -> float:
        """MB this object holds in this process's own memory (not bytes mapped).

        Rows read through the memory maps live in the page cache, shared and evictable, and are
        not counted; with memory-mapped reading this is the control block and the small table
        attributes read so far (copied on first access; NOTE [writable table memory] in
        tables.py). With a preload it adds the bytes of the preloaded tensors, on
        :attr:`device`.
        """
        held = self._control.nbytes
        held += sum(getattr(t, "_table_owned", 0) for t in self._tables.values())
        if self._preloaded is not None:
            held += self._preloaded.nbytes
        return held / 2**20

    def _config_origin(self) -> str:
        """The file the config came from, for messages: the dataset directory's own
        ``config.json`` (or its ``dataset.h5``) when the store is a copy made from one, since a
        fix belongs there (the copy is rebuilt from it), else the store's."""
        if self._source_dir is not None:
            for name in (CONFIG, "dataset.h5"):
                if (self._source_dir / name).is_file():
                    return str(self._source_dir / name)
        return str(self.store_path / CONFIG)

    def _table(self, attr: str) -> Any:
        """Table attribute ``attr`` (see :mod:`jasper_mmap.dataset.tables`), made on first access."""
        if self._closed:
            raise AttributeError(
                f"{type(self).__name__}.{attr}: the tables were released by close(); "
                f"open the dataset again to read them"
            )
        generation = self._control.snapshot().generation
        key = (attr, generation) if attr in ("hard_negatives", "negative_tiers") else attr
        if key not in self._tables:
            self._tables[key] = self._make_table(attr, generation)
        return self._tables[key]

    def _make_table(self, attr: str, generation: int) -> Any:
        store = self.store
        if attr == "pair_keyword_ids":
            return KeywordLists(  # NOTE [writable table memory]: its arrays are public too
                table_array(store, "pair_keyword_offsets", attr=attr, lazy=True),
                table_array(store, "pair_keyword_values", attr=attr, lazy=True),
            )
        name = TABLES[attr] or f"{self.split}_idx"
        if name in ("hard_negatives", "negative_tiers"):
            generation = store.serve(generation)
        if self._remote is not None and name in PARTIAL_NAMES:  # NOTE [eviction]
            t = tensor_of(self._checked_copy(name, generation), store, name, generation, attr)
        else:
            t = table_tensor(store, name, generation, attr)
        return t.to(self.device) if self.device.type != "cpu" else t

    def _checked_copy(self, name: str, generation: int) -> np.ndarray:
        """A pair-keyed table of a dataset on object storage, copied out of the node cache
        a few units at a time, each copy checked against eviction (NOTE [eviction]): never a
        view of units another process may evict."""
        store, remote = self.store, self._remote
        src = store.raw(name, generation if name in NEGATIVE_ARRAYS else None)
        out = np.empty(src.shape, dtype=src.dtype)
        step = remote.unit_rows * 4
        for lo in range(0, src.shape[0], step):
            hi = min(src.shape[0], lo + step)
            for _ in patiently():
                stamp = remote.ensure(np.arange(lo, hi), generation)
                out[lo:hi] = src[lo:hi]
                if remote.unchanged(stamp):
                    break
            else:
                raise remote.evicted_error(f"rows {lo}-{hi} of {name}", "copied")
        return out

    def __len__(self) -> int:
        return self._len

    # -- control -------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the curriculum epoch (drops assigned probabilities); reaches DataLoader
        workers at their next batch.

        Raises:
            ConfigError: the curriculum gives probabilities the draw cannot use at ``epoch``.
        """
        epoch = self._apply_epoch(epoch)
        log.info("Set epoch %d, steering probs: %s", epoch, _fmt(self.schedule.as_dict(epoch)))

    def _apply_epoch(self, epoch: int) -> int:
        """:meth:`set_epoch` without its log line (construction logs its own)."""
        epoch = check_epoch(epoch, f"{self.dataset_dir}")
        self.schedule.probs(epoch)  # refuse now, not at the first batch
        self._control.set(epoch=epoch)
        self._control.set_override(None)
        return epoch

    def force_steering(self, variant: str | None) -> None:
        """Serve every sample with ``variant`` ("zero", "centroid", "keyword", "residual");
        ``None`` restores the stochastic draw. Reaches workers at their next batch."""
        try:
            index = variant_index(variant)
        except ValueError:
            raise ValueError(
                f"Invalid steering variant: {variant!r}. Must be one of: zero, centroid, "
                f"keyword, residual (or None)"
            ) from None
        self._control.set(forced=index)
        if variant is None:
            log.info("Restored stochastic steering selection")
        else:
            log.info("Forced steering variant: %s", variant)

    @property
    def negatives_generation(self) -> int:
        """The negatives generation batches are served from (after the next batch starts)."""
        return self._control.snapshot().generation

    def reload_negatives(self) -> int:
        """Pick up new hard negatives; every worker uses them from its next batch.

        For a dataset opened from a dataset directory, negatives rewritten since they were last
        taken in (``hard_negatives.pt``/``negative_tiers.pt``, or ``dataset.h5`` in ``hdf5``
        mode) are first validated and published as a new generation of its store (streaming),
        unless a newer publication is live. Then the store's newest published generation (see
        :func:`jasper_mmap.publish_negatives`) becomes the one batches are served from.

        Returns:
            The generation now in use.

        Raises:
            ArtifactError: the new negatives are invalid; the old generation stays in use.
        """
        from jasper_mmap.dataset.resolve import refresh_negatives

        log.info("Reloading hard negatives from disk...")
        if self._source_dir is not None:
            refresh_negatives(self._source_dir, self.store_path, self.storage_format)
        if self._remote is not None:  # the newest generation on object storage, mirrored
            self._remote.sync_negatives()
        # leased at once (NOTE [generation leases]); one removed meanwhile: the live one
        generation = self.store.serve(self.store.live_generation())
        self._control.set(generation=generation)
        if self._preloaded is not None and self._preloaded.generation != generation:
            self._fetch_split(generation)
            self._preloaded.refresh_negatives(self.store)
        log.info("Hard negatives reloaded successfully (generation %d)", generation)
        return generation

    def use_negatives_generation(self, generation: int) -> int:
        """Serve negatives generation ``generation`` from the next batch (a resumed run's).

        Raises:
            StoreNotFoundError: that generation was removed from the store (collected after
                newer ones were published); resume with ``negatives="live"``.
        """
        from jasper_mmap.errors import StoreNotFoundError

        try:
            if self._remote is not None:
                self._remote.mirror_generation(int(generation))
            self.store.use_generation(int(generation))
        except StoreNotFoundError as e:
            raise StoreNotFoundError(
                f"{self.store_path}: negatives generation {generation} (the one the state was "
                f"saved with) is no longer in the store ({e}). Resume with "
                f'loader.load_state_dict(state, negatives="live") to use the live generation.'
            ) from None
        self._control.set(generation=int(generation))
        if self._preloaded is not None and self._preloaded.generation != generation:
            self._fetch_split(generation)
            self._preloaded.refresh_negatives(self.store)
        return int(generation)

    def get_batch(
        self, indices: Sequence[int] | np.ndarray, pin_memory: bool = False
    ) -> dict[str, torch.Tensor]:
        """The batch of samples ``indices``: nine keys, one vectorized gather per array (two
        for all the embedding rows where the store joins them: NOTE [joined rows]).

        With ``pin_memory`` the CPU outputs are gathered straight into pinned memory (for
        ``.cuda(non_blocking=True)``); it needs CUDA. Safe to call from several threads.

        Raises:
            SampleIndexError: (an IndexError) an index is negative or not below ``len(self)``.
            SampleIndexTypeError: (a TypeError) the indices are not integers (a boolean
                mask, floats): never cast, as ``dataset[i]`` refuses them.
        """
        idx = self._check_indices(indices)
        snap = self._control.snapshot()  # one consistent reading for the whole batch
        if self.preload:
            return self._preloaded_batch(idx, snap)
        # NOTE [generation leases]: the batch reads one generation, leased until it is done;
        # its small outputs are read after its rows, into recycled buffers
        for _ in patiently():
            with self.store.pinned(snap.generation, serve=True) as generation:
                plan = self._plan([idx], idx, snap, generation, small=False)
                try:
                    return self._serve(plan, 0, pin_memory)
                except UnitsEvicted:  # NOTE [eviction]: gathered again, the units refetched
                    continue
        raise self._remote.evicted_error("the units of a batch", "gathered")

    def plan_batches(self, batches: Sequence[Sequence[int] | np.ndarray]) -> BatchPlan | None:
        """The bookkeeping of the consecutive ``batches`` (each a batch of indices) done at
        once, for :meth:`planned_batch` (NOTE [batch plans]). None where batches are better
        served one by one: a preloaded dataset, a subclass that changes how batches are made,
        a store read ahead from disk (the bookkeeping reads wait on the disk there, and the
        gather threads wait on it in parallel), or an error while planning, such as an index
        out of range or a read error (each batch then raises its own when served, in order).
        """
        if (
            self.preload
            or getattr(self.get_batch, "__func__", None) is not _OWN_GET_BATCH
            or getattr(self.__getitems__, "__func__", None) is not _OWN_GETITEMS
            or self.store.reads_ahead
        ):
            return None
        try:
            # each batch as an array, all range-checked at once (a bad index: see above)
            checked = [self._as_indices(b) for b in batches]
            idx = self._check_indices(checked[0] if len(checked) == 1 else np.concatenate(checked))
            snap = self._control.snapshot()
            # NOTE [generation leases]: the plan reads one generation, leased until it is made
            with self.store.pinned(snap.generation, serve=True) as generation:
                return self._plan(checked, idx, snap, generation)
        except Exception:  # a bad index, a read error: raised again by its own batch, in order
            log.debug(
                "no plan for %d batches; serving them one by one", len(batches), exc_info=True
            )
            return None

    def planned_batch(self, plan: BatchPlan, j: int, pin_memory: bool = False) -> SampleBatch:
        """Batch ``j`` of ``plan``: what ``__getitems__(batches[j], pin_memory)`` returns now.

        From the plan while nothing was changed since it was made (``set_epoch``,
        ``force_steering``, assigned ``steering_probs``, ``reload_negatives``); otherwise made
        anew from the control block as it is now."""
        version = self._control.version
        if version != plan.version:
            return self.__getitems__(plan.batches[j], pin_memory)
        try:
            return SampleBatch(self._serve(plan, j, pin_memory), version, plan.batches[j])
        except UnitsEvicted:  # NOTE [eviction]: made anew, its units fetched again
            return self.__getitems__(plan.batches[j], pin_memory)

    def iter_batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of the whole split without a DataLoader: the fast path for preloaded data.

        The order is a permutation drawn from (``seed`` or the dataset's seed, current epoch)
        when ``shuffle``; each batch is one :meth:`get_batch`.
        """
        n = self._len
        if shuffle:
            if seed is not None:
                seed = check_seed(seed, "iter_batches(seed=)", "Pass a seed in that range.")
            key = (seed if seed is not None else self.seed) * 1_000_003 + self.epoch
            # the same order as before for every key torch took; larger ones wrap
            g = torch.Generator().manual_seed(key if -(2**63) <= key < 2**64 else key % 2**64)
            order = torch.randperm(n, generator=g).numpy()
        else:
            order = np.arange(n)
        stop = n - n % batch_size if drop_last else n
        for lo in range(0, stop, batch_size):
            yield self.get_batch(order[lo : lo + batch_size])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_preloaded"] = None  # rebuilt lazily (CPU) in the process that unpickles it
        state["_tables"] = {}
        return state

    def reserve_batch_buffers(self, batches: int) -> None:
        """Keep output buffers for ``batches`` CPU batches in flight at once (a loader calls
        this with its prefetch depth; NOTE [recycled batch buffers])."""
        self._pool.capacity = max(self._pool.capacity, batches)

    def __getitems__(self, indices: Sequence[int], pin_memory: bool = False) -> SampleBatch:
        """Batched fetch used by ``torch.utils.data.DataLoader`` (:meth:`get_batch`)."""
        version = self._control.version  # before: the batch is of this state or a later one
        return SampleBatch(self.get_batch(indices, pin_memory), version, indices)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        """One sample (shapes without the batch dimension); ``idx`` may be an int, a numpy
        integer or a 0-d integer tensor.

        Raises:
            IndexError: ``idx`` is negative or not below ``len(self)``.
            TypeError: ``idx`` is not an integer (:class:`SampleIndexTypeError`).
        """
        if isinstance(idx, torch.Tensor) and idx.ndim == 0:  # an integer dtype only
            if not (idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex()):
                idx = int(idx)
        if isinstance(idx, bool) or not isinstance(idx, int | np.integer):
            raise SampleIndexTypeError(
                f"{self.dataset_dir}: a sample index should be an int, but got "
                f"{type(idx).__name__} ({idx!r:.40}). Pass an int; use get_batch for many."
            )
        return SampleBatch(self.get_batch([int(idx)]))[0]

    # -- lifetime -------------------------------------------------------------------------------
    def _release(self) -> None:
        self._tables.clear()
        self._pool.clear()
        if self._store is not None:
            self._store.close()

    def close(self) -> None:
        """Release this process's maps, leases and preloaded tensors; the table attributes
        are gone until the dataset is used again (a batch reopens the maps)."""
        log.info(
            "Dataset closed. Split: %s, Device: %s, Memory: %.1f MB",
            self.split,
            self.device,
            self.memory_usage_mb,
        )
        self._release()
        self._preloaded = None
        self._closed = True

    def __enter__(self) -> JASPERSteeringDataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._release()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass

    def __repr__(self) -> str:
        return (
            f"JASPERSteeringDataset({str(self.dataset_dir)!r}, split={self.split!r}, len={self._len}, "
            f"epoch={self.epoch}, storage_format={self.storage_format!r}, use_mmap={self.use_mmap})"
        )

    @staticmethod
    def create_combined_splits(
        dataset_dir: str | Path,
        epoch: int = 0,
        device: str | torch.device | None = None,
        storage_format: str = "auto",
        use_mmap: bool | None = None,
        **kwargs: Any,
    ) -> dict[str, JASPERSteeringDataset]:
        """One dataset per split the dataset has (train, and val/test when they exist)."""
        first = JASPERSteeringDataset(
            dataset_dir, "train", epoch, device, storage_format, use_mmap, **kwargs
        )
        splits = {"train": first}
        for s in ("val", "test"):
            if first.store.has(f"{s}_idx"):
                splits[s] = JASPERSteeringDataset(
                    dataset_dir, s, epoch, device, storage_format, use_mmap, **kwargs
                )
        return splits

    @staticmethod
    def convert_pt_to_hdf5(dataset_dir: str | Path, compression: str | None = "gzip") -> Path:
        """Write the in-RAM dataset's ``dataset.h5`` from a ``.pt`` directory (streaming).

        Raises:
            ImportError: h5py is not installed (``pip install 'jasper_mmap[hdf5]'``).
        """
        from jasper_mmap.sources.hdf5.writer import convert_pt_to_hdf5

        return convert_pt_to_hdf5(dataset_dir, compression)


def _table_property(attr: str) -> property:
    return property(
        lambda self: self._table(attr),
        doc=f"``{attr}`` of the in-RAM dataset: a tensor that refuses in-place writes, in "
        f"memory of its own (see :mod:`jasper_mmap.dataset.tables`).",
    )


for _attr in TABLES:
    setattr(JASPERSteeringDataset, _attr, _table_property(_attr))


# how batches are made here: a dataset whose get_batch or __getitems__ is another function (a
# subclass, or a wrapper set on the instance or on this class) makes no plans
_OWN_GET_BATCH = JASPERSteeringDataset.get_batch


_OWN_GETITEMS = JASPERSteeringDataset.__getitems__


def _fmt(probs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={float(v):.2f}" for k, v in probs.items())


def _shown_path(value: object) -> str:
    """A dataset path as given, for a message (bytes decoded; anything else as its repr)."""
    try:
        return os.fsdecode(value)  # type: ignore[arg-type]
    except TypeError:
        return repr(value)
