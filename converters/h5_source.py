"""Read an upstream ``dataset.h5`` as a conversion source, block by block (never whole).

``open_h5_source(dataset_dir)`` returns an :class:`H5Source` whose ``arrays`` offer the same
interface as :class:`~jasper_mmap.converters.pt_reader.TensorArtifact` (``path``, ``shape``,
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

from jasper_mmap.errors import ArtifactError, ArtifactMissingError, JasperError, SampleIndexError
from jasper_mmap.files import describe_path, open_regular

from .pt_reader import TensorArtifact, open_tensor

__all__ = [
    "H5_NAME",
    "H5_PATHS",
    "KEYWORDS_PATH",
    "H5Array",
    "H5Source",
    "open_h5_source",
    "iter_h5_keyword_rows",
    "require_h5py",
]

log = logging.getLogger(__name__)

H5_NAME = "dataset.h5"
KEYWORDS_PATH = "pair_data/keyword_ids"
_SIGNATURE = b"\x89HDF\r\n\x1a\n"

#: store array name -> (HDF5 path in upstream's layout, element kind, ndim)
H5_PATHS: dict[str, tuple[str, str, int]] = {
    "question_embs": ("embeddings/questions", "float", 2),
    "source_embs": ("embeddings/sources", "float", 2),
    "keyword_embs": ("embeddings/keywords", "float", 2),
    "centroid_embs": ("embeddings/centroids", "float", 2),
    "pair_index": ("pair_data/index", "int", 2),
    "pair_cluster_id": ("pair_data/cluster_id", "int", 1),
    "pair_relevance": ("pair_data/relevance", "float", 1),
    "hard_negatives": ("negatives/hardnegatives", "int", 2),
    "negative_tiers": ("negatives/tiers", "int", 2),
    "steering_centroid": ("steering/centroid", "float", 2),
    "steering_keyword_weighted": ("steering/keyword_weighted", "float", 2),
    "steering_residual": ("steering/residual", "float", 2),
    "centroid_distances": ("steering/distances", "float", 1),
    "train_idx": ("splits/train", "int", 1),
    "val_idx": ("splits/val", "int", 1),
    "test_idx": ("splits/test", "int", 1),
}
SPLIT_NAMES = ("train", "val", "test")

#: numpy (kind, itemsize) -> torch dtype name: float16..64, int8..64, uint8..64, bool
TORCH_DTYPES = {
    (k, n): f"torch.{name}{8 * n}"
    for k, name in (("f", "float"), ("i", "int"), ("u", "uint"))
    for n in (1, 2, 4, 8)
    if (k, n) != ("f", 1)
} | {("b", 1): "torch.bool"}
KINDS = {"float": ("f",), "int": ("i", "u")}
_CACHE_MAX = 64 << 20
#: keyword pass: metadata cache room besides the group's name heap, and eviction period
_MDC_BASE = 64 << 20
_EVICT_EVERY = 4096
_CACHE_SLOTS = 10007


def require_h5py() -> Any:
    """Import and return h5py, or raise ImportError telling how to install it."""
    try:
        import h5py
    except ImportError:
        raise ImportError(
            "h5py is required to read or write dataset.h5 (HDF5), but it is not installed. "
            "Install it with: pip install 'jasper_mmap[hdf5]' (or pip install h5py)."
        ) from None
    return h5py


def fix_text(h5_path: Path) -> str:
    """The fix for a broken ``dataset.h5``: how to write it again."""
    return (
        f"Re-create it from the .pt files with convert_pt_to_hdf5('{h5_path.parent}') "
        f"(or re-run the builder that wrote it)."
    )


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
        while pos + len(_SIGNATURE) <= size:
            f.seek(pos)
            if f.read(len(_SIGNATURE)) == _SIGNATURE:
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
            f"{path}: HDF5 file is truncated or corrupt ({_brief(e)}). {fix_text(path)}"
        ) from None


def _brief(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


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
            f"{path}:{name}: cannot be opened, the file's metadata is corrupt ({_brief(e)}). "
            f"{fix_text(path)}"
        ) from None
    if isinstance(node, h5py.Dataset):
        outside = _data_outside(node.id)
        if outside:
            raise _outside(path, name, outside)
    return node


def _data_outside(dsid: Any) -> str | None:
    """How a dataset keeps its data outside its file (external storage, virtual), or None."""
    h5py = require_h5py()
    plist = dsid.get_create_plist()
    if plist.get_external_count():
        return f"a dataset whose data is stored in external file {plist.get_external(0)[0]!r}"
    if plist.get_layout() == h5py.h5d.VIRTUAL:
        return "a virtual dataset (its data are mapped from other datasets)"
    return None


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
                f"{self.path}: has a type or shape h5py cannot read ({_brief(e)}). "
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
                    f"data: {_brief(e)}). {fix_text(self.file_path)}"
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
        for split in SPLIT_NAMES:
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
        yield from _KeywordPass(self.path, self._keywords.id, self.n_pairs, block_rows)

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
        path = path / H5_NAME
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
        yield from _KeywordPass(src.path, src._keywords.id, n, block_rows)


class _KeywordPass:
    """One pass over the per-pair keyword datasets; see NOTE [keyword pass]."""

    def __init__(self, path: Path, gid: Any, n_pairs: int, block_rows: int) -> None:
        h5py = require_h5py()
        self.h5d, self.h5s, self.h5t, self.h5l = h5py.h5d, h5py.h5s, h5py.h5t, h5py.h5l
        self.i32 = h5py.h5t.STD_I32LE
        self.path, self.gid, self.n_pairs = path, gid, n_pairs
        self.block_rows = max(1, block_rows)
        self.lengths = np.empty(min(self.block_rows, max(n_pairs, 1)), dtype=np.int64)
        self.values = np.empty(4 * len(self.lengths), dtype=np.int32)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        n = self.n_pairs
        try:
            links = self.gid.get_num_objs()
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            raise self._corrupt(e) from None
        if links > n:
            log.warning(
                "%s: %d keyword datasets, %d pairs; extra ones ignored", self.path, links, n
            )
        self.fid = require_h5py().h5i.get_file_id(self.gid)
        saved = self.fid.get_mdc_config()
        self.big, self.small = self._mdc(_MDC_BASE + 32 * n), self._mdc(1 << 20)
        self.fid.set_mdc_config(self.big)
        # a regular file only (NOTE [regular files only] in jasper_mmap/files.py)
        f = open_regular(
            self.path,
            what="HDF5 dataset file",
            fix=fix_text(self.path),
            error=ArtifactError,
            missing=ArtifactMissingError,
        )
        try:
            yield from self._blocks(f.fileno())
        finally:
            f.close()
            self.fid.set_mdc_config(saved)

    def _mdc(self, size: int) -> Any:
        """Metadata cache settings of a fixed ``size``; see NOTE [metadata cache]."""
        c = self.fid.get_mdc_config()
        c.set_initial_size, c.initial_size, c.max_size = True, size, size
        c.min_size = min(c.min_size, size)
        c.incr_mode = c.flash_incr_mode = c.decr_mode = 0  # adaptive resizing off
        return c

    def _blocks(self, fd: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        k = pos = 0
        for i in range(self.n_pairs):
            n = self._read(fd, i, pos)
            self.lengths[k] = n
            k, pos = k + 1, pos + n
            if k == len(self.lengths):
                yield self.lengths.copy(), self.values[:pos].astype(np.int64)
                k = pos = 0
        if k:
            yield self.lengths[:k].copy(), self.values[:pos].astype(np.int64)

    def _read(self, fd: int, i: int, pos: int) -> int:
        """Append pair ``i``'s keyword ids at ``values[pos:]``; return how many."""
        ds = self._open(i)
        tid = ds.get_type()
        dims = ds.get_space().get_simple_extent_dims()
        if len(dims) != 1:
            raise self._bad(i, f"has shape {list(dims)}, but should be 1-D")
        n = int(dims[0])
        if pos + n > len(self.values):
            self.values = np.resize(self.values, 2 * (pos + n))
        offset = ds.get_offset() if n else None
        if offset is None and n:  # not contiguous in this file: NOTE [data outside dataset.h5]
            outside = _data_outside(ds)
            if outside:
                raise self._bad(i, f"are in {outside}; data outside {self.path.name} are refused")
        if offset is not None and tid.equal(self.i32):
            view = memoryview(self.values[pos : pos + n]).cast("B")
            if os.preadv(fd, [view], offset) != 4 * n:
                raise self._bad(i, "ends past the end of the file (truncated)")
        elif tid.get_class() != self.h5t.INTEGER:
            raise self._bad(i, f"holds {tid.dtype}, but should hold integers (upstream: int32)")
        elif n:
            self._read_converted(ds, i, pos, n)
        return n

    def _read_converted(self, ds: Any, i: int, pos: int, n: int) -> None:
        """Any other integer layout or type: HDF5 converts to int64; ids must fit int32."""
        tmp = np.empty(n, dtype=np.int64)
        try:
            ds.read(self.h5s.ALL, self.h5s.ALL, tmp)
        except (OSError, RuntimeError, ValueError, TypeError) as e:
            raise self._bad(i, f"cannot be read ({_brief(e)})") from None
        if tmp.min() < -(2**31) or tmp.max() >= 2**31:
            raise self._bad(i, f"holds ids outside the int32 range ({tmp.min()}..{tmp.max()})")
        self.values[pos : pos + n] = tmp

    def _open(self, i: int) -> Any:
        name = b"%d" % i
        self._check_link(i, name)
        evict = i % _EVICT_EVERY == 0 < i
        if evict:
            self.fid.set_mdc_config(self.small)  # the open below evicts the cached headers
        try:
            ds = self.h5d.open(self.gid, name)
        except (KeyError, ValueError, OSError, RuntimeError, TypeError) as e:
            if not self._exists(name, e):
                raise ArtifactError(
                    f"{self.path}:{KEYWORDS_PATH}/{i}: the keyword ids of pair {i} are missing "
                    f"(upstream writes one dataset per pair, named 0..{self.n_pairs - 1}). "
                    f"{fix_text(self.path)}"
                ) from None
            raise self._bad(i, f"is not a readable dataset ({_brief(e)})") from None
        if evict:
            self.fid.set_mdc_config(self.big)
        return ds

    def _check_link(self, i: int, name: bytes) -> None:
        """Refuse an external link (NOTE [data outside dataset.h5]): its data would be read at
        offsets of another file. ~3 us per pair."""
        try:
            external = self.gid.links.get_info(name).type == self.h5l.TYPE_EXTERNAL
        except (KeyError, ValueError, OSError, RuntimeError, TypeError):
            return  # missing or unreadable: the open below says which
        if external:
            raise self._bad(
                i,
                f"are an HDF5 external link; data outside {self.path.name} are "
                f"refused (changes there would never make the store stale)",
            )

    def _exists(self, name: bytes, err: BaseException) -> bool:
        try:
            return self.gid.links.exists(name)
        except (KeyError, ValueError, OSError, RuntimeError, TypeError):
            raise self._corrupt(err) from None

    def _corrupt(self, e: BaseException) -> JasperError:
        return ArtifactError(
            f"{self.path}:{KEYWORDS_PATH}: the group's metadata is corrupt ({_brief(e)}). "
            f"{fix_text(self.path)}"
        )

    def _bad(self, i: int, what: str) -> JasperError:
        return ArtifactError(
            f"{self.path}:{KEYWORDS_PATH}/{i}: the keyword ids of pair {i} {what}. "
            f"{fix_text(self.path)}"
        )
