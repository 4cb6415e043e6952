"""Read an upstream ``dataset.h5`` as a conversion source, block by block (never whole).

``open_h5_source(dataset_dir)`` returns an :class:`H5Source` whose ``arrays`` offer the same
interface as :class:`~jasper_mmap.sources.pt.reader.TensorArtifact` (``path``, ``shape``,
``dtype``, ``np_dtype``, ``nbytes``, ``row_bytes``, ``read_rows``), keyed by the store's array
names, and whose ``keyword_rows()`` yields ``(lengths, values)`` int64 blocks like those
``keyword_pickle.decode_keyword_rows`` hands out. The HDF5 layout is the one upstream's
``convert_pt_to_hdf5`` writes (docs/dataset_format.md); :data:`H5_PATHS` maps the names.

# NOTE [split source]
Upstream reads ``{split}_idx.pt`` even in HDF5 mode, so a ``{split}_idx.pt`` beside
``dataset.h5`` wins over ``splits/{split}`` (one INFO line says so). Without the ``.pt`` file
the split comes from ``splits/{split}``; ``train`` is required, ``val``/``test`` are optional.
``H5Source.split_sources`` tells which file each split came from.

# NOTE [chunk cache]
Upstream lets h5py guess chunk shapes, which split columns: a [400k, 384] float32 table gets
(6250, 6) chunks, so a row block ending inside a chunk row would decompress its 64 chunks again
for the next block. While a table is streamed (consecutive ``read_rows``) its dataset is held
with a chunk cache of one chunk row (at most 64 MiB); any other read, or the last row, drops
the handle and its cache, so memory stays bounded whatever the file size.

# NOTE [keyword pass]
``pair_data/keyword_ids`` holds one small int32 dataset per pair. ``group[str(i)][:]`` costs
~200 us each here; the pass opens each by its decimal name with ``h5py.h5d.open`` in numeric
order (no listing or sorting of names), checks type and rank, and for the usual contiguous
int32 layout reads the bytes with one ``os.pread`` at the offset HDF5 reports
(``H5Dget_offset``): ~80 us each. Other integer layouts go through ``H5Dread``.

# NOTE [metadata cache]
A scan opens every object header once, so HDF5's adaptive metadata cache sees a low hit rate
and grows to its 32 MiB maximum, counted in on-disk bytes: ~5 KiB of RAM per cached ~300-byte
header, so RSS grew by ~450 MB. Yet the group's name heap (one cache entry of ~16 bytes per
pair, which every name lookup needs) must stay cached, or each lookup re-reads it (1 ms).
So the pass fixes the cache at 64 MiB + 32 bytes per pair, and every 4096 datasets shrinks it
to 1 MiB for one open (which evicts the headers, and the heap once) and grows it back. RSS then
stays ~45 MB above the open file (400k pairs), and the file's own settings come back after.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jasper_mmap._fs.files import describe_path, open_regular
from jasper_mmap.errors import ArtifactError, ArtifactMissingError, JasperError, SampleIndexError
from jasper_mmap.format.spec import SPLITS
from jasper_mmap.sources.hdf5.keywords import KeywordPass
from jasper_mmap.sources.hdf5.layout import (
    H5_FILE,
    H5_PATHS,
    HDF5_SIGNATURE,
    KEYWORDS_PATH,
    KINDS,
    TORCH_DTYPES,
    brief,
    data_outside,
    fix_text,
    require_h5py,
)
from jasper_mmap.sources.pt.reader import TensorArtifact, open_tensor

__all__ = ["H5Array", "H5Source", "iter_h5_keyword_rows", "open_h5_file", "open_h5_source"]

log = logging.getLogger(__name__)


_CACHE_MAX = 64 << 20


_CACHE_SLOTS = 10007


def _has_signature(path: Path, size: int) -> bool:
    """Whether an HDF5 superblock signature sits at byte 0, 512, 1024, 2048, ... of the file."""
    with open_regular(
        path,
        what="HDF5 dataset file",
        error=ArtifactError,
        missing=ArtifactMissingError,
        fix=fix_text(path),
    ) as f:
        pos = 0
        while pos + len(HDF5_SIGNATURE) <= size:
            f.seek(pos)
            if f.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
                return True
            pos = 512 if pos == 0 else pos * 2
    return False


def open_h5_file(path: Path) -> Any:
    """Open ``path`` read-only with h5py; every failure is an ArtifactMissingError/ArtifactError."""
    h5py = require_h5py()
    if not path.is_file():
        what = (
            "is missing"
            if not os.path.lexists(path)
            else f"is not a file: it {describe_path(path)}"
        )
        raise ArtifactMissingError(
            f"{path}: HDF5 dataset file {what}. Write it with "
            f"convert_pt_to_hdf5('{path.parent}'), or use the directory's .pt files."
        )
    size = path.stat().st_size
    if size == 0:
        raise ArtifactError(f"{path}: is empty (0 bytes), not an HDF5 file. {fix_text(path)}")
    if not _has_signature(path, size):
        raise ArtifactError(
            f"{path}: is not an HDF5 file (no HDF5 signature in its first bytes). {fix_text(path)}"
        )
    try:
        try:
            return h5py.File(path, "r", locking="best-effort")
        except (ValueError, TypeError):  # h5py/HDF5 without best-effort locking
            return h5py.File(path, "r")
    except OSError as e:
        raise ArtifactError(
            f"{path}: HDF5 file is truncated or corrupt ({brief(e)}). {fix_text(path)}"
        ) from None


def _get_node(f: Any, path: Path, name: str) -> Any:
    """The object at ``name`` in the open file ``f``, or None; corrupt metadata -> ArtifactError.

    # NOTE [data outside dataset.h5]
    A store is stale when one of its source files changed, and only ``dataset.h5`` (with the
    split ``.pt`` files) is fingerprinted. HDF5 can keep an object's data in other files: an
    external link (the object lives in another HDF5 file), external storage (a dataset's raw
    bytes in other files) and virtual datasets (mapped from other datasets, usually in other
    files). Changes there would never make the store stale, and the keyword pass would read
    an external link's offsets from ``dataset.h5``. So they are refused, naming the link and
    the fix, before anything is read; no other file is opened (a link is checked, not followed).
    """
    h5py = require_h5py()
    try:
        parts, node = name.strip("/").split("/"), None
        for k in range(len(parts)):
            link = f.get("/".join(parts[: k + 1]), getlink=True)
            if link is None:
                return None
            if isinstance(link, h5py.ExternalLink):
                raise _outside(
                    path,
                    "/".join(parts[: k + 1]),
                    f"an HDF5 external link to {link.filename}:{link.path}",
                )
        node = f.get(name)
        if node is not None and node.file.filename != f.filename:  # a soft link led outside
            raise _outside(path, name, f"a link into another file, {node.file.filename}")
    except JasperError:
        raise
    except (OSError, KeyError, RuntimeError, ValueError) as e:
        raise ArtifactError(
            f"{path}:{name}: cannot be opened, the file's metadata is corrupt ({brief(e)}). "
            f"{fix_text(path)}"
        ) from None
    if isinstance(node, h5py.Dataset):
        outside = data_outside(node.id)
        if outside:
            raise _outside(path, name, outside)
    return node


def _outside(path: Path, name: str, what: str) -> ArtifactError:
    return ArtifactError(
        f"{path}:{name}: is {what}. Data outside {path.name} are refused: changes there would "
        f"never make the store stale (NOTE [data outside dataset.h5]). Copy the data into "
        f"{path.name} (h5py's Group.copy, or `h5repack`), or convert from the .pt files."
    )


class H5Array:
    """One HDF5 dataset, read row-block by row-block (the TensorArtifact interface).

    Attributes:
        path: ``"<file>:<dataset>"``, for messages.
        shape: dataset shape.
        dtype: torch dtype name (``"torch.float32"``...), as torch would have saved it.
        np_dtype: numpy dtype of what :meth:`read_rows` returns (little-endian).
        chunk_rows: rows per chunk (None when not chunked); reads that are multiples of it
            decompress each chunk once.
    """

    def __init__(self, f: Any, file_path: Path, name: str, kind: str, ndim: int) -> None:
        self.file_path, self.name = file_path, name
        self.path = f"{file_path}:{name}"
        ds = _get_node(f, file_path, name)
        h5py = require_h5py()
        if not isinstance(ds, h5py.Dataset):
            what = "is missing" if ds is None else "is a group, not a dataset"
            raise ArtifactError(
                f"{self.path}: required HDF5 dataset {what} (upstream's layout, see "
                f"docs/dataset_format.md). {fix_text(file_path)}"
            )
        try:
            dtype, shape = ds.dtype, ds.shape
        except (TypeError, ValueError, OSError) as e:
            raise ArtifactError(
                f"{self.path}: has a type or shape h5py cannot read ({brief(e)}). "
                f"{fix_text(file_path)}"
            ) from None
        self._check(dtype, shape, kind, ndim)
        self.shape: tuple[int, ...] = tuple(int(n) for n in shape)
        self.np_dtype = dtype.newbyteorder("<")
        self.dtype = TORCH_DTYPES[(dtype.kind, dtype.itemsize)]
        self.chunk_rows = ds.chunks[0] if ds.chunks else None
        self._parent, self._leaf = ds.parent.id, name.rsplit("/", 1)[-1].encode()
        self._cache = self._cache_bytes(ds)
        self._ds: Any = None  # handle held while streaming, see NOTE [chunk cache]
        self._next = -1
        self._lock = threading.Lock()
        self._closed = False

    def _check(self, dtype: np.dtype, shape: tuple[int, ...], kind: str, ndim: int) -> None:
        ok = dtype.kind in KINDS[kind] and (dtype.kind, dtype.itemsize) in TORCH_DTYPES
        if not ok or len(shape) != ndim:
            raise ArtifactError(
                f"{self.path}: should be a {ndim}-D array of "
                f"{'floats' if kind == 'float' else 'integers'}, but has shape {list(shape)} "
                f"and dtype {dtype}. {fix_text(self.file_path)}"
            )

    def _cache_bytes(self, ds: Any) -> int:
        """Chunk cache that holds one chunk row (see NOTE [chunk cache]), capped."""
        if not ds.chunks:
            return 0
        across = [-(-n // c) for n, c in zip(ds.shape[1:], ds.chunks[1:], strict=True)]
        row = int(np.prod(ds.chunks)) * ds.dtype.itemsize * int(np.prod(across))
        return min(_CACHE_MAX, max(1 << 20, 2 * row))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.np_dtype.itemsize

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.np_dtype.itemsize

    def _open(self) -> Any:
        h5py = require_h5py()
        dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
        if self._cache:
            dapl.set_chunk_cache(_CACHE_SLOTS, self._cache, 1.0)
        return h5py.Dataset(h5py.h5d.open(self._parent, self._leaf, dapl=dapl))

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Return rows ``start:stop`` as a new C-contiguous array of ``np_dtype``."""
        if not 0 <= start <= stop <= self.shape[0]:
            raise SampleIndexError(
                f"{self.path}: rows {start}:{stop} are outside [0, {self.shape[0]}]."
            )
        out = np.empty((stop - start, *self.shape[1:]), dtype=self.np_dtype)
        if out.size == 0:
            return out
        with self._lock:
            if self._closed:
                raise ArtifactError(f"{self.path}: read after its H5Source was closed.")
            streaming = start == self._next and stop - start >= (self.chunk_rows or 1)
            if not streaming:
                self._drop()
            try:
                if self._ds is None:
                    self._ds = self._open()
                self._ds.read_direct(out, np.s_[start:stop])
            except (OSError, KeyError, RuntimeError, ValueError, TypeError) as e:
                self._drop()
                raise ArtifactError(
                    f"{self.path}: cannot read rows {start}:{stop} (corrupt or truncated "
                    f"data: {brief(e)}). {fix_text(self.file_path)}"
                ) from None
            self._next = stop
            if stop == self.shape[0] or stop - start < (self.chunk_rows or 1):
                self._drop()
        return out

    def _drop(self) -> None:
        """Close the held dataset handle and its chunk cache."""
        if self._ds is not None:
            self._ds.id.close()
            self._ds = None
        self._next = -1

    def close(self) -> None:
        """Release the dataset handle; later reads raise ArtifactError."""
        with self._lock:
            self._drop()
            self._closed = True


