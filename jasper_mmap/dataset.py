"""``JASPERSteeringDataset``: the seed's in-RAM dataset, reading rows lazily from a store.

# NOTE [worker start-up]
The dataset pickles paths, the small manifest/config and a shared control block; the store's
maps are opened on first use inside each process (``Store.__getstate__`` drops them), so spawn
and forkserver workers cost kilobytes, and forked workers never share a file offset or a zarr
event loop they did not open. The control block is an 8-value int64 tensor in shared memory:
``torch.multiprocessing`` hands DataLoader workers a handle to the same memory (fork inherits
it), so ``set_epoch``/``force_steering`` written by the main process are read by every worker,
persistent ones too, at the start of their next batch. Each dataset has its own block, so two
datasets or two jobs on one machine never collide.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ArtifactMissingError, SampleIndexError
from .layout import CONFIG, SPLITS
from .preload import Preloaded
from .resolve import resolve_store
from .steering import VARIANTS, SteeringSchedule, draw_variants, variant_index
from .stores import Store, open_store

__all__ = ["JASPERSteeringDataset", "SampleBatch", "BATCH_KEYS"]

log = logging.getLogger(__name__)

#: the nine keys of a batch, as in the seed documents
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
_EPOCH, _FORCED, _GENERATION = 0, 1, 2  # slots of the control block
_PAIR_ARRAYS = (
    "pair_index",
    "hard_negatives",
    "negative_tiers",
    "pair_cluster_id",
    "pair_relevance",
    "centroid_distances",
)


class SampleBatch(Sequence):
    """What ``__getitems__`` returns: a whole batch that also reads as a list of samples.

    ``create_loader``'s collate function returns :attr:`batch` as it is (the fast path); the
    default collate of a plain ``DataLoader`` iterates the samples and stacks them again.
    """

    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return int(self.batch["relevance"].shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return {k: v[i] for k, v in self.batch.items()}


class JASPERSteeringDataset(torch.utils.data.Dataset):
    """Pre-computed (question, steering, target, negatives) samples, read lazily from a store.

    Args:
        dataset_dir: a store made by ``convert-pt``, or a directory of ``.pt`` artifacts (then
            converted once into a store kept beside it and reused while the files are unchanged;
            see :func:`jasper_mmap.resolve.resolve_store`).
        split: ``"train"``, ``"val"`` or ``"test"``.
        epoch: initial epoch of the steering curriculum.
        device: ``None``/``"cpu"``: batches are CPU tensors read from the memory maps.
            ``"cuda"`` (or a ``torch.device``): the split is preloaded onto that device (see
            :mod:`jasper_mmap.preload`) and batches are gathered there.
        preload: preload the split into this process's memory on ``device`` (implied for a
            CUDA device; ``device="cpu", preload=True`` keeps a small split in RAM).
        preload_budget_bytes: refuse a preload needing more (default for CUDA: the device's
            free memory minus a margin).
        seed: seed of the steering draw; default ``config.json``'s ``random_seed``, else 42.
        cache_dir: where to keep the store converted from a ``.pt`` directory.
        store_format: backend used when converting a ``.pt`` directory.
        check_sources: refuse a store whose source ``.pt`` directory still exists and changed
            since conversion (``StoreStaleError``); False reads it as it is.
        report_generation: add a tenth key, ``negatives_generation`` ([B] int64), naming the
            negatives generation each batch was served from (NOTE [hot reload]).

    Raises:
        StoreNotFoundError, ArtifactMissingError: the directory, its config or the split is missing.
    """

    def __init__(
        self,
        dataset_dir: str | Path,
        split: str = "train",
        epoch: int = 0,
        device: str | torch.device | None = None,
        *,
        seed: int | None = None,
        cache_dir: str | Path | None = None,
        store_format: str = "safetensors",
        report_generation: bool = False,
        preload: bool | None = None,
        preload_budget_bytes: int | None = None,
        check_sources: bool = True,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split should be one of {SPLITS}, but got split={split!r}")
        self.dataset_dir = Path(dataset_dir)
        self.split = split
        self.store_path = resolve_store(dataset_dir, cache_dir, store_format, check_sources)
        self._store: Store | None = open_store(self.store_path)
        manifest = self._store.manifest
        if f"{split}_idx" not in manifest["arrays"]:
            raise ArtifactMissingError(
                f"{self.store_path}: has no {split!r} split (its dataset had no {split}_idx.pt); splits "
                f"present: {sorted(manifest.get('splits', {}))}. Add {split}_idx.pt and convert again."
            )
        self._len = int(manifest["arrays"][f"{split}_idx"]["shape"][0])
        self.config = _read_config(self.store_path)
        self.seed = int(seed if seed is not None else self.config.get("random_seed", 42))
        self.schedule = SteeringSchedule.from_config(self.config, str(self.store_path / CONFIG))
        self.device = torch.device(device if device is not None else "cpu")
        self.preload = self.device.type != "cpu" if preload is None else bool(preload)
        if self.device.type != "cpu" and not self.preload:
            raise ValueError(
                f"device={self.device} needs preload=True (batches are gathered on the device)"
            )
        self.preload_budget_bytes = preload_budget_bytes
        self._preloaded: Preloaded | None = None
        if self.preload:
            self._preloaded = Preloaded(self._store, split, self.device, preload_budget_bytes)
        self._control = torch.zeros(8, dtype=torch.int64).share_memory_()
        self._control[_FORCED] = -1
        self._control[_GENERATION] = self._store.generation
        self.report_generation = report_generation
        self.set_epoch(epoch)

    # -- the seed's attributes -------------------------------------------------------------
    @property
    def store(self) -> Store:
        """The store, opened lazily in this process."""
        if self._store is None:
            self._store = open_store(self.store_path)
        return self._store

    @property
    def embedding_dim(self) -> int:
        return int(self.store.counts["embedding_dim"])

    @property
    def n_neg(self) -> int:
        return int(self.store.counts["n_neg"])

    @property
    def epoch(self) -> int:
        return int(self._control[_EPOCH])

    @property
    def steering_probs(self) -> dict[str, float]:
        """Variant probabilities at the current epoch (a forced variant overrides them)."""
        return dict(zip(VARIANTS, self.schedule.probs(self.epoch).tolist(), strict=True))

    @property
    def memory_usage_mb(self) -> float:
        """MB of data this object holds in this process's own memory (not bytes mapped).

        Rows read through the memory maps live in the page cache, shared and evictable, and are
        not counted; with memory-mapped reading this is the control block only. With a preload
        it is the bytes of the preloaded tensors, on :attr:`device`.
        """
        held = self._control.numel() * self._control.element_size()
        if self._preloaded is not None:
            held += self._preloaded.nbytes
        return held / 2**20

    def __len__(self) -> int:
        return self._len

    # -- control -------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the curriculum epoch; reaches DataLoader workers at their next batch."""
        if int(epoch) < 0:
            raise ValueError(f"epoch should be >= 0, but got epoch={epoch}")
        self._control[_EPOCH] = int(epoch)

    def force_steering(self, variant: str | None) -> None:
        """Serve every sample with ``variant`` ("zero", "centroid", "keyword", "residual");
        ``None`` restores the stochastic draw. Reaches workers at their next batch."""
        self._control[_FORCED] = variant_index(variant)

    @property
    def negatives_generation(self) -> int:
        """The negatives generation batches are served from (after the next batch starts)."""
        return int(self._control[_GENERATION])

    def reload_negatives(self) -> int:
        """Pick up new hard negatives; every worker uses them from its next batch.

        For a dataset opened from a ``.pt`` directory, changed ``hard_negatives.pt`` /
        ``negative_tiers.pt`` are first validated and published as a new generation of its
        store (streaming). Then the store's newest published generation (see
        :func:`jasper_mmap.publish_negatives`) becomes the one batches are served from.

        Returns:
            The generation now in use.

        Raises:
            ArtifactError: the new negatives are invalid; the old generation stays in use.
        """
        from .resolve import refresh_negatives

        if self.store_path != self.dataset_dir.expanduser().absolute():
            refresh_negatives(self.dataset_dir.expanduser().absolute(), self.store_path)
        generation = self.store.live_generation()
        self.store.use_generation(generation)
        self._control[_GENERATION] = generation
        if self._preloaded is not None and self._preloaded.generation != generation:
            self._preloaded.refresh_negatives(self.store)
        log.info("%s: serving negatives generation %d", self.store_path, generation)
        return generation

    # -- reading -------------------------------------------------------------------------------
    def _check_indices(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self._len):
            bad = idx[(idx < 0) | (idx >= self._len)][:5].tolist()
            raise SampleIndexError(
                f"{self.store_path}: {self.split} has {self._len} samples, indices should "
                f"be in [0, {self._len}), but got {bad}"
            )
        return idx

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """The batch of samples ``indices``: nine keys, one vectorized gather per array."""
        idx = self._check_indices(indices)
        control = self._control.tolist()  # one consistent snapshot for the whole batch
        if self.preload:
            return self._preloaded_batch(idx, control)
        store = self.store
        # NOTE [generation leases]: the batch reads one generation, leased until it is done
        with store.pinned(control[_GENERATION], serve=True) as generation:
            out = self._gather_batch(store, idx, control, generation)
        if self.report_generation:
            out["negatives_generation"] = torch.full((idx.size,), generation, dtype=torch.int64)
        return out

    def _gather_batch(
        self, store: Store, idx: np.ndarray, control: list[int], generation: int
    ) -> dict[str, torch.Tensor]:
        b, epoch = idx.size, control[_EPOCH]
        pairs = store.gather(f"{self.split}_idx", idx)
        variants = draw_variants(
            self.seed, epoch, pairs, self.schedule.probs(epoch), control[_FORCED]
        )
        chosen = {table: pairs[variants == v] for v, table in _STEERING_TABLES.items()}
        store.prefetch({name: pairs for name in _PAIR_ARRAYS} | chosen)  # NOTE [batch prefetch]
        qs = store.gather("pair_index", pairs)
        negs = store.gather("hard_negatives", pairs, generation=generation)
        sources = np.concatenate([qs[:, 1], negs.reshape(-1)])
        store.prefetch({"question_embs": qs[:, 0], "source_embs": sources})
        d, k = self.embedding_dim, negs.shape[1]
        gather = _gatherer(store, generation)
        rows = gather("source_embs", sources, (b * (1 + k), d), torch.float32)
        steering = gather.zeros((b, d))  # variant 0: zero steering
        for v, table in _STEERING_TABLES.items():
            if chosen[table].size:
                steering.numpy()[variants == v] = store.gather(table, chosen[table])
        out = {
            "question_emb": gather("question_embs", qs[:, 0], (b, d), torch.float32),
            "target_source_emb": rows[:b],
            "steering": steering,
            "negative_embs": rows[b:].view(b, k, d),
        }
        for key, (name, shape, dtype) in _PAIR_KEYS.items():
            out[key] = gather(name, pairs, shape(b, k), dtype)
        out["steering_variant"] = torch.from_numpy(variants)
        return {key: out[key] for key in BATCH_KEYS}

    def _preloaded_batch(self, idx: np.ndarray, control: list[int]) -> dict[str, torch.Tensor]:
        if self._preloaded is None:  # unpickled in a DataLoader worker
            if self.device.type != "cpu":
                raise RuntimeError(
                    f"{self.store_path}: a dataset preloaded to {self.device} serves batches in "
                    f"the process that made it; use num_workers=0 (create_loader does)."
                )
            self._preloaded = Preloaded(
                self.store, self.split, self.device, self.preload_budget_bytes
            )
        pre = self._preloaded
        if pre.generation != control[_GENERATION]:
            self.store.serve(control[_GENERATION])
            pre.refresh_negatives(self.store)
        epoch = control[_EPOCH]
        variants = draw_variants(
            self.seed, epoch, pre.pairs[idx], self.schedule.probs(epoch), control[_FORCED]
        )
        batch = pre.batch(idx, variants)
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
            g = torch.Generator().manual_seed(
                (seed if seed is not None else self.seed) * 1_000_003 + self.epoch
            )
            order = torch.randperm(n, generator=g).numpy()
        else:
            order = np.arange(n)
        stop = n - n % batch_size if drop_last else n
        for lo in range(0, stop, batch_size):
            yield self.get_batch(order[lo : lo + batch_size])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_preloaded"] = None  # rebuilt lazily (CPU) in the process that unpickles it
        return state

    def __getitems__(self, indices: Sequence[int]) -> SampleBatch:
        """Batched fetch used by ``torch.utils.data.DataLoader`` (one gather per array)."""
        return SampleBatch(self.get_batch(indices))

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        """One sample (shapes without the batch dimension)."""
        if not isinstance(idx, int | np.integer):
            raise TypeError(
                f"index should be an int, but got {type(idx).__name__}; use get_batch for many"
            )
        return SampleBatch(self.get_batch([int(idx)]))[0]

    # -- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """Release this process's maps (reopened on next use)."""
        if self._store is not None:
            self._store.close()

    def __enter__(self) -> JASPERSteeringDataset:
        return self

    def __exit__(self, *exc: object) -> None:
        log.debug("closing %s split %s (%d samples)", self.store_path, self.split, self._len)
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass

    def __repr__(self) -> str:
        return (
            f"JASPERSteeringDataset({str(self.store_path)!r}, split={self.split!r}, len={self._len}, "
            f"epoch={self.epoch}, backend={self.store.backend!r})"
        )

    @staticmethod
    def create_combined_splits(
        dataset_dir: str | Path,
        epoch: int = 0,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> dict[str, JASPERSteeringDataset]:
        """One dataset per split present in the store (train, and val/test when they exist)."""
        store = open_store(
            resolve_store(
                dataset_dir, kwargs.get("cache_dir"), kwargs.get("store_format", "safetensors")
            )
        )
        return {
            s: JASPERSteeringDataset(dataset_dir, s, epoch, device, **kwargs)
            for s in SPLITS
            if store.has(f"{s}_idx")
        }


#: batch key -> (array, shape from (B, n_neg), dtype) of the pair-level outputs
_PAIR_KEYS = {
    "cluster_id": ("pair_cluster_id", lambda b, k: (b,), torch.int64),
    "relevance": ("pair_relevance", lambda b, k: (b,), torch.float32),
    "centroid_distance": ("centroid_distances", lambda b, k: (b,), torch.float32),
    "negative_tiers": ("negative_tiers", lambda b, k: (b, k), torch.int64),
}


class _gatherer:
    """Gathers a batch's outputs as tensors.

    In a DataLoader worker the batch travels to the main process through shared memory, and
    torch copies every tensor there when the batch is queued. So in a worker each output is
    allocated in shared memory and the gather writes into it (no copy: +25% samples/s with 2
    workers on the 200k store). In the main process a plain gather is faster (~7%), so it is
    used there.
    """

    def __init__(self, store: Store, generation: int) -> None:
        self.store, self.generation = store, generation
        self.local = torch.utils.data.get_worker_info() is None

    def zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.local:
            return torch.from_numpy(np.zeros(shape, np.float32))
        return torch.zeros(shape).share_memory_()

    def __call__(
        self, name: str, rows: np.ndarray, shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        if self.local:
            return torch.from_numpy(self.store.gather(name, rows, generation=self.generation))
        out = torch.empty(shape, dtype=dtype).share_memory_()
        self.store.gather(name, rows, out.numpy(), generation=self.generation)
        return out


def _read_config(store_path: Path) -> dict[str, Any]:
    import json

    with open(store_path / CONFIG, encoding="utf-8") as f:
        return json.load(f)
