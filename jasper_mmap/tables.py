"""The in-RAM dataset's table attributes (``question_embs``, ``pair_index``, ...), over the maps.

Users and the upstream trainer read ``dataset.centroid_embs`` and friends. Here each is a
read-only tensor over the store's memory map, made on first access: no copy, no growth of
anonymous memory, and opening the dataset stays O(1). Writing into one is not supported (the map
is read-only). Tables stored at reduced precision keep that dtype (``float16``/``bfloat16``),
since widening would copy. A zarr store has no map: its tables are read into memory when
first accessed. ``hard_negatives``/``negative_tiers`` are those of the negatives generation
the dataset serves. ``pair_keyword_ids`` is a list-like object that decodes one pair's list at a
time.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from .stores import NEGATIVE_ARRAYS, Store

__all__ = ["TABLES", "KeywordLists", "table_tensor"]

#: dataset attribute -> store array (``split_indices`` is the split's own array)
TABLES = {
    "question_embs": "question_embs",
    "source_embs": "source_embs",
    "keyword_embs": "keyword_embs",
    "centroid_embs": "centroid_embs",
    "pair_index": "pair_index",
    "pair_cluster_id": "pair_cluster_id",
    "pair_relevance": "pair_relevance",
    "steering_centroid": "steering_centroid",
    "steering_keyword_weighted": "steering_keyword_weighted",
    "steering_residual": "steering_residual",
    "centroid_distances": "centroid_distances",
    "hard_negatives": "hard_negatives",
    "negative_tiers": "negative_tiers",
    "split_indices": None,
    "pair_keyword_ids": None,
}


def _as_tensor(arr: np.ndarray, stored: str) -> torch.Tensor:
    with warnings.catch_warnings():  # the map is read-only: torch warns that it cannot write
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if stored == "bfloat16" else t


def table_tensor(store: Store, name: str, generation: int) -> torch.Tensor:
    """Array ``name`` of ``store`` as a tensor: zero-copy over a memory map when there is one."""
    if name in NEGATIVE_ARRAYS:
        raw, stored = store.raw(name, generation), store.entry(name, generation)["stored_dtype"]
    else:
        raw, stored = store.raw(name), store.entry(name)["stored_dtype"]
    if not isinstance(raw, np.ndarray):  # zarr: no map to share
        raw = np.asarray(raw[...])
    return _as_tensor(raw, stored)


class KeywordLists(Sequence):
    """``pair_keyword_ids`` as a list of lists of int, decoded one pair at a time.

    Args:
        offsets: ``[N_pairs + 1]`` int64 (row ``i``'s ids are ``values[offsets[i]:offsets[i+1]]``).
        values: ``[nnz]`` int64 keyword rows.
    """

    def __init__(self, offsets: Any, values: Any) -> None:
        self.offsets, self.values = offsets, values

    def __len__(self) -> int:
        return int(self.offsets.shape[0]) - 1

    def __getitem__(self, i: int | slice) -> list[int] | list[list[int]]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        n = len(self)
        k = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= k < n:
            raise IndexError(f"pair {i} out of range [0, {n})")
        lo, hi = (int(v) for v in self.offsets[k : k + 2])
        return np.asarray(self.values[lo:hi]).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        return (self[k] for k in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return len(self) == len(other) and all(
            a == list(b) for a, b in zip(self, other, strict=True)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        head = ", ".join(str(self[k]) for k in range(min(3, len(self))))
        return f"KeywordLists([{head}{', ...' if len(self) > 3 else ''}], pairs={len(self)})"
