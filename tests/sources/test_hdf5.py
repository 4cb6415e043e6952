"""HDF5 (upstream's ``dataset.h5``): the streamed source reader and ``convert_pt_to_hdf5``.

Round trips are checked byte for byte against the ``.pt`` tensors, against upstream's own way
of reading the file (``f[path][:]``, ``group[str(i)][:]``), and against files written the way
upstream's ``convert_pt_to_hdf5`` writes them (``create_dataset(data=..., compression=...)``).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from jasper_mmap.errors import (
    ArtifactError,
    ArtifactMissingError,
    JasperError,
    SampleIndexError,
    StoreExistsError,
)
from jasper_mmap.sources.hdf5 import keywords as h5_keywords
from jasper_mmap.sources.hdf5 import reader as h5_source
from jasper_mmap.sources.hdf5.layout import H5_PATHS, KEYWORDS_PATH
from jasper_mmap.sources.hdf5.reader import H5Array, iter_h5_keyword_rows, open_h5_source
from jasper_mmap.sources.hdf5.writer import convert_pt_to_hdf5
from jasper_mmap.sources.pt.reader import TensorArtifact, open_tensor
from jasper_mmap.synthetic import SyntheticSpec, make_pt_dataset

#: upstream's reader (jasper_steering_dataset.py, _HDF5_PATH_MAP and _load_embeddings_hdf5)
UPSTREAM_READ = {
    "question_embs": "embeddings/questions",
    "source_embs": "embeddings/sources",
    "keyword_embs": "embeddings/keywords",
    "centroid_embs": "embeddings/centroids",
    "pair_index": "pair_data/index",
    "pair_cluster_id": "pair_data/cluster_id",
    "pair_relevance": "pair_data/relevance",
    "hard_negatives": "negatives/hardnegatives",
    "negative_tiers": "negatives/tiers",
    "steering_centroid": "steering/centroid",
    "steering_keyword_weighted": "steering/keyword_weighted",
    "steering_residual": "steering/residual",
    "centroid_distances": "steering/distances",
}
SPLITS = ("train", "val", "test")


def write_upstream_style(src: Path, out: Path, splits=SPLITS, compression="gzip") -> Path:
    """Write ``out`` with the h5py calls upstream's ``convert_pt_to_hdf5`` makes (whole loads)."""
    load = lambda name: torch.load(src / name, weights_only=True)  # noqa: E731
    with h5py.File(out, "w") as f:
        emb, pair = f.create_group("embeddings"), f.create_group("pair_data")
        neg, steer = f.create_group("negatives"), f.create_group("steering")
        spl = f.create_group("splits")
        for name in ["questions", "sources", "keywords", "centroids"]:
            pt = (name.rstrip("s") if name != "questions" else "question") + "_embs.pt"
            emb.create_dataset(name, data=load(pt).numpy(), compression=compression)
        for name in ["pair_index", "pair_cluster_id", "pair_relevance"]:
            pair.create_dataset(
                name.replace("pair_", ""), data=load(f"{name}.pt").numpy(), compression=compression
            )
        kw = pair.create_group("keyword_ids")
        for i, ids in enumerate(load("pair_keyword_ids.pt")):
            kw.create_dataset(str(i), data=np.array(ids, dtype=np.int32))
        for name in ["hard_negatives", "negative_tiers"]:
            neg.create_dataset(
                name.replace("negative_", "").replace("_", ""),
                data=load(f"{name}.pt").numpy(),
                compression=compression,
            )
        for name in ["steering_centroid", "steering_keyword_weighted", "steering_residual"] + [
            "centroid_distances"
        ]:
            steer.create_dataset(
                name.replace("steering_", "").replace("centroid_", ""),
                data=load(f"{name}.pt").numpy(),
                compression=compression,
            )
        for split in splits:
            spl.create_dataset(split, data=load(f"{split}_idx.pt").numpy(), compression=compression)
    return out


def read_all(arr, block: int = 7) -> np.ndarray:
    """Every row of a reader, read in blocks of ``block`` rows (streaming, unaligned)."""
    parts = [arr.read_rows(s, min(arr.shape[0], s + block)) for s in range(0, arr.shape[0], block)]
    return np.concatenate(parts) if parts else arr.read_rows(0, 0)