class H5Source:
    """An open ``dataset.h5``: its tables as readers, its keyword lists as a streaming pass.

    Attributes:
        path: the ``dataset.h5`` file.
        arrays: store array name -> :class:`H5Array` (or :class:`TensorArtifact` for a split
            read from ``{split}_idx.pt``); ``val_idx``/``test_idx`` are absent when neither
            source has them.
        split_sources: split name -> the file (and dataset) it is read from.
        n_pairs: rows of ``pair_data/index``; ``keyword_rows`` yields that many lists.
    """

    def __init__(self, path: Path, f: Any) -> None:
        self.path, self._file = path, f
        self.arrays: dict[str, H5Array | TensorArtifact] = {}
        self.split_sources: dict[str, str] = {}
        try:
            for name, (h5name, kind, ndim) in H5_PATHS.items():
                if not name.endswith("_idx"):
                    self.arrays[name] = H5Array(f, path, h5name, kind, ndim)
            self._open_splits()
            group = _get_node(f, path, KEYWORDS_PATH)
            if group is None or not hasattr(group, "keys"):
                what = "is missing" if group is None else "is a dataset, not a group"
                raise ArtifactError(
                    f"{path}:{KEYWORDS_PATH}: the group of keyword ids (one dataset per pair) "
                    f"{what}. {fix_text(path)}"
                )
        except BaseException:
            self.close()
            raise
        self._keywords = group
        self.n_pairs = self.arrays["pair_index"].shape[0]

    def _open_splits(self) -> None:
        """Each split from ``{split}_idx.pt`` if present, else ``splits/{split}``; see NOTE."""
        for split in SPLITS:
            name = f"{split}_idx"
            pt = self.path.parent / f"{name}.pt"
            h5name = H5_PATHS[name][0]
            in_h5 = _get_node(self._file, self.path, h5name) is not None
            if pt.exists():
                self.arrays[name] = open_tensor(pt)
                self.split_sources[split] = str(pt)
                if in_h5:
                    log.info(
                        "%s: split %s is read from %s (as upstream does)", self.path, split, pt
                    )
            elif in_h5:
                self.arrays[name] = H5Array(self._file, self.path, h5name, "int", 1)
                self.split_sources[split] = f"{self.path}:{h5name}"
            elif split == "train":
                raise ArtifactMissingError(
                    f"{self.path}: no train split: neither {pt.name} beside it nor "
                    f"{h5name} in it. Add one of them (re-run the dataset builder)."
                )
            else:
                log.info("%s: no %s split (neither %s nor %s)", self.path, split, pt.name, h5name)

    @property
    def files(self) -> list[Path]:
        """Every file the source reads: ``dataset.h5`` and the split ``.pt`` files it uses."""
        pts = [Path(s) for s in self.split_sources.values() if s.endswith(".pt")]
        return [self.path, *pts]

    def keyword_rows(self, block_rows: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(lengths, values)`` int64 blocks of the ``n_pairs`` keyword lists, in order."""
        if self._file is None:
            raise ArtifactError(f"{self.path}: keyword ids read after the H5Source was closed.")
        yield from KeywordPass(self.path, self._keywords.id, self.n_pairs, block_rows)

    def close(self) -> None:
        """Close every reader and the file (idempotent)."""
        for arr in self.arrays.values():
            if isinstance(arr, H5Array):
                arr.close()
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> H5Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_h5_source(dataset_dir: str | Path) -> H5Source:
    """Open ``dataset_dir/dataset.h5`` (or the ``.h5`` file given) as a conversion source.

    Nothing is read but metadata: dataset shapes and dtypes are checked against upstream's
    layout (floats for embeddings, steering, relevance and distances; integers for indices,
    negatives, tiers and splits; the number of dimensions).

    Raises:
        ImportError: h5py is not installed.
        ArtifactMissingError: the file, or every source of the train split, is missing.
        ArtifactError: not an HDF5 file, empty, truncated or corrupt, a required dataset or the
            keyword group missing, a wrong dtype kind or number of dimensions.
    """
    require_h5py()
    path = Path(dataset_dir)
    if path.suffix != ".h5" or path.is_dir():
        path = path / H5_FILE
    path = path.absolute()
    return H5Source(path, open_h5_file(path))


def iter_h5_keyword_rows(
    h5_path: str | Path, n_pairs: int | None = None, block_rows: int = 65536
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(lengths, values)`` int64 blocks of ``pair_data/keyword_ids/0..n_pairs-1``.

    The file is opened here (for the keyword thread, which gets only the path). ``n_pairs``
    defaults to the rows of ``pair_data/index``. See :meth:`H5Source.keyword_rows`.
    """
    with open_h5_source(h5_path) as src:
        n = src.n_pairs if n_pairs is None else n_pairs
        yield from KeywordPass(src.path, src._keywords.id, n, block_rows)
