"""Conversion sources behind one small interface: a ``.pt`` directory or an upstream ``dataset.h5``.

The converter reads every dataset the same way, whichever files hold it (the way the stores
hide their backends):

* ``arrays``: the store's array names (``jasper_mmap.format.spec.ARRAYS``) mapped to readers with
  ``path``, ``shape``, ``dtype`` (a torch dtype name), ``np_dtype``, ``nbytes``, ``row_bytes``
  and ``read_rows(start, stop)``; optional splits that are absent are left out;
* ``decode_keywords(on_rows, spill, stop)``: writes the values of the per-pair keyword lists to
  ``spill`` and hands ``(lengths, values)`` int64 blocks to ``on_rows``, in pair order;
* ``keyword_path`` and ``keyword_bytes``: what errors name and progress counts;
* ``close()``.

:class:`PtSource` reads ``.pt`` files (:mod:`~jasper_mmap.sources.pt.reader`,
:mod:`~jasper_mmap.sources.pt.keywords`); :class:`H5DatasetSource` reads ``dataset.h5``
(:mod:`~jasper_mmap.sources.hdf5.reader`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from jasper_mmap._fs.files import describe_path
from jasper_mmap.errors import ArtifactError, ArtifactMissingError, DependencyError
from jasper_mmap.format.spec import ARRAYS
from jasper_mmap.sources.hdf5.layout import H5_FILE
from jasper_mmap.sources.pt.keywords import KeywordsCancelled, decode_keyword_rows
from jasper_mmap.sources.pt.reader import open_tensor

__all__ = [
    "open_source",
    "detect_storage_format",
    "PtSource",
    "H5DatasetSource",
    "SOURCE_FORMATS",
    "STORAGE_FORMATS",
]

log = logging.getLogger(__name__)

SOURCE_FORMATS = ("pt", "hdf5")
STORAGE_FORMATS = ("auto", *SOURCE_FORMATS)
KEYWORD_FILE = "pair_keyword_ids.pt"
OnRows = Callable[[np.ndarray, np.ndarray], None]


class PtSource:
    """A dataset directory of ``.pt`` files (docs/dataset_format.md)."""

    format = "pt"

    def __init__(self, src: Path) -> None:
        self.dir = src
        _check_required_pt(src)
        self.arrays: dict[str, Any] = {}
        for spec in ARRAYS:
            if spec.source is None or spec.name == "pair_keyword_offsets":
                continue
            path = src / spec.source
            if not path.exists() and not spec.required:
                split = spec.name.removesuffix("_idx")
                log.info("%s: no %s split; the store will have none", src, split)
                continue
            self.arrays[spec.name] = open_tensor(path)
        self.keyword_path = src / KEYWORD_FILE
        if not self.keyword_path.exists():
            raise ArtifactMissingError(
                f"{self.keyword_path}: required artifact is missing. Re-run the dataset builder."
            )
        self.keyword_bytes = self.keyword_path.stat().st_size

    def decode_keywords(self, on_rows: OnRows, spill: BinaryIO, stop: threading.Event) -> None:
        decode_keyword_rows(self.keyword_path, on_rows, spill=spill, stop=stop)

    def close(self) -> None:
        """Nothing is held open between reads."""


class H5DatasetSource:
    """An upstream ``dataset.h5`` (with ``{split}_idx.pt`` files beside it winning, as upstream)."""

    format = "hdf5"

    def __init__(self, src: Path) -> None:
        from jasper_mmap.sources.hdf5.reader import open_h5_source

        self.dir = src
        self._h5 = open_h5_source(src)
        self.arrays = self._h5.arrays
        self.keyword_path = self._h5.path
        self.keyword_bytes = 0  # inside dataset.h5, whose bytes the arrays already count

    def decode_keywords(self, on_rows: OnRows, spill: BinaryIO, stop: threading.Event) -> None:
        # as the pickle decoder does: every block's values go to ``spill``, then to ``on_rows``
        for lengths, values in self._h5.keyword_rows():
            if stop.is_set():
                raise KeywordsCancelled()
            spill.write(np.ascontiguousarray(values, dtype="<i8").tobytes())
            spill.flush()
            on_rows(lengths, values)

    def close(self) -> None:
        self._h5.close()


def _pt_names(required: bool | None = None) -> list[str]:
    """The dataset's ``.pt`` file names in ARRAYS order (only the required, or optional, ones)."""
    return [
        spec.source
        for spec in ARRAYS
        if spec.source is not None and (required is None or spec.required == required)
    ]


