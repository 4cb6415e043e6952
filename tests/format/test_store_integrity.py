"""A catalogue of structurally bad stores: each is refused at open with our error naming the
file (never a raw KeyError/TypeError/JSONDecodeError/ValueError, never zeros), the dataset
refuses it too, and `jasper-mmap verify` lists the problem and exits 1.

Each case copies a good store (both backends unless it is backend-specific), breaks one thing
and states the error class and a pattern of the message, which always names the file.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from jasper_mmap import JASPERSteeringDataset, open_store
from jasper_mmap._fs.files import write_json_atomic
from jasper_mmap.cli import main as cli_main
from jasper_mmap.converters import convert_pt
from jasper_mmap.errors import (
    JasperError,
    StoreCorruptError,
    StoreFormatError,
    StoreNotFoundError,
    StoreWriteError,
)
from jasper_mmap.format.integrity import check_generation
from jasper_mmap.format.recorded import check_files, data_files
from jasper_mmap.stores.verify import verify_store

FMT, CORRUPT, MISSING = StoreFormatError, StoreCorruptError, StoreNotFoundError
BOTH, ST, ZARR = ("safetensors", "zarr"), ("safetensors",), ("zarr",)
GEN = "negatives/gen-000000"
#: a fix is always offered
FIX = re.compile(r"Re-create the store|Publish the negatives|Copy the dataset|Upgrade jasper_mmap")


@dataclass(frozen=True)
class Case:
    id: str
    mutate: Callable[[Path], None]
    error: type[JasperError]
    match: str  # regex over the message; names the file
    backends: tuple[str, ...] = BOTH


# -- ways to break a store ---------------------------------------------------------------------


def _load(path: Path):
    return json.loads(path.read_text())


def rerecord(store: Path, rel: str) -> None:
    """Record ``rel``'s current size wherever the store records it (a consistent tampering,
    so that the check under test, not the size check, must catch the change)."""
    for meta in (store / "manifest.json", store / "negatives/CURRENT.json", store / f"{GEN}.json"):
        obj = _load(meta)
        if rel in obj.get("files", {}):
            obj["files"][rel] = (store / rel).stat().st_size
            meta.write_text(json.dumps(obj))


def edit_json(rel: str, fn, keep_size: bool = False):
    def mutate(store: Path) -> None:
        obj = _load(store / rel)
        fn(obj)  # in place; its return value is ignored
        (store / rel).write_text(json.dumps(obj))
        if keep_size:
            rerecord(store, rel)

    return mutate


def manifest(fn):
    return edit_json("manifest.json", fn)


def pointer(fn):
    return edit_json("negatives/CURRENT.json", fn)


def generation(fn):
    """The same change to CURRENT.json and to the description it names (they agree)."""
    return lambda store: (pointer(fn)(store), edit_json(f"{GEN}.json", fn)(store))


def entry(name: str, key: str, value):
    return manifest(lambda m: m["arrays"][name].__setitem__(key, value))


def counts(key: str, value):
    return manifest(lambda m: m["counts"].__setitem__(key, value))


def drop(obj: dict, key: str):
    obj.pop(key)


def write_text(rel: str, text: str):
    return lambda store: (store / rel).write_text(text)


def remove(rel: str):
    def mutate(store: Path) -> None:
        p = store / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()

    return mutate


def truncate(rel: str, by: int = 1):
    def mutate(store: Path) -> None:
        with open(store / rel, "r+b") as f:
            f.truncate((store / rel).stat().st_size - by)

    return mutate


def append(rel: str):
    def mutate(store: Path) -> None:
        with open(store / rel, "ab") as f:
            f.write(b"\0" * 8)

    return mutate


def header(rel: str, fn):
    """Edit the JSON header of safetensors file ``rel``; same length where it fits (padded
    with spaces, as the format allows), else re-recorded at its new size."""

    def mutate(store: Path) -> None:
        raw = (store / rel).read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        h = json.loads(raw[8 : 8 + n])
        out = fn(h)
        blob = out if isinstance(out, bytes) else json.dumps(h, separators=(",", ":")).encode()
        blob = blob.ljust(n) if len(blob) <= n else blob
        (store / rel).write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])
        rerecord(store, rel)

    return mutate


def tensor(rel: str, name: str, key: str, value):
    return header(rel, lambda h: h[name].__setitem__(key, value))


def rename(obj: dict, old: str, new: str) -> None:
    obj[new] = obj.pop(old)


def swap(obj: dict, a: str, b: str, key: str) -> None:
    obj[a][key], obj[b][key] = obj[b][key], obj[a][key]


def zmeta(array: str, fn):
    return edit_json(f"{array}/zarr.json", fn, keep_size=True)


def unrecord(rel: str):
    return manifest(lambda m: m["files"].pop(rel))


# -- the catalogue -----------------------------------------------------------------------------

M = r"manifest\.json: .*"
REQUIRED = [
    "question_embs",
    "source_embs",
    "keyword_embs",
    "centroid_embs",
    "pair_index",
    "pair_cluster_id",
    "pair_relevance",
    "centroid_distances",
    "pair_keyword_offsets",
    "pair_keyword_values",
    "steering_centroid",
    "steering_keyword_weighted",
    "steering_residual",
    "train_idx",
]
COUNT_KEYS = [
    "embedding_dim",
    "n_neg",
    "n_pairs",
    "n_questions",
    "n_sources",
    "n_keywords",
    "n_clusters",
    "n_keyword_values",
]

CASES: list[Case] = [
    # the manifest: every field of every entry
    *(
        Case(f"entry-{n}-is-{v!r}", entry_set, FMT, M + rf"the entry of '{n}' should be an object")
        for n, v, entry_set in [
            (n, v, manifest(lambda m, n=n, v=v: m["arrays"].__setitem__(n, v)))
            for n, v in [("question_embs", 5), ("pair_index", "x"), ("train_idx", None)]
            + [("steering_residual", [1]), ("val_idx", True)]
        ]
    ),
    *(
        Case(
            f"entry-{n}-removed",
            manifest(lambda m, n=n: m["arrays"].pop(n)),
            FMT,
            M + f"required array '{n}' is missing",
        )
        for n in REQUIRED
    ),
    Case(
        "stored_dtype-unknown",
        entry("source_embs", "stored_dtype", "float8"),
        FMT,
        M + r"'source_embs'.*'stored_dtype' 'float8' is unknown",
    ),
    Case(
        "stored_dtype-int",
        entry("source_embs", "stored_dtype", 5),
        FMT,
        M + r"'stored_dtype' should be a string",
    ),
    Case(
        "stored_dtype-int64-embeddings",
        entry("source_embs", "stored_dtype", "int64"),
        FMT,
        M + r"'int64' is not allowed for this array",
    ),
    Case(
        "stored_dtype-float-index",
        entry("pair_index", "stored_dtype", "float32"),
        FMT,
        M + r"'pair_index'.*'float32' is not allowed",
    ),
    Case(
        "stored_dtype-bf16-relevance",
        entry("pair_relevance", "stored_dtype", "bfloat16"),
        FMT,
        M + r"'bfloat16' is not allowed",
    ),
    Case(
        "dtype-float64",
        entry("question_embs", "dtype", "float64"),
        FMT,
        M + r"'dtype' \(what readers return\) should be 'float32'",
    ),
    Case(
        "dtype-removed",
        manifest(lambda m: drop(m["arrays"]["pair_index"], "dtype")),
        FMT,
        M + r"'pair_index': 'dtype' should be a string",
    ),
    *(
        Case(
            f"shape-{v!r}",
            entry("source_embs", "shape", v),
            FMT,
            M + rf"'source_embs': 'shape' should {what}",
        )
        for v, what in [
            ("abc", "be a list of non-negative integers"),
            (None, "be a list of non-negative integers"),
            ([-1, 16], "be a list of non-negative integers"),
            ([120.0, 16], "be a list of non-negative integers"),
            ([True, 16], "be a list of non-negative integers"),
            ([120], r"have 2 dimension\(s\)"),
            ([120, 16, 1], r"have 2 dimension\(s\)"),
        ]
    ),
    Case(
        "shape-disagrees-with-counts",
        entry("source_embs", "shape", [119, 16]),
        FMT,
        M + r"array 'source_embs' has shape \[119, 16\], but counts .* should be \[120, 16\]",
    ),
    Case(
        "shape-split-longer-than-pairs",
        manifest(
            lambda m: (
                m["arrays"]["train_idx"].__setitem__("shape", [121]),
                m["splits"].__setitem__("train", 121),
            )
        ),
        FMT,
        M + r"split 'train_idx' has 121 rows, more than n_pairs=120",
    ),
    Case(
        "counts-empty",
        manifest(lambda m: m.__setitem__("counts", {})),
        FMT,
        M + r"'counts' should hold non-negative integers",
    ),
    Case(
        "counts-list",
        manifest(lambda m: m.__setitem__("counts", [])),
        FMT,
        M + r"'counts' should be an object",
    ),
    Case(
        "counts-string",
        manifest(lambda m: m.__setitem__("counts", "x")),
        FMT,
        M + r"'counts' should be an object",
    ),
    *(
        Case(
            f"counts-{k}-removed",
            manifest(lambda m, k=k: m["counts"].pop(k)),
            FMT,
            M + rf"'counts' should hold .* but has {k}='\(missing\)'",
        )
        for k in COUNT_KEYS
    ),
    Case(
        "counts-embedding_dim-wrong",
        counts("embedding_dim", 17),
        FMT,
        M + r"has shape \[\d+, 16\], but counts embedding_dim=17",
    ),
    Case(
        "counts-embedding_dim-0",
        counts("embedding_dim", 0),
        FMT,
        M + r"embedding_dim at least 1\), but has embedding_dim=0",
    ),
    Case(
        "counts-embedding_dim-str",
        counts("embedding_dim", "16"),
        FMT,
        M + r"but has embedding_dim='16'",
    ),
    Case(
        "counts-embedding_dim-negative",
        counts("embedding_dim", -1),
        FMT,
        M + r"but has embedding_dim=-1",
    ),
    Case("counts-n_pairs-wrong", counts("n_pairs", 121), FMT, M + r"but counts .*n_pairs=121"),
    Case(
        "counts-n_questions-wrong",
        counts("n_questions", 59),
        FMT,
        M + r"array 'question_embs' has shape \[60, 16\]",
    ),
    Case(
        "counts-n_keyword_values-wrong",
        manifest(
            lambda m: m["counts"].__setitem__(
                "n_keyword_values", m["counts"]["n_keyword_values"] + 1
            )
        ),
        FMT,
        M + r"array 'pair_keyword_values' has shape",
    ),
    Case(
        "counts-n_neg-wrong",
        counts("n_neg", 7),
        FMT,
        r"negatives/gen-000000\.json: array .hard_negatives. has shape \[120, 6\], but counts .*n_neg=7",
    ),
    *(
        Case(
            f"file-{v!r}",
            entry("question_embs", "file", v),
            FMT,
            M + rf"'question_embs': 'file' should be {what}",
        )
        for v, what in [
            (5, "a string"),
            ("../x.safetensors", "a relative path inside the store"),
            ("/etc/passwd", "a relative path inside the store"),
            ("", "a relative path inside the store"),
            ("other", r"a \.safetensors file or the zarr array 'question_embs'"),
        ]
    ),
    Case(
        "key-renamed",
        entry("question_embs", "key", "question_embsX"),
        FMT,
        M + r"'key' should be 'question_embs', but is 'question_embsX'",
    ),
    Case("key-int", entry("question_embs", "key", 5), FMT, M + r"'key' should be a string"),
    Case(
        "crc32-str", entry("pair_index", "crc32", "abc"), FMT, M + r"'crc32' should be an integer"
    ),
    Case(
        "crc32-negative", entry("pair_index", "crc32", -1), FMT, M + r"'crc32' should be an integer"
    ),
    Case(
        "crc32-too-big",
        entry("pair_index", "crc32", 2**33),
        FMT,
        M + r"'crc32' should be an integer in \[0, 2\*\*32\)",
    ),
    Case(
        "stats-not-object",
        entry("pair_index", "stats", "x"),
        FMT,
        M + r"'stats' should be an object",
    ),
    Case(
        "source_dtype-int",
        entry("pair_index", "source_dtype", 5),
        FMT,
        M + r"'source_dtype' should be a string or null",
    ),
    Case(
        "data_offsets-str",
        entry("pair_index", "data_offsets", "x"),
        FMT,
        M + r"'data_offsets' should be \[begin, end\]",
    ),
    Case(
        "data_offsets-reversed",
        entry("pair_index", "data_offsets", [8, 0]),
        FMT,
        M + r"'data_offsets' should be \[begin, end\]",
    ),
    Case(
        "unknown-array",
        manifest(lambda m: m["arrays"].__setitem__("foo_embs", m["arrays"]["question_embs"])),
        FMT,
        M + r"lists an array 'foo_embs' that no store has",
    ),
    Case(
        "negatives-in-arrays",
        manifest(
            lambda m: m["arrays"].__setitem__(
                "hard_negatives", m["negatives_initial"]["hard_negatives"]
            )
        ),
        FMT,
        M + r"'arrays' lists 'hard_negatives', which lives in the negatives generations",
    ),
    Case(
        "splits-disagree",
        manifest(lambda m: m["splits"].__setitem__("train", 5)),
        FMT,
        M + r"'splits' says train=5, but the train_idx array has 96 rows",
    ),
    Case(
        "splits-not-object",
        manifest(lambda m: m.__setitem__("splits", "x")),
        FMT,
        M + r"'splits' should be an object",
    ),
    Case(
        "splits-unknown",
        manifest(lambda m: m["splits"].__setitem__("bogus", 1)),
        FMT,
        M + r"'splits' should map \['train', 'val', 'test'\]",
    ),
    Case(
        "backend-unknown",
        manifest(lambda m: m.__setitem__("backend", "hdf5")),
        FMT,
        M + r"'backend' should be one of \['safetensors', 'zarr'\], but got 'hdf5'",
    ),
    Case(
        "backend-int",
        manifest(lambda m: m.__setitem__("backend", 5)),
        FMT,
        M + r"'backend' should be one of",
    ),
    Case(
        "arrays-list",
        manifest(lambda m: m.__setitem__("arrays", [])),
        FMT,
        M + r"'arrays' should be an object, but got list",
    ),
    Case(
        "files-list",
        manifest(lambda m: m.__setitem__("files", [])),
        FMT,
        M + r"'files' should be an object, but got list",
    ),
    Case(
        "files-outside",
        manifest(lambda m: m["files"].__setitem__("../x", 1)),
        FMT,
        M + r"'files' should map relative paths inside the store to sizes, but has '\.\./x'",
    ),
    Case(
        "files-size-str",
        manifest(lambda m: m["files"].__setitem__(next(iter(m["files"])), "x")),
        FMT,
        M + r"'files' should map relative paths .* 'x'",
    ),
    Case(
        "source-not-object",
        manifest(lambda m: m.__setitem__("source", "x")),
        FMT,
        M + r"'source' should be an object",
    ),
    Case(
        "source-files-bad",
        manifest(lambda m: m["source"].__setitem__("files", {"a.pt": 5})),
        FMT,
        M + r"'source\.files' should map file names to fingerprints",
    ),
    Case(
        "source-dir-int",
        manifest(lambda m: m["source"].__setitem__("dir", 5)),
        FMT,
        M + r"'source\.dir' should be a path or null",
    ),
    Case(
        "warnings-not-list",
        manifest(lambda m: m.__setitem__("warnings", "x")),
        FMT,
        M + r"'warnings' should be a list of strings",
    ),
    Case(
        "warnings-not-strings",
        manifest(lambda m: m.__setitem__("warnings", [1])),
        FMT,
        M + r"'warnings' should be a list of strings",
    ),
    Case(
        "negatives_initial-list",
        manifest(lambda m: m.__setitem__("negatives_initial", [])),
        FMT,
        M + r"'negatives_initial' should be an object",
    ),
    Case(
        "format-removed",
        manifest(lambda m: drop(m, "format")),
        FMT,
        M
        + r"format should be 'jasper-mmap-store', but got format=None\. .* is not a jasper_mmap store",
    ),
    Case(
        "format-other",
        manifest(lambda m: m.__setitem__("format", "safetensors")),
        FMT,
        M + r"format should be 'jasper-mmap-store'",
    ),
    Case(
        "format_version-newer",
        manifest(lambda m: m.__setitem__("format_version", 2)),
        FMT,
        M + r"format_version should be an integer in 1\.\.1, but got format_version=2\. Upgrade",
    ),
    Case(
        "format_version-str",
        manifest(lambda m: m.__setitem__("format_version", "1")),
        FMT,
        M + r"format_version should be an integer",
    ),
    Case(
        "format_version-bool",
        manifest(lambda m: m.__setitem__("format_version", True)),
        FMT,
        M + r"format_version should be an integer",
    ),
    Case(
        "manifest-not-json",
        write_text("manifest.json", "{nope"),
        FMT,
        M + r"manifest\.json is not valid JSON",
    ),
    Case(
        "manifest-empty",
        write_text("manifest.json", ""),
        FMT,
        M + r"manifest\.json is not valid JSON",
    ),
    Case(
        "manifest-list",
        write_text("manifest.json", "[]"),
        FMT,
        M + r"manifest\.json should be a JSON object, but got list",
    ),
    Case("manifest-missing", remove("manifest.json"), MISSING, M + r"manifest\.json is missing"),
    # config.json
    Case(
        "config-missing", remove("config.json"), MISSING, r"config\.json: config\.json is missing"
    ),
    Case(
        "config-not-json",
        write_text("config.json", "{nope"),
        FMT,
        r"config\.json: config\.json is not valid JSON",
    ),
    Case(
        "config-list",
        write_text("config.json", "[1]"),
        FMT,
        r"config\.json: config\.json should be a JSON object, but got list",
    ),
    Case(
        "config-directory",
        lambda s: ((s / "config.json").unlink(), (s / "config.json").mkdir()),
        FMT,
        r"config\.json: config\.json is a directory, not a regular file",
    ),
    # data files: missing, truncated, appended to
    *(
        Case(
            f"removed-{rel}",
            remove(rel),
            MISSING,
            rf"{re.escape(rel)}: store file is missing \(the manifest lists it\)",
            ST,
        )
        for rel in [
            "embeddings.safetensors",
            "pairs.safetensors",
            "steering.safetensors",
            "splits.safetensors",
        ]
    ),
    *(
        Case(
            f"truncated-{rel}",
            truncate(rel),
            CORRUPT,
            rf"{re.escape(rel)}: file is \d+ bytes, but the manifest records \d+ \(truncated",
            ST,
        )
        for rel in [
            "embeddings.safetensors",
            "pairs.safetensors",
            "steering.safetensors",
            "splits.safetensors",
        ]
    ),
    Case(
        "appended-pairs",
        append("pairs.safetensors"),
        CORRUPT,
        r"pairs\.safetensors: file is \d+ bytes, but the manifest records",
        ST,
    ),
    *(
        Case(
            f"removed-{rel}",
            remove(rel),
            MISSING,
            rf"{re.escape(rel)}: store file is missing \(the manifest lists it\)",
            ZARR,
        )
        for rel in [
            "source_embs/c/0/0",
            "train_idx/c/0",
            "pair_index/c/0/0",
            "question_embs/zarr.json",
            "zarr.json",
            "negatives/zarr.json",
        ]
    ),
    *(
        Case(
            f"truncated-{rel}",
            truncate(rel, 9),
            CORRUPT,
            rf"{re.escape(rel)}: file is \d+ bytes, but the manifest records",
            ZARR,
        )
        for rel in ["source_embs/c/0/0", "train_idx/c/0", "pair_keyword_values/c/0"]
    ),
    Case(
        "removed-array-dir",
        remove("steering_residual"),
        MISSING,
        r"steering_residual/(c/0/0|zarr\.json): store file is missing",
        ZARR,
    ),
    Case(
        "removed-gen",
        remove(f"{GEN}.safetensors"),
        MISSING,
        rf"{GEN}\.safetensors: store file is missing \(gen-000000\.json lists it\)",
        ST,
    ),
    Case(
        "truncated-gen",
        truncate(f"{GEN}.safetensors"),
        CORRUPT,
        rf"{GEN}\.safetensors: file is \d+ bytes, but gen-000000\.json records",
        ST,
    ),
    *(
        Case(
            f"removed-{rel}",
            remove(rel),
            MISSING,
            rf"{re.escape(rel)}: store file is missing \(gen-000000\.json lists it\)",
            ZARR,
        )
        for rel in [
            f"{GEN}/hard_negatives/c/0/0",
            f"{GEN}/negative_tiers/zarr.json",
            f"{GEN}/zarr.json",
        ]
    ),
    Case(
        "truncated-gen-shard",
        truncate(f"{GEN}/negative_tiers/c/0/0", 4),
        CORRUPT,
        rf"{GEN}/negative_tiers/c/0/0: file is \d+ bytes, but gen-000000\.json records",
        ZARR,
    ),
    Case(
        "unrecorded-unit",
        unrecord("pairs.safetensors"),
        FMT,
        M + r"'files' does not record pairs\.safetensors",
        ST,
    ),
    Case(
        "unrecorded-shard",
        unrecord("source_embs/c/0/0"),
        FMT,
        M + r"'files' does not record source_embs/c/0/0, a chunk file of array 'source_embs'",
        ZARR,
    ),
    Case(
        "unrecorded-split-chunk",
        unrecord("train_idx/c/0"),
        FMT,
        M + r"'files' does not record train_idx/c/0",
        ZARR,
    ),
    Case(
        "unrecorded-array-meta",
        unrecord("question_embs/zarr.json"),
        FMT,
        M + r"'files' does not record question_embs/zarr\.json",
        ZARR,
    ),
    Case(
        "swapped-files",
        manifest(lambda m: swap(m["arrays"], "question_embs", "pair_index", "file")),
        CORRUPT,
        r"pairs\.safetensors: has no tensor 'question_embs' that the manifest lists",
        ST,
    ),
    Case(
        "swapped-files",
        manifest(lambda m: swap(m["arrays"], "steering_centroid", "steering_residual", "file")),
        FMT,
        M + r"'file' should be a \.safetensors file or the zarr array 'steering_centroid'",
        ZARR,
    ),
]

# safetensors headers: each file's header against the manifest (same length: padded)
for rel, name, other in [
    ("embeddings.safetensors", "question_embs", "I32"),
    ("pairs.safetensors", "pair_index", "F64"),
    (f"{GEN}.safetensors", "hard_negatives", "U64"),
]:
    r = re.escape(rel)
    CASES += [
        Case(
            f"header-{name}-renamed",
            header(rel, lambda h, n=name: rename(h, n, n + "X")),
            CORRUPT,
            rf"{r}: has no tensor '{name}' that the manifest lists",
            ST,
        ),
        Case(
            f"header-{name}-removed",
            header(rel, lambda h, n=name: drop(h, n)),
            CORRUPT,
            rf"{r}: (has no tensor '{name}'|tensor .* starts at byte)",
            ST,
        ),
        Case(
            f"header-{name}-dtype-{other}",
            tensor(rel, name, "dtype", other),
            CORRUPT,
            rf"{r}: tensor '{name}' has dtype {other}, but the manifest says",
            ST,
        ),
        Case(
            f"header-{name}-dtype-unknown",
            tensor(rel, name, "dtype", "XX"),
            CORRUPT,
            rf"{r}: header entry '{name}': dtype 'XX' is not a safetensors dtype",
            ST,
        ),
        Case(
            f"header-{name}-shape-transposed",
            header(rel, lambda h, n=name: h[n].__setitem__("shape", h[n]["shape"][::-1])),
            CORRUPT,
            rf"{r}: tensor '{name}' has shape \[\d+, \d+\], but the manifest says",
            ST,
        ),
        Case(
            f"header-{name}-shape-str",
            tensor(rel, name, "shape", "abc"),
            CORRUPT,
            rf"{r}: header entry '{name}': shape 'abc' should be a list",
            ST,
        ),
        Case(
            f"header-{name}-offsets-str",
            tensor(rel, name, "data_offsets", "abc"),
            CORRUPT,
            rf"{r}: header entry '{name}': data_offsets 'abc' should be \[begin, end\]",
            ST,
        ),
        Case(
            f"header-{name}-offsets-reversed",
            header(
                rel, lambda h, n=name: h[n].__setitem__("data_offsets", h[n]["data_offsets"][::-1])
            ),
            CORRUPT,
            rf"{r}: header entry '{name}': data_offsets .* should be \[begin, end\]",
            ST,
        ),
        Case(
            f"header-{name}-offsets-shifted",
            header(
                rel,
                lambda h, n=name: h[n].__setitem__(
                    "data_offsets", [v + 8 for v in h[n]["data_offsets"]]
                ),
            ),
            CORRUPT,
            rf"{r}: (tensor '\w+' starts at byte|file is \d+ bytes, but its header describes)",
            ST,
        ),
        Case(
            f"header-{name}-offsets-short",
            header(
                rel,
                lambda h, n=name: h[n].__setitem__(
                    "data_offsets", [h[n]["data_offsets"][0], h[n]["data_offsets"][1] - 8]
                ),
            ),
            CORRUPT,
            rf"{r}: header entry '{name}': data_offsets .* span \d+ bytes, but shape",
            ST,
        ),
        Case(
            f"header-{name}-not-object",
            header(rel, lambda h, n=name: h.__setitem__(n, 5)),
            CORRUPT,
            rf"{r}: header entry '{name}': should be an object, but is int",
            ST,
        ),
    ]
CASES += [
    Case(
        "header-offsets-swapped",
        header(
            "steering.safetensors",
            lambda h: swap(h, "steering_centroid", "steering_residual", "data_offsets"),
        ),
        CORRUPT,
        r"steering\.safetensors: tensor 'steering_\w+' has data_offsets \[\d+, \d+\], but the manifest recorded",
        ST,
    ),
    Case(
        "header-entries-swapped",
        header(
            "steering.safetensors",
            lambda h: (
                rename(h, "steering_centroid", "tmp")
                or rename(h, "steering_residual", "steering_centroid")
                or rename(h, "tmp", "steering_residual")
            ),
        ),
        CORRUPT,
        r"steering\.safetensors: tensor 'steering_\w+' has data_offsets",
        ST,
    ),
    Case(
        "header-metadata-int",
        header("pairs.safetensors", lambda h: h.__setitem__("__metadata__", 5)),
        CORRUPT,
        r"pairs\.safetensors: __metadata__ should be an object of strings",
        ST,
    ),
    Case(
        "header-garbage",
        header("pairs.safetensors", lambda h: b"\xff" * 16),
        FMT,
        r"pairs\.safetensors: header is not valid JSON",
        ST,
    ),
    Case(
        "header-list",
        header("pairs.safetensors", lambda h: b"[]"),
        FMT,
        r"pairs\.safetensors: header should be a JSON object",
        ST,
    ),
    Case(
        "header-length-huge",
        lambda s: _poke(s / "splits.safetensors", 0, struct.pack("<Q", 2**40)),
        FMT,
        r"splits\.safetensors: header length \d+ is implausible",
        ST,
    ),
    Case(
        "header-length-past-end",
        lambda s: _poke(s / "splits.safetensors", 0, struct.pack("<Q", 10**6)),
        FMT,
        r"splits\.safetensors: header should be 1000000 bytes, but the file ends",
        ST,
    ),
    Case(
        "appended-gen",
        lambda s: (append(f"{GEN}.safetensors")(s), rerecord(s, f"{GEN}.safetensors")),
        CORRUPT,
        rf"{GEN}\.safetensors: file is \d+ bytes, but its header describes \d+ bytes",
        ST,
    ),
]


def _poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


# zarr array metadata against the manifest (re-recorded at its new size)
for array in ["question_embs", "train_idx", f"{GEN}/hard_negatives"]:
    a = re.escape(array)
    CASES += [
        Case(
            f"zarr-{array}-shape",
            zmeta(array, lambda z: z["shape"].__setitem__(0, z["shape"][0] + 1)),
            CORRUPT,
            rf"{a}/zarr\.json: has shape \[\d+.*, the manifest says",
            ZARR,
        ),
        Case(
            f"zarr-{array}-data_type",
            zmeta(array, lambda z: z.__setitem__("data_type", "int32")),
            CORRUPT,
            rf"{a}/zarr\.json: has data_type 'int32', the manifest says",
            ZARR,
        ),
        Case(
            f"zarr-{array}-group",
            zmeta(array, lambda z: z.__setitem__("node_type", "group")),
            CORRUPT,
            rf"{a}/zarr\.json: should describe a zarr v3 array",
            ZARR,
        ),
        Case(
            f"zarr-{array}-not-json",
            lambda s, a=array: (
                (s / a / "zarr.json").write_text("{nope"),
                rerecord(s, f"{a}/zarr.json"),
            ),
            CORRUPT,
            rf"{a}/zarr\.json: zarr array metadata is not valid JSON",
            ZARR,
        ),
        Case(
            f"zarr-{array}-grid",
            zmeta(array, lambda z: z.__setitem__("chunk_grid", {"name": "rectilinear"})),
            CORRUPT,
            rf"{a}/zarr\.json: has a chunk grid or chunk key encoding",
            ZARR,
        ),
        Case(
            f"zarr-{array}-logical",
            zmeta(array, lambda z: z["attributes"].__setitem__("logical_dtype", "bfloat16")),
            CORRUPT,
            rf"{a}/zarr\.json: has logical_dtype 'bfloat16'",
            ZARR,
        ),
        Case(
            f"zarr-{array}-codecs",
            zmeta(array, lambda z: z.__setitem__("codecs", [])),
            CORRUPT,
            rf"{a}/zarr\.json: should list its codecs",
            ZARR,
        ),
    ]

# the live negatives generation's description
P = r"negatives/CURRENT\.json: .*"
G = r"negatives/gen-000000\.json: .*"
CASES += [
    Case(
        "pointer-missing",
        remove("negatives/CURRENT.json"),
        MISSING,
        P + r"negatives generation description is missing",
    ),
    Case(
        "pointer-not-json",
        write_text("negatives/CURRENT.json", "{nope"),
        FMT,
        P + r"negatives generation description is not valid JSON",
    ),
    Case(
        "pointer-generation-str",
        pointer(lambda p: p.__setitem__("generation", "x")),
        FMT,
        P + r"should hold a non-negative integer 'generation'",
    ),
    Case(
        "pointer-generation-negative",
        pointer(lambda p: p.__setitem__("generation", -1)),
        FMT,
        P + r"should hold a non-negative integer 'generation'",
    ),
    Case(
        "pointer-arrays-list",
        pointer(lambda p: p.__setitem__("arrays", [])),
        FMT,
        P + r"and an 'arrays' object",
    ),
    Case(
        "pointer-lacks-negatives",
        pointer(lambda p: p["arrays"].pop("hard_negatives")),
        FMT,
        P + r"'arrays' lacks 'hard_negatives'",
    ),
    Case(
        "pointer-extra-array",
        pointer(lambda p: p["arrays"].__setitem__("source_embs", {})),
        FMT,
        P + r"'arrays' should hold only \['hard_negatives', 'negative_tiers'\]",
    ),
    Case(
        "pointer-entry-int",
        pointer(lambda p: p["arrays"].__setitem__("negative_tiers", 5)),
        FMT,
        P + r"the entry of 'negative_tiers' should be an object",
    ),
    Case(
        "pointer-stored_dtype",
        pointer(lambda p: p["arrays"]["hard_negatives"].__setitem__("stored_dtype", "float8")),
        FMT,
        P + r"'stored_dtype' 'float8' is unknown",
    ),
    Case(
        "pointer-shape",
        pointer(lambda p: p["arrays"]["hard_negatives"].__setitem__("shape", [120, 7])),
        FMT,
        P + r"\['arrays'\] differ from gen-000000\.json's",
    ),
    Case(
        "generation-shape",
        generation(lambda p: p["arrays"]["hard_negatives"].__setitem__("shape", [120, 7])),
        FMT,
        G + r"array 'hard_negatives' has shape \[120, 7\], but counts",
    ),
    Case(
        "generation-stored_dtype",
        generation(lambda p: p["arrays"]["negative_tiers"].__setitem__("stored_dtype", "float32")),
        FMT,
        r"negatives/(CURRENT|gen-000000)\.json: .*'negative_tiers'.*'float32' is not allowed",
    ),
    Case(
        "generation-files-size",
        generation(lambda p: p["files"].__setitem__(next(iter(p["files"])), 1)),
        CORRUPT,
        r"negatives/gen-000000\S*: file is \d+ bytes, but gen-000000\.json records 1",
    ),
    Case(
        "generation-description-only",
        edit_json(f"{GEN}.json", lambda p: p["arrays"]["hard_negatives"].__setitem__("key", "x")),
        FMT,
        G + r"'key' should be 'hard_negatives'",
    ),
    Case(
        "generation-description-missing",
        remove(f"{GEN}.json"),
        MISSING,
        G + r"negatives generation 0, which CURRENT\.json names, has no description",
    ),
    Case(
        "generation-description-not-json",
        write_text(f"{GEN}.json", "{nope"),
        FMT,
        G + r"negatives generation description is not valid JSON",
    ),
    Case(
        "pointer-generation-nudged",
        pointer(lambda p: p.__setitem__("generation", 1)),
        MISSING,
        r"gen-000001\.json: negatives generation 1, which CURRENT\.json names, has no description",
    ),
    Case(
        "pointer-shape-str",
        pointer(lambda p: p["arrays"]["hard_negatives"].__setitem__("shape", "abc")),
        FMT,
        P + r"'shape' should be a list",
    ),
    Case(
        "pointer-file-outside",
        pointer(lambda p: p["arrays"]["hard_negatives"].__setitem__("file", "../x")),
        FMT,
        P + r"'file' should be a relative path inside the store",
    ),
    Case(
        "pointer-key",
        pointer(lambda p: p["arrays"]["hard_negatives"].__setitem__("key", "negative_tiers")),
        FMT,
        P + r"'key' should be 'hard_negatives'",
    ),
    Case(
        "pointer-files-list",
        pointer(lambda p: p.__setitem__("files", [])),
        FMT,
        P + r"'files' should be an object of relative paths to sizes",
    ),
    Case(
        "pointer-files-size",
        pointer(lambda p: p["files"].__setitem__(next(iter(p["files"])), 1)),
        FMT,
        P + r"\['files'\] differ from gen-000000\.json's",
    ),
    Case(
        "pointer-not-object",
        write_text("negatives/CURRENT.json", "[]"),
        FMT,
        P + r"negatives generation description should be a JSON object",
    ),
]

PARAMS = [pytest.param(c, b, id=f"{b}-{c.id}") for c in CASES for b in c.backends]


@pytest.fixture(scope="module")
def good(tmp_path_factory, pt_dataset):
    """One good store per backend, converted from the session's `.pt` dataset."""
    root = tmp_path_factory.mktemp("good")
    return {b: convert_pt(pt_dataset, root / b, format=b, progress=False) for b in BOTH}