def keyword_lists(src) -> list[list[int]]:
    """The keyword lists a source's ``keyword_rows`` yields, as Python lists."""
    out = []
    for lengths, values in src.keyword_rows(block_rows=13):
        assert lengths.dtype == np.int64 and values.dtype == np.int64
        out.extend(v.tolist() for v in np.split(values, np.cumsum(lengths)[:-1]))
    return out


@pytest.fixture(scope="module")
def pt_dir(tmp_path_factory) -> Path:
    """A private 120-pair `.pt` dataset (the session one must not get a dataset.h5)."""
    return make_pt_dataset(tmp_path_factory.mktemp("h5pt") / "ds", SyntheticSpec())


@pytest.fixture(scope="module")
def h5_dir(pt_dir, tmp_path_factory) -> Path:
    """A copy of ``pt_dir`` with ``dataset.h5`` written by ``convert_pt_to_hdf5``; read-only."""
    d = tmp_path_factory.mktemp("h5conv") / "ds"
    shutil.copytree(pt_dir, d)
    convert_pt_to_hdf5(d)
    return d


@pytest.fixture(scope="module")
def kw_lists(pt_dir) -> list[list[int]]:
    return [list(x) for x in torch.load(pt_dir / "pair_keyword_ids.pt", weights_only=True)]


def h5_only(src_dir: Path, dst: Path, **kw) -> Path:
    """A directory holding only config.json and an upstream-style dataset.h5 of ``src_dir``."""
    dst.mkdir()
    shutil.copy(src_dir / "config.json", dst / "config.json")
    write_upstream_style(src_dir, dst / "dataset.h5", **kw)
    return dst


# ---------------------------------------------------------------------------- round trips


def test_round_trip_is_bit_exact(h5_dir, pt_dir, kw_lists):
    with open_h5_source(h5_dir) as src:
        assert set(src.arrays) == set(H5_PATHS)
        assert src.n_pairs == 120 and src.path == h5_dir / "dataset.h5"
        for name, arr in src.arrays.items():
            want = open_tensor(pt_dir / f"{name}.pt")
            assert (arr.shape, arr.dtype, arr.np_dtype) == (want.shape, want.dtype, want.np_dtype)
            assert (arr.nbytes, arr.row_bytes) == (want.nbytes, want.row_bytes)
            got = read_all(arr)
            assert got.flags.c_contiguous
            assert got.tobytes() == want.read_rows(0, want.shape[0]).tobytes(), name
        assert keyword_lists(src) == kw_lists


def test_h5_arrays_name_file_and_dataset(h5_dir):
    with open_h5_source(h5_dir) as src:
        arr = src.arrays["question_embs"]
        assert isinstance(arr, H5Array)
        assert arr.path == f"{h5_dir / 'dataset.h5'}:embeddings/questions"
        with pytest.raises(SampleIndexError, match="rows 50:70 are outside"):
            arr.read_rows(50, 70)
        assert arr.read_rows(3, 3).shape == (0, 16)
    with pytest.raises(ArtifactError, match="after its H5Source was closed"):
        arr.read_rows(0, 1)


def test_upstream_reader_gets_the_pt_tensors(h5_dir, pt_dir, kw_lists):
    """Read our file exactly the way upstream's dataset does."""
    with h5py.File(h5_dir / "dataset.h5", "r") as f:
        for name, path in UPSTREAM_READ.items():
            got = torch.from_numpy(f[path][:])
            want = torch.load(pt_dir / f"{name}.pt", weights_only=True)
            assert got.dtype == want.dtype and torch.equal(got, want), name
        n = len(torch.from_numpy(f["pair_data/index"][:]))
        assert [list(f["pair_data/keyword_ids"][str(i)][:]) for i in range(n)] == kw_lists
        for split in SPLITS:
            want = torch.load(pt_dir / f"{split}_idx.pt", weights_only=True)
            assert torch.equal(torch.from_numpy(f[f"splits/{split}"][:]), want)


