"""The node-local copy of a store on object storage, read through the local store's memory maps.

# NOTE [node cache]
A node (what torchrun calls one; every rank, worker and thread on it shares ``cache_dir``)
keeps one *mirror* per store and manifest: ``<cache_dir>/<name>-<hash of URL>/v1-<crc32 of
manifest.json>/store``, a local store directory the ordinary store classes open. Its whole
files (NOTE [remote catalog] in jasper_mmap/remote/catalog.py) are downloaded once, to a
temporary name, checked (size, crc32) and renamed into place; its sparse files are created at
full size with their ``always`` bytes fetched and checked; ``manifest.json`` is written last, so a
mirror without one is incomplete and is finished (never trusted) by the next opener. The unit
rows of a sparse file are fetched when a batch needs them (:meth:`RemoteMirror.ensure`, called
for every batch before its rows are gathered) or ahead of it (:meth:`RemoteMirror.prefetch`):
the unit's byte ranges are read, checked against the catalog's crc32, written, fsynced, and
only then is the unit's byte set in the group's *have map* (``have/<group>.bin``, one byte a
unit). A process killed mid-fetch leaves a unit whose byte is 0: refetched, never read.
Fetches are serialized per unit across the node by an open file description lock on byte
``u`` of ``have/<group>.lock`` (one descriptor a process; a thread lock per unit inside one), so each unit is
downloaded once per node whatever the number of ranks, workers and threads. A unit once
present stays valid for the mirror's life, unless a cache budget evicts it (NOTE [eviction]). Another manifest at the same URL (the store was replaced) gets another
mirror; a cache written by another version of this layout lives under another ``v`` name.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import re
import struct
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, as_completed, wait
from pathlib import Path
from typing import Any

import numpy as np

from jasper_mmap._fs.partials import partial_name, remove_stale_partials_in
from jasper_mmap.errors import StoreCorruptError, StoreFormatError, StoreNotFoundError
from jasper_mmap.format.spec import MANIFEST, NEGATIVES_DIR, POINTER, generation_name
from jasper_mmap.remote.catalog import CATALOG, CATALOG_VERSION, unit_pieces
from jasper_mmap.remote.objects import ObjectStore, usable_here

__all__ = ["RemoteMirror", "default_cache_dir", "CACHE_LAYOUT", "EVICTION_PATIENCE", "patiently"]

log = logging.getLogger(__name__)

#: the mirror layout's version (part of each mirror's directory name)
CACHE_LAYOUT = 2
_FORKED_WAIT = 30.0
#: how long a batch keeps fetching units evicted again meanwhile before it gives up
EVICTION_PATIENCE = 60.0


def patiently() -> Iterator[int]:
    """Tries of a read that eviction may undo: at least 16, then until EVICTION_PATIENCE."""
    deadline, n = time.monotonic() + EVICTION_PATIENCE, 0
    while n < 16 or time.monotonic() < deadline:
        yield n
        n += 1


# NOTE [durability]
# On Linux nothing a mirror fetches is fsynced: a process killed mid-fetch loses nothing the
# kernel was given (the page cache outlives it), and the order of writes (rows, then their have
# byte; a temporary file, then its rename) is all a kill can observe. What an OS crash or power
# loss could leave instead (a have byte on disk whose rows are not, a renamed file of zeros) is
# looked for at the first open after a reboot: the mirror records the boot it was written
# under (``have/boot_id``, from /proc/sys/kernel/random/boot_id), and an opener that finds
# another one (or none: its rename lost) checks every whole file's pieces, every sparse file's fixed bytes and every unit
# marked present against the catalog's crc32s before anything is read, removing or unmarking
# what differs (fetched again when needed). Without a boot id (not Linux), every file is
# fsynced before its rename and every unit before its have byte. Why: the fsyncs made a cold
# epoch of the benchmark store ~10% slower on 2 cores (the bytes had to reach the disk during
# the epoch; docs/performance.md#object-storage).


def _boot_id() -> str | None:
    """This boot's id (Linux), or None where there is none (then every write is fsynced)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


_PUNCH = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
_GEN = re.compile(r"^gen-(\d{6,})\.json$")


_LIBC: Any = None

# NOTE [eviction]
# With a cache budget (``create_loader(cache_limit=)``), the loader's fetch-ahead thread evicts
# present units, least recently used first (readers stamp a unit's last use), never those of
# the batches in its window, until the mirror fits. Another rank or worker may be gathering a
# unit at that moment, so a reader never trusts a gather on its own: :meth:`RemoteMirror.ensure`
# reads the units' eviction counts *before* it sees them present, and after the gather
# :meth:`RemoteMirror.unchanged` checks that they are still present with the same counts; if
# not, the batch is made again (fetching anew). The evictor marks a unit absent and bumps its
# count *before* punching its bytes out (``fallocate(PUNCH_HOLE)``), so a gather that read
# punched zeros always sees the change; a unit evicted and fetched again between the two
# checks has another count. Nothing read from an evicted unit reaches a batch. Every eviction
# also bumps the node's eviction count (``have/evictions.bin``) before the punch: while it is
# the value a process last saw, the units that process saw present are still there, so a batch
# costs one lookup (and the check after the gather one read) until something is evicted.


def _punch(fd: int, offset: int, length: int) -> None:
    """Free ``length`` bytes at ``offset`` (they read as zeros), the file's size kept."""
    global _LIBC
    import ctypes
    import ctypes.util

    if _LIBC is None:
        _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _LIBC.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if _LIBC.fallocate(fd, _PUNCH, offset, length) != 0:
        err = ctypes.get_errno()
        # a filesystem without hole punching: zeros written instead (the bytes stay used)
        log.debug("fallocate(PUNCH_HOLE) failed (%s); writing zeros", os.strerror(err))
        os.pwrite(fd, bytes(length), offset)


