"""``convert_pt_to_hdf5``: write upstream's ``dataset.h5`` from a ``.pt`` directory, streamed.

The file has exactly the groups, dataset names, shapes and dtypes that upstream's
``JASPERSteeringDataset.convert_pt_to_hdf5`` writes (docs/dataset_format.md): tensors keep the dtype
torch saved them with, ``pair_data/keyword_ids/<i>`` is one int32 dataset per pair, and
``splits/*`` holds the splits whose ``{split}_idx.pt`` exists. Two things differ on purpose:

- **Streaming.** Tensors are read block by block with ``open_tensor(...).read_rows`` and
  written into pre-created datasets; keyword ids come from ``decode_keyword_rows``. Memory stays
  a few blocks whatever the size (upstream loads every tensor whole).
- **Atomic.** The file is written as ``.dataset.h5.partial-PID-TOKEN-HOST`` in the same directory,
  fsynced, and published with one ``os.replace``; an existing ``dataset.h5`` is replaced (as
  upstream overwrites it), but readers never see a half-written file and a failed run leaves
  the old one untouched. A killed run's partial file is removed by the next run.
- **Failed writes never reach HDF5.** After a failed write (disk full, ``ulimit -f``), HDF5
  crashes the process when the file is closed or at exit (seen with h5py 3.16 / HDF5 2.0: a
  segfault). So HDF5 writes through a Python file object (h5py's ``fileobj`` driver),
  :class:`_GuardedFile`, that records the first failed write and from then on pretends to
  write; the writer checks it after every array and every decoded block of keyword ids,
  stops, closes the file (which cannot fail any more) and raises ``StoreWriteError``. The
  partial file is removed and the old ``dataset.h5`` stays. No child process is started.
- **Chunks** are full rows of about 1 MiB (upstream lets h5py guess, which splits columns);
  readers cannot tell the difference, and row blocks then decompress each chunk once.
- bfloat16 and float8 tensors, which upstream cannot convert (numpy has neither), are
  widened to float32 (exact), with a warning.
"""

from __future__ import annotations

import io
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np

from jasper_mmap._fs.partials import partial_name, remove_stale_partial_files
from jasper_mmap._fs.publish import fsync_dir
from jasper_mmap.errors import (
    ArtifactError,
    ArtifactMissingError,
    JasperError,
    StoreExistsError,
    StoreWriteError,
    write_error,
)
from jasper_mmap.format.dtypes import to_float32
from jasper_mmap.sources.hdf5.layout import (
    H5_FILE,
    H5_PATHS,
    KEYWORDS_PATH,
    KINDS,
    TORCH_DTYPES,
    require_h5py,
)
from jasper_mmap.sources.pt.keywords import decode_keyword_rows
from jasper_mmap.sources.pt.reader import TensorArtifact, open_tensor

__all__ = ["convert_pt_to_hdf5"]

log = logging.getLogger(__name__)

#: upstream's write order: group -> store array names
_GROUPS = {
    "embeddings": ["question_embs", "source_embs", "keyword_embs", "centroid_embs"],
    "pair_data": ["pair_index", "pair_cluster_id", "pair_relevance"],
    "negatives": ["hard_negatives", "negative_tiers"],
    "steering": [
        "steering_centroid",
        "steering_keyword_weighted",
        "steering_residual",
        "centroid_distances",
    ],
    "splits": ["train_idx", "val_idx", "test_idx"],
}
_NUMPY_OF = {torch: np.dtype(f"<{kind}{size}") for (kind, size), torch in TORCH_DTYPES.items()}
_CHUNK_BYTES = 1 << 20


def _is_bf16_bits(art: TensorArtifact) -> bool:
    return art.dtype == "torch.bfloat16" and art.np_dtype.kind == "u"


def _stored_dtype(art: TensorArtifact, warn: bool = False) -> np.dtype:
    """The dtype the tensor is written with: as torch saved it; bfloat16/float8 as float32."""
    if art.dtype in _NUMPY_OF:
        return _NUMPY_OF[art.dtype]
    if _is_bf16_bits(art) or (art.dtype.startswith("torch.float") and art.np_dtype.kind == "f"):
        if warn:
            log.warning("%s: %s is written as float32 (HDF5 has no such type)", art.path, art.dtype)
        return np.dtype("<f4")
    raise ArtifactError(
        f"{art.path}: holds {art.dtype}, which HDF5 (and upstream's converter) cannot "
        f"store. Re-save it as float32 (or int64), or convert with convert-pt instead."
    )


def _open_inputs(src: Path, quiet: bool = False) -> dict[str, TensorArtifact]:
    """Describe every input tensor (no data read); check dtype kinds and dimensions."""
    arts: dict[str, TensorArtifact] = {}
    for name, (h5name, kind, ndim) in H5_PATHS.items():
        path = src / f"{name}.pt"
        if name in ("val_idx", "test_idx") and not path.exists():
            if not quiet:
                log.info("%s: no %s; dataset.h5 gets no %s", src, path.name, h5name)
            continue
        art = arts[name] = open_tensor(path)
        if len(art.shape) != ndim or _stored_dtype(art).kind not in KINDS[kind]:
            raise ArtifactError(
                f"{art.path}: should be a {ndim}-D tensor of "
                f"{'floats' if kind == 'float' else 'integers'} (for {h5name}), but is "
                f"{list(art.shape)} {art.dtype}. Re-run the dataset builder."
            )
    return arts