def test_catalogue_is_large_and_ids_are_distinct():
    ids = [p.id for p in PARAMS]
    assert len(ids) == len(set(ids)) and len(ids) >= 150, len(ids)


@pytest.mark.parametrize(("case", "backend"), PARAMS)
def test_bad_store_is_refused_at_open_and_by_verify(case, backend, good, tmp_path, capsys):
    store = shutil.copytree(good[backend], tmp_path / "s")
    case.mutate(store)
    with pytest.raises(case.error) as info:
        open_store(store)
    msg = str(info.value)
    assert re.search(case.match, msg), msg
    assert FIX.search(msg) or "is not a jasper_mmap store" in msg, msg
    with pytest.raises(JasperError):
        JASPERSteeringDataset(store, check_sources=False)
    assert cli_main(["verify", str(store), "-q"]) == 1
    out = capsys.readouterr().out
    assert re.search(case.match, out), out
    assert "Traceback" not in out


# -- zarr: never zeros -------------------------------------------------------------------------


def test_zarr_records_every_file_and_each_generation_its_own(good):
    store = good["zarr"]
    m = json.loads((store / "manifest.json").read_text())
    gen = json.loads((store / f"{GEN}.json").read_text())
    on_disk = {
        p.relative_to(store).as_posix(): p.stat().st_size
        for p in store.rglob("*")
        if p.is_file() and p.suffix != ".json" or p.name == "zarr.json"
    }
    recorded = {**m["files"], **gen["files"]}
    assert recorded == on_disk
    assert set(gen["files"]) == {f for f in on_disk if f.startswith(f"{GEN}/")}
    assert json.loads((store / "negatives/CURRENT.json").read_text())["files"] == gen["files"]
    assert "source_embs/c/0/0" in m["files"] and "train_idx/c/0" in m["files"]


