"""The dataset: the facade (``JASPERSteeringDataset``), its batch engine, outputs, control
block, tables, preload, and the dataset-directory cache (``resolve``).

Names are loaded on first use: ``resolve`` and ``publish`` import no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "JASPERSteeringDataset": "dataset",
    "SampleBatch": "batches",
    "BatchPlan": "batches",
    "BATCH_KEYS": "batches",
    "publish_negatives": "publish",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
