"""The catalog of a store on object storage: which files a node copies whole, and where the
pair-keyed rows lie so that a node fetches only its units of them, each piece checked.

# NOTE [remote catalog]
A store uploaded by us holds, beside its own files, ``jasper_remote.json`` (and one
``negatives/gen-NNNNNN.catalog.json`` per negatives generation). The pair-keyed arrays read per
sample (the three steering tables, ``hard_negatives``, ``negative_tiers``) are cut into *units*
of ``unit_rows`` consecutive pair rows; each unit of each array has the crc32 of its rows'
bytes. Every other file is *whole*: fetched once per node and checked against its size and
crc32 (the source and question tables are gathered at random by every batch, the small
per-pair arrays and splits cost little). A file that holds unit rows is *sparse* on a node:
created at its full size, its bytes outside the unit rows (a safetensors header, a zarr shard's
index and padding: ``always``) fetched at once and checked, its unit rows fetched when a unit is
needed. The ``always`` bytes of every sparse file are also uploaded back to back as one *bundle*
object (``jasper_remote.always``; ``negatives/gen-NNNNNN.always`` for a generation): a node
gets them in one GET instead of one small GET per zarr shard (111 for the 1.47 GB benchmark
store; a server that reads a whole object to answer a range, as moto does, read 0.9 GB for
them). Whole files have a crc32 per ``piece_bytes`` piece, so a node checks each piece as it
arrives, without reading the file again. A zarr array is cut into units only where its shards hold rows back to back from the
file's start (as convert-pt writes them: NOTE [zarr shards as rows]); any other layout is whole.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

from jasper_mmap.format.dtypes import STORED_DTYPES
from jasper_mmap.format.spec import NEGATIVE_ARRAYS, NEGATIVES_DIR, STEERING_NAMES, generation_name
from jasper_mmap.format.zarr_metadata import decode_shard_index, shard_layout

__all__ = [
    "BUNDLE",
    "CATALOG",
    "CATALOG_VERSION",
    "PARTIAL_GROUPS",
    "PARTIAL_NAMES",
    "PIECE_BYTES",
    "build_catalog",
    "default_unit_rows",
    "generation_bundle",
    "row_bytes",
    "unit_pieces",
]

CATALOG = "jasper_remote.json"
#: the store's bundle of ``always`` bytes (a generation's: :func:`generation_bundle`)
BUNDLE = "jasper_remote.always"
CATALOG_VERSION = 2
#: bytes of a whole file's piece (one crc32 each; one ranged GET each)
PIECE_BYTES = 16 * 1024 * 1024
#: the arrays fetched per unit, in groups fetched together (one have-map per group)
PARTIAL_GROUPS = {"steering": STEERING_NAMES, "negatives": NEGATIVE_ARRAYS}
#: every array fetched per unit
PARTIAL_NAMES = frozenset(n for names in PARTIAL_GROUPS.values() for n in names)
_UNIT_BYTES = 8 * 1024 * 1024
_BLOCK = 16 * 1024 * 1024


def default_unit_rows(root: Path, entries: dict[str, dict[str, Any]], backend: str) -> int:
    """Rows of a unit: those of a zarr steering table's shard where convert-pt wrote it (a
    unit's rows of each array are then one shard file's: one whole GET each), else ~8 MiB of
    the widest pair-keyed array's rows (a unit is a few GETs of ~8 MiB: object stores serve
    ranges of that size at full speed, and fewer, larger GETs cost less per byte)."""
    partial = {n: e for n, e in entries.items() if n in PARTIAL_NAMES}
    if backend == "zarr":
        for name in STEERING_NAMES:
            entry = partial.get(name)
            if entry is None:
                continue
            try:
                meta = json.loads((Path(root) / entry["file"] / "zarr.json").read_text())
            except (OSError, ValueError):
                break
            lay = shard_layout(meta, entry)
            if lay is not None:
                return int(lay.shard_rows)
            break
    widest = max((row_bytes(e) for e in partial.values()), default=1)
    return max(1, _UNIT_BYTES // max(1, widest))


def row_bytes(entry: dict[str, Any]) -> int:
    """Bytes of one row of a manifest entry's array as stored."""
    width = 1
    for d in entry["shape"][1:]:
        width *= int(d)
    return STORED_DTYPES[entry["stored_dtype"]][0].itemsize * width


def generation_bundle(g: int) -> str:
    """The key of negatives generation ``g``'s bundle of ``always`` bytes."""
    return f"{NEGATIVES_DIR}/{generation_name(g)}.always"


def _piece_crcs(f: Any, size: int) -> list[int]:
    return [_crc_range(f, a, min(a + PIECE_BYTES, size)) for a in range(0, size, PIECE_BYTES)]


def _crc_range(f: Any, start: int, stop: int) -> int:
    crc, pos = 0, start
    while pos < stop:
        block = f.read(min(_BLOCK, stop - pos)) if f.seek(pos) == pos else b""
        if not block:
            raise OSError(f"short read at {pos}")
        crc = zlib.crc32(block, crc)
        pos += len(block)
    return crc