def default_cache_dir() -> Path:
    """``$JASPER_MMAP_CACHE``, else ``$XDG_CACHE_HOME/jasper_mmap``, else ``~/.cache/jasper_mmap``."""
    if os.environ.get("JASPER_MMAP_CACHE"):
        return Path(os.environ["JASPER_MMAP_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jasper_mmap"


def fixed_bytes(catalog: dict[str, Any]) -> int:
    """Bytes of a catalog a mirror always holds: its whole files and its sparse files' fixed
    bytes (NOTE [remote catalog])."""
    whole = sum(int(f["size"]) for f in catalog["whole"].values())
    return whole + sum(b - a for f in catalog["sparse"].values() for a, b, *_ in f["always"])


def piece_ranges(spec: dict[str, Any], piece: int) -> list[tuple[int, int, int]] | None:
    """``[(start, stop, crc32), ...]`` of a whole file's pieces (a catalog entry), or None
    when the catalog's crc32s do not count its pieces (a damaged catalog)."""
    size = int(spec["size"])
    starts = range(0, size, piece)
    if len(spec["crc32"]) != len(starts):
        return None
    return [(a, min(a + piece, size), c) for a, c in zip(starts, spec["crc32"], strict=True)]


def _gen_group(g: int) -> str:
    """The have-map group of negatives generation ``g``."""
    return f"negatives-{generation_name(g)}"


def _same(path: Path, size: int, ranges: list[Any]) -> bool:
    """``path`` is ``size`` bytes long and its ranges ``[(start, stop, crc32, ...), ...]``
    have those crc32s."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size != size:
            return False
        for a, b, crc, *_ in ranges:
            data = os.pread(f.fileno(), b - a, a)
            if len(data) != b - a or zlib.crc32(data) != crc:
                return False
    return True


_LOCKS: dict[Path, _NodeLock] = {}
_LOCKS_GUARD = threading.Lock()


def node_lock(path: Path) -> _NodeLock:
    """The one :class:`_NodeLock` of this process for ``path`` (record locks are per process:
    two objects for one file would not exclude each other, nor their threads)."""
    path = Path(os.path.abspath(path))
    with _LOCKS_GUARD:
        lock = _LOCKS.get(path)
        if lock is None:
            lock = _LOCKS[path] = _NodeLock(path)
        return lock


def _after_fork_in_child() -> None:
    global _LOCKS_GUARD
    _LOCKS_GUARD = threading.Lock()  # another thread may have held them at the fork
    for lock in _LOCKS.values():
        lock._guard, lock._threads, lock._fd = threading.Lock(), {}, None


os.register_at_fork(after_in_child=_after_fork_in_child)


def _lock_byte(fd: int, i: int, kind: int) -> None:
    """Lock (``F_WRLCK``, waiting) or unlock (``F_UNLCK``) byte ``i`` of ``fd`` with an open
    file description lock: owned by the descriptor, not the process, so the kernel never
    reports a false deadlock between two processes whose *threads* wait on each other's
    units (classic ``lockf`` locks did: EDEADLK, found by the attack round). Without OFD locks
    (old kernels), classic locks, retried on that false EDEADLK."""
    if _OFD:
        flock = struct.pack("hhxxxxqqixxxx", kind, os.SEEK_SET, i, 1, 0)
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, flock)
            return
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_UN if kind == fcntl.F_UNLCK else fcntl.LOCK_EX, 1, i)
            return
        except OSError as e:
            if e.errno != errno.EDEADLK:
                raise
            time.sleep(0.005)


_OFD = hasattr(fcntl, "F_OFD_SETLKW") and sys.platform.startswith("linux")


class _NodeLock:
    """A POSIX record lock on byte ``i`` of a lock file (node-wide, across processes) plus a
    thread lock per byte (within one process: record locks are per process). One per file and
    process (:func:`node_lock`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._pid = -1
        self._threads: dict[int, threading.Lock] = {}
        self._guard = threading.Lock()

    def __reduce__(self) -> Any:
        return (node_lock, (self.path,))

    def _fd_here(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            # one descriptor per process, never closed while locks may be held (closing any
            # descriptor of the file drops all of the process's record locks on it)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self._pid = os.getpid()
            self._threads = {}
        return self._fd

    class _Held:
        def __init__(self, owner: _NodeLock, i: int) -> None:
            self.owner, self.i = owner, i

        def __enter__(self) -> None:
            o = self.owner
            with o._guard:
                fd = o._fd_here()
                t = o._threads.setdefault(self.i, threading.Lock())
            t.acquire()
            try:
                _lock_byte(fd, self.i, fcntl.F_WRLCK)
            except BaseException:
                t.release()
                raise
            self.fd, self.t = fd, t

        def __exit__(self, *exc: object) -> None:
            try:
                _lock_byte(self.fd, self.i, fcntl.F_UNLCK)
            finally:
                self.t.release()

    def __call__(self, i: int = 0) -> _NodeLock._Held:
        return _NodeLock._Held(self, i)


class _HaveMap:
    """One byte per unit: 1 once the unit's rows are in the mirror, checked (NOTE above)."""

    def __init__(self, path: Path, units: int) -> None:
        self.path, self.units = path, units
        self._map: np.ndarray | None = None
        self._evicted: np.ndarray | None = None
        self._used: np.ndarray | None = None
        self._pid = -1
        self.lock = node_lock(path.with_suffix(".lock"))

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "units": self.units}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["units"])

    def create(self) -> None:
        for path, size in (
            (self.evicted_path, max(1, self.units)),
            (self.used_path, 4 * max(1, self.units)),
            (self.path, max(1, self.units)),  # last: the map exists whole or not at all
        ):
            if not path.exists():
                tmp = path.with_name(partial_name(path.name))
                with open(tmp, "wb") as f:
                    f.truncate(size)
                    os.fsync(f.fileno())
                os.replace(tmp, path)

    @property
    def evicted_path(self) -> Path:
        return self.path.with_suffix(".evicted")

    @property
    def used_path(self) -> Path:
        return self.path.with_suffix(".used")

    @property
    def evicted(self) -> np.ndarray:
        """One byte a unit, bumped (mod 256) each time the unit is evicted (NOTE [eviction])."""
        if self._evicted is None or self._pid != os.getpid():
            self.view  # noqa: B018 - (re)maps for this process
        return self._evicted

    @property
    def used(self) -> np.ndarray:
        """Last use of each unit (uint32 seconds), written by readers, read by the evictor."""
        if self._used is None or self._pid != os.getpid():
            self.view  # noqa: B018
        return self._used

    @property
    def view(self) -> np.ndarray:
        if self._map is None or self._pid != os.getpid():
            with open(self.path, "rb") as f:
                m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
            with open(self.evicted_path, "rb") as f:
                e = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
            with open(self.used_path, "r+b") as f:
                u = mmap.mmap(f.fileno(), 0)
            self._evicted = np.frombuffer(e, dtype=np.uint8)
            self._used = np.frombuffer(u, dtype=np.uint32)
            self._map, self._pid = np.frombuffer(m, dtype=np.uint8), os.getpid()
        return self._map

    def missing(self, units: np.ndarray) -> np.ndarray:
        return units[self.view[units] == 0]

    def mark(self, u: int, sync: bool) -> None:
        self._put(self.path, u, b"\x01", sync=sync)

    def unmark(self, u: int) -> None:
        """Absent, then the unit's eviction count bumped (NOTE [eviction]): both before its
        bytes are punched out."""
        self._put(self.path, u, b"\x00", sync=False)
        self._put(self.evicted_path, u, bytes([(int(self.evicted[u]) + 1) % 256]), sync=False)

    @staticmethod
    def _put(path: Path, u: int, byte: bytes, sync: bool) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.pwrite(fd, byte, u)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)


class RemoteMirror:
    """The node-local mirror of the store at ``url`` (NOTE [node cache]).

    Pickles as its URL, options, paths and catalog; each process reopens what it needs.
    """

    def __init__(
        self,
        url: str,
        cache_dir: str | os.PathLike | None = None,
        storage_options: dict[str, Any] | None = None,
        concurrency: int = 16,
    ) -> None:
        self.url = url.rstrip("/")
        self.objects = ObjectStore(self.url, storage_options)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.concurrency = concurrency
        self.catalog: dict[str, Any] = {}
        self.root: Path | None = None
        self._have: dict[str, _HaveMap] = {}
        self._ev_map: np.ndarray | None = None
        self._ev_pid = -1
        self._known: dict[str, np.ndarray] = {}  # units seen present at eviction count _known_at
        self._known_at: int | None = None
        self._gen_catalogs: dict[int, dict[str, Any]] = {}
        self.units_fetched = 0
        self.units_hit = 0
        self.units_evicted = 0
        self.cache_limit: int | None = None
        self.generation: int | None = None  # the newest one published, when last looked
        self._count = threading.Lock()
        self._sync = True  # NOTE [durability]: decided at open

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_count"] = None
        state["_ev_map"], state["_known"], state["_known_at"] = None, {}, None
        state["units_fetched"] = state["units_hit"] = state["units_evicted"] = 0
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._count = threading.Lock()

    # -- opening ---------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        assert self.root is not None, "open() first"
        return self.root / "store"

    def open(self) -> Path:
        """Read the remote manifest and catalog, make or finish this node's mirror; its path."""
        try:
            manifest = self.objects.get(MANIFEST)
        except StoreNotFoundError:
            raise StoreNotFoundError(
                f"{self.url}: no store there ({MANIFEST} is missing: nothing was uploaded, or "
                f"an upload is still under way; a store appears when its {MANIFEST} is "
                f"written, last). Upload one with: convert-pt SRC {self.url} (or "
                f"jasper-mmap upload STORE {self.url})."
            ) from None
        try:
            catalog = json.loads(self.objects.get(CATALOG))
        except StoreNotFoundError:
            raise StoreFormatError(
                f"{self.url}: has {MANIFEST} but no {CATALOG}: not uploaded by jasper_mmap "
                f"(a store copied there by hand). Upload it with jasper-mmap upload STORE "
                f"{self.url} --overwrite."
            ) from None
        except ValueError:
            raise StoreCorruptError(
                f"{self.url}/{CATALOG} is not valid JSON. Upload again."
            ) from None
        if catalog.get("kind") != "jasper_mmap.remote" or catalog.get("version") != CATALOG_VERSION:
            raise StoreFormatError(
                f"{self.url}/{CATALOG}: kind {catalog.get('kind')!r}, version "
                f"{catalog.get('version')!r}; this jasper_mmap reads version {CATALOG_VERSION}. "
                f"Upload the store again with this version."
            )
        crc = zlib.crc32(manifest)
        if catalog.get("manifest_crc32") != crc:
            raise StoreCorruptError(
                f"{self.url}: {CATALOG} was written for another {MANIFEST} (crc32 "
                f"{catalog.get('manifest_crc32')} there, {crc} here): the store is being "
                f"replaced, or an upload was interrupted. Run again once the upload is done."
            )
        self.catalog = catalog
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", self.url.split("://", 1)[1])[-60:].strip("_")
        key = hashlib.blake2b(self.url.encode(), digest_size=6).hexdigest()
        self.root = self.cache_dir / f"{slug}-{key}" / f"v{CACHE_LAYOUT}-{crc:08x}"
        (self.root / "have").mkdir(parents=True, exist_ok=True)
        self.path.mkdir(exist_ok=True)
        (self.path / NEGATIVES_DIR).mkdir(exist_ok=True)
        self._mirror_lock = node_lock(self.root / "mirror.lock")
        with self._mirror_lock(0):
            evictions = self.root / "have" / "evictions.bin"
            if not evictions.exists():  # (under the lock: never replaced once counting)
                self._write_bytes(evictions, bytes(8))
            self._check_boot()
            if not (self.path / MANIFEST).exists():
                t0 = time.monotonic()
                before = self.objects.bytes_fetched
                self._materialize(catalog, "")
                self._write_bytes(self.path / MANIFEST, manifest)
                log.info(
                    "%s: node cache %s filled: %.1f MB of whole files in %.1f s",
                    self.url,
                    self.path,
                    (self.objects.bytes_fetched - before) / 1e6,
                    time.monotonic() - t0,
                )
        for group in catalog["groups"]:
            if group != "negatives":
                self._have_map(group).create()
        self.sync_negatives()
        return self.path

    def _settle(self, fd: int) -> None:
        """Make what was written to ``fd`` durable where NOTE [durability] needs it."""
        if self._sync:
            os.fsync(fd)

    def _check_boot(self) -> None:
        """NOTE [durability]: after a reboot, check what was written before it (under the
        mirror lock, before anything of the mirror is read)."""
        boot = _boot_id()
        self._sync = boot is None
        if boot is None:
            return
        path = self.root / "have" / "boot_id"
        try:
            seen = path.read_text()
        except FileNotFoundError:
            seen = None
        if seen == boot:
            return
        # no boot id at all: a new mirror (nothing to check: cheap), or one whose boot id
        # was lost in a crash soon after it was made (its units not yet checked): checked
        t0 = time.monotonic()
        bad = self._verify_written()
        if seen is not None or bad:
            log.warning(
                "%s: node cache %s was written before a reboot: checked in %.1f s, %d "
                "files or units differed (fetched again when needed)",
                self.url,
                self.path,
                time.monotonic() - t0,
                bad,
            )
        self._write_bytes(path, boot.encode())

    def _verify_written(self) -> int:
        """Check every file and present unit of the mirror against its catalogs; remove or
        unmark what differs (the mirror's or a generation's completion mark with it, so the
        next open or :meth:`mirror_generation` fetches it again). The number that differed."""
        bad = 0
        catalogs: list[tuple[dict[str, Any], Path, list[tuple[str, dict[str, Any]]]]] = [
            (
                self.catalog,
                self.path / MANIFEST,
                [(g, spec) for g, spec in self.catalog["groups"].items() if g != "negatives"],
            )
        ]
        for path in sorted((self.root / "have").glob("gen-*.catalog.json")):
            g = int(path.name.split(".")[0].split("-")[1])
            cat = self.gen_catalog(g)
            groups = cat["groups"].get("negatives")
            catalogs.append(
                (
                    cat,
                    self.path / NEGATIVES_DIR / f"{generation_name(g)}.json",
                    [(_gen_group(g), groups)] if groups else [],
                )
            )
        for cat, complete, groups in catalogs:
            piece = int(cat["piece_bytes"])
            gone: set[str] = set()
            checks = [
                (rel, int(spec["size"]), spec["always"]) for rel, spec in cat["sparse"].items()
            ]
            for rel, spec in cat["whole"].items():
                ranges = piece_ranges(spec, piece)
                if ranges is None:  # never matches (_download refuses it)
                    checks.append((rel, -1, []))
                else:
                    checks.append((rel, int(spec["size"]), ranges))
            was_complete = complete.exists()
            for rel, size, ranges in checks:
                path = self.path / rel
                if not path.exists():  # never made, or its rename lost: made again
                    gone.add(rel)
                    bad += was_complete
                elif not _same(path, size, ranges):
                    gone.add(rel)
                    bad += 1
            for rel in gone:
                (self.path / rel).unlink(missing_ok=True)
                complete.unlink(missing_ok=True)
            for name, spec in groups:
                hm = self._have_map(name)
                if not hm.path.exists():
                    continue
                for u in np.flatnonzero(hm.view):
                    if not self._unit_intact(spec, int(u), gone):
                        hm.unmark(int(u))
                        bad += 1
        if bad:
            self._bump_evictions()
        return bad

    def _unit_intact(self, spec: dict[str, Any], u: int, gone: set[str]) -> bool:
        """Unit ``u``'s rows of every array of group ``spec``, as the mirror holds them, have
        the catalog's crc32s."""
        for i, rows in enumerate(spec["arrays"].values()):
            crc = 0
            for file, a, b in unit_pieces(rows, u, self.unit_rows):
                if file in gone:
                    return False
                with open(self.path / file, "rb") as f:
                    data = os.pread(f.fileno(), b - a, a)
                if len(data) != b - a:
                    return False
                crc = zlib.crc32(data, crc)
            if crc != spec["crc32"][u][i]:
                return False
        return True

    def _have_map(self, name: str) -> _HaveMap:
        hm = self._have.get(name)
        if hm is None:
            hm = self._have[name] = _HaveMap(self.root / "have" / f"{name}.bin", self.units)
        return hm

    @property
    def unit_rows(self) -> int:
        return int(self.catalog["unit_rows"])

    @property
    def units(self) -> int:
        return int(self.catalog["units"])

    def _write_bytes(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(partial_name(path.name))
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _materialize(self, catalog: dict[str, Any], what: str) -> None:
        """Make the sparse files of ``catalog`` (their ``always`` bytes from its bundle) and
        download its whole files, those not yet there."""
        sparse = {r: spec for r, spec in catalog["sparse"].items() if not (self.path / r).exists()}
        whole = {r: spec for r, spec in catalog["whole"].items() if not (self.path / r).exists()}
        for folder in {(self.path / rel).parent for rel in [*sparse, *whole]}:
            if folder.is_dir():  # what a killed opener left half written (never read)
                remove_stale_partials_in(folder)
        if sparse:
            bundle = self._bundle(catalog)
            for rel, spec in sparse.items():
                self._make_sparse(rel, spec, bundle)
        self._download(whole, int(catalog["piece_bytes"]))

    def _tmp_open(self, rel: str, size: int) -> tuple[int, Path]:
        """A temporary file of ``size`` bytes beside ``rel``'s place in the mirror: its
        descriptor and path."""
        final = self.path / rel
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(partial_name(final.name))
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, size)
        except BaseException:
            self._tmp_close(rel, (fd, tmp), keep=False)
            raise
        return fd, tmp

    def _tmp_close(self, rel: str, handle: tuple[int, Path], keep: bool) -> None:
        """Rename ``rel``'s temporary file (:meth:`_tmp_open`) into place (``keep``; made
        durable first where NOTE [durability] says so) or remove it."""
        fd, tmp = handle
        try:
            if keep:
                self._settle(fd)
        finally:
            os.close(fd)
        if keep:
            os.replace(tmp, self.path / rel)
        else:
            tmp.unlink(missing_ok=True)

    def _download(self, whole: dict[str, dict[str, Any]], piece: int) -> None:
        """The files ``whole`` (catalog entries): all their pieces through one pool of
        ``concurrency`` GETs, each checked against its crc32 as it arrives and written to its
        file's temporary name; a file is renamed into place once all its pieces are in. At
        most ``2 * concurrency`` pieces, and the files they belong to, are open at a time."""
        fds: dict[str, tuple[int, Path]] = {}
        left: dict[str, int] = {}

        def one(rel: str, a: int, b: int, want: int) -> str:
            (data,) = self.objects.get_ranges(rel, [(a, b)])
            if len(data) != b - a:
                raise self._damaged(rel, f"bytes {a}-{b} came back {len(data)} long")
            crc = zlib.crc32(data)
            if crc != want:
                raise self._damaged(rel, f"bytes {a}-{b} have crc32 {crc}, the catalog says {want}")
            os.pwrite(fds[rel][0], data, a)
            return rel

        def done(rel: str) -> None:
            left[rel] -= 1
            if not left[rel]:
                del left[rel]
                self._tmp_close(rel, fds.pop(rel), keep=True)

        pieces = {rel: piece_ranges(spec, piece) for rel, spec in whole.items()}
        for rel, ranges in pieces.items():
            if ranges is None:
                raise self._damaged(
                    rel, f"the catalog has {len(whole[rel]['crc32'])} piece crc32s for its "
                    f"{whole[rel]['size']} bytes"
                )  # fmt: skip
        pending: set[Any] = set()
        try:
            with ThreadPoolExecutor(self.concurrency) as pool:
                for rel, spec in whole.items():
                    fds[rel] = self._tmp_open(rel, int(spec["size"]))
                    left[rel] = len(pieces[rel]) + 1  # + 1: released below
                    for a, b, want in pieces[rel]:
                        while len(pending) >= 2 * self.concurrency:
                            ready, _ = wait(pending, return_when=FIRST_COMPLETED)
                            for f in ready:
                                pending.discard(f)
                                done(f.result())
                        pending.add(pool.submit(one, rel, a, b, want))
                    done(rel)
                for f in as_completed(list(pending)):
                    pending.discard(f)
                    done(f.result())
        except BaseException:
            for f in pending:
                f.cancel()
            for rel, handle in fds.items():
                self._tmp_close(rel, handle, keep=False)
            raise

    def _bundle(self, catalog: dict[str, Any]) -> bytes:
        """The catalog's bundle of ``always`` bytes (NOTE [remote catalog]), checked."""
        spec = catalog["bundle"]
        size = int(spec["size"])
        data = bytes(self.objects.get_ranges(spec["key"], [(0, size)])[0]) if size else b""
        if len(data) != size or zlib.crc32(data) != spec["crc32"]:
            raise self._damaged(spec["key"], "its bytes differ from the catalog's")
        return data

    def _damaged(self, rel: str, why: str) -> StoreCorruptError:
        return StoreCorruptError(
            f"{self.objects.where(rel)}: {why}: the object was truncated or altered after "
            f"upload (or is being replaced). Upload the store again; nothing of it was used."
        )

    def _make_sparse(self, rel: str, spec: dict[str, Any], bundle: bytes) -> None:
        """``rel`` at its full size, only its ``always`` bytes written (from ``bundle``)."""
        handle = self._tmp_open(rel, int(spec["size"]))
        try:
            for a, b, crc, at in spec["always"]:
                data = bundle[at : at + b - a]
                if len(data) != b - a or zlib.crc32(data) != crc:
                    raise self._damaged(rel, f"bytes {a}-{b} differ from the catalog's")
                os.pwrite(handle[0], data, a)
        except BaseException:
            self._tmp_close(rel, handle, keep=False)
            raise
        self._tmp_close(rel, handle, keep=True)

    # -- negatives generations -------------------------------------------------------------
    def remote_generations(self) -> list[int]:
        """Generations published on the object store (their ``gen-N.json`` exists)."""
        out = []
        for meta in self.objects.list(f"{NEGATIVES_DIR}/"):
            m = _GEN.match(meta["path"].rsplit("/", 1)[-1])
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def sync_negatives(self) -> int:
        """Make the newest generation published on the object store this mirror's live one
        (its whole files fetched, its unit rows on demand); return it."""
        gens = self.remote_generations()
        if not gens:
            raise StoreNotFoundError(
                f"{self.url}/{NEGATIVES_DIR}: no negatives generation (gen-NNNNNN.json) was "
                f"published there. Upload the store again."
            )
        self.mirror_generation(gens[-1])
        self.generation = gens[-1]
        pointer = self.path / NEGATIVES_DIR / POINTER
        live = self.path / NEGATIVES_DIR / f"{generation_name(gens[-1])}.json"
        if not pointer.exists() or pointer.read_bytes() != live.read_bytes():
            self._write_bytes(pointer, live.read_bytes())
        return gens[-1]

    def gen_catalog(self, g: int) -> dict[str, Any]:
        cat = self._gen_catalogs.get(g)
        if cat is None:
            path = self.root / "have" / f"{generation_name(g)}.catalog.json"
            try:
                cat = json.loads(path.read_bytes())
            except FileNotFoundError:
                pass
            except ValueError:  # what a crash left of it (NOTE [durability]): fetched again
                log.warning("%s: %s is not valid JSON; fetching it again", self.url, path)
            if cat is None:
                raw = self.objects.get(f"{NEGATIVES_DIR}/{generation_name(g)}.catalog.json")
                cat = json.loads(raw)
                self._write_bytes(path, raw)
            self._gen_catalogs[g] = cat
        return cat

    def mirror_generation(self, g: int) -> None:
        """Generation ``g``'s files in the mirror (unit rows on demand), its json last."""
        final = self.path / NEGATIVES_DIR / f"{generation_name(g)}.json"
        if final.exists():
            return
        with self._mirror_lock(0):
            if final.exists():
                return
            raw = self.objects.get(f"{NEGATIVES_DIR}/{generation_name(g)}.json")
            cat = self.gen_catalog(g)
            if cat.get("json_crc32") != zlib.crc32(raw):
                raise self._damaged(
                    f"{NEGATIVES_DIR}/{generation_name(g)}.json", "it differs from its catalog"
                )
            self._materialize(cat, generation_name(g))
            if "negatives" in cat["groups"]:
                self._have_map(_gen_group(g)).create()
            self._write_bytes(final, raw)

    # -- unit rows ---------------------------------------------------------------------------
    def _groups(self, generation: int | None) -> list[tuple[str, dict[str, Any]]]:
        out = [(g, spec) for g, spec in self.catalog["groups"].items() if g != "negatives"]
        if generation is not None:
            cat = self.gen_catalog(generation)
            if "negatives" in cat["groups"]:
                out.append((_gen_group(generation), cat["groups"]["negatives"]))
        return out

    def units_of(self, pairs: np.ndarray) -> np.ndarray:
        return np.unique(np.asarray(pairs, dtype=np.int64) // self.unit_rows)

    def _evictions_map(self) -> np.ndarray:
        """The node's eviction count (one uint64, ``have/evictions.bin``), mapped read-only."""
        if self._ev_map is None or self._ev_pid != os.getpid():
            path = self.root / "have" / "evictions.bin"
            with open(path, "rb") as f:
                self._ev_map = np.frombuffer(
                    mmap.mmap(f.fileno(), 8, prot=mmap.PROT_READ), dtype=np.uint64
                )
            self._ev_pid, self._known, self._known_at = os.getpid(), {}, None
        return self._ev_map

    def _bump_evictions(self) -> None:
        path = self.root / "have" / "evictions.bin"
        with node_lock(path.with_suffix(".lock"))(0):
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
                os.pwrite(fd, struct.pack("<Q", (n + 1) % 2**64), 0)
            finally:
                os.close(fd)

    def ensure(
        self, pairs: np.ndarray, generation: int | None, tries: int | None = None
    ) -> tuple[int, list[Any] | None]:
        """The unit rows of pair rows ``pairs`` (steering, and generation ``generation``'s
        negatives) are in the mirror when this returns (fetched now where missing). Returns a
        stamp for :meth:`unchanged` (NOTE [eviction]): the node's eviction count, and the
        units' own counts, read before they were seen present. ``tries``: give up sooner (a
        plan of many batches, which are then served one by one).

        Fast path: while the node's eviction count is the one this process last saw, units it
        saw present are present (nothing was evicted since): one lookup a batch."""
        rows = np.append(np.asarray(pairs, dtype=np.int64), 0) // self.unit_rows
        groups = [(self._have_map(name), name, spec) for name, spec in self._groups(generation)]
        evictions = self._evictions_map()
        at = int(evictions[0])
        if at != self._known_at:
            self._known, self._known_at = {}, at
        known = [self._known.get(name) for _, name, _ in groups]
        if all(k is not None and bool(k[rows].all()) for k in known):
            with self._count:
                self.units_hit += len(groups)
            self._mark_used(groups, rows)
            return at, None
        units = np.unique(rows)
        for n in patiently():
            if tries is not None and n >= tries:
                break
            at = int(evictions[0])  # before anything is seen present: see NOTE
            stamp, todo = [], []
            for hm, name, spec in groups:
                have, evicted = hm.view, hm.evicted  # (mapped once per process)
                counts = evicted[units]
                missing = units[have[units] == 0]
                stamp.append((have, evicted, units, counts))
                todo.extend((name, spec, int(u)) for u in missing)
            if not todo:
                with self._count:
                    self.units_hit += len(groups) * int(units.size)
                self._mark_used(groups, units)
                if at == self._known_at:  # present, and nothing evicted since ``at``
                    for _, name, _ in groups:
                        k = self._known.get(name)
                        if k is None:
                            k = self._known[name] = np.zeros(max(1, self.units), dtype=bool)
                        k[units] = True
                return at, stamp
            self._fetch_all(todo)
        raise self.evicted_error("units of a batch", "fetched")

    def _mark_used(self, groups: list[tuple], units: np.ndarray) -> None:
        """Under a budget, the units' last use (the evictor's LRU order)."""
        if self.cache_limit is not None:
            now = np.uint32(int(time.time()) & 0xFFFFFFFF)
            for hm, _, _ in groups:
                hm.used[units] = now

    def unchanged(self, stamp: tuple[int, list[Any] | None]) -> bool:
        """True when no unit of ``stamp`` (:meth:`ensure`) was evicted since: rows gathered
        in between are the store's (NOTE [eviction])."""
        at, units = stamp
        if int(self._evictions_map()[0]) == at:
            return True  # nothing at all was evicted on the node since
        return units is not None and all(
            bool(have[u].all()) and np.array_equal(evicted[u], counts)
            for have, evicted, u, counts in units
        )

    def _wait_for(self, todo: list[tuple[str, dict[str, Any], int]]) -> None:
        """A forked worker process (which cannot call obstore): the loader's process fetches
        each batch's units before handing it out, so they are here; wait a little for one
        fetched by another process at this moment, then say what to do."""
        deadline = time.monotonic() + _FORKED_WAIT
        for name, _, u in todo:
            hm = self._have_map(name)
            while not hm.view[u]:
                if time.monotonic() > deadline:
                    raise StoreNotFoundError(
                        f"{self.url}: unit {u} of {name} is not in this node's cache "
                        f"({self.path}) and this worker process, forked after the object "
                        f"store was used, cannot fetch it. Read batches through "
                        f"create_loader (it fetches before handing batches to workers), "
                        f"use worker_mode='thread', or multiprocessing_context='spawn'."
                    )
                time.sleep(0.01)

    def missing_units(self, pairs: np.ndarray, generation: int | None) -> list[tuple]:
        """``(group, spec, unit)`` of the units of ``pairs`` not here (for :meth:`fetch_unit`)."""
        units = self.units_of(pairs)
        return [
            (name, spec, int(u))
            for name, spec in self._groups(generation)
            for u in self._have_map(name).missing(units)
        ]

    def fetch_unit(self, job: tuple) -> None:
        """Fetch one unit of :meth:`missing_units` (nothing if another got it meanwhile)."""
        self._fetch_unit(*job)

    def prefetch(self, pairs: np.ndarray, generation: int | None) -> int:
        """Fetch the units of ``pairs`` not yet here, ``concurrency`` at a time; the count."""
        todo = self.missing_units(pairs, generation)
        self._fetch_all(todo)
        return len(todo)

    def _fetch_all(self, todo: list[tuple]) -> None:
        """The units ``todo`` (:meth:`missing_units`), ``concurrency`` at a time; in a forked
        worker, which cannot fetch, waited for."""
        if not todo:
            return
        if not usable_here():
            self._wait_for(todo)
        elif len(todo) == 1:
            self._fetch_unit(*todo[0])
        else:
            with ThreadPoolExecutor(min(self.concurrency, len(todo))) as pool:
                list(pool.map(lambda t: self._fetch_unit(*t), todo))

    def evicted_error(self, what: str, doing: str) -> StoreNotFoundError:
        """What is raised when ``what`` kept being evicted for EVICTION_PATIENCE."""
        return StoreNotFoundError(
            f"{self.url}: {what} were evicted from this node's cache ({self.path}) again and "
            f"again for {EVICTION_PATIENCE:.0f} s while being {doing}: cache_limit is too small "
            f"for the batches in flight. Raise cache_limit."
        )

    def _get_all(self, by_file: dict[str, list[tuple[int, int]]]) -> dict[str, list[Any]]:
        """The byte ranges of several objects, their GETs concurrent."""
        if len(by_file) < 2:
            return {f: self.objects.get_ranges(f, r) for f, r in by_file.items()}
        with ThreadPoolExecutor(min(len(by_file), self.concurrency)) as pool:
            jobs = {f: pool.submit(self.objects.get_ranges, f, r) for f, r in by_file.items()}
            return {f: job.result() for f, job in jobs.items()}

    def _fetch_unit(self, name: str, spec: dict[str, Any], u: int) -> None:
        hm = self._have_map(name)
        with hm.lock(u):
            if hm.view[u]:
                return  # another rank, worker or thread fetched it meanwhile
            writes = []
            arrays = [unit_pieces(rows, u, self.unit_rows) for rows in spec["arrays"].values()]
            by_file: dict[str, list[tuple[int, int]]] = {}
            for pieces in arrays:
                for file, a, b in pieces:
                    by_file.setdefault(file, []).append((a, b))
            try:  # the unit's objects at once, not one after another
                got = self._get_all(by_file)
            except StoreNotFoundError as e:
                if not name.startswith("negatives-"):
                    raise
                raise StoreNotFoundError(
                    f"{str(e).split(': ', 1)[0]}: gone from object storage: negatives "
                    f"generation {name.split('-')[-1].lstrip('0') or '0'} was removed (by "
                    f"jasper-mmap prune, or by hand) while this run still read it, and "
                    f"unit {u} of it is not in this node's cache ({self.path}). Call "
                    f"reload_negatives() to read the newest generation; prune with an "
                    f"--older-than longer than your longest run."
                ) from None
            at = {f: 0 for f in by_file}
            for i, (array, pieces) in enumerate(zip(spec["arrays"], arrays, strict=True)):
                crc = 0
                for file, a, b in pieces:
                    data = got[file][at[file]]
                    at[file] += 1
                    if len(data) != b - a:
                        raise self._damaged(file, f"bytes {a}-{b} came back {len(data)} long")
                    crc = zlib.crc32(data, crc)
                    writes.append((file, a, data))
                if crc != spec["crc32"][u][i]:
                    raise self._damaged(
                        pieces[0][0] if pieces else array,
                        f"the rows of unit {u} of {array} have crc32 {crc}, the catalog says "
                        f"{spec['crc32'][u][i]}",
                    )
            fds: dict[str, int] = {}
            try:
                for file, a, data in writes:
                    fd = fds.get(file)
                    if fd is None:
                        fd = fds[file] = os.open(self.path / file, os.O_WRONLY | os.O_CLOEXEC)
                    os.pwrite(fd, data, a)
                for fd in fds.values():
                    self._settle(fd)
            finally:
                for fd in fds.values():
                    os.close(fd)
            hm.mark(u, sync=self._sync)
        with self._count:
            self.units_fetched += 1

    # -- eviction ----------------------------------------------------------------------------
    def cached_bytes(self) -> int:
        """Bytes this mirror holds: whole files, sparse files' fixed bytes, present units."""
        groups = self._all_groups()  # (loads the catalog of every generation mirrored here)
        total = sum(fixed_bytes(cat) for cat in [self.catalog, *self._gen_catalogs.values()])
        for name, spec in groups:
            total += int(np.count_nonzero(self._have_map(name).view)) * self._unit_bytes(spec)
        return total

    def _all_groups(self) -> list[tuple[str, dict[str, Any]]]:
        out = [(g, spec) for g, spec in self.catalog["groups"].items() if g != "negatives"]
        for g, cat in self._gen_catalogs.items():
            if (
                "negatives" in cat["groups"]
                and (self.root / "have" / f"{_gen_group(g)}.bin").exists()
            ):
                out.append((_gen_group(g), cat["groups"]["negatives"]))
        return out

    def unit_bytes(self, generation: int | None) -> int:
        """Bytes of one unit of every group read with negatives generation ``generation``."""
        return sum(self._unit_bytes(spec) for _, spec in self._groups(generation))

    def _unit_bytes(self, spec: dict[str, Any]) -> int:
        return self.unit_rows * sum(int(a["row_bytes"]) for a in spec["arrays"].values())

    def evict_to(self, limit: int, keep: np.ndarray) -> int:
        """Evict present units, least recently used first, but not those of ``keep``, until
        the mirror holds at most ``limit`` bytes (NOTE [eviction]); the number evicted."""
        over = self.cached_bytes() - limit
        if over <= 0:
            return 0
        candidates = []
        for name, spec in self._all_groups():
            hm = self._have_map(name)
            present = np.flatnonzero(hm.view)
            present = present[~np.isin(present, keep)]
            size = self._unit_bytes(spec)
            candidates += [
                (int(t), name, spec, int(u), size)
                for u, t in zip(present, hm.used[present], strict=True)
            ]
        candidates.sort(key=lambda c: (c[0], c[3]))
        evicted = 0
        for _, name, spec, u, size in candidates:
            if over <= 0:
                break
            if self._evict_unit(name, spec, u):
                over -= size
                evicted += 1
        if evicted:
            log.debug("%s: evicted %d units from %s", self.url, evicted, self.path)
        return evicted

    def _evict_unit(self, name: str, spec: dict[str, Any], u: int) -> bool:
        hm = self._have_map(name)
        with hm.lock(u):
            if not hm.view[u]:
                return False
            hm.unmark(u)  # absent and counted before a byte changes (NOTE [eviction])
            self._bump_evictions()
            for rows in spec["arrays"].values():
                for file, a, b in unit_pieces(rows, u, self.unit_rows):
                    fd = os.open(self.path / file, os.O_WRONLY | os.O_CLOEXEC)
                    try:
                        _punch(fd, a, b - a)
                    finally:
                        os.close(fd)
        with self._count:
            self.units_evicted += 1
        return True

    def mark_all(self, generation: int) -> None:
        """Every unit of ``generation``'s negatives is present (published from this node)."""
        hm = self._have_map(_gen_group(generation))
        hm.create()
        fd = os.open(hm.path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.pwrite(fd, b"\x01" * self.units, 0)
            os.fsync(fd)
        finally:
            os.close(fd)

    def summary(self) -> dict[str, int]:
        return {
            "bytes_fetched": self.objects.bytes_fetched,
            "gets": self.objects.gets,
            "units_fetched": self.units_fetched,
            "units_hit": self.units_hit,
            "units_evicted": self.units_evicted,
        }
