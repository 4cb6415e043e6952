"""The batch engine: plans (NOTE [batch plans]), joined rows (NOTE [joined rows]) and serving a
batch from them.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from jasper_mmap.dataset.control import Snapshot
from jasper_mmap.dataset.outputs import NP_DTYPES, BatchOutputs
from jasper_mmap.dataset.preload import Preloaded
from jasper_mmap.errors import (
    SampleIndexError,
    SampleIndexTypeError,
)
from jasper_mmap.format.spec import PAIR_ARRAYS, STEERING_NAMES, STEERING_TABLES
from jasper_mmap.steering import (
    draw_variants,
)
from jasper_mmap.stores import Store
from jasper_mmap.stores.readahead import dense_arrays

__all__ = ["BATCH_KEYS", "BatchEngine", "BatchPlan", "LoadedBatch", "SampleBatch"]

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


_EMBEDDINGS = ("question_embs", "source_embs")  # read as one where joined: NOTE [joined rows]


class SampleBatch(Sequence):
    """What ``__getitems__`` returns: a whole batch that also reads as a list of samples.

    ``batch["question_emb"]`` gives a key of the whole batch; ``batch[i]`` gives sample ``i``.
    ``create_loader``'s collate function returns :attr:`batch` as it is (the fast path); the
    default collate of a plain ``DataLoader`` iterates the samples and stacks them again.
    """

    def __init__(
        self,
        batch: dict[str, torch.Tensor],
        version: int | None = None,
        indices: Any = None,
    ) -> None:
        self.batch = batch
        #: the control block's version read before the batch was gathered, and its indices:
        #: a loader gathers it again if the version changed before it is handed out (NOTE
        #: [control at hand-out] in jasper_mmap/loading/loader.py)
        self.version, self.indices = version, indices

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


class LoadedBatch(dict):
    """A collated batch (a dict of the batch keys) that remembers the control version it was
    gathered under and its indices (NOTE [control at hand-out] in jasper_mmap/loading/loader.py)."""

    def __init__(
        self, batch: Any = (), version: int | None = None, indices: Any = None, **kw: Any
    ) -> None:
        # a mapping alone also makes one, as libraries rebuild a batch (type(b)(mapping)):
        # Lightning moving it to a device, say
        super().__init__(batch, **kw)
        self.control_version, self.indices = version, indices


#: batch key -> (array, shape from (B, n_neg), dtype) of the pair-level outputs
_PAIR_KEYS = {
    "cluster_id": ("pair_cluster_id", lambda b, k: (b,), torch.int64),
    "relevance": ("pair_relevance", lambda b, k: (b,), torch.float32),
    "centroid_distance": ("centroid_distances", lambda b, k: (b,), torch.float32),
    "negative_tiers": ("negative_tiers", lambda b, k: (b, k), torch.int64),
}


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
# Both backends join (zarr maps its shard files side by side: NOTE [zarr shards as rows] in
# jasper_mmap/stores/zarr_store.py); a store whose arrays cannot be joined (a zarr layout read
# through zarr-python) or that stores float16 (widened per array) reads one array at a time;
# both ways give the same bytes.


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


class UnitsEvicted(Exception):
    """Units a batch read were evicted from the node cache while it was gathered: the batch
    is made again (NOTE [eviction] in jasper_mmap/remote/cache.py). Never leaves the dataset."""


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
    stamp: Any = None  # a store on object storage: the units read (NOTE [eviction])

    def __len__(self) -> int:
        return len(self.batches)


class BatchEngine:
    """The batch engine of :class:`JASPERSteeringDataset` (its methods, kept apart from the facade)."""

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
            emb, steering = store.joined(_EMBEDDINGS), store.joined(STEERING_NAMES)
            names = _EMBEDDINGS + STEERING_NAMES
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
        # it (``gather_unchecked``): the pair-keyed arrays have n_pairs rows (schema, at open and publish)
        pairs = store.check_rows("pair_index", store.gather_unchecked(f"{self.split}_idx", idx))
        remote, stamp = getattr(self, "_remote", None), None
        if remote is not None:  # NOTE [node cache]: the batch's unit rows are in the mirror
            # a plan of many batches gives up soon where units keep being evicted (its batches
            # are then served one by one: NOTE [batch plans])
            stamp = remote.ensure(pairs, generation, 3 if len(batches) > 1 else None)
        variants = self._variants(pairs, snap)
        # NOTE [batch prefetch], NOTE [dense arrays]: only a store read ahead gets the hints
        ahead, dense = store.reads_ahead, self._dense_arrays(store)
        if ahead:
            chosen = {table: pairs[variants == v] for v, table in STEERING_TABLES.items()}
            store.prefetch(
                {name: pairs for name in PAIR_ARRAYS} | chosen, dense, snap.epoch, generation
            )
        qs = store.gather_unchecked("pair_index", pairs)
        negs = store.gather_unchecked("hard_negatives", pairs, generation=generation)
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
                out = np.empty(shape(idx.size, k), NP_DTYPES[dtype])
                outputs[key] = store.gather_unchecked(name, pairs, out, generation=generation)
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
            stamp,
        )

    def _serve(self, plan: BatchPlan, j: int, pin_memory: bool) -> dict[str, torch.Tensor]:
        """Batch ``j`` of ``plan``: its embedding rows gathered, the rest taken from the plan."""
        lo, hi = plan.bounds[j], plan.bounds[j + 1]
        b, d, k = hi - lo, self.embedding_dim, plan.n_neg
        gather = BatchOutputs(self.store, plan.generation, pin_memory, self._pool)
        if plan.steering is not None:  # NOTE [joined rows]: one block, two gathers
            n, m = b * (1 + k), b * (2 + k)  # targets, negatives; questions; steering rows
            block, tensor = gather.block((m + b, d))
            self.store.gather_joined_unchecked(_EMBEDDINGS, plan.sources[j], block[:m])
            self.store.gather_joined_unchecked(STEERING_NAMES, plan.steering[lo:hi], block[m:])
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
        if plan.stamp is not None and not self._remote.unchanged(plan.stamp):
            raise UnitsEvicted  # rows read from the node cache were evicted meanwhile
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
