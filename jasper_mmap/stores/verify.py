"""Full integrity check of a store, streamed with bounded memory: ``jasper-mmap verify``.

Opening a store checks its structure in O(number of files) (``jasper_mmap.format.integrity``:
manifest, config.json, file sizes, safetensors headers / zarr metadata, the live negatives
generation). ``verify`` reports every one of those problems, then reads every array whose
structure is sound once, block by block, without mapping it (so memory stays at a block), and
checks: the crc32 recorded at conversion, every index against the counts it refers to, split
indices (in range, not empty), keyword offsets, and NaN/Inf. It reports every problem it finds,
not only the first, and never raises.

The values are checked by the converter's own checks (``jasper_mmap.format.values``), so
verify sorts them exactly as ``convert-pt`` did: what the converter refuses is a problem; what it
accepts with a warning (tiers outside 1..4, relevance outside [0, 1], centroid distances
outside [0, 2], splits that repeat pairs) is a warning, not a problem. Verify shows the
manifest's ``warnings`` (the converter's notices), plus any such unusual values it finds that
no recorded warning reports (a negatives generation published later, say).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jasper_mmap._fs.files import as_path, open_regular, read_json
from jasper_mmap.errors import ConfigError, JasperError
from jasper_mmap.format.dtypes import entry_nbytes, numpy_dtype, to_float32
from jasper_mmap.format.integrity import store_problems
from jasper_mmap.format.manifest import read_raw_manifest
from jasper_mmap.format.schema import store_fix
from jasper_mmap.format.spec import CONFIG
from jasper_mmap.format.values import Notices, SplitCheck, Stats, check_block, check_steering
from jasper_mmap.stores import BACKENDS, open_store
from jasper_mmap.stores.base import NEGATIVE_ARRAYS, Store

__all__ = ["verify_store", "VerifyReport", "store_info"]

_BLOCK_BYTES = 16 << 20
#: the offsets are checked against the values' length
_KEYWORD_ARRAYS = ("pair_keyword_offsets", "pair_keyword_values")


@dataclass
class VerifyReport:
    """What ``verify_store`` found: the arrays read, the problems, the manifest's warnings."""

    store: Path
    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    data_read: bool = True

    @property
    def ok(self) -> bool:
        """No problems (warnings do not count)."""
        return not self.problems

    def __str__(self) -> str:
        head = f"{self.store}: {len(self.checked)} arrays checked, "
        lines = [head + (f"{len(self.problems)} problem(s):" if self.problems else "no problems")]
        lines += [f"  - {p}" for p in self.problems]
        if not self.data_read:
            lines.append("  (array data not read: fix the problems above, then verify again)")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


class _Unusual(Notices):
    """The converter's notices (unusual values it accepts with a warning), as verify finds them
    in one array: collected, never raised, with the kinds found (``what``)."""

    def __init__(self) -> None:
        super().__init__(strict=False)
        self.kinds: list[str] = []

    def add(self, where: Path | str, what: str, count: int, example: str) -> None:
        if what not in self.kinds:
            self.kinds.append(what)
        super().add(where, what, count, example)

    def unreported(self, recorded: list[str]) -> list[str]:
        """The messages of kinds that no warning of ``recorded`` reports (the converter writes
        them as ``WHERE: WHAT (COUNT in all; ...)``, as :meth:`Notices.messages` does)."""
        reported = [f": {k} (" for k in self.kinds if any(f": {k} (" in w for w in recorded)]
        return [m for m in self.messages() if not any(r in m for r in reported)]


def _shards(store: Store, name: str) -> tuple[int, list[str]] | None:
    """``(rows per shard, shard files)`` of a zarr array whose entry records each shard's
    crc32 (``shard_crc32``), in the layout convert-pt writes; None otherwise."""
    entry = store.entry(name)
    if store.backend != "zarr" or "shard_crc32" not in entry:
        return None
    from jasper_mmap.format.zarr_metadata import shard_layout

    meta = read_json(
        store.path / entry["file"] / "zarr.json",
        what="zarr array metadata",
        fix=store_fix(store.path, store.manifest),
    )
    layout = shard_layout(meta, entry)
    if layout is None:
        return None
    return layout.shard_rows, [f"{entry['file']}/{key}" for key in layout.keys]


