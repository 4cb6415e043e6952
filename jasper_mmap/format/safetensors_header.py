"""The safetensors header: parsing and checks against the manifest (no reading of data)."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

from jasper_mmap._fs.files import MAX_JSON_DEPTH, json_depth, open_regular
from jasper_mmap.errors import JasperError, StoreCorruptError, StoreFormatError
from jasper_mmap.format.dtypes import safetensors_code
from jasper_mmap.format.schema import Problem, is_count, type_name

__all__ = ["header_problems", "layout_problems", "read_header", "tensor_problems"]

ALIGN = 8


#: a header larger than this is not ours (ours are a few kilobytes)
_MAX_HEADER = 100 * 1024 * 1024


RECREATE_FIX = "Re-create the store with `convert-pt SRC STORE --overwrite`."


#: bytes per element of every safetensors dtype code
_CODE_SIZES = {
    **dict.fromkeys(("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0"), 1),
    **dict.fromkeys(("I16", "U16", "F16", "BF16"), 2),
    **dict.fromkeys(("I32", "U32", "F32"), 4),
    **dict.fromkeys(("I64", "U64", "F64"), 8),
}


def read_header(path: Path, fix: str = RECREATE_FIX) -> tuple[int, dict[str, Any]]:
    """Return ``(data_start, header)`` of safetensors file ``path``; reads only the header.

    Raises:
        StoreNotFoundError: the file is missing.
        StoreFormatError: the header is truncated, too large or not valid JSON.
        StoreCorruptError: the file cannot be read (not a regular file, an I/O error).
    """
    try:
        with open_regular(path, what="store file", fix=fix, error=StoreCorruptError) as f:
            head = f.read(8)
            if len(head) < 8:
                raise StoreFormatError(
                    f"{path}: file is {len(head)} bytes, shorter than a safetensors header. {fix}"
                )
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER:
                raise StoreFormatError(
                    f"{path}: header length {n} is implausible (over {_MAX_HEADER}). {fix}"
                )
            raw = f.read(n)
    except OSError as e:
        raise StoreCorruptError(f"{path}: store file cannot be read ({e}). {fix}") from None
    if len(raw) != n:
        raise StoreFormatError(
            f"{path}: header should be {n} bytes, but the file ends after {len(raw)}. {fix}"
        )
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise StoreFormatError(f"{path}: header is not valid JSON ({e!s:.200}). {fix}") from None
    if json_depth(header) > MAX_JSON_DEPTH:
        raise StoreFormatError(
            f"{path}: header is not valid JSON for us (nested deeper than {MAX_JSON_DEPTH} "
            f"levels). {fix}"
        )
    if not isinstance(header, dict):
        raise StoreFormatError(f"{path}: header should be a JSON object. {fix}")
    return 8 + n, header


def _tensor_findings(meta: Any) -> list[str]:
    """What is wrong with one header entry ``{"dtype", "shape", "data_offsets"}``."""
    if not isinstance(meta, dict):
        return [f"should be an object, but is {type_name(meta)}"]
    code, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    found = []
    if not isinstance(code, str) or code not in _CODE_SIZES:
        found.append(f"dtype {code!r:.20} is not a safetensors dtype")
    if not isinstance(shape, list) or not all(is_count(d) for d in shape):
        found.append(f"shape {shape!r:.40} should be a list of non-negative integers")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(is_count(v) for v in offsets)
        and offsets[0] <= offsets[1]
    ):
        found.append(f"data_offsets {offsets!r:.40} should be [begin, end], 0 <= begin <= end")
    if not found:
        need = math.prod(shape) * _CODE_SIZES[code]
        if offsets[1] - offsets[0] != need:
            found.append(
                f"data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, but shape "
                f"{shape} of {code} needs {need}"
            )
    return found


def layout_problems(
    path: Path, header: dict[str, Any], data_start: int, size: int, fix: str, arrays=()
) -> list[Problem]:
    """Every header entry well formed, and the tensors tiling the data section exactly, as
    ``safetensors.safe_open`` requires (no gap, no overlap, nothing past the file's end)."""
    problems, spans = [], []
    for key, meta in header.items():
        if key == "__metadata__":
            if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
                problems.append(f"__metadata__ should be an object of strings: {meta!r:.40}")
            continue
        found = _tensor_findings(meta)
        problems += [f"header entry {key!r}: {f}" for f in found]
        if not found:
            spans.append((*meta["data_offsets"], key))
    pos = 0
    for begin, end, key in sorted(spans) if not problems else ():
        if begin != pos:
            problems.append(
                f"tensor {key!r} starts at byte {begin} of the data, but the tensors before it "
                f"end at byte {pos} (a gap or an overlap; safetensors readers refuse it)"
            )
            break
        pos = end
    if not problems and data_start + pos != size:
        problems.append(
            f"file is {size} bytes, but its header describes {data_start + pos} bytes "
            f"(truncated or appended to)"
        )
    return [Problem(StoreCorruptError, f"{path}: {p}. {fix}", tuple(arrays)) for p in problems]


def tensor_problems(
    path: Path | str, header: dict[str, Any], name: str, entry: dict[str, Any], fix: str
) -> list[Problem]:
    """The header's tensor of array ``name`` against its (well-formed) manifest ``entry``."""
    key = entry["key"]
    meta = header.get(key)
    if key == "__metadata__" or meta is None:
        msg = f"{path}: has no tensor {key!r} that the manifest lists (array {name!r}). {fix}"
        return [Problem(StoreCorruptError, msg, (name,))]
    found = _tensor_findings(meta)
    if not found:
        code = safetensors_code(entry["stored_dtype"])
        if meta["dtype"] != code:
            found.append(f"has dtype {meta['dtype']}, but the manifest says {code}")
        if meta["shape"] != entry["shape"]:
            found.append(f"has shape {meta['shape']}, but the manifest says {entry['shape']}")
        want = entry.get("data_offsets")
        if want is not None and meta["data_offsets"] != want:
            found.append(
                f"has data_offsets {meta['data_offsets']}, but the manifest recorded {want}"
            )
    return [
        Problem(StoreCorruptError, f"{path}: tensor {key!r} {f}. {fix}", (name,)) for f in found
    ]


def header_problems(store_dir: Path, entries: dict[str, dict[str, Any]], fix: str) -> list[Problem]:
    """Each safetensors file's header (read once) against the manifest ``entries`` it holds."""
    by_file: dict[str, list[str]] = {}
    for name, e in entries.items():
        by_file.setdefault(e["file"], []).append(name)
    problems = []
    base = os.fspath(store_dir)
    for rel, names in by_file.items():
        path = os.path.join(base, rel)
        try:
            start, header = read_header(Path(path), fix)
            size = os.path.getsize(path)
        except (JasperError, OSError) as e:
            err = type(e) if isinstance(e, JasperError) else StoreCorruptError
            problems.append(Problem(err, str(e), tuple(sorted(names))))
            continue
        problems += layout_problems(path, header, start, size, fix, sorted(names))
        for name in names:
            problems += tensor_problems(path, header, name, entries[name], fix)
    return problems
