"""The catalogue of structurally bad stores (the `CASES` of test_store_integrity.py and
test_checked_stores.py): each case copies a good store, breaks one thing and states the
error class and a pattern of the message. Data and helpers only: no tests here."""

from __future__ import annotations

import json
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from jasper_mmap.errors import (
    JasperError,
    StoreCorruptError,
    StoreFormatError,
    StoreNotFoundError,
)

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
