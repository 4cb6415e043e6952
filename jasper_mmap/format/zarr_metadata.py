"""zarr v3 array metadata (``zarr.json``): parsing and checks against the manifest."""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np

from jasper_mmap._fs.files import read_json
from jasper_mmap.errors import JasperError, StoreCorruptError, StoreFormatError
from jasper_mmap.format.dtypes import STORED_DTYPES
from jasper_mmap.format.schema import Problem, is_count, type_name
from jasper_mmap.format.spec import MANIFEST

__all__ = [
    "MISSING",
    "ShardLayout",
    "decode_shard_index",
    "encode_shard_index",
    "metadata_problems",
    "shard_layout",
]

META_NAMES = ("zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata")


#: stored dtype -> zarr v3 ``data_type`` of the raw bytes
_DATA_TYPES = {name: np_dtype.name for name, (np_dtype, _) in STORED_DTYPES.items()}


def _json_findings(meta: Any, entry: dict[str, Any]) -> list[str]:
    """What in an array's ``zarr.json`` disagrees with its (well-formed) manifest ``entry``."""
    if not isinstance(meta, dict):
        return [f"should be a JSON object, but is {type_name(meta)}"]
    found = []
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
        found.append("should describe a zarr v3 array (zarr_format 3, node_type array)")
    if meta.get("shape") != entry["shape"]:
        found.append(f"has shape {meta.get('shape')!r:.40}, the manifest says {entry['shape']}")
    want = _DATA_TYPES[entry["stored_dtype"]]
    if meta.get("data_type") != want:
        found.append(f"has data_type {meta.get('data_type')!r:.20}, the manifest says {want!r}")
    attrs = meta.get("attributes")
    logical = attrs.get("logical_dtype") if isinstance(attrs, dict) else None
    if logical not in (None, entry["stored_dtype"]):
        found.append(
            f"has logical_dtype {logical!r:.20}, the manifest says {entry['stored_dtype']!r}"
        )
    if _grid(meta, len(entry["shape"])) is None:
        found.append("has a chunk grid or chunk key encoding zarr_store cannot read")
    if not isinstance(meta.get("codecs"), list) or not meta["codecs"]:
        found.append("should list its codecs")
    return found


def _grid(meta: dict[str, Any], ndim: int) -> tuple[list[int], str, str] | None:
    """(chunk shape, key prefix, separator) of a regular grid, or None."""
    grid, enc = meta.get("chunk_grid"), meta.get("chunk_key_encoding")
    if not (isinstance(grid, dict) and isinstance(enc, dict) and grid.get("name") == "regular"):
        return None
    conf, econf = grid.get("configuration"), enc.get("configuration", {})
    chunks = conf.get("chunk_shape") if isinstance(conf, dict) else None
    if not (isinstance(chunks, list) and len(chunks) == ndim and all(is_count(c) for c in chunks)):
        return None
    if not all(chunks) or not isinstance(econf, dict) or enc.get("name") not in ("default", "v2"):
        return None
    sep = econf.get("separator", "/" if enc["name"] == "default" else ".")
    if sep not in ("/", "."):
        return None
    return chunks, ("c" if enc["name"] == "default" else ""), sep


def _chunk_keys(meta: dict[str, Any], shape: list[int]) -> list[str]:
    """The key of every chunk (shard) file of an array, in grid order."""
    chunks, prefix, sep = _grid(meta, len(shape))
    counts = [math.ceil(n / c) for n, c in zip(shape, chunks, strict=True)]
    if not shape:
        return [prefix or "0"]
    head = f"{prefix}{sep}" if prefix else ""
    if all(c == 1 for c in counts[1:]):  # full-width chunks, as we write them: fast path
        tail = f"{sep}0" * (len(shape) - 1)
        return [f"{head}{i}{tail}" for i in range(counts[0])]
    grid = itertools.product(*(range(n) for n in counts))
    return [head + sep.join(str(c) for c in coords) for coords in grid]


def metadata_problems(
    store_dir: Path, entries: dict[str, dict[str, Any]], files: dict[str, int], fix: str
) -> list[Problem]:
    """Each array's ``zarr.json`` against its manifest entry (shape, dtype, grid); with recorded
    ``files`` (NOTE [recorded files]), also that every chunk file the grid implies is recorded.
    Reads one small JSON file per array."""
    problems = []
    for name, entry in entries.items():
        path = os.path.join(store_dir, entry["file"], "zarr.json")
        try:
            meta = read_json(path, what="zarr array metadata", fix=fix, error=StoreCorruptError)
        except JasperError as e:
            problems.append(Problem(type(e), str(e), (name,)))
            continue
        found = _json_findings(meta, entry)
        problems += [Problem(StoreCorruptError, f"{path}: {f}. {fix}", (name,)) for f in found]
        if found or not files:
            continue
        for key in _chunk_keys(meta, entry["shape"]):
            rel = f"{entry['file']}/{key}"
            if rel not in files:
                problems.append(
                    Problem(
                        StoreFormatError,
                        f"{Path(store_dir) / MANIFEST}: 'files' does not record {rel}, a chunk "
                        f"file of array {name!r}, so it cannot be checked. {fix}",
                        (name,),
                    )
                )
                break
    return problems


