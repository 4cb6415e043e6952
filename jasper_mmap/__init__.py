"""jasper_mmap: out-of-core, memory-mapped datasets for training JASPER predictors.

Convert a directory of ``.pt`` artifacts with ``convert-pt`` (or
:func:`converters.convert_pt`), then train with :class:`JASPERSteeringDataset` /
:func:`create_loader`, which read rows lazily from the store.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import errors  # noqa: E402
from .dataset import BATCH_KEYS, JASPERSteeringDataset  # noqa: E402
from .layout import FORMAT_NAME, FORMAT_VERSION  # noqa: E402
from .loader import create_loader, set_epoch, validate_first_batch  # noqa: E402
from .steering import VARIANTS  # noqa: E402
from .stores import Store, open_store  # noqa: E402

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
]
