"""One contract every store backend must pass, plus what third-party readers see."""

from __future__ import annotations

import pickle
import threading

import numpy as np
import pytest
import torch
import zarr
from helpers import keyword_arrays, load_pt
from safetensors import safe_open

from jasper_mmap import open_store
from jasper_mmap.errors import (
    SampleIndexError,
    StoreCorruptError,
    StoreFormatError,
    StoreNotFoundError,
)
from jasper_mmap.format.spec import ARRAYS
from jasper_mmap.stores.zarr_store import ZARR_CHUNK_BYTES

TENSOR_ARRAYS = [s for s in ARRAYS if s.source and s.name != "pair_keyword_offsets"]
STEERING = ("steering_centroid", "steering_keyword_weighted", "steering_residual")


class TestStoreContract:
    """Run against both backends through the parametrized `store_path` fixture."""

    def test_every_array_round_trips_bit_exactly(self, store_path, pt_dataset):
        store = open_store(store_path)
        for spec in TENSOR_ARRAYS:
            want = load_pt(pt_dataset / spec.source)
            got = store.read(spec.name)
            assert got.dtype == want.dtype, spec.name
            assert got.shape == want.shape, spec.name
            assert got.tobytes() == want.tobytes(), spec.name

    def test_keyword_ids_become_offsets_and_values(self, store_path, pt_dataset):
        store = open_store(store_path)
        offsets, values = keyword_arrays(pt_dataset / "pair_keyword_ids.pt")
        np.testing.assert_array_equal(store.read("pair_keyword_offsets"), offsets)
        np.testing.assert_array_equal(store.read("pair_keyword_values"), values)

    def test_gather_any_rows_in_any_order(self, store_path, pt_dataset):
        store = open_store(store_path)
        want = load_pt(pt_dataset / "source_embs.pt")
        idx = np.array([5, 0, 5, len(want) - 1, 17, 3])
        np.testing.assert_array_equal(store.gather("source_embs", idx), want[idx])
        negs = load_pt(pt_dataset / "hard_negatives.pt")
        np.testing.assert_array_equal(store.gather("hard_negatives", [7, 2]), negs[[7, 2]])
        assert store.gather("pair_relevance", np.array([], dtype=np.int64)).shape == (0,)

    def test_out_of_range_rows_raise_index_error(self, store_path):
        store = open_store(store_path)
        n = store.shape("question_embs")[0]
        for bad in ([n], [-1], [0, n + 5]):
            with pytest.raises(SampleIndexError, match="question_embs"):
                store.gather("question_embs", bad)
        with pytest.raises(IndexError):
            store.gather("pair_index", [10**9])

    def test_check_rows_once_then_take_reads_what_gather_reads(self, store_path):
        """A batch checks an index array once and reads several arrays with it (``gather_unchecked``)."""
        store = open_store(store_path)
        idx = store.check_rows("pair_index", [3, 0, 3, store.shape("pair_index")[0] - 1])
        assert idx.dtype == np.int64
        for name in ("pair_index", "pair_relevance", "steering_centroid", "hard_negatives"):
            np.testing.assert_array_equal(
                store.gather_unchecked(name, idx), store.gather(name, idx)
            )
            out = np.empty_like(store.gather(name, idx))
            assert store.gather_unchecked(name, idx, out) is out
            np.testing.assert_array_equal(out, store.gather(name, idx))
        n = store.shape("source_embs")[0]
        with pytest.raises(SampleIndexError, match=rf"'source_embs' should be in \[0, {n}\)"):
            store.check_rows("source_embs", [0, n])

    @pytest.mark.parametrize("order", [1, -1], ids=["as-written", "reversed"])
    def test_take_mixed_reads_each_row_from_its_table_and_zeros(self, store_path, order):
        """Row idx[i] of names[which[i]], zeros where which[i] < 0; the same whether the
        tables are read as one gather over their joined rows (safetensors, in either order)
        or one by one (zarr)."""
        store = open_store(store_path)
        names = STEERING[::order]
        rng = np.random.default_rng(0)
        n = store.shape(names[0])[0]
        idx = store.check_rows(names[0], rng.integers(0, n, 200))
        which = rng.integers(-1, 3, 200)
        which[:4] = [-1, 0, 1, 2]
        want = np.zeros((200, store.shape(names[0])[1]), np.float32)
        for k, name in enumerate(names):
            want[which == k] = store.gather(name, idx[which == k])
        out = np.full_like(want, np.nan)
        assert store.gather_mixed_unchecked(names, which, idx, out) is out
        np.testing.assert_array_equal(out, want)
        if store.backend == "safetensors":
            assert store.joined(names) is not None

    def test_manifest_records_counts_and_integrity_facts(self, store_path, pt_dataset):
        store = open_store(store_path)
        c = store.counts
        assert (c["n_pairs"], c["embedding_dim"], c["n_neg"]) == (120, 16, 6)
        negs = load_pt(pt_dataset / "hard_negatives.pt")
        stats = store.entry("hard_negatives")["stats"]
        assert (stats["min"], stats["max"]) == (negs.min(), negs.max())
        files = store.manifest["source"]["files"]
        assert files["source_embs.pt"]["size"] == (pt_dataset / "source_embs.pt").stat().st_size
        assert store.negatives_pointer["generation"] == 0

    def test_every_data_file_is_recorded_with_its_size(self, store_path):
        """manifest.json `files` + the generation's own `files` = every data file on disk."""
        import json

        store = open_store(store_path)
        recorded = {**store.manifest["files"], **store.negatives_pointer["files"]}
        meta = {"manifest.json", "config.json", "CURRENT.json", "gen-000000.json"}
        on_disk = {
            p.relative_to(store_path).as_posix(): p.stat().st_size
            for p in store_path.rglob("*")
            if p.is_file() and p.name not in meta
        }
        assert recorded == on_disk
        gen = json.loads((store_path / "negatives" / "gen-000000.json").read_text())
        assert gen["files"] == store.negatives_pointer["files"]

    def test_pickles_small_and_reopens_after_pickling(self, store_path):
        store = open_store(store_path)
        before = store.gather("source_embs", [1, 2])
        blob = pickle.dumps(store)
        assert len(blob) < 64 * 1024
        again = pickle.loads(blob)
        np.testing.assert_array_equal(again.gather("source_embs", [1, 2]), before)
        store.close()
        np.testing.assert_array_equal(store.gather("source_embs", [1, 2]), before)