# -- the layout convert-pt writes: NOTE [zarr shards as rows] --------------------------------

#: an index entry of a chunk the shard does not hold
MISSING = 2**64 - 1


@dataclass(frozen=True)
class ShardLayout:
    """Where an array's rows lie in its shard files, for arrays stored as convert-pt writes
    them (:func:`shard_layout`): uncompressed full-width chunks of ``chunk_rows`` rows in
    shards of ``shard_rows`` rows, each shard's index (``chunks_per_shard`` pairs of little-endian
    uint64 offset and length, then their crc32c) at the end of its file."""

    chunk_rows: int
    shard_rows: int
    row_bytes: int
    keys: tuple[str, ...]  # the shard files, relative to the array's directory, in row order

    @property
    def chunks_per_shard(self) -> int:
        return self.shard_rows // self.chunk_rows

    @property
    def index_bytes(self) -> int:
        return 16 * self.chunks_per_shard + 4

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_rows * self.row_bytes


def _is_bytes_codec(codec: Any, itemsize: int) -> bool:
    if not isinstance(codec, dict) or codec.get("name") != "bytes":
        return False
    conf = codec.get("configuration") or {}
    return isinstance(conf, dict) and conf.get("endian", None if itemsize == 1 else "") in (
        "little",
        None,
    )


def shard_layout(meta: Any, entry: dict[str, Any]) -> ShardLayout | None:
    """The :class:`ShardLayout` of an array whose ``zarr.json`` (``meta``, already checked
    against its manifest ``entry`` by :func:`metadata_problems`) describes the layout
    convert-pt writes; None for any other layout (compressed or checksummed chunks, an index at
    the start, chunks narrower than a row...), which only zarr-python reads."""
    shape = entry["shape"]
    if not isinstance(meta, dict) or not shape or _grid(meta, len(shape)) is None:
        return None
    shard = meta["chunk_grid"]["configuration"]["chunk_shape"]
    codecs = meta.get("codecs")
    if not (isinstance(codecs, list) and len(codecs) == 1 and isinstance(codecs[0], dict)):
        return None
    conf = codecs[0].get("configuration")
    if codecs[0].get("name") != "sharding_indexed" or not isinstance(conf, dict):
        return None
    itemsize = STORED_DTYPES[entry["stored_dtype"]][0].itemsize
    inner, index = conf.get("codecs"), conf.get("index_codecs")
    chunk = conf.get("chunk_shape")
    if not (
        isinstance(chunk, list)
        and len(chunk) == len(shape)
        and all(is_count(c) and c for c in chunk)
        and list(chunk[1:]) == list(shape[1:]) == list(shard[1:])
        and shard[0] % chunk[0] == 0
        and isinstance(inner, list)
        and len(inner) == 1
        and _is_bytes_codec(inner[0], itemsize)
        and isinstance(index, list)
        and len(index) == 2
        and _is_bytes_codec(index[0], 8)
        and index[1] == {"name": "crc32c"}
        and conf.get("index_location", "end") == "end"
    ):
        return None
    row_bytes = itemsize * math.prod(shape[1:])
    if not row_bytes:
        return None
    return ShardLayout(chunk[0], shard[0], row_bytes, tuple(_chunk_keys(meta, shape)))


def encode_shard_index(offsets_lengths: np.ndarray) -> bytes:
    """A shard's index as stored: ``[chunks, 2]`` uint64 little-endian, then its crc32c."""
    blob = np.ascontiguousarray(offsets_lengths, dtype="<u8").tobytes()
    return blob + np.uint32(google_crc32c.value(blob)).astype("<u4").tobytes()


def decode_shard_index(blob: bytes, chunks: int) -> np.ndarray | None:
    """The ``[chunks, 2]`` offsets and lengths of a stored index; None if its crc32c differs."""
    data, crc = blob[:-4], blob[-4:]
    if (
        len(data) != 16 * chunks
        or np.uint32(google_crc32c.value(data)).astype("<u4").tobytes() != crc
    ):
        return None
    return np.frombuffer(data, dtype="<u8").reshape(chunks, 2)