def test_safetensors_generation_records_its_file(good):
    store = good["safetensors"]
    gen = json.loads((store / f"{GEN}.json").read_text())
    assert gen["files"] == {f"{GEN}.safetensors": (store / f"{GEN}.safetensors").stat().st_size}
    entry = gen["arrays"]["hard_negatives"]
    assert entry["data_offsets"] == [0, 120 * 6 * 8]  # recorded at write time


@pytest.mark.parametrize(
    "rel", ["source_embs/c/0/0", "train_idx/c/0", f"{GEN}/hard_negatives/c/0/0"]
)
def test_zarr_chunk_removed_after_open_raises_not_zeros(good, tmp_path, rel):
    store = shutil.copytree(good["zarr"], tmp_path / "z")
    s = open_store(store)
    name = rel.split("/")[-4] if rel.startswith("negatives") else rel.split("/")[0]
    (store / rel).unlink()
    # a negatives generation's files are checked when it is leased, before anything is mapped
    missing = rf"{re.escape(rel)}: (chunk file of array '{name}'|store file) is missing"
    with pytest.raises(StoreNotFoundError, match=missing):
        s.gather(name, [0, 1])
    with pytest.raises(StoreNotFoundError, match=re.escape(rel)):
        s.read(name)
    with pytest.raises(StoreNotFoundError, match=re.escape(rel)):  # the handle tables.py uses
        s.raw(name)[...]