def test_layout_matches_upstream_writer(h5_dir, pt_dir, tmp_path):
    ref = write_upstream_style(pt_dir, tmp_path / "upstream.h5")

    def describe(path):
        out = {}
        with h5py.File(path, "r") as f:

            def visit(name, obj):
                if isinstance(obj, h5py.Dataset):
                    out[name] = (obj.shape, obj.dtype.str, obj.compression, obj[()].tobytes())
                else:
                    out[name] = "group"

            f.visititems(visit)
            kw = f[KEYWORDS_PATH]
            assert all(kw[k].chunks is None and kw[k].dtype == np.int32 for k in kw)
        return out

    assert describe(h5_dir / "dataset.h5") == describe(ref)


@pytest.mark.parametrize("compression", ["gzip", None])
def test_upstream_written_file_reads(pt_dir, kw_lists, tmp_path, caplog, compression):
    """An upstream-style file without splits/test and without any split .pt file beside it."""
    d = h5_only(pt_dir, tmp_path / "ds", splits=("train", "val"), compression=compression)
    caplog.set_level(logging.INFO, logger=h5_source.__name__)
    with open_h5_source(d) as src:
        assert "test_idx" not in src.arrays
        assert src.split_sources == {
            "train": f"{d / 'dataset.h5'}:splits/train",
            "val": f"{d / 'dataset.h5'}:splits/val",
        }
        assert src.files == [d / "dataset.h5"]
        for name, arr in src.arrays.items():
            want = open_tensor(pt_dir / f"{name}.pt")
            assert read_all(arr, 11).tobytes() == want.read_rows(0, want.shape[0]).tobytes()
        assert keyword_lists(src) == kw_lists
    assert "no test split" in caplog.text


def test_split_pt_file_wins_over_splits_group(pt_dir, tmp_path, caplog):
    d = h5_only(pt_dir, tmp_path / "ds")
    other = torch.arange(5, dtype=torch.int64)
    torch.save(other, d / "train_idx.pt")
    caplog.set_level(logging.INFO, logger=h5_source.__name__)
    with open_h5_source(d / "dataset.h5") as src:  # the file itself works as well
        assert isinstance(src.arrays["train_idx"], TensorArtifact)
        assert isinstance(src.arrays["val_idx"], H5Array)
        assert src.arrays["train_idx"].read_rows(0, 5).tolist() == other.tolist()
        assert src.split_sources["train"] == str(d / "train_idx.pt")
        assert src.files == [d / "dataset.h5", d / "train_idx.pt"]
    assert "split train is read from" in caplog.text


def test_iter_h5_keyword_rows_by_path(h5_dir, kw_lists):
    rows = list(iter_h5_keyword_rows(h5_dir / "dataset.h5", block_rows=50))
    assert [len(lengths) for lengths, _ in rows] == [50, 50, 20]
    values = np.concatenate([v for _, v in rows]).tolist()
    assert values == [x for ids in kw_lists for x in ids]
    first = list(iter_h5_keyword_rows(h5_dir, n_pairs=3))
    assert [x.tolist() for x in first[0]] == [
        [len(x) for x in kw_lists[:3]],
        [v for x in kw_lists[:3] for v in x],
    ]


# ----------------------------------------------------------- keyword layouts and the cache


def _rewrite_keywords(path: Path, make) -> list[list[int]]:
    """Replace every keyword dataset ``i`` by ``make(group, name, ids)``; return the lists."""
    with h5py.File(path, "r+") as f:
        g = f[KEYWORDS_PATH]
        lists = [g[str(i)][:].tolist() for i in range(len(g))]
        for i, ids in enumerate(lists):
            del g[str(i)]
            make(g, str(i), ids)
    return lists


