"""Store backends behind one interface: ``open_store(path)`` picks the backend from the manifest."""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from jasper_mmap._fs.files import as_path
from jasper_mmap.format.integrity import raise_problems, store_problems
from jasper_mmap.format.manifest import read_raw_manifest
from jasper_mmap.stores.base import NEGATIVE_ARRAYS, Store, StoreWriter

__all__ = ["open_store", "Store", "StoreWriter", "BACKENDS", "WRITERS", "NEGATIVE_ARRAYS"]


class _Backends(Mapping):
    """Backend name -> class, each module imported on first use (zarr alone takes ~0.5 s to
    import, which every ``import jasper_mmap`` and CLI call would otherwise pay)."""

    def __init__(self, classes: dict[str, str]) -> None:
        self._where = classes

    def __getitem__(self, name: str) -> Any:
        module, attr = self._where[name].split(":")
        return getattr(importlib.import_module(module, __name__), attr)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


BACKENDS: Mapping[str, type[Store]] = _Backends(
    {"safetensors": ".safetensors_store:SafetensorsStore", "zarr": ".zarr_store:ZarrStore"}
)
WRITERS: Mapping[str, type[StoreWriter]] = _Backends(
    {"safetensors": ".safetensors_store:SafetensorsWriter", "zarr": ".zarr_store:ZarrWriter"}
)


def open_store(path: str | Path, manifest: dict[str, Any] | None = None) -> Store:
    """Open the store at ``path``; data is mapped on first use.

    Checks the store's structure in O(number of files), reading no array data
    (``jasper_mmap.format.integrity.store_problems``): the manifest field by field, ``config.json``,
    every recorded data file's size, each safetensors header or zarr array metadata against
    the manifest, and the live negatives generation. Raises the first problem found.
    ``manifest``: the manifest as :func:`~jasper_mmap.format.manifest.read_raw_manifest` just read it,
    when the caller has it (it is not read again).

    Raises:
        StoreNotFoundError: ``path``, its manifest, ``config.json`` or a data file is missing.
        StoreFormatError: the manifest is not a jasper_mmap store, of an unknown version or
            backend, or malformed.
        StoreCorruptError: a data file disagrees with the manifest (size, header, metadata).
    """
    path = as_path(path, "the store's path")
    if manifest is None:
        manifest = read_raw_manifest(path)
    verified: dict[int, dict[str, Any]] = {}
    raise_problems(store_problems(path, manifest, verified, reuse=True), path)
    return BACKENDS[manifest["backend"]](path, manifest, verified)