def test_zarr_damaged_shard_names_the_file(good, tmp_path):
    store = shutil.copytree(good["zarr"], tmp_path / "z")
    s = open_store(store)
    shard = store / "source_embs/c/0/0"
    with open(shard, "r+b") as f:  # same size: the crc32c of the shard index no longer matches
        f.seek(shard.stat().st_size - 4)
        f.write(b"\0\0\0\0")
    with pytest.raises(
        StoreCorruptError,
        match=r"source_embs: reading rows of 'source_embs' failed \(ValueError: .*checksum.*source_embs/c/0/0",
    ):
        s.gather("source_embs", [3])
    with pytest.raises(StoreCorruptError, match=r"source_embs/c/0/0"):
        s.read("source_embs", 0, 5)
    with pytest.raises(StoreCorruptError, match=r"source_embs/c/0/0"):
        s.raw("source_embs")[...]
    report = verify_store(store, progress=False)
    assert not report.ok and any("source_embs/c/0/0" in p for p in report.problems), str(report)


def test_zarr_store_without_recorded_files_still_opens(good, tmp_path):
    """Manifests written before every file was recorded keep the old check (and reads)."""
    store = shutil.copytree(good["zarr"], tmp_path / "z")
    m = json.loads((store / "manifest.json").read_text())
    m["files"] = {}
    (store / "manifest.json").write_text(json.dumps(m))
    for meta in ("negatives/CURRENT.json", f"{GEN}.json"):
        p = json.loads((store / meta).read_text())
        del p["files"]
        (store / meta).write_text(json.dumps(p))
    s = open_store(store)
    assert s.read("source_embs").tobytes() == open_store(good["zarr"]).read("source_embs").tobytes()
    assert verify_store(store, progress=False).ok


