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

from jasper_mmap._version import __version__  # noqa: E402

#
from jasper_mmap.format.spec import FORMAT_NAME, FORMAT_VERSION  # noqa: E402
from jasper_mmap.stores import Store, open_store  # noqa: E402

_LAZY = {
    "JASPERSteeringDataset": "dataset.dataset",
    "BATCH_KEYS": "dataset.batches",
    "create_loader": "loading.loader",
    "set_epoch": "loading.loader",
    "validate_first_batch": "loading.loader",
    "VARIANTS": "steering",
    "publish_negatives": "dataset.publish",
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