@pytest.mark.parametrize(
    "make",
    [
        lambda g, n, ids: g.create_dataset(n, data=np.array(ids, dtype=">i4")),
        lambda g, n, ids: g.create_dataset(n, data=np.array(ids, dtype=np.int64)),
        lambda g, n, ids: g.create_dataset(n, data=np.array(ids, dtype=np.uint16)),
        lambda g, n, ids: g.create_dataset(
            n, data=np.array(ids, dtype=np.int32), chunks=(4,), maxshape=(None,), compression="gzip"
        ),
        lambda g, n, ids: g.create_dataset(n, data=np.array(ids, dtype=np.int32), track_times=True),
    ],
    ids=["big-endian", "int64", "uint16", "chunked-gzip", "timestamps"],
)
def test_keyword_datasets_of_any_integer_layout(h5_dir, tmp_path, make):
    shutil.copy(h5_dir / "dataset.h5", tmp_path / "dataset.h5")
    lists = _rewrite_keywords(tmp_path / "dataset.h5", make)
    with open_h5_source(tmp_path / "dataset.h5") as src:
        assert keyword_lists(src) == lists


def test_contiguous_int32_keywords_take_the_pread_path(h5_dir, kw_lists, monkeypatch):
    def refuse(*args):
        raise AssertionError("H5Dread used for a contiguous int32 keyword dataset")

    monkeypatch.setattr(h5_source.KeywordPass, "_read_converted", refuse)
    with open_h5_source(h5_dir) as src:
        assert keyword_lists(src) == kw_lists


def test_empty_keyword_lists(h5_dir, tmp_path):
    shutil.copy(h5_dir / "dataset.h5", tmp_path / "dataset.h5")

    def make(g, n, ids):
        g.create_dataset(n, data=np.array([] if int(n) % 5 == 0 else ids, dtype=np.int32))

    lists = _rewrite_keywords(tmp_path / "dataset.h5", make)
    with open_h5_source(tmp_path) as src:
        assert keyword_lists(src) == [[] if i % 5 == 0 else x for i, x in enumerate(lists)]


def test_keyword_pass_with_a_userblock_and_cache_evictions(pt_dir, kw_lists, tmp_path, monkeypatch):
    """pread offsets account for a user block; the eviction path gives the same lists."""
    d = tmp_path / "ds"
    d.mkdir()
    with h5py.File(d / "dataset.h5", "w", userblock_size=1024) as f:
        f.create_group("tmp")
    ref = write_upstream_style(pt_dir, tmp_path / "ref.h5")
    with h5py.File(ref, "r") as a, h5py.File(d / "dataset.h5", "a") as b:
        for g in a:
            a.copy(a[g], b, g)
    monkeypatch.setattr(h5_keywords, "_EVICT_EVERY", 16)
    with open_h5_source(d) as src:
        assert keyword_lists(src) == kw_lists
        cfg = src._file.id.get_mdc_config()
        assert cfg.incr_mode == 1  # the file's own cache settings are back


def test_keyword_pass_in_a_thread_beside_array_reads(h5_dir, pt_dir, kw_lists, monkeypatch):
    """As the converter runs it: keywords decoded in a thread while tables stream."""
    monkeypatch.setattr(h5_keywords, "_EVICT_EVERY", 8)
    want = {n: open_tensor(pt_dir / f"{n}.pt") for n in H5_PATHS}
    with open_h5_source(h5_dir) as src, ThreadPoolExecutor(1) as pool:
        for _ in range(3):
            lists = pool.submit(keyword_lists, src)
            for name, arr in src.arrays.items():
                want_bytes = want[name].read_rows(0, want[name].shape[0]).tobytes()
                assert read_all(arr, 5).tobytes() == want_bytes
            assert lists.result() == kw_lists


def test_extra_keyword_datasets_are_ignored_like_upstream(h5_dir, kw_lists, tmp_path, caplog):
    shutil.copy(h5_dir / "dataset.h5", tmp_path / "dataset.h5")
    with h5py.File(tmp_path / "dataset.h5", "r+") as f:
        f[KEYWORDS_PATH].create_dataset("120", data=np.array([1], dtype=np.int32))
    with open_h5_source(tmp_path) as src:
        assert keyword_lists(src) == kw_lists
    assert "121 keyword datasets, 120 pairs" in caplog.text