def _segments(root: Path, entry: dict[str, Any], backend: str) -> list[list[Any]] | None:
    """``[[file, first_row, rows, offset], ...]``: where the rows of an array lie, or None
    (the array is not cut into units: its files are whole)."""
    rows = int(entry["shape"][0])
    if backend == "safetensors":
        with open(root / entry["file"], "rb") as f:
            (hlen,) = struct.unpack("<Q", f.read(8))
        return [[entry["file"], 0, rows, 8 + hlen + int(entry["data_offsets"][0])]]
    meta = json.loads((root / entry["file"] / "zarr.json").read_text())
    lay = shard_layout(meta, entry)
    if lay is None:
        return None
    segments = []
    for s, key in enumerate(lay.keys):
        first = s * lay.shard_rows
        n = min(lay.shard_rows, rows - first)
        rel = f"{entry['file']}/{key}"
        path = root / rel
        with open(path, "rb") as f:
            f.seek(-lay.index_bytes, 2)
            index = decode_shard_index(f.read(lay.index_bytes), lay.chunks_per_shard)
        if index is None:
            return None
        chunks = -(-n // lay.chunk_rows)
        for k in range(chunks):  # rows back to back from the file's start
            if int(index[k, 0]) != k * lay.chunk_bytes or int(index[k, 1]) != lay.chunk_bytes:
                return None
        segments.append([rel, first, n, 0])
    return segments


def unit_pieces(array: dict[str, Any], unit: int, unit_rows: int) -> list[tuple[str, int, int]]:
    """``[(file, start, stop), ...]``: the bytes of unit ``unit``'s rows of one array."""
    lo, rb = unit * unit_rows, int(array["row_bytes"])
    hi = lo + unit_rows
    out = []
    for file, first, rows, offset in array["segments"]:
        a, b = max(lo, first), min(hi, first + rows)
        if a < b:
            out.append((file, offset + (a - first) * rb, offset + (b - first) * rb))
    return out


def build_catalog(
    root: Path,
    files: dict[str, int],
    arrays: dict[str, dict[str, Any]],
    backend: str,
    n_pairs: int,
    unit_rows: int | None,
    bundle_key: str,
) -> tuple[dict[str, Any], bytes]:
    """The catalog (NOTE [remote catalog]) of ``files`` (relative path -> size) of the local
    store ``root``, cutting the pair-keyed ones of ``arrays`` (manifest entries) into units;
    and the bundle of its sparse files' ``always`` bytes, to be uploaded as ``bundle_key``."""
    groups: dict[str, Any] = {}
    covered: dict[str, list[tuple[int, int]]] = {}
    cut: dict[str, dict[str, Any]] = {}
    for name, entry in arrays.items():
        if not any(name in names for names in PARTIAL_GROUPS.values()):
            continue
        if int(entry["shape"][0]) != n_pairs or not n_pairs:
            continue
        segs = _segments(root, entry, backend)
        if segs is None:
            continue
        cut[name] = {"segments": segs, "row_bytes": row_bytes(entry)}
    if unit_rows is None:
        unit_rows = default_unit_rows(root, arrays, backend)
    units = -(-n_pairs // unit_rows) if n_pairs else 0
    handles: dict[str, Any] = {}
    try:
        for group, names in PARTIAL_GROUPS.items():
            present = [n for n in names if n in cut]
            if not present:
                continue
            crcs = []
            for u in range(units):
                row = []
                for name in present:
                    crc = 0
                    for file, a, b in unit_pieces(cut[name], u, unit_rows):
                        f = handles.get(file) or handles.setdefault(file, open(root / file, "rb"))
                        crc = zlib.crc32(_read(f, a, b), crc)
                        covered.setdefault(file, []).append((a, b))
                    row.append(crc)
                crcs.append(row)
            groups[group] = {"arrays": {n: cut[n] for n in present}, "crc32": crcs}
        whole: dict[str, Any] = {}
        sparse: dict[str, Any] = {}
        bundle = bytearray()
        for rel, size in sorted(files.items()):
            with open(root / rel, "rb") as f:
                if rel not in covered:
                    whole[rel] = {"size": int(size), "crc32": _piece_crcs(f, int(size))}
                    continue
                always, pos = [], 0
                for a, b in sorted(covered[rel]) + [(int(size), int(size))]:
                    if a > pos:
                        data = _read(f, pos, a)
                        always.append([pos, a, zlib.crc32(data), len(bundle)])
                        bundle += data
                    pos = max(pos, b)
                sparse[rel] = {"size": int(size), "always": always}
    finally:
        for f in handles.values():
            f.close()
    catalog = {
        "kind": "jasper_mmap.remote",
        "version": CATALOG_VERSION,
        "backend": backend,
        "unit_rows": unit_rows,
        "units": units,
        "n_pairs": n_pairs,
        "piece_bytes": PIECE_BYTES,
        "whole": whole,
        "sparse": sparse,
        "bundle": {"key": bundle_key, "size": len(bundle), "crc32": zlib.crc32(bundle)},
        "groups": groups,
    }
    return catalog, bytes(bundle)


def _read(f: Any, a: int, b: int) -> bytes:
    f.seek(a)
    data = f.read(b - a)
    if len(data) != b - a:
        raise OSError(f"short read of {f.name} at {a}")
    return data
