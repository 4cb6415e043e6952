"""jasper_mmap: out-of-core, memory-mapped datasets for training JASPER predictors.

Convert a directory of ``.pt`` artifacts with ``convert-pt`` (or
:func:`converters.convert_pt`), then read rows lazily with :func:`open_store`.
"""

from __future__ import annotations

from . import errors
from .layout import FORMAT_NAME, FORMAT_VERSION
from .stores import Store, open_store

__version__ = "0.1.0"

__all__ = ["__version__", "errors", "open_store", "Store", "FORMAT_NAME", "FORMAT_VERSION"]