def _blocks(store: Store, name: str, step: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, raw block) of array ``name``, read with ``pread`` (safetensors) or slices;
    ``step`` rows at a time (default: ~16 MiB)."""
    entry = store.entry(name)
    shape, dtype = tuple(entry["shape"]), numpy_dtype(entry["stored_dtype"])
    row = max(1, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
    step = step or max(1, _BLOCK_BYTES // row)
    if store.backend != "safetensors":
        for lo in range(0, shape[0], step):
            yield lo, np.ascontiguousarray(store._read_raw(name, lo, lo + step))
        return
    from jasper_mmap.format.safetensors_header import read_header

    path = store.path / entry["file"]
    start, header = read_header(path)
    base = start + header[entry["key"]]["data_offsets"][0]
    with open_regular(path, what="store file", fix=store_fix(store.path, store.manifest)) as f:
        for lo in range(0, shape[0], step):
            n = min(step, shape[0] - lo)
            raw = _pread(f.fileno(), n * row, base + lo * row)
            yield lo, np.frombuffer(raw, dtype=dtype).reshape((n, *shape[1:]))


def _pread(fd: int, n: int, offset: int) -> bytes:
    import os

    out = bytearray()
    while len(out) < n:
        chunk = os.pread(fd, n - len(out), offset + len(out))
        if not chunk:
            raise EOFError(f"file ends {n - len(out)} bytes early")
        out += chunk
    return bytes(out)


def _check_array(store: Store, name: str, progress, notices: Notices) -> None:
    """Check every block of array ``name``; raise for a problem, collect notices (unusual
    values the converter accepted with a warning) in ``notices``."""
    entry, counts = store.entry(name), store.counts
    split = (
        SplitCheck(store.path / entry["file"], counts["n_pairs"], notices)
        if name.endswith("_idx")
        else None
    )
    crc, stats, prev_end = 0, Stats(), 0
    where = store.path / entry["file"]
    shards = _shards(store, name)
    if shards is not None and len(shards[1]) != len(entry["shard_crc32"]):
        raise ValueError(
            f"{where}: the store records {len(entry['shard_crc32'])} "
            f"shard checksums for {len(shards[1])} shard files"
        )
    for lo, raw in _blocks(store, name, shards[0] if shards else 0):
        data = memoryview(np.ascontiguousarray(raw)).cast("B")
        crc = zlib.crc32(data, crc)
        if shards is not None:
            k = lo // shards[0]
            if zlib.crc32(data) != entry["shard_crc32"][k]:
                raise ValueError(
                    f"{store.path / shards[1][k]}: this shard of {name} has crc32 "
                    f"{zlib.crc32(data):08x}, but {entry['shard_crc32'][k]:08x} was recorded "
                    f"when it was written: its bytes changed on disk"
                )
        block = to_float32(raw, entry["stored_dtype"])
        allowed = bool(
            entry.get("stats", {}).get("nonfinite_rows")
        )  # converted with --allow-nonfinite
        check_block(where, name, block, lo, counts, stats, allowed, notices)
        if split is not None:
            split.update(block, lo)
        if name == "pair_keyword_offsets" and block.size:
            if block[0] < prev_end or (np.diff(block) < 0).any():
                raise ValueError(
                    f"{where}: pair_keyword_offsets should not decrease (near row {lo})"
                )
            prev_end = int(block[-1])
        if progress is not None:
            progress(raw.nbytes)
    if split is not None:
        split.finish()
    if name == "pair_keyword_offsets" and prev_end != store.shape("pair_keyword_values")[0]:
        raise ValueError(
            f"{where}: pair_keyword_offsets should end at {store.shape('pair_keyword_values')[0]} "
            f"(the number of keyword values), but ends at {prev_end}"
        )
    if "crc32" in entry and crc != entry["crc32"]:
        raise ValueError(
            f"{where}: {name} has crc32 {crc:08x}, but {entry['crc32']:08x} was recorded when it "
            f"was written: its bytes changed on disk"
        )


def _config_problems(store_dir: Path) -> list[str]:
    """Steering probabilities the draw cannot use (the dataset refuses to open the store;
    ``convert-pt`` refuses them since, but older stores may hold them)."""
    try:
        config = read_json(store_dir / CONFIG, what="config.json", fix=store_fix(store_dir))
        check_steering(store_dir, config)
    except ConfigError as e:
        return [f"{e} The dataset cannot be opened until then."]
    except JasperError as e:  # unreadable (changed since store_problems read it)
        return [str(e)]
    except Exception as e:  # noqa: BLE001 -- verify reports, it never raises
        return [f"{store_dir / CONFIG}: its steering probabilities cannot be checked ({e!r})."]
    return []


def verify_store(path: str | Path, progress: bool | None = None) -> VerifyReport:
    """Check the store at ``path`` (see the module docstring). Never raises for a problem of
    the store, however damaged: every problem goes into the report."""
    try:
        path = as_path(path, "the store's path")
    except JasperError as e:  # never raises for a problem: a path that cannot be one is one
        report = VerifyReport(Path(_shown(path)))
        report.problems.append(str(e))
        report.data_read = False
        return report
    report = VerifyReport(path)
    try:
        manifest = read_raw_manifest(path)
    except JasperError as e:
        report.problems.append(str(e))
        report.data_read = False
        return report
    warnings = manifest.get("warnings")
    if isinstance(warnings, list):
        report.warnings = [w for w in warnings if isinstance(w, str)]
    problems = store_problems(path, manifest)
    report.problems += [p.message for p in problems]
    if any(not p.arrays for p in problems):
        report.data_read = False
        return report
    bad = {a for p in problems for a in p.arrays}
    for pair in (NEGATIVE_ARRAYS, _KEYWORD_ARRAYS):  # checked together: both or neither
        if bad & set(pair):
            bad |= set(pair)
    if "pair_index" in bad:  # n_pairs is not to be trusted: it sizes each split's seen-map
        bad |= {n for n in manifest.get("arrays", {}) if n.endswith("_idx")}
    report.problems += _config_problems(Path(path))
    store = BACKENDS[manifest["backend"]](path, manifest)
    names = [n for n in store.names() if n not in bad]
    _check_arrays(store, names, report, progress)
    store.close()
    return report


def _check_arrays(store: Store, names: list[str], report: VerifyReport, progress) -> None:
    """Read and check each of ``names``; every failure becomes a problem of ``report``."""
    from tqdm.auto import tqdm

    sizes = {}
    for name in names:
        try:
            e = store.entry(name)  # negatives: read from CURRENT.json now, which may change
            sizes[name] = entry_nbytes(e)
        except JasperError as e:
            report.problems.append(str(e))
    total = sum(sizes.values())
    disable = None if progress is None else not progress
    recorded = list(report.warnings)  # the converter's: unusual values it already reported
    with tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=disable) as bar:
        for name in sizes:
            unusual = _Unusual()
            try:
                _check_array(store, name, bar.update, unusual)
                report.warnings += unusual.unreported(recorded)
            except (JasperError, ValueError, EOFError, OSError) as e:
                report.problems.append(str(e))
            except Exception as e:  # a damaged store must never crash verify
                report.problems.append(
                    f"{store.path}: array {name!r} could not be checked ({type(e).__name__}: "
                    f"{e}). This is unexpected; please report it with this message."
                )
            report.checked.append(name)


def _shown(path: Any) -> str:
    """``path`` as text for a report, whatever it is."""
    try:
        return os.fsdecode(path)
    except TypeError:
        return repr(path)


def store_info(path: str | Path) -> dict[str, Any]:
    """A summary of a store from its manifest: backend, counts, arrays, negatives generation,
    and the converter's warnings.

    Raises:
        StoreNotFoundError, StoreFormatError, StoreCorruptError: the store cannot be opened.
    """
    store = open_store(path)
    arrays = {}
    for name in store.names():
        e = store.entry(name)
        arrays[name] = {
            "shape": e["shape"],
            "stored_dtype": e["stored_dtype"],
            "bytes": entry_nbytes(e),
            "file": e["file"],
        }
    return {
        "store": str(store.path),
        "backend": store.backend,
        "format_version": store.manifest["format_version"],
        "counts": store.counts,
        "splits": store.manifest.get("splits", {}),
        "negatives_generation": store.generation,
        "arrays": arrays,
        "bytes": sum(a["bytes"] for a in arrays.values()),
        "warnings": list(store.manifest.get("warnings", [])),
    }