def _chunk_rows(shape: tuple[int, ...], itemsize: int) -> int:
    row = int(np.prod(shape[1:], dtype=np.int64)) * itemsize
    return max(1, min(max(shape[0], 1), _CHUNK_BYTES // max(row, 1)))


def _write_array(group: Any, leaf: str, art: TensorArtifact, compression, block_bytes) -> None:
    """Create ``group/leaf`` (chunked, compressed) and stream the tensor into it."""
    t0 = time.perf_counter()
    dtype = _stored_dtype(art, warn=True)
    rows = _chunk_rows(art.shape, dtype.itemsize)
    chunked = all(art.shape[1:]) and art.shape[0] > 0
    ds = group.create_dataset(
        leaf,
        shape=art.shape,
        dtype=dtype,
        chunks=(rows, *art.shape[1:]) if chunked else None,
        compression=compression if chunked else None,
    )
    n = art.shape[0]
    step = rows * max(1, block_bytes // max(1, rows * art.row_bytes))
    for start in range(0, n if chunked else 0, step):
        block = art.read_rows(start, min(n, start + step))
        if _is_bf16_bits(art):
            block = to_float32(block.view(np.uint16), "bfloat16")
        ds[start : start + block.shape[0]] = block.astype(dtype, copy=False)
    log.info(
        "dataset.h5: wrote %s %s %s (%.1f MB) in %.1f s",
        ds.name.lstrip("/"),
        list(art.shape),
        dtype.name,
        art.nbytes / 1e6,
        time.perf_counter() - t0,
    )


def _write_keywords(group: Any, kw_path: Path, n_pairs: int, check: Any = None) -> None:
    """One int32 dataset per pair under ``pair_data/keyword_ids``, as upstream writes them;
    ``check()`` (a failed write so far?) is called once per decoded block."""
    h5py = require_h5py()
    h5d, h5p, h5s, h5t = h5py.h5d, h5py.h5p, h5py.h5s, h5py.h5t
    t0 = time.perf_counter()
    gid = group.create_group("keyword_ids").id
    dcpl = h5p.create(h5p.DATASET_CREATE)
    dcpl.set_obj_track_times(False)  # what h5py's create_dataset sets
    lcpl = h5p.create(h5p.LINK_CREATE)
    lcpl.set_create_intermediate_group(True)
    spaces: dict[int, Any] = {}
    row = 0

    def write_block(lengths: np.ndarray, values: np.ndarray) -> None:
        nonlocal row
        ids = _as_int32(kw_path, lengths, values, row)
        start = 0
        for end in np.cumsum(lengths).tolist():
            n = end - start
            space = spaces.get(n)
            if space is None:
                space = spaces[n] = h5s.create_simple((n,))
            ds = h5d.create(gid, b"%d" % row, h5t.STD_I32LE, space, dcpl=dcpl, lcpl=lcpl)
            if n:
                ds.write(h5s.ALL, h5s.ALL, ids[start:end])
            ds.close()
            start, row = end, row + 1
        if check is not None:
            check()

    decode_keyword_rows(kw_path, write_block)
    if row != n_pairs:
        raise ArtifactError(
            f"{kw_path}: should hold one list per pair ({n_pairs}, as pair_index.pt has), "
            f"but holds {row}. Re-run the dataset builder."
        )
    log.info(
        "dataset.h5: wrote %s (%d datasets) in %.1f s",
        KEYWORDS_PATH,
        row,
        time.perf_counter() - t0,
    )


def _as_int32(path: Path, lengths: np.ndarray, values: np.ndarray, row: int) -> np.ndarray:
    """The block's values as int32 (upstream's dtype); ids that do not fit are an error."""
    bad = np.flatnonzero((values < -(2**31)) | (values >= 2**31))
    if bad.size:
        pair = row + int(np.searchsorted(np.cumsum(lengths), bad[0], side="right"))
        raise ArtifactError(
            f"{path}: the keyword ids of pair {pair} hold {int(values[bad[0]])}, which does not "
            f"fit int32 (upstream's dtype for keyword_ids). Keyword ids are rows of "
            f"keyword_embs.pt: re-run the dataset builder."
        )
    return values.astype(np.int32)


def _check_compression(compression: Any) -> None:
    """Refuse a compression h5py cannot apply, before anything is written."""
    h5py = require_h5py()
    try:
        with h5py.File(
            f"check-{secrets.token_hex(4)}", "w", driver="core", backing_store=False
        ) as f:
            f.create_dataset("x", shape=(4,), dtype="<f4", chunks=(4,), compression=compression)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"compression should be 'gzip', 'lzf', a gzip level 0-9 or None, but got "
            f"compression={compression!r} ({e})."
        ) from None


def _target(src: Path) -> Path:
    """``src/dataset.h5``, or the file a symlink there points to; a directory is refused."""
    final = src / H5_FILE
    if final.is_symlink():
        final = final.resolve()
    if final.is_dir():
        raise StoreExistsError(
            f"{final}: is a directory, so dataset.h5 cannot be written there. Move it away."
        )
    return final


def _write_failure(final: Path, e: OSError) -> OSError:
    err = write_error(final, e, "dataset.h5")
    if err is not e:
        return err
    return StoreWriteError(
        f"{final}: could not write dataset.h5 ({str(e).splitlines()[0][:200]}). Nothing was "
        f"replaced; check free space and permissions of {final.parent}, then run again."
    )


class _GuardedFile(io.RawIOBase):
    """A file for h5py's ``fileobj`` driver that records a failed write instead of raising.

    See the module docstring: HDF5 must never see a failed write. After the first failure the
    remaining writes are skipped (the position moves on), so HDF5 finishes as if all went well
    and the caller raises :attr:`error` instead.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._f = open(path, "x+b", buffering=0)  # noqa: SIM115 - closed in close()
        self.error: OSError | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._f.seek(pos, whence)

    def tell(self) -> int:
        return self._f.tell()

    def readinto(self, b: Any) -> int:
        return self._f.readinto(b)

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        if self.error is None:
            try:
                done = 0
                while done < len(view):  # a short write (disk filling) is retried until it fails
                    done += self._f.write(view[done:]) or 0
                return len(view)
            except OSError as e:
                self.error = e
        self._f.seek(len(view), os.SEEK_CUR)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        try:
            return self._f.truncate(size)
        except OSError as e:
            self.error = self.error or e
            return self.tell() if size is None else size

    def check(self) -> None:
        """Raise the first failed write, if any."""
        if self.error is not None:
            raise self.error

    def fsync(self) -> None:
        try:
            os.fsync(self._f.fileno())
        except OSError as e:
            self.error = self.error or e
        self.check()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
        super().close()


def _write_file(tmp: Path, src: Path, arts: dict[str, TensorArtifact], compression) -> None:
    """Write the whole file into ``tmp`` through a :class:`_GuardedFile` (see above)."""
    h5py = require_h5py()
    guard = _GuardedFile(tmp)
    try:
        with h5py.File(guard, "w") as f:
            groups = {g: f.create_group(g) for g in _GROUPS}
            for g, names in _GROUPS.items():
                for name in names:
                    if name in arts:
                        leaf = H5_PATHS[name][0].split("/")[1]
                        _write_array(groups[g], leaf, arts[name], compression, 16 << 20)
                        f.flush()
                        guard.check()
                if g == "pair_data":
                    n = arts[names[0]].shape[0]
                    _write_keywords(groups[g], src / "pair_keyword_ids.pt", n, guard.check)
            del groups
            f.flush()
            guard.check()
        guard.check()  # closing wrote the last metadata
        guard.fsync()
    finally:
        guard.close()


def _write_and_publish(final: Path, src: Path, compression: Any) -> None:
    """Write a hidden partial file beside ``final``, then replace ``final`` with it at once."""
    remove_stale_partial_files(final)  # killed runs' partial files (this host's)
    tmp = final.with_name(partial_name(final.name))
    try:
        _write_file(tmp, src, _open_inputs(src, quiet=True), compression)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, JasperError):
            raise _write_failure(final, e) from e
        raise


def convert_pt_to_hdf5(dataset_dir: str | Path, compression: Any = "gzip") -> Path:
    """Write ``dataset_dir/dataset.h5`` from the directory's ``.pt`` files (upstream's layout).

    Args:
        dataset_dir: a ``.pt`` dataset directory (docs/dataset_format.md).
        compression: h5py compression of the tensor datasets: ``"gzip"`` (upstream's
            default), ``"lzf"``, a gzip level 0-9, or None. Keyword datasets are never
            compressed (as upstream).

    Returns:
        The path of ``dataset.h5``.

    Raises:
        ImportError: h5py is not installed.
        ValueError: ``compression`` is not one h5py can apply.
        ArtifactMissingError, ArtifactError: a missing or bad ``.pt`` file, named.
        StoreExistsError: ``dataset.h5`` is a directory.
        StoreWriteError: the file could not be written (disk full, permissions).
    """
    require_h5py()
    src = Path(dataset_dir).absolute()
    if not src.is_dir():
        raise ArtifactMissingError(
            f"{src}: dataset directory does not exist (or is not a directory)."
        )
    _check_compression(compression)
    arts = _open_inputs(src)
    if not (src / "pair_keyword_ids.pt").exists():
        raise ArtifactMissingError(
            f"{src / 'pair_keyword_ids.pt'}: required artifact is missing. "
            f"Re-run the dataset builder."
        )
    final = _target(src)
    t0 = time.perf_counter()
    _write_and_publish(final, src, compression)
    pt_bytes = sum(a.path.stat().st_size for a in arts.values())
    log.info(
        "wrote %s in %.1f s: %.1f MB (the tensors' .pt files: %.1f MB)",
        final,
        time.perf_counter() - t0,
        final.stat().st_size / 1e6,
        pt_bytes / 1e6,
    )
    return final