# -- the functions other modules call ----------------------------------------------------------


def test_data_files_lists_every_file_under_each_path(good):
    store = good["zarr"]
    got = data_files(store, ["zarr.json", "train_idx", f"{GEN}"])
    assert got["zarr.json"] == (store / "zarr.json").stat().st_size
    assert {"train_idx/zarr.json", "train_idx/c/0", f"{GEN}/zarr.json"} <= set(got)
    assert f"{GEN}/hard_negatives/c/0/0" in got and list(got) == sorted(got)
    with pytest.raises(
        StoreNotFoundError, match="nope: data file or directory to record is missing"
    ):
        data_files(store, ["nope"])


def test_check_files_raises_our_errors_naming_the_file(good, tmp_path):
    store = shutil.copytree(good["safetensors"], tmp_path / "s")
    rel = f"{GEN}.safetensors"
    files = data_files(store, [rel])
    check_files(store, files, str(store / "negatives/gen-000000.json"))  # fine
    with pytest.raises(
        StoreCorruptError,
        match=rf"{rel}: file is \d+ bytes, but gen-000000\.json records 1 \(truncated",
    ):
        check_files(store, {rel: 1}, str(store / "negatives/gen-000000.json"))
    with pytest.raises(StoreFormatError, match=r"'files' should map relative paths"):
        check_files(store, {"../x": 1}, "where")
    (store / rel).unlink()
    with pytest.raises(
        StoreNotFoundError,
        match=rf"{rel}: store file is missing \(gen-000000\.json lists it\)\. Re-create",
    ):
        check_files(store, files, str(store / "negatives/gen-000000.json"))


