"""Publishing new hard negatives as a new generation of a store (hot reload).

# NOTE [hot reload]
A publisher (``publish_negatives``, or ``reload_negatives`` after a miner rewrote the ``.pt``
files) validates the new ``hard_negatives``/``negative_tiers`` block by block, streams them
into ``STORE/.negatives.partial-PID-TOKEN-HOST/`` (a name no reader opens), renames the
finished file/group to ``negatives/gen-NNNNNN.*``, writes its description ``gen-NNNNNN.json``
and then replaces ``negatives/CURRENT.json`` with one atomic ``os.replace``: that rename is the
publication.
A publisher killed at any point leaves CURRENT naming the previous, complete generation.
A publisher takes the store-level writer lock first (NOTE [one writer per store] in
``_atomic.py``: shared with ``convert-pt --overwrite`` and the auto-convert), then opens and
checks the store, so it writes into, and cleans up, only the store it opened; it also takes the
older ``negatives/.publish.lock`` (older versions' publishers take only that one, so it is kept;
opened non-blocking, and refused unless it is a regular file: a FIFO there must not hang the
publish). Only names
that generations really have (``gen-NNNNNN.json``, ``gen-NNNNNN.safetensors``, the zarr group
``gen-NNNNNN``, with the number written exactly as ``generation_name`` writes it) are read as
generations; any other file in ``negatives/`` (``gen-000000 (copy).json``, ``gen-0000001.json``,
``gen-000001.txt``) is left alone. A publish whose next number would reach ``MAX_GENERATION``
is refused before anything is written, naming the file(s) that took the number there.

Readers never follow CURRENT on their own: ``reload_negatives()`` reads it and writes the
generation number into the dataset's control block (NOTE [worker start-up] in jasper_mmap/dataset/control.py);
every process switches at the start of its next batch, so a batch is always served from one
generation. A process holds a shared ``flock`` on ``gen-NNNNNN.json`` while it maps that
generation. After publishing, the publisher removes generations older than the newest ``keep``
(default 2) whose lock it can take exclusively, i.e. that no process maps any more; a mapped
file is never rewritten, and unlinking it leaves existing maps valid.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import stat
import time
from pathlib import Path
from typing import Any

import numpy as np

from jasper_mmap._fs.files import file_kind, open_regular, write_json_atomic
from jasper_mmap._fs.lock import close_lock_fd, held_flock, open_lock_fd, store_lock
from jasper_mmap._fs.partials import partial_dir, remove_stale_partials_in
from jasper_mmap._fs.publish import fsync_dir, fsync_tree
from jasper_mmap.errors import ArtifactError, JasperError, StoreExistsError, write_error
from jasper_mmap.format.manifest import read_generation_desc
from jasper_mmap.format.recorded import entry_files
from jasper_mmap.format.spec import MAX_GENERATION, NEGATIVES_DIR, POINTER, generation_name
from jasper_mmap.format.store_dirs import remove_stale_partials
from jasper_mmap.stores import WRITERS, open_store

__all__ = ["publish_generation", "KEEP_GENERATIONS"]

log = logging.getLogger(__name__)

KEEP_GENERATIONS = 2
#: the lock older versions' publishers take (inside ``negatives/``)
PUBLISH_LOCK = ".publish.lock"
_BLOCK_ROWS = 1 << 16


class _Rows:
    """Row-block access to an in-memory array, a ``.pt`` file or a source reader (anything
    with ``read_rows``, ``shape``, ``np_dtype``, ``path``), with a name for errors."""

    def __init__(self, value: Any, what: str) -> None:
        self.what = what
        if hasattr(value, "read_rows"):
            self.art = value
            self.path, self.shape, self.kind = str(value.path), value.shape, value.np_dtype.kind
            self.read = lambda a, b: self._int64(self.art.read_rows(a, b), a)
        else:
            try:  # a ragged list, or objects numpy cannot make an array of
                arr = (
                    value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
                )
            except (ValueError, TypeError) as e:
                raise ArtifactError(
                    f"the {what} array: {what} should be an [N_pairs, n_neg] array of "
                    f"integers, but it cannot be made into one ({e}). Nothing was published "
                    f"and the old negatives stay in use; pass a tensor or a numpy array."
                ) from None
            self.path, self.shape, self.kind = f"the {what} array", arr.shape, arr.dtype.kind
            self.read = lambda a, b: self._int64(np.asarray(arr[a:b]), a)

    def _int64(self, block: np.ndarray, start: int) -> np.ndarray:
        """``block`` as int64; unsigned values past its range are refused, never wrapped
        (as the converter refuses them)."""
        if block.dtype.kind == "u" and block.dtype.itemsize >= 8 and block.size:
            too_big = block > np.iinfo(np.int64).max
            if too_big.any():
                bad = np.flatnonzero(too_big.any(axis=-1) if block.ndim > 1 else too_big)[:5]
                raise ArtifactError(
                    f"{self.path}: {self.what} should fit int64, but rows "
                    f"{(bad + start).tolist()} hold values of 2**63 or more (uint64). The old "
                    f"negatives stay in use; fix the miner and publish again."
                )
        return block.astype(np.int64, copy=False)


def _check(rows: _Rows, n_pairs: int, n_neg: int) -> None:
    if rows.kind not in "iu":
        raise ArtifactError(
            f"{rows.path}: {rows.what} should hold integers, but has dtype kind "
            f"{rows.kind!r}. Pass an int64 tensor or array."
        )
    if tuple(rows.shape) != (n_pairs, n_neg):
        raise ArtifactError(
            f"{rows.path}: {rows.what} should have shape [{n_pairs}, {n_neg}] (N_pairs, n_neg "
            f"of the store), but has {list(rows.shape)}. Re-run the miner."
        )


def _stream(rows: _Rows, writer, lo: int | None, hi: int | None, what: str) -> dict[str, int]:
    """Write ``rows`` block by block, checking every value is in ``[lo, hi)`` (when given);
    return their min/max."""
    n, vmin, vmax = rows.shape[0], None, None
    for start in range(0, n, _BLOCK_ROWS):
        block = rows.read(start, min(n, start + _BLOCK_ROWS))
        if lo is not None and block.size and (block.min() < lo or block.max() >= hi):
            bad = np.flatnonzero(((block < lo) | (block >= hi)).any(axis=1))[:5]
            raise ArtifactError(
                f"{rows.path}: {what} should be in [{lo}, {hi}), but rows "
                f"{(bad + start).tolist()} hold {block[bad].tolist()}. The old "
                f"negatives stay in use; fix the miner and publish again."
            )
        if block.size:
            vmin = int(block.min()) if vmin is None else min(vmin, int(block.min()))
            vmax = int(block.max()) if vmax is None else max(vmax, int(block.max()))
        writer.write(rows.what, block)
    return {"min": vmin, "max": vmax}


#: what a generation's files are called: its description, its safetensors file or its zarr
#: group (no extension); a name is a generation's only when its stem is exactly
#: ``generation_name(g)`` (``gen-0000001.json``, ``gen-000001.txt`` are not ours)
_GEN_NAME = re.compile(r"gen-(\d{6,})(\.json|\.safetensors)?")


def _generation_of(name: str) -> int | None:
    """The generation ``name`` belongs to, or None when it is not one of our names."""
    m = _GEN_NAME.fullmatch(name)
    if m is None or generation_name(int(m.group(1))) != f"gen-{m.group(1)}":
        return None  # leading zeros past six digits: another name for the same number
    return int(m.group(1))


def _generations(neg_dir: Path, suffix: str | None = ".json") -> dict[int, list[Path]]:
    """The entries of ``neg_dir`` named as generation files are (``suffix=None``: any of
    their extensions, or none): generation -> paths. Other names are not ours to read or
    remove; numbers from ``MAX_GENERATION`` on are never ours either (``_next_generation``
    names them)."""
    found: dict[int, list[Path]] = {}
    with os.scandir(neg_dir) as it:
        for entry in it:
            g = _generation_of(entry.name)
            if g is None or g >= MAX_GENERATION:
                continue
            if suffix is None or entry.name == f"{generation_name(g)}{suffix}":
                found.setdefault(g, []).append(Path(entry.path))
    return found


def _next_generation(neg_dir: Path) -> int:
    """One past every generation number in use (a name of ours taken by anything counts);
    refused at ``MAX_GENERATION``, naming the files that took the number there."""
    taken = _generations(neg_dir, None)
    current = read_generation_desc(neg_dir.parent)["generation"]
    g = max([current, *taken]) + 1
    if g >= MAX_GENERATION:
        top = max(taken, default=-1)
        names = (
            ", ".join(str(p) for p in sorted(taken[top]))
            if top >= current
            else f"{neg_dir / POINTER} (generation {current})"
        )
        raise StoreExistsError(
            f"{neg_dir}: the next negatives generation would be {g}, past the last one allowed "
            f"({MAX_GENERATION - 1}), because of {names}. Nothing was published and the old "
            f"negatives stay in use; move the stray file(s) out of {neg_dir} (or, when the "
            f"live generation is that high, convert the store again), then publish again."
        )
    return g


def _collect(neg_dir: Path, current: int, keep: int) -> list[int]:
    """Remove generations older than the newest ``keep`` that no process holds (only those
    whose description is a regular file: a FIFO or a directory there is not ours)."""
    removed = []
    data = _generations(neg_dir, None)
    metas = _generations(neg_dir).items()
    for g, (meta,) in sorted((g, m) for g, m in metas if not m[0].is_symlink()):  # one each
        if g > current - keep:
            continue
        try:  # a FIFO swapped in after the listing must not hang the publisher
            f = open_regular(meta, what="generation description", missing=None)
        except (FileNotFoundError, JasperError):
            continue  # gone, or not a regular file: not ours to remove
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a reader still maps it; a later publish retries
            for path in data.get(g, []):
                if path.suffix == ".json":
                    continue  # the description goes last (NOTE [generation leases])
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)  # zarr group
                else:
                    path.unlink(missing_ok=True)
            meta.unlink()
        removed.append(g)
    return removed


def publish_generation(
    store_path: Path,
    hard_negatives: Any,
    negative_tiers: Any,
    *,
    keep: int = KEEP_GENERATIONS,
    sources: dict[str, Any] | None = None,
    number: int | None = None,
) -> int:
    """Validate and publish new negatives as the next generation of the store at
    ``store_path`` (arrays, tensors or row readers with ``read_rows``); see
    :func:`jasper_mmap.publish_negatives` (dataset directories, ``.pt`` paths), which
    checks its arguments and calls this. ``number``: the generation's number, decided
    elsewhere (a node's mirror of a store on object storage: NOTE [remote publish] in
    jasper_mmap/remote/upload.py); it must be past every number in use here."""
    negs, tiers = _Rows(hard_negatives, "hard_negatives"), _Rows(negative_tiers, "negative_tiers")
    # NOTE [one writer per store]: the store is opened and checked only once the lock is held
    with store_lock(store_path, "publishing negatives") as real:
        # a killed conversion's leftovers beside the store: its partial, or the old store a
        # replacement moved aside (NOTE [a killed replacement] in jasper_mmap/_fs/publish.py)
        remove_stale_partials(real)
    with store_lock(store_path, "publishing negatives") as real, open_store(real) as store:
        c = store.counts
        for rows in (negs, tiers):
            _check(rows, c["n_pairs"], c["n_neg"])
        neg_dir = real / NEGATIVES_DIR
        try:
            with held_flock(_open_publish_lock(neg_dir, real)):  # never kept by a fork child
                g, removed = _publish_locked(store, neg_dir, negs, tiers, sources, keep, number)
        except OSError as e:
            if isinstance(e, JasperError):
                raise
            raise write_error(real, e, "a negatives generation") from e
    log.info("published negatives generation %d in %s (removed %s)", g, real, removed or "none")
    return g


def _open_publish_lock(neg_dir: Path, store: Path) -> int:
    """Open (create) ``negatives/.publish.lock``, the lock older versions' publishers take
    (they take only that one, not the store lock: NOTE [hot reload]). Non-blocking and
    without following links: a FIFO there must not hang the publish (opened for writing
    with no reader it fails with ENXIO), and anything but a regular file is refused."""
    path = neg_dir / PUBLISH_LOCK
    fix = "Move it away, then publish again (publishers create their own there)."
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = open_lock_fd(path, flags)  # registered at once: never kept by a fork child
    except OSError as e:
        if e.errno not in (errno.ENXIO, errno.ELOOP, errno.EISDIR):
            raise
        try:
            kind = "a symbolic link" if path.is_symlink() else file_kind(os.stat(path).st_mode)
        except OSError:
            kind = "not a regular file"
        raise StoreExistsError(
            f"{path}: the publish lock of store {store} is {kind}, not a regular file. {fix}"
        ) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        close_lock_fd(fd)
        raise StoreExistsError(
            f"{path}: the publish lock of store {store} is {file_kind(mode)}, not a regular "
            f"file. {fix}"
        )
    os.set_blocking(fd, True)
    return fd  # a raw descriptor: held_flock releases it (LOCK_UN) and closes it


def _publish_locked(
    store, neg_dir: Path, negs, tiers, sources, keep, number=None
) -> tuple[int, list[int]]:
    """Write, describe and publish the next generation (the publish lock is held)."""
    remove_stale_partials(neg_dir)  # STORE/.negatives.partial-*: killed publishers' data
    remove_stale_partials_in(neg_dir)  # their half-written descriptions
    previous = read_generation_desc(store.path)
    g = _next_generation(neg_dir)
    if number is not None:
        if number < g:
            raise StoreExistsError(
                f"{neg_dir}: generation {number} was asked for, but numbers up to {g - 1} are "
                f"in use there. Nothing was published; publish again."
            )
        g = number
    what = f"negatives generation {g}"
    try:
        tmp = partial_dir(neg_dir)  # STORE/.negatives.partial-PID-TOKEN-HOST: same filesystem
        try:
            entries = _write_generation(store, tmp, g, negs, tiers, store.counts["n_sources"])
            for item in tmp.glob(f"{generation_name(g)}*"):  # the file, or the zarr group
                os.rename(item, neg_dir / item.name)
            fsync_dir(neg_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        if isinstance(e, JasperError):
            raise
        raise write_error(store.path, e, what) from e
    tier_range = entries["negative_tiers"]["stats"]
    warnings = []
    if tier_range["min"] is not None and (tier_range["min"] < 1 or tier_range["max"] > 4):
        warnings.append(
            f"{store.path}: generation {g} has tiers in [{tier_range['min']}, "
            f"{tier_range['max']}], outside the usual 1..4; the in-RAM dataset passed tiers "
            f"through as they were, so they are served as they are"
        )
        log.warning("%s", warnings[-1])
    desc = {
        "generation": g,
        "arrays": entries,
        "warnings": warnings,
        "files": entry_files(store.path, entries),
        "created_unix": time.time(),
        # the .pt negatives last taken in, carried forward (resolve.negatives_to_take_in)
        "sources": previous.get("sources", {}) if sources is None else sources,
    }
    write_json_atomic(neg_dir / f"{generation_name(g)}.json", desc, what)
    write_json_atomic(neg_dir / POINTER, desc, what)  # the publication
    fsync_dir(neg_dir)
    return g, _collect(neg_dir, g, max(2, keep))


def _write_generation(store, tmp: Path, g: int, negs: _Rows, tiers: _Rows, n_sources: int) -> dict:
    writer = WRITERS[store.backend](tmp)
    shape = tuple(negs.shape)
    unit = generation_name(g)
    writer.begin_unit(
        unit, [("hard_negatives", shape, "int64"), ("negative_tiers", shape, "int64")]
    )
    try:
        stats = {
            "hard_negatives": _stream(negs, writer, 0, n_sources, "negative source rows"),
            "negative_tiers": _stream(tiers, writer, None, None, "tiers"),  # labels: see below
        }
        written = writer.end_unit()
    except BaseException:
        writer.abort()
        raise
    fsync_tree(tmp)
    return {
        name: {
            "file": f"{NEGATIVES_DIR}/{e['file']}",
            "key": e["key"],
            "crc32": e["crc32"],
            "shape": list(shape),
            "dtype": "int64",
            "stored_dtype": "int64",
            "stats": stats[name],
            **({"data_offsets": e["data_offsets"]} if "data_offsets" in e else {}),
        }
        for name, e in written.items()
    }
