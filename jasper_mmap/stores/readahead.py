"""Read-ahead policy in one place: ``madvise`` advice by store size, batch prefetch hints, and
the dense arrays read in windows.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from typing import Any

import numpy as np

from jasper_mmap.format.dtypes import entry_nbytes
from jasper_mmap.format.spec import PAIR_ARRAYS
from jasper_mmap.stores.base import Store

__all__ = ["DENSE_WINDOW", "choose_advice", "ram_bytes"]

#: read unit of a dense array's prefetch (NOTE [dense arrays] in jasper_mmap/stores/readahead.py): on the disk of
#: the README's benchmarks, random 1 MiB reads ran at ~476 MiB/s and 4 KiB reads at ~24k/s
#: (95 MiB/s): a window costs about as much as 50 single pages
DENSE_WINDOW = 1 << 20


def ram_bytes() -> int | None:
    """This machine's physical memory (None where ``sysconf`` cannot tell)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def choose_advice(store_bytes: int) -> str:
    """``"normal"`` or ``"random"`` read-ahead for a store of ``store_bytes`` (NOTE above)."""
    forced = os.environ.get("JASPER_MMAP_MADVISE", "auto").lower()
    if forced in ("normal", "random"):
        return forced
    ram = ram_bytes()
    if ram is None:
        return "normal"
    return "normal" if store_bytes <= ram // 2 else "random"


def _libc_madvise() -> Any:
    """libc's ``madvise`` through ctypes, which drops the GIL for the call (None if absent).

    ``mmap.madvise`` keeps the GIL during the system call, and ``MADV_WILLNEED`` on a file map
    can block while the kernel queues the reads; with gather threads that stalled every other
    thread, the training loop included (NOTE [batch prefetch]).
    """
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _libc_madvise()


def array_address(a: np.ndarray) -> int:
    """Address of an array's first byte."""
    return a.__array_interface__["data"][0]


def map_address(m: mmap.mmap) -> int:
    """Address of the first byte of a read-only map (through a zero-copy numpy view)."""
    return array_address(np.frombuffer(m, dtype=np.uint8, count=1))


def advise_random(address: int, length: int) -> None:
    """``MADV_RANDOM`` on ``length`` bytes at ``address`` (a hint: errors are ignored)."""
    if _MADVISE is not None and hasattr(mmap, "MADV_RANDOM"):
        _MADVISE(address, length, mmap.MADV_RANDOM)


def willneed(m: mmap.mmap, base: int, starts: np.ndarray, length: int) -> None:
    """``MADV_WILLNEED`` on ``[start, start + length)`` of map ``m`` (at ``base``) for each
    start, clipped to the map; through ctypes, without the GIL (NOTE [batch prefetch])."""
    if not starts.size:
        return
    lengths = np.minimum(length, len(m) - starts)
    if _MADVISE is None:
        for start, n in zip(starts.tolist(), lengths.tolist(), strict=True):
            m.madvise(mmap.MADV_WILLNEED, start, n)
        return
    for start, n in zip((starts + base).tolist(), lengths.tolist(), strict=True):
        _MADVISE(start, n, mmap.MADV_WILLNEED)  # a hint: errors are ignored


# NOTE [dense arrays]
# On a store larger than RAM the batch prefetch reads each row's pages (NOTE [batch prefetch]):
# one 4 KiB random read per page. Some arrays are read mostly whole over a pass anyway: the
# source table (1 + n_neg rows per sample), the question table, the per-pair arrays of a split
# that spans the store. Reading those in 1 MiB windows around the rows asked for turns ~50
# page reads into one read the disk serves at its bandwidth, and the windows stay in the page
# cache for the rest of the pass. An array counts as dense when a pass over the split
# references its rows at least DENSE_REFS_PER_WINDOW times per window (the cost of a window in
# page reads, measured on the benchmark disk), densest first, while the dense arrays together
# fit in half of RAM (beyond that, windows would be evicted before the pass used them). A
# window is asked for once per epoch and process (asking again per row costs a system call
# per page; docs/design/dense-arrays.md); a window evicted within an epoch anyway (memory
# pressure from elsewhere) is read a page per fault.
# The steering tables (one row per sample, of one table in four) stay sparse.
# JASPER_MMAP_DENSE=off reads every array page by page. Measured by scripts/bench_large.py
# (README, "Larger than RAM").
DENSE_REFS_PER_WINDOW = 50


def dense_arrays(store: Store, split_len: int) -> frozenset[str]:
    """Arrays of ``store`` that a pass over ``split_len`` samples reads mostly whole."""
    pass  # (import moved into this module)

    if os.environ.get("JASPER_MMAP_DENSE", "auto").lower() == "off":
        return frozenset()
    if not store.reads_ahead:
        return frozenset()  # cached (or not mapped): the batch prefetch does nothing
    refs = dict.fromkeys(PAIR_ARRAYS, split_len)
    refs.update(question_embs=split_len, source_embs=split_len * (1 + store.counts["n_neg"]))
    sizes = {n: entry_nbytes(store.entry(n)) for n in refs}
    budget, dense = (ram_bytes() or 0) // 2, []
    for name in sorted(refs, key=lambda n: -refs[n] / max(sizes[n], 1)):
        windows = -(-sizes[name] // DENSE_WINDOW)
        if refs[name] >= DENSE_REFS_PER_WINDOW * windows and sizes[name] <= budget:
            dense.append(name)
            budget -= sizes[name]
    return frozenset(dense)