def test_streaming_reads_of_upstream_chunks(tmp_path):
    """Column-split chunks (as h5py guesses them), unaligned blocks, then random rows."""
    data = np.random.default_rng(0).standard_normal((3000, 40)).astype(np.float32)
    with h5py.File(tmp_path / "t.h5", "w") as f:
        f.create_dataset("embeddings/questions", data=data, chunks=(64, 8), compression="gzip")
    with h5py.File(tmp_path / "t.h5", "r") as f:
        arr = H5Array(f, tmp_path / "t.h5", "embeddings/questions", "float", 2)
        assert arr.chunk_rows == 64 and arr._cache == 1 << 20
        assert read_all(arr, 150).tobytes() == data.tobytes()
        assert arr._ds is None  # the last row dropped the handle and its cache
        with ThreadPoolExecutor(1) as pool:  # as the converter prefetches: one read at a time
            blocks = [
                pool.submit(arr.read_rows, s, min(3000, s + 700)).result()
                for s in range(0, 3000, 700)
            ]
        assert np.concatenate(blocks).tobytes() == data.tobytes()
        for i in (5, 2999, 1000, 6):
            assert arr.read_rows(i, i + 1).tobytes() == data[i : i + 1].tobytes()
            assert arr._ds is None
        arr.close()


# ------------------------------------------------------------------------- bad inputs


def _edit(h5_dir: Path, tmp_path: Path, fn) -> Path:
    """A copy of the converted directory's dataset.h5 changed by ``fn(file)``."""
    shutil.copy(h5_dir / "dataset.h5", tmp_path / "dataset.h5")
    with h5py.File(tmp_path / "dataset.h5", "r+") as f:
        fn(f)
    return tmp_path


def _replace(path: str, data) -> callable:
    def fn(f):
        del f[path]
        f.create_dataset(path, data=data)

    return fn


def _kw_consume(d: Path) -> None:
    with open_h5_source(d) as src:
        for _ in src.keyword_rows():
            pass