def _check_required_pt(src: Path) -> None:
    """Name every required ``.pt`` file that ``src`` lacks, in one error (not one a run)."""
    missing = [name for name in _pt_names(required=True) if not (src / name).exists()]
    if len(missing) == 1:
        raise ArtifactMissingError(
            f"{src / missing[0]}: required artifact is missing. Re-run the dataset builder "
            f"or copy the file into the dataset directory."
        )
    if missing:
        raise ArtifactMissingError(
            f"{src}: {len(missing)} required artifacts are missing: {', '.join(missing)}. "
            f"Re-run the dataset builder or copy the files into the dataset directory "
            f"(docs/dataset_format.md lists them)."
        )


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _found_vs_expected(src: Path, h5: bool = True) -> str:
    """What ``src`` holds against what a dataset directory needs, for the errors above."""
    try:
        found = sorted(p.name for p in src.iterdir() if not p.name.startswith("."))
    except OSError:
        found = []
    ours = set(_pt_names())
    foreign = [n for n in found if n.endswith(".pt") and n not in ours]
    holds = f"it holds {_names(found)}" if found else "it is empty"
    optional = " and ".join(_pt_names(required=False))
    expected = (
        f"expected {f'{H5_FILE}, or ' if h5 else ''}the dataset's .pt files "
        f"{_names(_pt_names(True), 99)} ({optional} optional)"
    )
    if foreign:
        verb = "is" if len(foreign) == 1 else "are"
        return f"{holds}; {expected}. {_names(foreign)} {verb} not among the dataset's files"
    return f"{holds}; {expected}"


def open_source(src: Path, format: str) -> PtSource | H5DatasetSource:
    """Open dataset directory ``src`` as a ``"pt"`` or ``"hdf5"`` source (only metadata is read).

    Raises:
        ArtifactMissingError, ArtifactError: missing or malformed files, named in the message.
        ImportError: ``"hdf5"`` without h5py.
    """
    if format not in SOURCE_FORMATS:
        raise ValueError(f"source should be one of {SOURCE_FORMATS}, but got source={format!r}")
    return PtSource(src) if format == "pt" else H5DatasetSource(src)


def _h5py_available() -> bool:
    try:
        import h5py  # noqa: F401
    except ImportError:
        return False
    return True


def _refuse_odd_h5(src: Path, pt: bool) -> None:
    """``dataset.h5`` is there but is no regular file (a FIFO, a device, a directory, a link
    loop or to nothing): say what it is, never that it is missing, and never read it (a FIFO
    would block; NOTE [regular files only] in jasper_mmap/_fs/files.py)."""
    path = src / H5_FILE
    alt = (
        ", or read the .pt files beside it with storage_format='pt' (convert-pt --source pt)"
        if pt
        else ""
    )
    raise ArtifactError(
        f"{path}: {describe_path(path)}, not a regular file, so it cannot be read as the "
        f"dataset's HDF5 file. Replace it with the dataset.h5 file itself{alt}."
    )


def detect_storage_format(src: Path, requested: str) -> str:
    """Which source files of dataset directory ``src`` to read: ``"pt"`` or ``"hdf5"``.

    As the in-RAM dataset decides: ``"auto"`` takes ``dataset.h5`` when it exists and h5py is
    installed, else the ``.pt`` files; ``"pt"``/``"hdf5"`` insist on theirs.

    Raises:
        ValueError: an unknown ``requested``, or the files it needs are absent (an
            ``ArtifactMissingError``, also a FileNotFoundError), or h5py is missing.
        ArtifactError: ``dataset.h5`` is there but is not a regular file (unless ``"pt"``).
    """
    if requested not in STORAGE_FORMATS:
        raise ValueError(f"Invalid storage_format: {requested!r}. Must be 'auto', 'pt', or 'hdf5'")
    h5 = (src / H5_FILE).is_file()
    pt = any((src / spec.source).is_file() for spec in ARRAYS if spec.source)  # any of ours
    odd = not h5 and os.path.lexists(src / H5_FILE)  # there, but no regular file
    # "auto" reads the .pt files past a link to nothing, as the in-RAM dataset (exists())
    if odd and (
        requested == "hdf5" or (requested == "auto" and (not pt or (src / H5_FILE).exists()))
    ):
        _refuse_odd_h5(src, pt)
    if requested == "auto":
        if h5 and _h5py_available():
            return "hdf5"
        if pt:
            return "pt"
        h5_note = (
            f" ({H5_FILE} is there, but reading it needs h5py: pip install h5py)" if h5 else ""
        )
        raise ArtifactMissingError(
            f"No dataset files found in {src}: {_found_vs_expected(src)}{h5_note}. Point at "
            f"the dataset directory, or re-run the dataset builder (docs/dataset_format.md)."
        )
    if requested == "hdf5":
        if not _h5py_available():
            raise DependencyError(
                "HDF5 format requested but h5py is not installed. Install with: "
                "pip install 'jasper_mmap[hdf5]' (or pip install h5py)"
            )
        if not h5:  # the in-RAM dataset's words first, then the fix
            fix = (
                f"{src} holds .pt files: read them with storage_format='pt' or 'auto' "
                f"(convert-pt --source pt, or auto)"
                if pt
                else f"Point at the dataset directory that holds {H5_FILE}"
            )
            raise ArtifactMissingError(f"HDF5 file not found: {src / H5_FILE}. {fix}.")
        return "hdf5"
    if not pt:
        raise ArtifactMissingError(
            f"PT files not found in {src} (none of the dataset's .pt files): "
            f"{_found_vs_expected(src, h5=False)}. Point at the dataset directory, or re-run the "
            f"dataset builder (docs/dataset_format.md)."
        )
    return "pt"
