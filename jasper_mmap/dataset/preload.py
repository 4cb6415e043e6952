"""Preloading one split onto a device (CUDA, or CPU RAM) and gathering batches there.

Only what the split needs is copied: its pair-level rows (in split order, so sample ``i`` is
row ``i``), and the question and source rows its pairs and negatives reference, with indices
remapped to those compact tables. Before copying, the size is checked against the free memory
of the device (``torch.cuda.mem_get_info``, minus a margin) or a budget the caller sets.
Batches are gathered with torch indexing on the device; the steering draw is the same
counter-based function as the memory-mapped path (computed on the CPU from the pair ids and
copied over: ``B`` int64 values), so variants match it exactly.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from jasper_mmap.errors import JasperError
from jasper_mmap.format.spec import STEERING_NAMES
from jasper_mmap.stores import Store

__all__ = ["Preloaded", "PreloadTooLargeError", "MARGIN_BYTES"]

log = logging.getLogger(__name__)

#: left free on a CUDA device beyond the preloaded tensors (allocator slack, the model)
MARGIN_BYTES = 512 * 2**20
_BLOCK_ROWS = 65536


class PreloadTooLargeError(JasperError, MemoryError):
    """The split does not fit in the device's free memory (or the given budget)."""


def _to_device(store: Store, name: str, rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """Gather ``rows`` of ``name`` block by block straight into one tensor on ``device``."""
    shape = (rows.size, *store.shape(name)[1:])
    dtype = torch.int64 if store.entry(name)["dtype"] == "int64" else torch.float32
    out = torch.empty(shape, dtype=dtype, device=device)
    for lo in range(0, rows.size, _BLOCK_ROWS):
        block = torch.from_numpy(store.gather(name, rows[lo : lo + _BLOCK_ROWS]))
        out[lo : lo + block.shape[0]].copy_(block)
    return out


class Preloaded:
    """One split's rows on one device, with compact question/source tables.

    Args:
        store: the open store.
        split: ``"train"``, ``"val"`` or ``"test"``.
        device: where the tensors live.
        budget_bytes: refuse when the copy needs more; default: free CUDA memory minus
            ``MARGIN_BYTES`` (no limit for the CPU).

    Raises:
        PreloadTooLargeError: with the sizes, before anything is copied.
    """

    def __init__(
        self, store: Store, split: str, device: torch.device, budget_bytes: int | None = None
    ):
        self.device, self.split, self.budget_bytes = device, split, budget_bytes
        self.pairs = store.read(f"{split}_idx")  # CPU: the steering draw's counter
        pair_index = store.gather("pair_index", self.pairs)
        negs = store.gather("hard_negatives", self.pairs)
        questions, q_row = np.unique(pair_index[:, 0], return_inverse=True)
        sources, s_inv = np.unique(
            np.concatenate([pair_index[:, 1], negs.ravel()]), return_inverse=True
        )
        n, d, k = self.pairs.size, store.counts["embedding_dim"], negs.shape[1]
        need = 4 * d * (questions.size + sources.size + 3 * n) + 8 * n * (3 + 2 * k) + 8 * n
        self._check_fits(
            store,
            need,
            f"{n} samples, {questions.size} question rows, {sources.size} source rows, D={d}",
        )
        dev = device
        self.q_row = torch.from_numpy(q_row.reshape(-1)).to(dev)
        self.s_row = torch.from_numpy(s_inv[:n]).to(dev)
        self.negs = torch.from_numpy(s_inv[n:].reshape(negs.shape)).to(dev)
        self.questions = _to_device(store, "question_embs", questions, dev)
        self.sources = _to_device(store, "source_embs", sources, dev)
        self.tables: dict[str, torch.Tensor] = {
            name: _to_device(store, name, self.pairs, dev)
            for name in (
                "negative_tiers",
                "pair_cluster_id",
                "pair_relevance",
                "centroid_distances",
                *STEERING_NAMES,
            )
        }
        self.generation = store.generation
        log.info(
            "preloaded %s split (%d samples, %.1f MB) to %s", split, n, self.nbytes / 2**20, device
        )

    def _check_fits(self, store: Store, need: int, what: str) -> None:
        budget = self.budget_bytes
        if budget is None and self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free - MARGIN_BYTES
        if budget is not None and need > budget:
            raise PreloadTooLargeError(
                f"{store.path}: preloading the {self.split!r} split to {self.device} needs "
                f"{need / 2**20:.1f} MB ({what}), but "
                f"only {max(budget, 0) / 2**20:.1f} MB are available. Use the memory-mapped CPU dataset "
                f"(device='cpu', preload=False) with create_loader(pin_memory=True), or a smaller split."
            )

    @property
    def nbytes(self) -> int:
        """Bytes held on the device."""
        tensors = [
            self.q_row,
            self.s_row,
            self.negs,
            self.questions,
            self.sources,
            *self.tables.values(),
        ]
        return sum(t.numel() * t.element_size() for t in tensors)

    def refresh_negatives(self, store: Store) -> None:
        """Re-gather negatives, tiers and the source rows they reference (hot reload)."""
        fresh = Preloaded.__new__(Preloaded)
        fresh.__dict__.update(self.__dict__)
        negs = store.gather("hard_negatives", self.pairs)
        targets = store.gather("pair_index", self.pairs)[:, 1]
        sources, s_inv = np.unique(np.concatenate([targets, negs.ravel()]), return_inverse=True)
        n, d, k = self.pairs.size, self.questions.shape[1], negs.shape[1]
        if self.budget_bytes is not None:  # the budget covers everything held, old tables out
            fresh.budget_bytes = (
                self.budget_bytes - self.nbytes + 4 * d * self.sources.shape[0] + 16 * n * k
            )
        fresh._check_fits(
            store,
            4 * d * sources.size + 8 * n * (1 + 2 * k),
            f"new negatives: {sources.size} source rows, D={d}",
        )
        fresh.budget_bytes = self.budget_bytes
        fresh.s_row = torch.from_numpy(s_inv[:n]).to(self.device)
        fresh.negs = torch.from_numpy(s_inv[n:].reshape(negs.shape)).to(self.device)
        fresh.sources = _to_device(store, "source_embs", sources, self.device)
        fresh.tables = {
            **self.tables,
            "negative_tiers": _to_device(store, "negative_tiers", self.pairs, self.device),
        }
        fresh.generation = store.generation
        self.__dict__.update(fresh.__dict__)  # swap in one step: a batch sees old or new

    def batch(self, idx: np.ndarray, variants: np.ndarray) -> dict[str, Any]:
        """The nine-key batch of samples ``idx`` (numpy, validated) with given variants."""
        dev = self.device
        i = torch.from_numpy(idx).to(dev, non_blocking=True)
        v = torch.from_numpy(variants).to(dev, non_blocking=True)
        t = self.tables
        steering = torch.zeros((idx.size, self.questions.shape[1]), device=dev)
        for k, name in enumerate(STEERING_NAMES, start=1):
            steering = torch.where((v == k)[:, None], t[name][i], steering)
        return {
            "question_emb": self.questions[self.q_row[i]],
            "target_source_emb": self.sources[self.s_row[i]],
            "steering": steering,
            "negative_embs": self.sources[self.negs[i]],
            "cluster_id": t["pair_cluster_id"][i],
            "relevance": t["pair_relevance"][i],
            "centroid_distance": t["centroid_distances"][i],
            "steering_variant": v,
            "negative_tiers": t["negative_tiers"][i],
        }


def memory_mode(device: torch.device, use_mmap: bool | None, preload: bool | None) -> bool:
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