def test_open_names_how_many_more_problems_and_verify_lists_them_all(good, tmp_path, capsys):
    store = shutil.copytree(good["safetensors"], tmp_path / "s")
    m = json.loads((store / "manifest.json").read_text())
    m["arrays"]["source_embs"]["shape"] = "abc"
    m["arrays"]["pair_index"]["stored_dtype"] = "float8"
    (store / "manifest.json").write_text(json.dumps(m))
    (store / "config.json").unlink()
    with pytest.raises(
        StoreFormatError, match=r"\(2 more problem\(s\); `jasper-mmap verify .*` lists all\)"
    ):
        open_store(store)
    assert cli_main(["verify", str(store), "-q"]) == 1
    out = capsys.readouterr().out
    assert "3 problem(s)" in out and "'shape' should be" in out and "'float8' is unknown" in out
    assert "config.json is missing" in out and "array data not read" in out


def test_verify_still_reads_the_data_of_sound_arrays(good, tmp_path):
    """A problem that concerns one array leaves the others' data checks (crc32) running."""
    store = shutil.copytree(good["safetensors"], tmp_path / "s")
    m = json.loads((store / "manifest.json").read_text())
    m["arrays"]["pair_relevance"]["stored_dtype"] = "float8"
    m["arrays"]["steering_residual"]["crc32"] ^= 1
    (store / "manifest.json").write_text(json.dumps(m))
    report = verify_store(store, progress=False)
    assert len(report.problems) == 2, str(report)
    assert "steering_residual has crc32" in str(report) and "pair_relevance" not in report.checked


