"""jasper_mmap: out-of-core, memory-mapped datasets for training JASPER predictors.

Convert a directory of ``.pt`` artifacts with ``convert-pt`` (or
:func:`jasper_mmap.converters.convert_pt`), then train with :class:`JASPERSteeringDataset` /
:func:`create_loader`, which read rows lazily from the store.

The dataset and loader modules import torch; they are loaded on first use, so that the store
readers and tools that only read stores start without paying for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from . import errors  # noqa: E402
from .layout import FORMAT_NAME, FORMAT_VERSION  # noqa: E402
from .stores import Store, open_store  # noqa: E402

_LAZY = {
    "JASPERSteeringDataset": "dataset",
    "BATCH_KEYS": "dataset",
    "create_loader": "loader",
    "set_epoch": "loader",
    "validate_first_batch": "loader",
    "VARIANTS": "steering",
    "publish_negatives": "negatives",
}

__all__ = [
    "__version__",
    "errors",
    "JASPERSteeringDataset",
    "create_loader",
    "set_epoch",
    "validate_first_batch",
    "open_store",
    "Store",
    "BATCH_KEYS",
    "VARIANTS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "publish_negatives",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
