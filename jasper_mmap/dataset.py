"""``JASPERSteeringDataset``: the in-RAM dataset's API, reading rows lazily from a store.

The constructor, attributes, curriculum, errors and logging are those of the in-RAM dataset
(RAG_supporters' ``JASPERSteeringDataset``), so a user changes one import. What differs on
purpose is listed in the README ("Switching from the in-RAM dataset"): rows are read through
memory maps by default, a batch is one vectorized gather, and the steering draw is a pure
function of (seed, epoch, sample) (NOTE [counter-based steering RNG] in steering.py). Changes
reach DataLoader workers through the control block (NOTE [worker start-up] in control.py).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._dtypes import entry_nbytes
from .buffers import BufferPool
from .control import ControlBlock, Snapshot
from .errors import (
    ArtifactMissingError,
    ConfigError,
    DeviceUnavailableError,
    SampleIndexError,
    SampleIndexTypeError,
)
from .files import read_json
from .layout import CONFIG, SPLITS
from .preload import Preloaded
from .resolve import resolve_dataset
from .steering import (
    VARIANTS,
    SteeringSchedule,
    check_epoch,
    check_seed,
    distribution,
    draw_variants,
    variant_index,
)
from .stores import Store, open_store
from .tables import TABLES, KeywordLists, table_array, table_tensor

__all__ = ["JASPERSteeringDataset", "SampleBatch", "BatchPlan", "BATCH_KEYS"]

log = logging.getLogger(__name__)

_OPENING = threading.Lock()


def _after_fork_in_child() -> None:
    global _OPENING
    _OPENING = threading.Lock()  # another thread of the parent may have held it at the fork


os.register_at_fork(after_in_child=_after_fork_in_child)

#: the nine keys of a batch, as the in-RAM dataset returns them
BATCH_KEYS = (
    "question_emb",
    "target_source_emb",
    "steering",
    "negative_embs",
    "cluster_id",
    "relevance",
    "centroid_distance",
    "steering_variant",
    "negative_tiers",
)
_STEERING_TABLES = {1: "steering_centroid", 2: "steering_keyword_weighted", 3: "steering_residual"}
_STEERING_NAMES = tuple(_STEERING_TABLES.values())  # variant v > 0 reads _STEERING_NAMES[v - 1]
_EMBEDDINGS = ("question_embs", "source_embs")  # read as one where joined: NOTE [joined rows]
_PAIR_ARRAYS = (
    "pair_index",
    "hard_negatives",
    "negative_tiers",
    "pair_cluster_id",
    "pair_relevance",
    "centroid_distances",
)


# NOTE [dense arrays]
# On a store larger than RAM the batch prefetch reads each row's pages (NOTE [batch prefetch]):
# one 4 KiB random read per page. Some arrays are read mostly whole over a pass anyway: the
# source table (1 + n_neg rows per sample), the question table, the per-pair arrays of a split
# that spans the store. Reading those in 1 MiB windows around the rows asked for turns ~50
# page reads into one read the disk serves at its bandwidth, and the windows stay in the page
# cache for the rest of the pass. An array counts as dense when a pass over the split
# references its rows at least DENSE_REFS_PER_WINDOW times per window (the cost of a window in
# page reads, measured on the benchmark disk), densest first, while the dense arrays together
# fit in half of RAM (beyond that, windows would be evicted before the pass used them). A
# window is asked for once per epoch and process: asking again for each row's pages costs a
# system call per page, which took the 32 GB pass from ~32k to ~12k samples/s; a window
# evicted within an epoch anyway (memory pressure from elsewhere) is read a page per fault.
# The steering tables (one row per sample, of one table in four) stay sparse.
# JASPER_MMAP_DENSE=off reads every array page by page. Measured by scripts/bench_large.py
# (README, "Larger than RAM").
DENSE_REFS_PER_WINDOW = 50


def dense_arrays(store: Store, split_len: int) -> frozenset[str]:
    """Arrays of ``store`` that a pass over ``split_len`` samples reads mostly whole."""
    from .stores.safetensors_store import DENSE_WINDOW, ram_bytes

    if os.environ.get("JASPER_MMAP_DENSE", "auto").lower() == "off":
        return frozenset()
    if store.advice != "random":
        return frozenset()  # cached (or not mapped): the batch prefetch does nothing
    refs = dict.fromkeys(_PAIR_ARRAYS, split_len)
    refs.update(question_embs=split_len, source_embs=split_len * (1 + store.counts["n_neg"]))
    sizes = {n: entry_nbytes(store.entry(n)) for n in refs}
    budget, dense = (ram_bytes() or 0) // 2, []
    for name in sorted(refs, key=lambda n: -refs[n] / max(sizes[n], 1)):
        windows = -(-sizes[name] // DENSE_WINDOW)
        if refs[name] >= DENSE_REFS_PER_WINDOW * windows and sizes[name] <= budget:
            dense.append(name)
            budget -= sizes[name]
    return frozenset(dense)


class SampleBatch(Sequence):
    """What ``__getitems__`` returns: a whole batch that also reads as a list of samples.

    ``batch["question_emb"]`` gives a key of the whole batch; ``batch[i]`` gives sample ``i``.
    ``create_loader``'s collate function returns :attr:`batch` as it is (the fast path); the
    default collate of a plain ``DataLoader`` iterates the samples and stacks them again.
    """

    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return int(self.batch["relevance"].shape[0])

    def __getitem__(self, i: int | str) -> Any:
        if isinstance(i, str):
            return self.batch[i]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return {k: v[i] for k, v in self.batch.items()}

    def keys(self):
        return self.batch.keys()


def _memory_mode(device: torch.device, use_mmap: bool | None, preload: bool | None) -> bool:
    """Whether the split is preloaded (True) or read through the memory maps (False)."""
    if use_mmap is not None and preload is not None and bool(use_mmap) == bool(preload):
        raise ValueError(
            f"use_mmap={use_mmap} and preload={preload} contradict each other; pass one "
            f"(use_mmap=False means the same as preload=True)"
        )
    if device.type != "cpu":
        if use_mmap:
            log.warning("use_mmap=True is ignored for device=%s: the split is preloaded", device)
        if preload is False:
            raise ValueError(
                f"device={device} needs the split preloaded (batches are gathered on the device)"
            )
        return True
    if preload is not None:
        return bool(preload)
    return use_mmap is False


class JASPERSteeringDataset(torch.utils.data.Dataset):
    """Pre-computed (question, steering, target, negatives) samples, read lazily from a store.

    Args:
        dataset_dir: a store made by ``convert-pt``, or a dataset directory of ``.pt`` files or
            an upstream ``dataset.h5`` (then converted once into a store kept beside it and
            reused while the files are unchanged; see :func:`jasper_mmap.resolve.resolve_store`).
        split: ``"train"``, ``"val"`` or ``"test"``.
        epoch: initial epoch of the steering curriculum.
        device: ``None``/``"cpu"``: batches are CPU tensors. A CUDA device: the split is
            preloaded onto it (:mod:`jasper_mmap.preload`) and batches are gathered there.
        storage_format: the source files of a dataset directory: ``"auto"`` (``dataset.h5``
            when it exists and h5py is installed, else the ``.pt`` files), ``"pt"`` or
            ``"hdf5"``. :attr:`storage_format` says which was used.
        use_mmap: ``None``/``True``: read rows through memory maps (the default; the in-RAM
            dataset decided by size). ``False``: hold the split in RAM (a CPU preload).
            :attr:`use_mmap` says which is in effect.
        seed: seed of the steering draw; default ``config.json``'s ``random_seed``, else 42.
        cache_dir: where to keep the store converted from a dataset directory.
        store_format: backend of that store (``"safetensors"`` or ``"zarr"``).
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
        store_format: str = "safetensors",
        report_generation: bool = False,
        preload: bool | None = None,
        preload_budget_bytes: int | None = None,
        check_sources: bool = True,
        allow_nonfinite: bool = False,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(
                f"Split file not found: {_shown_path(dataset_dir)}/{split}_idx.pt. Valid splits "
                f"are: train, val, test (got split={split!r})"
            )
        self.split = split
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
        self.config = _read_config(self.store_path)
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
        self.preload = _memory_mode(self.device, use_mmap, preload)
        self.use_mmap = not self.preload
        self.preload_budget_bytes = preload_budget_bytes
        self.report_generation = report_generation
        self._tables: dict[str, Any] = {}
        self._pool = BufferPool()  # NOTE [recycled batch buffers]; one per process
        self._epoch_probs: dict[int, np.ndarray] = {}  # schedule.probs(epoch), checked once
        self._closed = False
        self._preloaded: Preloaded | None = None
        if self.preload:
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
        """Table attribute ``attr`` (see :mod:`jasper_mmap.tables`), made on first access."""
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
        t = table_tensor(store, name, generation, attr)
        return t.to(self.device) if self.device.type != "cpu" else t

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
        from .resolve import refresh_negatives

        log.info("Reloading hard negatives from disk...")
        if self._source_dir is not None:
            refresh_negatives(self._source_dir, self.store_path, self.storage_format)
        # leased at once (NOTE [generation leases]); one removed meanwhile: the live one
        generation = self.store.serve(self.store.live_generation())
        self._control.set(generation=generation)
        if self._preloaded is not None and self._preloaded.generation != generation:
            self._preloaded.refresh_negatives(self.store)
        log.info("Hard negatives reloaded successfully (generation %d)", generation)
        return generation

    # -- reading -------------------------------------------------------------------------------
    def _as_indices(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """``indices`` as a flat int64 array, refused unless they are integers: booleans
        (anywhere in a list, or a 0-d tensor), floats, complex numbers, objects, a masked
        array or a ragged list are never cast (``dataset[i]`` refuses them too)."""
        if isinstance(indices, torch.Tensor):  # its dtype first: never cast, never .numpy()
            if indices.dtype == torch.bool or indices.is_floating_point() or indices.is_complex():
                self._not_integers(f"a {indices.dtype} tensor", indices.reshape(-1)[:3].tolist())
            indices = indices.detach().cpu().numpy()
        elif isinstance(indices, np.ma.MaskedArray):
            self._not_integers("a masked array (its mask would be ignored)", [])
        elif isinstance(indices, list | tuple):
            # the element types, not numpy's common type: [True, 1] would be an int array
            # (one C-level pass over the list, about as long as numpy's conversion of it)
            for t in set(map(type, indices)):
                if t is bool or not issubclass(t, int | np.integer) or issubclass(t, np.bool_):
                    bad = next(x for x in indices if type(x) is t)
                    self._not_integers(f"{t.__name__} values", [bad])
        try:
            arr = np.asarray(indices)
        except (ValueError, TypeError) as e:  # a ragged nesting of lists
            self._not_integers(f"a sequence numpy cannot read as an array ({e})", [])
        if arr.size and arr.dtype.kind not in "iu":
            if arr.dtype == object and isinstance(indices, list | tuple):  # ints past uint64
                self._out_of_range([x for x in arr.reshape(-1) if not 0 <= x < self._len])
            kind = "a boolean mask" if arr.dtype.kind == "b" else f"{arr.dtype} values"
            self._not_integers(kind, arr.reshape(-1)[:3].tolist())
        if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
            self._out_of_range(arr[arr >= self._len].tolist())  # before int64 wraps them
        return arr.astype(np.int64, copy=False).reshape(-1)

    def _not_integers(self, kind: str, examples: list) -> None:
        eg = f" (e.g. {examples!r:.80})" if examples else ""
        raise SampleIndexTypeError(
            f"{self.dataset_dir}: sample indices of the {self.split} split should be "
            f"integers, but got {kind}{eg}; they are never cast. Pass integer sample numbers: "
            f"`np.flatnonzero(mask)` for a mask, `idx.astype(np.int64)` (or `.long()`) for "
            f"floats you mean as integers, a flat list of ints."
        )

    def _out_of_range(self, bad: list) -> None:
        bad = [int(x) for x in bad[:5]]
        raise SampleIndexError(
            f"Index {bad[0] if len(bad) == 1 else bad} out of range [0, {self._len}) for "
            f"the {self.split} split of {self.dataset_dir}"
        )

    def _check_indices(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        idx = self._as_indices(indices)
        if idx.size and (idx.min() < 0 or idx.max() >= self._len):
            self._out_of_range(idx[(idx < 0) | (idx >= self._len)].tolist())
        return idx

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
        with self.store.pinned(snap.generation, serve=True) as generation:
            return self._serve(self._plan([idx], idx, snap, generation, small=False), 0, pin_memory)

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
            or self.store.advice == "random"
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
        if self._control.version != plan.version:
            return self.__getitems__(plan.batches[j], pin_memory)
        return SampleBatch(self._serve(plan, j, pin_memory))

    def _variants(self, pairs: np.ndarray, snap: Snapshot) -> np.ndarray:
        probs = snap.override
        if probs is None:  # the schedule is fixed: compute and check each epoch's once
            probs = self._epoch_probs.get(snap.epoch)
            if probs is None:
                probs = self._epoch_probs[snap.epoch] = self.schedule.probs(snap.epoch)
        return draw_variants(self.seed, snap.epoch, pairs, probs, snap.forced)

    def _dense_arrays(self, store: Store) -> frozenset[str]:
        """The arrays a pass over this split reads mostly whole (NOTE [dense arrays])."""
        dense = self.__dict__.get("_dense")
        if dense is None:
            dense = self._dense = dense_arrays(store, self._len)
        return dense

    def _joined(self, store: Store) -> tuple[int, int, np.ndarray] | None:
        """Where the question rows, the source rows and each steering table begin in the
        store's joined rows (NOTE [joined rows]); None unless both groups are joined float32."""
        joined = self.__dict__.get("_joined_rows", False)
        if joined is False:
            emb, steering = store.joined(_EMBEDDINGS), store.joined(_STEERING_NAMES)
            names = _EMBEDDINGS + _STEERING_NAMES
            joined = None
            if (
                emb is not None
                and steering is not None
                and all(store.entry(name)["stored_dtype"] == "float32" for name in names)
            ):
                joined = (emb[0], emb[1], np.asarray(steering, dtype=np.int64))
            self._joined_rows = joined
        return joined

    def _plan(
        self,
        batches: list[np.ndarray],
        idx: np.ndarray,
        snap: Snapshot,
        generation: int,
        small: bool = True,
    ) -> BatchPlan:
        """Everything of ``batches`` (checked indices; ``idx``: them concatenated) but the
        gathers of the embedding rows: the rows to read, the steering variants and (``small``)
        the small per-pair outputs. The caller leases the negatives ``generation`` (the one
        ``snap`` asks for, served)."""
        store = self.store
        bounds = list(itertools.accumulate((b.size for b in batches), initial=0))
        # each index array is range-checked once; every array of that length is read with
        # it (``take``): the pair-keyed arrays have n_pairs rows (schema, at open and publish)
        pairs = store.check_rows("pair_index", store.take(f"{self.split}_idx", idx))
        variants = self._variants(pairs, snap)
        # NOTE [batch prefetch], NOTE [dense arrays]: only a store read ahead gets the hints
        ahead, dense = store.advice == "random", self._dense_arrays(store)
        if ahead:
            chosen = {table: pairs[variants == v] for v, table in _STEERING_TABLES.items()}
            store.prefetch(
                {name: pairs for name in _PAIR_ARRAYS} | chosen, dense, snap.epoch, generation
            )
        qs = store.take("pair_index", pairs)
        negs = store.take("hard_negatives", pairs, generation=generation)
        k = negs.shape[1]
        # source rows: the targets, then the negatives (k a sample)
        targets = store.check_rows("source_embs", qs[:, 1])
        negatives = store.check_rows("source_embs", negs.reshape(-1))
        questions = store.check_rows("question_embs", qs[:, 0])
        if ahead:
            store.prefetch(
                {"question_embs": questions, "source_embs": np.concatenate([targets, negatives])},
                dense,
                snap.epoch,
                generation,
            )
        # each batch's rows of source_embs (targets, then k negatives a sample) for one gather;
        # where the store joins the embedding rows (NOTE [joined rows]), its questions too, all
        # moved into the joined rows, and the steering rows in the joined tables
        steering = zeros = None
        joined = self._joined(store)
        at_source = 0
        if joined is not None:
            at_question, at_source, at_table = joined
            zero = np.flatnonzero(variants == 0)
            steering = at_table[np.maximum(variants - 1, 0)] + pairs
            steering[zero] = 0  # zeroed after the gather: read the first row, a cached page
            cuts = np.searchsorted(zero, bounds)
            zeros = [
                zero[first:last] - lo
                for (first, last), lo in zip(itertools.pairwise(cuts), bounds[:-1], strict=True)
            ]
        parts = [(targets, 1, at_source), (negatives, k, at_source)]
        if joined is not None:
            parts.append((questions, 1, at_question))
        sources = _batch_rows(parts, bounds)
        outputs = None
        if small:
            outputs = {}
            for key, (name, shape, dtype) in _PAIR_KEYS.items():
                out = np.empty(shape(idx.size, k), _NP_DTYPES[dtype])
                outputs[key] = store.take(name, pairs, out, generation=generation)
        return BatchPlan(
            snap.version,
            generation,
            batches,
            bounds,
            k,
            pairs,
            variants,
            questions,
            sources,
            steering,
            zeros,
            outputs,
        )

    def _serve(self, plan: BatchPlan, j: int, pin_memory: bool) -> dict[str, torch.Tensor]:
        """Batch ``j`` of ``plan``: its embedding rows gathered, the rest taken from the plan."""
        lo, hi = plan.bounds[j], plan.bounds[j + 1]
        b, d, k = hi - lo, self.embedding_dim, plan.n_neg
        gather = _gatherer(self.store, plan.generation, pin_memory, self._pool)
        if plan.steering is not None:  # NOTE [joined rows]: one block, two gathers
            n, m = b * (1 + k), b * (2 + k)  # targets, negatives; questions; steering rows
            block, tensor = gather.block((m + b, d))
            self.store.take_joined(_EMBEDDINGS, plan.sources[j], block[:m])
            self.store.take_joined(_STEERING_NAMES, plan.steering[lo:hi], block[m:])
            if plan.zeros[j].size:
                block[m:][plan.zeros[j]] = 0
            if tensor is None:  # plain memory: a tensor over each slice is cheaper to make
                view = torch.from_numpy
                target, negatives = view(block[:b]), view(block[b:n].reshape(b, k, d))
                question, steering = view(block[n:m]), view(block[m:])
            else:  # pinned or shared: slices of the block's tensor keep what it is
                target, negatives = tensor[:b], tensor[b:n].view(b, k, d)
                question, steering = tensor[n:m], tensor[m:]
        else:
            rows = gather("source_embs", plan.sources[j], (b * (1 + k), d), torch.float32)
            target, negatives = rows[:b], rows[b:].view(b, k, d)
            question = gather("question_embs", plan.questions[lo:hi], (b, d), torch.float32)
            steering = gather.steering(plan.variants[lo:hi], plan.pairs[lo:hi], (b, d))
        out = {
            "question_emb": question,
            "target_source_emb": target,
            "steering": steering,
            "negative_embs": negatives,
            "steering_variant": gather.adopt(plan.variants[lo:hi]),
        }
        if plan.small is None:  # a plan of one batch, served under its lease (get_batch)
            for key, (name, shape, dtype) in _PAIR_KEYS.items():
                out[key] = gather(name, plan.pairs, shape(b, k), dtype)
        else:
            for key, values in plan.small.items():
                out[key] = gather.adopt(values[lo:hi])
        batch = {key: out[key] for key in BATCH_KEYS}
        if self.report_generation:
            batch["negatives_generation"] = torch.full((b,), plan.generation, dtype=torch.int64)
        return batch

    def _preloaded_batch(self, idx: np.ndarray, snap: Snapshot) -> dict[str, torch.Tensor]:
        if self._preloaded is None:  # unpickled in a DataLoader worker, or after close()
            if self.device.type != "cpu" and torch.utils.data.get_worker_info() is not None:
                raise RuntimeError(
                    f"{self.dataset_dir}: a dataset preloaded to {self.device} serves batches in "
                    f"the process that made it; use num_workers=0 (create_loader does)."
                )
            self._preloaded = Preloaded(
                self.store, self.split, self.device, self.preload_budget_bytes
            )
        pre = self._preloaded
        if pre.generation != snap.generation:
            self.store.serve(snap.generation)
            pre.refresh_negatives(self.store)
        batch = pre.batch(idx, self._variants(pre.pairs[idx], snap))
        if self.report_generation:
            batch["negatives_generation"] = torch.full(
                (idx.size,), pre.generation, device=self.device
            )
        return batch

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
        return SampleBatch(self.get_batch(indices, pin_memory))

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
        from .converters.h5_writer import convert_pt_to_hdf5

        return convert_pt_to_hdf5(dataset_dir, compression)


def _table_property(attr: str) -> property:
    return property(
        lambda self: self._table(attr),
        doc=f"``{attr}`` of the in-RAM dataset: a tensor that refuses in-place writes, in "
        f"memory of its own (see :mod:`jasper_mmap.tables`).",
    )


for _attr in TABLES:
    setattr(JASPERSteeringDataset, _attr, _table_property(_attr))

# how batches are made here: a dataset whose get_batch or __getitems__ is another function (a
# subclass, or a wrapper set on the instance or on this class) makes no plans
_OWN_GET_BATCH = JASPERSteeringDataset.get_batch
_OWN_GETITEMS = JASPERSteeringDataset.__getitems__


#: batch key -> (array, shape from (B, n_neg), dtype) of the pair-level outputs
_PAIR_KEYS = {
    "cluster_id": ("pair_cluster_id", lambda b, k: (b,), torch.int64),
    "relevance": ("pair_relevance", lambda b, k: (b,), torch.float32),
    "centroid_distance": ("centroid_distances", lambda b, k: (b,), torch.float32),
    "negative_tiers": ("negative_tiers", lambda b, k: (b, k), torch.int64),
}


_NP_DTYPES = {torch.float32: np.float32, torch.int64: np.int64}


# NOTE [batch plans]
# Making a batch is two kinds of work: gathering its embedding rows (~1,900 rows of 1.5 KiB for
# B=128, n_neg=12, D=384) and the bookkeeping around them: the split and pair indices, the
# steering draw, range checks, the negatives and the small per-pair outputs. The bookkeeping is
# a few dozen numpy calls on 128 values, so its cost is per call, not per value: ~0.3 ms of a
# ~0.7 ms batch alone, and more between two training steps, whose caches it finds cold. A
# thread-mode loader knows its next batches (it draws them from the sampler ahead of time), so
# it asks for the bookkeeping of up to 16 of them at once (``plan_batches``), and serving a
# batch of the plan (``planned_batch``) is its row gathers and slices of the plan's
# arrays. A plan is made from one reading of the control block and used only while the block is
# unchanged (its version, a write counter): a ``set_epoch``, ``force_steering``, assigned
# ``steering_probs`` or ``reload_negatives`` after the plan was made sends its remaining batches
# back to ``__getitems__``, which reads the block as it is then. So a batch is the same bytes as
# ``get_batch`` of its indices at the moment it starts, with or without a plan. ``get_batch``
# itself is a plan of one batch, served under the batch's lease, with its small outputs read
# after its rows into recycled buffers as before plans (so on a store read ahead from disk,
# which is served this way, the small arrays' reads finish while the rows are waited for). The
# plan reads its negatives while it leases their generation (NOTE [generation leases]); serving
# reads only the source, question and steering tables, which no reload changes. The small
# outputs of a planned batch are slices of the plan's arrays: fresh arrays, never reused, so a
# kept batch is never overwritten (a kept slice keeps the plan's few kilobytes). Measured on 2
# cores, the seed's training loop with num_workers=4 gathering in the loop (next() timed, 5
# rounds of 300 steps): 1.23-1.35 ms per batch one by one, 0.80-0.88 ms from plans of 16, the
# row gathers alone 0.58-0.79 ms; the loader alone (bench_train.py) at num_workers=2 / 4, 210k /
# 215k samples/s before, 236k / 238k with plans. num_workers=0 takes one batch at a time from
# the sampler, as a plain DataLoader does, so it makes plans of one (get_batch).


# NOTE [joined rows]
# The converter writes question_embs and source_embs back to back in one file, and the three
# steering tables back to back in another. A store that maps its files sees each group as one
# array of rows (``Store.joined``: where each array begins in it), so a batch's embedding rows
# are two gathers, not three plus the steering draw's index arithmetic: the plan turns the
# question, source and steering rows into rows of the joined arrays (and notes where the
# variant is 0, whose rows are zeroed after the gather), and serving gathers targets,
# negatives and questions into one recycled block and the steering rows after them. The four
# embedding outputs are row slices of that block: a kept output keeps the whole block (B x (3 +
# n_neg) rows: 2.9 MB at B=128, n_neg=12, D=384) and keeps it from being reused (NOTE
# [recycled batch buffers]); ``.clone()`` what you keep. A variant-0 row gathers the steering
# tables' first row (read every batch, so cached), not its pair's row, and is zeroed. Between
# two training steps of the seed's loop on 2 cores (num_workers=4 gathering in the loop, page
# cache warm) a batch took 1.08-1.13 ms with one gather per array and 0.82-0.92 ms so; the
# gather floor of bench_train.py, 0.69-0.74 ms.
# A store that joins nothing (zarr) or stores float16 (widened per array) reads one array at a
# time, as before; both ways give the same bytes.


def _batch_rows(parts: list[tuple[np.ndarray, int, int]], bounds: list[int]) -> Any:
    """Each batch's rows of ``parts`` back to back: from each (rows, w, offset), batch ``j``'s
    ``rows[bounds[j] * w : bounds[j + 1] * w] + offset``. Batches of one size (all but a
    short last one, mostly) are rows of one 2-D array, filled with one operation a part."""
    sizes = {hi - lo for lo, hi in itertools.pairwise(bounds)}
    if len(sizes) == 1 and (b := sizes.pop()) > 0:
        out = np.empty((len(bounds) - 1, b * sum(w for _, w, _ in parts)), np.int64)
        at = 0
        for rows, w, offset in parts:
            np.add(rows.reshape(-1, b * w), offset, out=out[:, at : at + b * w])
            at += b * w
        return out
    return [
        np.concatenate([rows[lo * w : hi * w] + offset for rows, w, offset in parts])
        for lo, hi in itertools.pairwise(bounds)
    ]


@dataclass(eq=False, slots=True)
class BatchPlan:
    """The bookkeeping of consecutive batches (NOTE [batch plans]); batch ``j`` is rows
    ``bounds[j]:bounds[j + 1]`` of the per-sample arrays, its source rows ``sources[j]``."""

    version: int  # the control block's version the plan was made from
    generation: int  # the negatives generation it read
    batches: list[np.ndarray]  # the checked indices of each batch
    bounds: list[int]
    n_neg: int
    pairs: np.ndarray
    variants: np.ndarray
    questions: np.ndarray  # rows of question_embs
    # per batch: rows of source_embs, the targets then the negatives; where the store joins the
    # embedding rows (NOTE [joined rows]), rows of the joined rows: targets, negatives, questions
    # (a list, or the rows of one 2-D array where the batches have one size: _batch_rows)
    sources: Any
    steering: np.ndarray | None  # rows of the joined steering tables (None: not joined)
    zeros: list[np.ndarray] | None  # per batch: where the variant is 0 (zero steering rows)
    small: dict[str, np.ndarray] | None  # batch key -> the per-pair outputs (_PAIR_KEYS)

    def __len__(self) -> int:
        return len(self.batches)


class _gatherer:
    """Gathers a batch's outputs as tensors, allocated where they will be used.

    In a DataLoader worker process the batch travels to the main process through shared
    memory, and torch copies every tensor there when the batch is queued; so there each output
    is allocated in shared memory and the gather writes into it (no copy: +25% samples/s with 2
    workers on the 200k store). With ``pin`` (CUDA, ``pin_memory=True``) outputs are pinned
    tensors from torch's caching host allocator (NOTE [thread loading] in threaded.py).
    Otherwise (the main process) into recycled buffers of ``pool``.
    """

    def __init__(self, store: Store, generation: int, pin: bool, pool: BufferPool) -> None:
        self.store, self.generation, self.pool = store, generation, pool
        worker = torch.utils.data.get_worker_info() is not None
        self.mode = "shared" if worker else "pinned" if pin else "plain"

    def _empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An output tensor of the batch, where this mode allocates them (contents arbitrary)."""
        if self.mode == "plain":  # a recycled buffer: NOTE [recycled batch buffers]
            return torch.from_numpy(self.pool.empty(shape, _NP_DTYPES[dtype]))
        if self.mode == "shared":
            return torch.empty(shape, dtype=dtype).share_memory_()
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def steering(
        self, variants: np.ndarray, pairs: np.ndarray, shape: tuple[int, int]
    ) -> torch.Tensor:
        """The batch's steering rows: zeros for variant 0, else the pair's row of the
        variant's table (``Store.take_mixed``: one gather where the tables are adjacent)."""
        out = self._empty(shape, torch.float32)
        self.store.take_mixed(_STEERING_NAMES, variants - 1, pairs, out.numpy())
        return out

    def block(self, shape: tuple[int, int]) -> tuple[np.ndarray, torch.Tensor | None]:
        """One float32 output the batch's embedding outputs are row slices of: the array to
        gather into, and the tensor over it where outputs must be slices of a tensor made
        here (pinned or shared memory); None in plain memory (a recycled array of the pool)."""
        if self.mode == "plain":
            return self.pool.empty(shape, np.float32), None
        tensor = self._empty(shape, torch.float32)
        return tensor.numpy(), tensor

    def adopt(self, values: np.ndarray) -> torch.Tensor:
        """A tensor of the batch computed in numpy (the variants)."""
        t = torch.from_numpy(values)
        if self.mode == "plain":
            return t
        return self._empty(tuple(t.shape), t.dtype).copy_(t)

    def __call__(
        self, name: str, rows: np.ndarray, shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        """Rows ``rows`` (range-checked by the caller: ``Store.check_rows``) of ``name``."""
        out = self._empty(shape, dtype)
        self.store.take(name, rows, out.numpy(), generation=self.generation)
        return out


def _fmt(probs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={float(v):.2f}" for k, v in probs.items())


def _read_config(store_path: Path) -> dict[str, Any]:
    path = store_path / CONFIG
    try:  # a regular file, bounded nesting: NOTE [regular files only] in files.py
        config = read_json(
            path, what="config.json", fix="Fix the file.", error=ConfigError, missing=None
        )
    except FileNotFoundError:
        raise ArtifactMissingError(f"Config file not found: {path}. Re-create the store.") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: should be a JSON object. Fix the file.")
    return config


def _shown_path(value: object) -> str:
    """A dataset path as given, for a message (bytes decoded; anything else as its repr)."""
    try:
        return os.fsdecode(value)  # type: ignore[arg-type]
    except TypeError:
        return repr(value)