# -- write_json_atomic ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "err"), [("fsync", errno.ENOSPC), ("replace", errno.EROFS), ("open", errno.EACCES)]
)
def test_write_json_atomic_failure_leaves_nothing_and_says_cannot_write(
    tmp_path, monkeypatch, where, err
):
    target = tmp_path / "CURRENT.json"
    target.write_text('{"old": 1}')

    def fail(*args, **kwargs):
        raise OSError(err, os.strerror(err))

    if where == "open":
        monkeypatch.setattr("builtins.open", fail)
    else:
        monkeypatch.setattr(os, where, fail)
    with pytest.raises(StoreWriteError, match=r"CURRENT\.json: could not write the pointer: "):
        write_json_atomic(target, {"new": 2}, "the pointer")
    monkeypatch.undo()
    assert target.read_text() == '{"old": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CURRENT.json"]


def test_write_json_atomic_other_failures_are_raised_as_they_are(tmp_path):
    target = tmp_path / "x.json"
    with pytest.raises(TypeError):
        write_json_atomic(target, {"bad": object()})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError):  # not a "cannot write" errno: left unchanged
        write_json_atomic(tmp_path / "missing" / "x.json", {})
    write_json_atomic(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1} and list(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("backend", BOTH)
def test_check_generation_checks_a_generation_before_it_is_read(good, tmp_path, backend):
    store = shutil.copytree(good[backend], tmp_path / "s")
    m = json.loads((store / "manifest.json").read_text())
    path = store / f"{GEN}.json"
    desc = json.loads(path.read_text())
    check_generation(store, desc, m, path)  # a good one passes
    rel = sorted(desc["files"])[-1]
    with open(store / rel, "ab") as f:
        f.write(b"\0")
    with pytest.raises(
        StoreCorruptError,
        match=rf"{re.escape(rel)}: file is \d+ bytes, but gen-000000\.json records",
    ):
        check_generation(store, desc, m, path)
    desc["arrays"]["negative_tiers"]["shape"] = [120, 5]
    with pytest.raises(
        StoreFormatError, match=r"gen-000000\.json: array 'negative_tiers' has shape \[120, 5\]"
    ):
        check_generation(store, desc, m, path)


@pytest.mark.parametrize("backend", BOTH)
def test_open_checks_the_live_generation_once_and_later_ones_at_first_lease(
    good, tmp_path, backend, monkeypatch
):
    """open_store checks the live generation; its first lease does not repeat that check, a
    generation published later is checked when first leased, and a damaged one is refused."""
    import pickle

    from jasper_mmap import publish_negatives
    from jasper_mmap.stores import leases as base

    store_dir = shutil.copytree(good[backend], tmp_path / "s")
    checked = []
    real = base.check_generation
    monkeypatch.setattr(
        base,
        "check_generation",
        lambda d, desc, m, p: checked.append(desc["generation"]) or real(d, desc, m, p),
    )
    store = open_store(store_dir)
    assert store.generation == 0 and checked == []  # verified by open_store itself
    assert pickle.loads(pickle.dumps(store))._verified == {}  # per process
    negs, tiers = store.read("hard_negatives"), store.read("negative_tiers")
    publish_negatives(store_dir, negs, tiers)
    store.use_generation(1)
    assert checked == [1]
    publish_negatives(store_dir, negs, tiers)
    rel = next(
        r for r in json.loads((store_dir / "negatives/gen-000002.json").read_text())["files"]
    )
    with open(store_dir / rel, "ab") as f:
        f.write(b"\0")
    with pytest.raises(StoreCorruptError, match=re.escape(rel)):
        store.use_generation(2)


# -- NOTE [checked stores]: a store found sound is not read again while no file changed -----


@pytest.fixture
def files_look_old(monkeypatch):
    """Let integrity trust files written just now (the racy window is 2 s), and forget what
    other tests found sound."""
    from jasper_mmap.format import integrity

    monkeypatch.setattr(integrity, "_RACY_SECONDS", -1e9)
    monkeypatch.setattr(integrity, "_CHECKED", {})
    return integrity


def _count_full_checks(monkeypatch, integrity) -> list[int]:
    calls: list[int] = []
    real = integrity._structure_problems
    monkeypatch.setattr(integrity, "_structure_problems", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize(("case", "backend"), PARAMS)
def test_damage_after_a_sound_open_is_refused_at_the_next_open(
    case, backend, good, tmp_path, files_look_old
):
    """Every case of the catalogue, done to a store this process already opened and found
    sound (so its file states are remembered): the next open still refuses it."""
    import time

    store = shutil.copytree(good[backend], tmp_path / "s")
    open_store(store)
    assert str(store) in files_look_old._CHECKED
    time.sleep(0.02)  # past a tick of the kernel's coarse clock, which stamps ctime
    case.mutate(store)
    with pytest.raises(case.error) as info:
        open_store(store)
    assert re.search(case.match, str(info.value)), str(info.value)


@pytest.mark.parametrize("backend", BOTH)
def test_a_sound_store_opened_again_is_only_stat_ed(
    good, tmp_path, backend, files_look_old, monkeypatch
):
    """The second open of an unchanged store reads and checks nothing again, serves the same
    live generation, and a dataset over it reads the same rows; a touch of any one file it
    looked at (same bytes, new ctime) brings the full check back."""
    import time

    from jasper_mmap import publish_negatives

    integrity = files_look_old
    store_dir = shutil.copytree(good[backend], tmp_path / "s")
    full = _count_full_checks(monkeypatch, integrity)
    first = open_store(store_dir)
    second = open_store(store_dir)
    assert len(full) == 1
    assert second.generation == first.generation == 0
    ds = JASPERSteeringDataset(store_dir, "train", check_sources=False)
    assert len(full) == 1
    assert ds[0]["question_emb"].equal(JASPERSteeringDataset(store_dir, "train")[0]["question_emb"])
    rels = integrity._CHECKED[str(store_dir)][0]
    assert {"manifest.json", "config.json", "negatives/CURRENT.json", f"{GEN}.json"} <= set(rels)
    for rel in ("config.json", f"{GEN}.json", rels[-1]):
        time.sleep(0.02)
        os.utime(store_dir / rel)  # content unchanged: a full check again, and it passes
        before = len(full)
        open_store(store_dir)
        assert len(full) == before + 1, rel
    negs, tiers = first.read("hard_negatives"), first.read("negative_tiers")
    publish_negatives(store_dir, negs[:, ::-1].copy(), tiers[:, ::-1].copy())
    before = len(full)
    assert open_store(store_dir).generation == 1 and len(full) == before + 1


def test_a_store_written_just_now_is_checked_in_full_at_every_open(good, tmp_path, monkeypatch):
    """Within the racy window (files changed less than 2 s ago) nothing is remembered."""
    from jasper_mmap.format import integrity

    monkeypatch.setattr(integrity, "_CHECKED", {})
    store_dir = shutil.copytree(good["safetensors"], tmp_path / "s")  # ctime: now
    full = _count_full_checks(monkeypatch, integrity)
    open_store(store_dir)
    open_store(store_dir)
    assert len(full) == 2 and str(store_dir) not in integrity._CHECKED


def test_verify_always_checks_in_full(good, tmp_path, files_look_old, monkeypatch):
    store_dir = shutil.copytree(good["safetensors"], tmp_path / "s")
    open_store(store_dir)
    full = _count_full_checks(monkeypatch, files_look_old)
    assert cli_main(["verify", str(store_dir), "-q"]) == 0
    assert len(full) == 1


def test_threads_opening_a_changed_store_at_once_all_succeed(good, tmp_path, files_look_old):
    """The memo is shared by the process's threads: a stale entry found by several of them at
    once is dropped once, and every open checks in full and succeeds."""
    import threading
    import time

    store_dir = shutil.copytree(good["safetensors"], tmp_path / "s")
    errors = []
    for _ in range(10):
        open_store(store_dir)
        time.sleep(0.01)
        os.utime(store_dir / "config.json")
        barrier = threading.Barrier(4)

        def opener(barrier=barrier):
            barrier.wait()
            try:
                open_store(store_dir)
            except BaseException as e:  # noqa: BLE001 - collected for the assertion
                errors.append(e)

        threads = [threading.Thread(target=opener) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_a_file_changed_during_the_full_check_is_not_remembered(good, tmp_path, monkeypatch):
    """The racy window counts from the start of the check: a file written while the check
    ran (here: after it read the file) is checked again at the next open, however long the
    check took."""
    import time

    from jasper_mmap.format import integrity

    monkeypatch.setattr(integrity, "_CHECKED", {})
    monkeypatch.setattr(integrity, "_RACY_SECONDS", 0.3)
    store_dir = shutil.copytree(good["safetensors"], tmp_path / "s")
    time.sleep(0.4)  # the copy is older than the window
    real = integrity._structure_problems

    def slow_check(*args):
        problems = real(*args)
        with open(store_dir / "pairs.safetensors", "ab") as f:
            f.write(b"\0" * 8)  # after the check read it
        time.sleep(0.4)  # the check "ran" longer than the window
        return problems

    monkeypatch.setattr(integrity, "_structure_problems", slow_check)
    open_store(store_dir)
    monkeypatch.setattr(integrity, "_structure_problems", real)
    with pytest.raises(StoreCorruptError, match=r"pairs\.safetensors"):
        open_store(store_dir)


@pytest.mark.parametrize("backend", BOTH)
def test_a_store_that_does_not_record_its_files_is_remembered_by_the_files_it_reads(
    good, tmp_path, backend, files_look_old, monkeypatch
):
    """Stores written before every file was recorded: the check still reads each array's
    data file header or zarr.json, so a change to one of those is seen at the next open."""
    import time

    store_dir = shutil.copytree(good[backend], tmp_path / "s")
    m = json.loads((store_dir / "manifest.json").read_text())
    m["files"] = {}
    (store_dir / "manifest.json").write_text(json.dumps(m))
    for rel in (f"{GEN}.json", "negatives/CURRENT.json"):
        p = json.loads((store_dir / rel).read_text())
        del p["files"]
        (store_dir / rel).write_text(json.dumps(p))
    full = _count_full_checks(monkeypatch, files_look_old)
    open_store(store_dir)
    open_store(store_dir)
    assert len(full) == 1
    time.sleep(0.02)
    rel = "embeddings.safetensors" if backend == "safetensors" else "question_embs/zarr.json"
    meta = "question_embs/zarr.json"
    if backend == "zarr":
        z = json.loads((store_dir / meta).read_text())
        z["shape"] = [z["shape"][0] + 1, *z["shape"][1:]]
        (store_dir / meta).write_text(json.dumps(z))
    else:
        with open(store_dir / rel, "ab") as f:
            f.write(b"\0")
    with pytest.raises(StoreCorruptError, match=re.escape(rel)):
        open_store(store_dir)
    assert len(full) == 2


def test_a_store_opened_before_a_publication_serves_the_live_generation(good, tmp_path):
    """The generation checked at open is not served if another went live before first use."""
    from jasper_mmap import publish_negatives

    store_dir = shutil.copytree(good["safetensors"], tmp_path / "s")
    reader = open_store(store_dir)
    other = open_store(store_dir)
    publish_negatives(store_dir, other.read("hard_negatives"), other.read("negative_tiers"))
    assert reader.generation == reader.live_generation() == 1
