"""Store backends behind one interface: ``open_store(path)`` picks the backend from the manifest."""

from __future__ import annotations

from pathlib import Path

from ..integrity import raise_problems, store_problems
from ..layout import load_manifest
from .base import NEGATIVE_ARRAYS, Store, StoreWriter
from .safetensors_store import SafetensorsStore, SafetensorsWriter
from .zarr_store import ZarrStore, ZarrWriter

__all__ = ["open_store", "Store", "StoreWriter", "BACKENDS", "WRITERS", "NEGATIVE_ARRAYS"]

BACKENDS: dict[str, type[Store]] = {"safetensors": SafetensorsStore, "zarr": ZarrStore}
WRITERS: dict[str, type[StoreWriter]] = {"safetensors": SafetensorsWriter, "zarr": ZarrWriter}


def open_store(path: str | Path) -> Store:
    """Open the store at ``path``; data is mapped on first use.

    Checks the store's structure in O(number of files), reading no array data
    (``jasper_mmap.integrity.store_problems``): the manifest field by field, ``config.json``,
    every recorded data file's size, each safetensors header or zarr array metadata against
    the manifest, and the live negatives generation. Raises the first problem found.

    Raises:
        StoreNotFoundError: ``path``, its manifest, ``config.json`` or a data file is missing.
        StoreFormatError: the manifest is not a jasper_mmap store, of an unknown version or
            backend, or malformed.
        StoreCorruptError: a data file disagrees with the manifest (size, header, metadata).
    """
    path = Path(path)
    manifest = load_manifest(path)
    raise_problems(store_problems(path, manifest), path)
    return BACKENDS[manifest["backend"]](path, manifest)
