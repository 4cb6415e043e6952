"""The low-level pass over ``pair_data/keyword_ids`` (NOTE [keyword pass], NOTE [metadata cache]
in reader.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jasper_mmap._fs.files import open_regular
from jasper_mmap.errors import ArtifactError, ArtifactMissingError, JasperError
from jasper_mmap.sources.hdf5.layout import (
    KEYWORDS_PATH,
    brief,
    data_outside,
    fix_text,
    require_h5py,
)

log = logging.getLogger(__name__)


#: keyword pass: metadata cache room besides the group's name heap, and eviction period
_MDC_BASE = 64 << 20


_EVICT_EVERY = 4096


class KeywordPass:
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
        # a regular file only (NOTE [regular files only] in jasper_mmap/_fs/files.py)
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
            outside = data_outside(ds)
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
            raise self._bad(i, f"cannot be read ({brief(e)})") from None
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
            raise self._bad(i, f"is not a readable dataset ({brief(e)})") from None
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
            f"{self.path}:{KEYWORDS_PATH}: the group's metadata is corrupt ({brief(e)}). "
            f"{fix_text(self.path)}"
        )

    def _bad(self, i: int, what: str) -> JasperError:
        return ArtifactError(
            f"{self.path}:{KEYWORDS_PATH}/{i}: the keyword ids of pair {i} {what}. "
            f"{fix_text(self.path)}"
        )
