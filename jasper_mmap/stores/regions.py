"""One range of addresses holding many read-only file maps: the rows of a sharded array laid
out so that one ``numpy.take`` gathers them (NOTE [one range for many files]).

# NOTE [one range for many files]
A zarr array is hundreds of shard files. Gathering a batch's rows from one map per file would
cost a Python call per file touched (~190 for 1,664 rows of a 1.5 GB array), so the files are
mapped side by side into one range of addresses instead: the range is reserved first
(``PROT_NONE``, ``MAP_NORESERVE``: no memory, no commit charge), then each file is mapped
read-only (``PROT_READ``, ``MAP_SHARED``) at its place with ``MAP_FIXED``. Places are a whole
number of pages and of rows apart, so every row of every file sits at a row-aligned address of
the range and the whole range is one 2-D numpy array; where a file's rows end on a page
boundary the next file is mapped right there, over the end of the previous map (its shard
index, never read through the map), so the rows of consecutive files follow each other with
no gap (NOTE [zarr shards as rows] in jasper_mmap/stores/zarr_store.py). Pages between a
file's end and the next place are never read (no row lies there). The file maps are
the same shared, read-only page-cache maps as the safetensors backend's; the range is unmapped
when the last array over it is garbage-collected, never while a view of it is alive.
Linux only (libc ``mmap`` through ctypes; Python's ``mmap`` cannot map at an address); where it
is unavailable the zarr backend reads through zarr-python.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import platform
from typing import Any

import numpy as np

__all__ = ["MAP_NORESERVE", "Region", "region_array", "regions_supported", "slot_bytes"]

# MAP_NORESERVE (absent from Python's mmap module before 3.13), by Linux architecture
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", None)
_machine = platform.machine().lower()
if MAP_NORESERVE is None:
    if platform.system() != "Linux":
        MAP_NORESERVE = 0
    elif _machine.startswith(("ppc", "powerpc", "sparc")):
        MAP_NORESERVE = 0x40
    elif _machine.startswith("mips"):
        MAP_NORESERVE = 0x400
    elif _machine.startswith("alpha"):
        MAP_NORESERVE = 0x10000
    else:
        MAP_NORESERVE = 0x4000
_MAP_FIXED = 0x100 if _machine.startswith("alpha") else 0x10
_MAP_FAILED = ctypes.c_void_p(-1).value


def _libc() -> Any:
    if platform.system() != "Linux":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mmap_fn, munmap_fn = libc.mmap, libc.munmap
    except (OSError, AttributeError):
        return None
    mmap_fn.argtypes = (
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    )
    mmap_fn.restype = ctypes.c_void_p
    munmap_fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    munmap_fn.restype = ctypes.c_int
    return mmap_fn, munmap_fn


_LIBC = _libc()


def regions_supported() -> bool:
    """Whether :class:`Region` works here (Linux with libc ``mmap``)."""
    return _LIBC is not None


def slot_bytes(file_bytes: int, row_bytes: int) -> int:
    """The smallest slot holding ``file_bytes`` that is a whole number of pages and rows."""
    unit = math.lcm(mmap.PAGESIZE, max(1, row_bytes))
    return max(unit, -(-file_bytes // unit) * unit)


class Region:
    """A reserved range of ``size`` bytes into which files are mapped read-only at chosen
    offsets; ``numpy.asarray(region)`` is a read-only uint8 array over all of it, which keeps
    the region (and every map in it) alive. Unmapped when garbage-collected."""

    def __init__(self, size: int) -> None:
        if _LIBC is None:
            raise OSError("mapping files side by side needs Linux's mmap (NOTE above)")
        self.size = max(int(size), mmap.PAGESIZE)
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE
        addr = _LIBC[0](None, self.size, 0, flags, -1, 0)  # PROT_NONE: addresses only
        if addr in (None, _MAP_FAILED):
            e = ctypes.get_errno()
            raise OSError(e, f"reserving {self.size} bytes of addresses: {os.strerror(e)}")
        self.address = addr

    def map_file(self, fd: int, offset: int, length: int) -> None:
        """Map the first ``length`` bytes of ``fd`` read-only at ``offset`` in the range."""
        if length <= 0:
            return
        if offset % mmap.PAGESIZE or offset + length > self.size:
            raise ValueError(f"slot at {offset} (+{length}) is not inside the page-aligned range")
        want = self.address + offset
        flags = mmap.MAP_SHARED | _MAP_FIXED
        got = _LIBC[0](want, length, mmap.PROT_READ, flags, fd, 0)
        if got != want:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))

    @property
    def __array_interface__(self) -> dict[str, Any]:
        return {
            "shape": (self.size,),
            "typestr": "|u1",
            "data": (self.address, True),  # read-only
            "version": 3,
        }

    def __del__(self) -> None:
        address, self.address = getattr(self, "address", None), None
        if address is not None and _LIBC is not None:
            _LIBC[1](address, self.size)


def region_array(region: Region) -> np.ndarray:
    """The read-only uint8 array over ``region`` (its base keeps the region alive)."""
    return np.asarray(region)