BAD_FILES = {
    "missing group": (lambda f: f.__delitem__("steering"), "steering/centroid: required HDF5"),
    "missing dataset": (
        lambda f: f.__delitem__("embeddings/questions"),
        "embeddings/questions: required HDF5 dataset is missing",
    ),
    "group instead of dataset": (
        lambda f: (f.__delitem__("pair_data/relevance"), f.create_group("pair_data/relevance")),
        "relevance: required HDF5 dataset is a group",
    ),
    "floats as ints": (
        _replace("embeddings/questions", np.zeros((60, 16), np.int32)),
        r"questions: should be a 2-D array of floats, but has shape \[60, 16\] and dtype int32",
    ),
    "ints as floats": (
        _replace("negatives/tiers", np.zeros((120, 6), np.float32)),
        "tiers: should be a 2-D array of integers",
    ),
    "strings": (
        _replace("pair_data/cluster_id", np.array([b"a"] * 120)),
        "cluster_id: should be a 1-D array of integers",
    ),
    "wrong shape": (
        _replace("embeddings/sources", np.zeros(120, np.float32)),
        r"sources: should be a 2-D array of floats, but has shape \[120\]",
    ),
    "missing keyword group": (
        lambda f: f.__delitem__(KEYWORDS_PATH),
        "keyword_ids: the group of keyword ids",
    ),
    "splits/train missing": (lambda f: f.__delitem__("splits/train"), None),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_datasets_are_named(h5_dir, tmp_path, case):
    fn, match = BAD_FILES[case]
    d = _edit(h5_dir, tmp_path, fn)
    if match is None:  # the .pt split is not beside this copy, so train has no source at all
        with pytest.raises(ArtifactMissingError, match="no train split: neither train_idx.pt"):
            open_h5_source(d)
        return
    with pytest.raises(ArtifactError, match=match) as e:
        open_h5_source(d)
    assert str(d / "dataset.h5") in str(e.value) and "convert_pt_to_hdf5" in str(e.value)


BAD_KEYWORDS = {
    "missing": (
        lambda f: f.__delitem__(f"{KEYWORDS_PATH}/57"),
        "keyword_ids/57: the keyword ids of pair 57 are missing",
    ),
    "floats": (
        _replace(f"{KEYWORDS_PATH}/3", np.array([1.5, 2.0])),
        "keyword_ids/3: the keyword ids of pair 3 holds float64, but should hold integers",
    ),
    "2-D": (
        _replace(f"{KEYWORDS_PATH}/9", np.zeros((2, 2), np.int32)),
        r"pair 9 has shape \[2, 2\], but should be 1-D",
    ),
    "too large": (
        _replace(f"{KEYWORDS_PATH}/4", np.array([2**40], np.int64)),
        "pair 4 holds ids outside the int32 range",
    ),
    "a group": (
        lambda f: (f.__delitem__(f"{KEYWORDS_PATH}/8"), f.create_group(f"{KEYWORDS_PATH}/8")),
        "pair 8 is not a readable dataset",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_KEYWORDS))
def test_bad_keyword_datasets_are_named(h5_dir, tmp_path, case):
    fn, match = BAD_KEYWORDS[case]
    d = _edit(h5_dir, tmp_path, fn)
    with pytest.raises(ArtifactError, match=match) as e:
        _kw_consume(d)
    assert str(d / "dataset.h5") in str(e.value)


def test_truncated_file(h5_dir, tmp_path):
    data = (h5_dir / "dataset.h5").read_bytes()
    (tmp_path / "dataset.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="HDF5 file is truncated or corrupt .*convert_pt"):
        open_h5_source(tmp_path)


def test_corrupt_chunk_is_named_on_read(h5_dir, tmp_path):
    shutil.copy(h5_dir / "dataset.h5", tmp_path / "dataset.h5")
    with h5py.File(tmp_path / "dataset.h5", "r") as f:
        info = f["steering/residual"].id.get_chunk_info(0)
    with open(tmp_path / "dataset.h5", "r+b") as fh:
        fh.seek(info.byte_offset)
        fh.write(b"\xff" * info.size)
    with open_h5_source(tmp_path) as src:
        with pytest.raises(ArtifactError, match=r"steering/residual: cannot read rows 0:120"):
            src.arrays["steering_residual"].read_rows(0, 120)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", r"is empty \(0 bytes\), not an HDF5 file"),
        (b"question,source\n1,2\n" * 50, "is not an HDF5 file .no HDF5 signature"),
    ],
    ids=["empty", "text"],
)
def test_not_hdf5(tmp_path, content, match):
    (tmp_path / "dataset.h5").write_bytes(content)
    with pytest.raises(ArtifactError, match=match):
        open_h5_source(tmp_path)


def test_missing_file(tmp_path):
    with pytest.raises(ArtifactMissingError, match="HDF5 dataset file is missing"):
        open_h5_source(tmp_path)
    (tmp_path / "dataset.h5").mkdir()
    with pytest.raises(ArtifactMissingError, match="HDF5 dataset file is not a file"):
        open_h5_source(tmp_path)


def test_corrupted_files_raise_only_our_errors(h5_dir, tmp_path):
    """Random byte flips (anywhere, in the metadata) and truncations: a JasperError or a clean
    read, never a raw h5py/OSError/KeyError/RuntimeError."""
    data = (h5_dir / "dataset.h5").read_bytes()
    rng = np.random.default_rng(7)
    for trial in range(90):
        b = bytearray(data)
        if trial % 3 == 0:
            b[rng.integers(len(b))] = rng.integers(256)
        elif trial % 3 == 1:
            del b[rng.integers(len(b)) :]
        else:
            for pos in rng.integers(min(len(b), 8192), size=4):
                b[pos] = rng.integers(256)
        (tmp_path / "dataset.h5").write_bytes(bytes(b))
        try:
            with open_h5_source(tmp_path) as src:
                for arr in src.arrays.values():
                    read_all(arr, 50)
                for _ in src.keyword_rows():
                    pass
        except JasperError:
            pass


# --------------------------------------------------------------------------- the writer


def _copy(pt_dir: Path, tmp_path: Path) -> Path:
    d = tmp_path / "ds"
    shutil.copytree(pt_dir, d)
    return d