def test_safe_open_reads_our_files_bit_exactly(tmp_path, pt_dataset):
    from jasper_mmap.converters import convert_pt

    dst = convert_pt(pt_dataset, tmp_path / "s", progress=False)
    store = open_store(dst)
    seen = set()
    for name in store.names():
        entry = store.entry(name)
        with safe_open(dst / entry["file"], framework="pt") as f:
            t = f.get_tensor(entry["key"])
        assert t.numpy().tobytes() == store.read(name).tobytes(), name
        seen.add(name)
    assert len(seen) == len(ARRAYS)


def test_zarr_open_group_reads_our_group_bit_exactly(tmp_path, pt_dataset):
    from jasper_mmap.converters import convert_pt

    dst = convert_pt(pt_dataset, tmp_path / "z", format="zarr", progress=False)
    group = zarr.open_group(str(dst), mode="r")
    store = open_store(dst)
    for name in store.names():
        arr = group[store.entry(name)["file"]]
        assert arr[...].tobytes() == store.read(name).tobytes(), name
    q = group["question_embs"]
    rows = ZARR_CHUNK_BYTES // (q.shape[1] * 4)
    assert q.chunks == (min(rows, q.shape[0]), q.shape[1])  # full-width chunks of ~16 KiB of rows


@pytest.mark.parametrize("backend", ["safetensors", "zarr"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reduced_precision_halves_bytes_and_reads_float32(tmp_path, pt_dataset, backend, dtype):
    from jasper_mmap.converters import convert_pt

    dst = convert_pt(pt_dataset, tmp_path / "r", format=backend, dtype=dtype, progress=False)
    store = open_store(dst)
    src = torch.load(pt_dataset / "steering_residual.pt", weights_only=True)
    want = src.to(getattr(torch, dtype)).float().numpy()  # torch's own rounding
    got = store.read("steering_residual")
    assert got.dtype == np.float32
    assert got.tobytes() == want.tobytes()
    assert store.entry("question_embs")["stored_dtype"] == dtype
    assert store.entry("pair_relevance")["stored_dtype"] == "float32"  # not an embedding
    if backend == "safetensors":
        with safe_open(dst / "embeddings.safetensors", framework="pt") as f:
            assert (
                f.get_slice("question_embs").get_dtype()
                == {"float16": "F16", "bfloat16": "BF16"}[dtype]
            )


@pytest.mark.parametrize("dtype", ["float16", "keep"])
def test_take_mixed_widens_and_splits_like_gather(tmp_path, pt_dataset, dtype):
    """A float16 store is read one table at a time (widened to float32); in a gather
    thread (numpy) and in the loop's thread (torch, above the intra-op bytes) the same bytes."""
    from jasper_mmap.converters import convert_pt
    from jasper_mmap.stores import base, mapped

    dst = convert_pt(pt_dataset, tmp_path / "r", dtype=dtype, progress=False)
    store = open_store(dst)
    n, d = store.shape(STEERING[0])
    idx = np.arange(n, dtype=np.int64)[::-1].copy()
    which = np.arange(n) % 4 - 1
    want = np.zeros((n, d), np.float32)
    for k, name in enumerate(STEERING):
        want[which == k] = store.gather(name, idx[which == k])
    got = [store.gather_mixed_unchecked(STEERING, which, idx, np.empty((n, d), np.float32))]
    joined = store._placed(STEERING)  # float16 rows: one read per table, widened
    assert joined is not None and (joined.view.dtype == np.float32) == (dtype == "keep")
    old = mapped._INTRA_OP_BYTES
    try:
        mapped._INTRA_OP_BYTES = 1  # the loop's thread: torch.index_select
        got.append(store.gather_mixed_unchecked(STEERING, which, idx, np.empty((n, d), np.float32)))
    finally:
        mapped._INTRA_OP_BYTES = old
    result = []
    thread = threading.Thread(  # a gather thread: numpy.take
        target=lambda: (
            base.mark_gather_thread(),
            result.append(
                store.gather_mixed_unchecked(STEERING, which, idx, np.empty((n, d), np.float32))
            ),
        )
    )
    thread.start()
    thread.join()
    for out in got + result:
        np.testing.assert_array_equal(out, want)


def test_open_errors_name_the_problem(tmp_path, store_path):
    with pytest.raises(StoreNotFoundError, match="does not exist"):
        open_store(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreNotFoundError, match="is not a directory"):
        open_store(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreNotFoundError, match="manifest.json is missing"):
        open_store(tmp_path / "empty")
    (tmp_path / "empty" / "manifest.json").write_text(
        '{"format": "jasper-mmap-store", "format_version": 99}'
    )
    with pytest.raises(StoreFormatError, match="format_version"):
        open_store(tmp_path / "empty")


def test_truncated_safetensors_file_is_reported_not_sigbus(tmp_path, pt_dataset):
    from jasper_mmap.converters import convert_pt

    dst = convert_pt(pt_dataset, tmp_path / "t", progress=False)
    path = dst / "embeddings.safetensors"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    with pytest.raises(StoreCorruptError, match="truncated"):
        open_store(dst).gather("question_embs", [0])


def test_open_checks_file_sizes_against_the_manifest(tmp_path, pt_dataset):
    from jasper_mmap.converters import convert_pt

    dst = convert_pt(pt_dataset, tmp_path / "s", progress=False)
    assert set(open_store(dst).manifest["files"]) == {
        "embeddings.safetensors",
        "pairs.safetensors",
        "steering.safetensors",
        "splits.safetensors",
    }
    with open(dst / "steering.safetensors", "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(
        StoreCorruptError,
        match=r"steering.safetensors: file is \d+ bytes, but the manifest records",
    ):
        open_store(dst)  # at open, before any row is read
    (dst / "steering.safetensors").unlink()
    with pytest.raises(StoreNotFoundError, match="steering.safetensors: store file is missing"):
        open_store(dst)


@pytest.mark.parametrize("rows", [[0.5], [0.7, 1.0], [True], np.array([1.0])])
def test_store_gather_refuses_rows_that_are_not_integers(store_path, rows):
    """Found by an attack: ``np.asarray(rows, dtype=int64)`` read row 0 for 0.5."""
    from jasper_mmap.errors import SampleIndexTypeError

    store = open_store(store_path)
    with pytest.raises(SampleIndexTypeError, match="should be integers"):
        store.gather("source_embs", rows)
    assert store.gather("source_embs", []).shape == (0, store.shape("source_embs")[1])
