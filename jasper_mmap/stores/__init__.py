"""Store backends behind one interface: ``open_store(path)`` picks the backend from the manifest."""

from __future__ import annotations

from pathlib import Path

from ..errors import StoreFormatError
from ..layout import read_manifest
from .base import NEGATIVE_ARRAYS, Store, StoreWriter
from .safetensors_store import SafetensorsStore, SafetensorsWriter
from .zarr_store import ZarrStore, ZarrWriter

__all__ = ["open_store", "Store", "StoreWriter", "BACKENDS", "WRITERS", "NEGATIVE_ARRAYS"]

BACKENDS: dict[str, type[Store]] = {"safetensors": SafetensorsStore, "zarr": ZarrStore}
WRITERS: dict[str, type[StoreWriter]] = {"safetensors": SafetensorsWriter, "zarr": ZarrWriter}


def open_store(path: str | Path) -> Store:
    """Open the store at ``path``. Reads only ``manifest.json``; data is mapped on first use.

    Raises:
        StoreNotFoundError: ``path`` or its manifest does not exist.
        StoreFormatError: the manifest is not a jasper_mmap store, or of an unknown version
            or backend.
    """
    manifest = read_manifest(Path(path))
    backend = manifest["backend"]
    if backend not in BACKENDS:
        raise StoreFormatError(
            f"{Path(path) / 'manifest.json'}: backend should be one of {sorted(BACKENDS)}, but got "
            f"backend={backend!r}. Upgrade jasper_mmap or re-create the store with convert-pt."
        )
    return BACKENDS[backend](path, manifest)