def test_writer_logs_each_array_and_returns_the_path(pt_dir, tmp_path, caplog):
    d = _copy(pt_dir, tmp_path)
    caplog.set_level(logging.INFO, logger="jasper_mmap.sources.hdf5.writer")
    assert convert_pt_to_hdf5(str(d)) == d / "dataset.h5"
    wrote = [r.getMessage() for r in caplog.records if "dataset.h5: wrote" in r.getMessage()]
    assert len(wrote) == len(H5_PATHS) + 1  # every tensor and the keyword group
    assert any("pair_data/keyword_ids (120 datasets)" in m for m in wrote)


def test_writer_replaces_atomically_and_old_readers_keep_their_file(pt_dir, tmp_path):
    d = _copy(pt_dir, tmp_path)
    old = write_upstream_style(pt_dir, d / "dataset.h5", compression=None)
    with h5py.File(old, "r") as reader:
        before = reader["embeddings/questions"][:5]
        convert_pt_to_hdf5(d)
        assert np.array_equal(reader["embeddings/questions"][:5], before)  # the old inode
    with h5py.File(d / "dataset.h5", "r") as f:
        assert f["embeddings/questions"].compression == "gzip"
    assert [p.name for p in d.iterdir() if "partial" in p.name] == []


def test_failed_write_leaves_the_old_file_and_no_partial(pt_dir, tmp_path):
    d = _copy(pt_dir, tmp_path)
    (d / "dataset.h5").write_bytes(b"old")
    torch.save([[1, 2]] * 119, d / "pair_keyword_ids.pt")
    with pytest.raises(ArtifactError, match=r"should hold one list per pair \(120"):
        convert_pt_to_hdf5(d)
    assert (d / "dataset.h5").read_bytes() == b"old"
    assert sorted(p.name for p in d.iterdir() if p.name.startswith(".")) == []


def test_writer_removes_a_killed_runs_partial(pt_dir, tmp_path):
    d = _copy(pt_dir, tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = d / f".dataset.h5.partial-{dead.pid}-abcd1234"
    live = d / f".dataset.h5.partial-{os.getpid()}-abcd1234"
    stale.write_bytes(b"x")
    live.write_bytes(b"x")
    convert_pt_to_hdf5(d)
    assert not stale.exists() and live.exists()


def test_full_disk_is_a_store_write_error_and_keeps_the_old_file(pt_dir, tmp_path):
    """A file size limit (as a full disk) at many points of the file, in one process: a
    StoreWriteError each time, the old file kept, no partial left, and the process never
    crashes (HDF5 segfaulted closing a file whose write had failed)."""
    d = _copy(pt_dir, tmp_path)
    full = convert_pt_to_hdf5(_copy(pt_dir, tmp_path / "full")).stat().st_size
    (d / "dataset.h5").write_bytes(b"old")
    limits = [full * k // 12 for k in range(1, 12)]
    code = (
        "import resource, signal, sys\n"
        "from jasper_mmap.sources.hdf5.writer import convert_pt_to_hdf5\n"
        "from jasper_mmap.errors import StoreWriteError\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"for limit in {limits}:\n"
        "    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))\n"
        "    try:\n"
        "        convert_pt_to_hdf5(sys.argv[1])\n"
        "    except StoreWriteError as e:\n"
        "        print('StoreWriteError', 'Nothing was' in str(e))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(d)], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["StoreWriteError", "True"] * len(limits), out
    assert (d / "dataset.h5").read_bytes() == b"old"
    assert [p.name for p in d.iterdir() if "partial" in p.name] == []


@pytest.mark.parametrize("compression", [None, "lzf", 9])
def test_writer_compressions(pt_dir, tmp_path, compression):
    d = _copy(pt_dir, tmp_path)
    convert_pt_to_hdf5(d, compression=compression)
    with open_h5_source(d) as src:
        got = read_all(src.arrays["source_embs"])
    assert got.tobytes() == open_tensor(d / "source_embs.pt").read_rows(0, 120).tobytes()
    with h5py.File(d / "dataset.h5", "r") as f:
        assert f["embeddings/sources"].compression == ("gzip" if compression == 9 else compression)


def test_writer_refuses_bad_compression_before_writing(pt_dir, tmp_path):
    d = _copy(pt_dir, tmp_path)
    with pytest.raises(ValueError, match="compression should be 'gzip'.*'zstd-nope'"):
        convert_pt_to_hdf5(d, compression="zstd-nope")
    assert not (d / "dataset.h5").exists()


def test_writer_without_optional_splits(pt_dir, tmp_path):
    d = _copy(pt_dir, tmp_path)
    (d / "test_idx.pt").unlink()
    convert_pt_to_hdf5(d)
    with h5py.File(d / "dataset.h5", "r") as f:
        assert sorted(f["splits"]) == ["train", "val"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_writer_widens_types_hdf5_lacks(pt_dir, tmp_path, caplog, dtype):
    d = _copy(pt_dir, tmp_path)
    t = torch.load(d / "keyword_embs.pt", weights_only=True).to(dtype)
    torch.save(t, d / "keyword_embs.pt")
    try:
        if open_tensor(d / "keyword_embs.pt").np_dtype.kind not in "fu":
            pytest.skip("this pt_reader hands out float8 bits, not values")
    except ArtifactError:
        pytest.skip("this pt_reader does not read float8 tensors")
    convert_pt_to_hdf5(d)
    with h5py.File(d / "dataset.h5", "r") as f:
        assert f["embeddings/keywords"].dtype == np.float32
        assert np.array_equal(f["embeddings/keywords"][:], t.float().numpy())
    assert f"{dtype} is written as float32" in caplog.text


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda d: (d / "hard_negatives.pt").unlink(), ArtifactMissingError, "hard_negatives.pt"),
        (lambda d: (d / "train_idx.pt").unlink(), ArtifactMissingError, "train_idx.pt"),
        (
            lambda d: (d / "pair_keyword_ids.pt").unlink(),
            ArtifactMissingError,
            "pair_keyword_ids.pt: required artifact is missing",
        ),
        (
            lambda d: torch.save(torch.zeros(60, 16, dtype=torch.int64), d / "question_embs.pt"),
            ArtifactError,
            r"question_embs.pt: should be a 2-D tensor of floats .for embeddings/questions.",
        ),
        (
            lambda d: torch.save(torch.zeros(120), d / "pair_index.pt"),
            ArtifactError,
            r"pair_index.pt: should be a 2-D tensor of integers",
        ),
        (
            lambda d: torch.save([[0, 2**33]] * 120, d / "pair_keyword_ids.pt"),
            ArtifactError,
            "keyword ids of pair 0 hold 8589934592, which does not fit int32",
        ),
        (
            lambda d: (d / "dataset.h5").mkdir(),
            StoreExistsError,
            "dataset.h5: is a directory",
        ),
    ],
    ids=["missing", "no-train", "no-keywords", "int-embs", "1d-index", "huge-id", "dir"],
)
def test_writer_bad_inputs(pt_dir, tmp_path, change, error, match):
    d = _copy(pt_dir, tmp_path)
    change(d)
    with pytest.raises(error, match=match):
        convert_pt_to_hdf5(d)
    assert not (d / "dataset.h5").is_file()
    assert [p.name for p in d.iterdir() if "partial" in p.name] == []


def test_missing_directory(tmp_path):
    with pytest.raises(ArtifactMissingError, match="dataset directory does not exist"):
        convert_pt_to_hdf5(tmp_path / "nope")


def test_import_error_without_h5py(h5_dir):
    """Both entry points say how to install h5py when it cannot be imported."""
    code = (
        "import sys; sys.modules['h5py'] = None\n"
        "from jasper_mmap.sources.hdf5.writer import convert_pt_to_hdf5\n"
        "from jasper_mmap.sources.hdf5.reader import open_h5_source\n"
        "for fn in (convert_pt_to_hdf5, open_h5_source):\n"
        "    try:\n"
        f"        fn({str(h5_dir)!r})\n"
        "    except ImportError as e:\n"
        "        print('ImportError:', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    lines = out.strip().splitlines()
    assert len(lines) == 2, out
    for line in lines:
        assert "h5py is required" in line and "pip install 'jasper_mmap[hdf5]'" in line
