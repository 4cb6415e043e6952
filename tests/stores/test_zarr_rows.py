"""zarr stores read rows through maps of their shard files (NOTE [zarr shards as rows]): the
bytes convert-pt writes are zarr-python's, every batch equals the safetensors store's, damaged
shards fail naming the file, and other layouts still read (through zarr-python, with a
warning)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from jasper_mmap import JASPERSteeringDataset, create_loader, open_store
from jasper_mmap.converters import convert_pt
from jasper_mmap.dataset.batches import BATCH_KEYS
from jasper_mmap.errors import StoreCorruptError, StoreNotFoundError
from jasper_mmap.format.dtypes import numpy_dtype
from jasper_mmap.format.zarr_metadata import MISSING, encode_shard_index
from jasper_mmap.stores import zarr_store
from jasper_mmap.stores.zarr_store import ZarrWriter, chunk_rows
from jasper_mmap.synthetic.small import SyntheticSpec, make_pt_dataset

# small chunks and shards, so that a tiny dataset spans many of both
CHUNK, SHARD = 4 * 64, 5 * 4 * 64  # bytes: 4 rows of D=16 float32 per chunk, 5 chunks per shard


@pytest.fixture(scope="module", params=["contiguous", "row table"])
def pair(request, tmp_path_factory):
    """One dataset converted to safetensors and to zarr in many chunks and shards. Its shards
    hold whole 4 KiB pages ("contiguous": mapped back to back, no row table), or, written as
    if pages were 64 bytes, do not ("row table": each shard in a slot of its own)."""
    root = tmp_path_factory.mktemp("pair")
    src = make_pt_dataset(root / "ds", SyntheticSpec(n_pairs=203, n_neg=5))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(zarr_store, "ZARR_CHUNK_BYTES", CHUNK)
        mp.setattr(zarr_store, "ZARR_SHARD_BYTES", SHARD)
        if request.param == "row table":
            mp.setattr(zarr_store, "_PAGE", 64)
        z = convert_pt(src, root / "z", format="zarr", progress=False)
    s = convert_pt(src, root / "s", format="safetensors", progress=False)
    place = open_store(z)._placed(("source_embs",))
    assert (place.chunk_rows is None) == (request.param == "contiguous")
    assert (
        len(json.loads((z / "manifest.json").read_text())["arrays"]["source_embs"]["shard_crc32"])
        >= 4
    )
    return s, z


def _zarr_python_copy(shape, dtype: str, data, chunk_bytes, shard_bytes, root: Path) -> None:
    rows, shard = chunk_rows(shape, numpy_dtype(dtype).itemsize, chunk_bytes, shard_bytes)
    a = zarr.open_group(root, mode="w", zarr_format=3).create_array(
        "x",
        shape=shape,
        dtype=numpy_dtype(dtype),
        chunks=(rows, *shape[1:]),
        shards=(shard, *shape[1:]),
        compressors=None,
        fill_value=0,
        attributes={"logical_dtype": dtype},
        config={"write_empty_chunks": True},
    )
    for lo in range(0, shape[0], shard):
        a[lo : lo + shard] = data[lo : lo + shard]


@pytest.mark.parametrize(
    "shape,dtype,chunk_bytes,shard_bytes",
    [
        ((10000, 4), "float32", 1360, 1360 * 64),  # last shard part-filled: absent chunks
        ((1000, 64), "float32", 128 << 10, 8 << 20),  # one shard, last chunk padded
        ((777,), "int64", 800, 8000),
        ((5, 3), "int64", 128 << 10, 8 << 20),
        ((2003, 12), "int64", 96 * 7, 96 * 7 * 5),
        ((301, 7), "float16", 140, 1400),
        ((0, 4), "float32", 64, 640),
    ],
)
def test_shards_written_directly_are_the_bytes_zarr_python_writes(
    tmp_path, shape, dtype, chunk_bytes, shard_bytes
):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 1000, shape).astype(numpy_dtype(dtype))
    ours = tmp_path / "ours"
    w = ZarrWriter(ours, chunk_bytes, shard_bytes)
    w.begin_unit("embeddings", [("x", shape, dtype)])
    for lo in range(0, shape[0], 333):  # blocks that straddle chunks and shards
        w.write("x", data[lo : lo + 333])
    w.end_unit()
    _zarr_python_copy(shape, dtype, data, chunk_bytes, shard_bytes, tmp_path / "ref")

    def files(root: Path) -> dict[str, bytes]:
        return {
            p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()
        }

    assert files(ours) == files(tmp_path / "ref")
    np.testing.assert_array_equal(zarr.open_group(ours, mode="r")["x"][...], data)


def test_rows_come_from_maps_of_the_shards_and_equal_zarr_python(pair):
    _, z = pair
    store = open_store(z)
    rng = np.random.default_rng(1)
    for name in ("question_embs", "source_embs", "pair_index", "steering_residual", "train_idx"):
        n = store.shape(name)[0]
        idx = rng.integers(0, n, 97)
        got = store.gather(name, idx)
        assert store._places[(name,), None] is not None, name  # the mapped path
        want = zarr.open_group(z, mode="r")[name].oindex[idx]
        np.testing.assert_array_equal(got, want.astype(got.dtype))
        np.testing.assert_array_equal(store.read(name), zarr.open_group(z, mode="r")[name][...])


def test_joined_rows_of_zarr_arrays_are_each_arrays_rows(pair):
    _, z = pair
    store = open_store(z)
    names = ("steering_centroid", "steering_keyword_weighted", "steering_residual")
    offsets = store.joined(names)
    assert offsets is not None and offsets[0] == 0
    n = store.shape(names[0])[0]
    which = np.array([0, 1, 2, -1, 2, 0, 1] * 9)
    idx = np.random.default_rng(2).integers(0, n, which.size)
    out = np.empty((which.size, store.shape(names[0])[1]), np.float32)
    store.gather_mixed_unchecked(names, which, idx, out)
    for i, (k, r) in enumerate(zip(which, idx, strict=True)):
        want = 0 if k < 0 else store.gather(names[k], [r])[0]
        np.testing.assert_array_equal(out[i], want)
    qs = ("question_embs", "source_embs")
    at = store.joined(qs)
    rows = np.array([0, 5, store.shape("question_embs")[0] - 1])
    got = np.empty((3, store.shape("source_embs")[1]), np.float32)
    store.gather_joined_unchecked(qs, at[1] + rows, got)
    np.testing.assert_array_equal(got, store.gather("source_embs", rows))


def _batches(loader) -> list[dict[str, torch.Tensor]]:
    return [{k: b[k].clone() for k in BATCH_KEYS} for b in loader]


@pytest.mark.parametrize(
    "kw",
    [
        {"num_workers": 0},
        {"num_workers": 2, "worker_mode": "thread"},
        {"num_workers": 2, "worker_mode": "process"},
        {"num_workers": 0, "pin_memory": True},
        {"num_workers": 0, "preload": True},
    ],
    ids=["loop", "threads", "processes", "pinned", "preloaded"],
)
def test_zarr_batches_are_bit_identical_to_safetensors(pair, kw):
    s, z = pair
    got = {}
    for name, store in (("s", s), ("z", z)):
        gen = torch.Generator().manual_seed(3)
        got[name] = _batches(create_loader(store, "train", 16, generator=gen, **kw))
    assert len(got["z"]) == len(got["s"]) > 5
    for bs, bz in zip(got["s"], got["z"], strict=True):
        for k in BATCH_KEYS:
            assert torch.equal(bs[k], bz[k]), k


def test_dataset_items_are_bit_identical_across_backends(pair):
    s, z = pair
    a, b = JASPERSteeringDataset(s, "val"), JASPERSteeringDataset(z, "val")
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert all(torch.equal(x[k], y[k]) for k in x), i


def _copy(z: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(z, tmp_path / "z"))


def _shard(store: Path, k: int = 2) -> Path:
    return store / "source_embs" / "c" / str(k) / "0"


def test_a_shard_removed_before_first_read_names_the_file(pair, tmp_path):
    store = _copy(pair[1], tmp_path)
    s = open_store(store)
    _shard(store).unlink()
    with pytest.raises(StoreNotFoundError, match=r"source_embs/c/2/0: chunk file of array"):
        s.gather("source_embs", [0])


def _rewrite_index(path: Path, edit) -> None:
    meta = json.loads((path.parents[2] / "zarr.json").read_text())
    shard = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
    chunks = shard // meta["codecs"][0]["configuration"]["chunk_shape"][0]
    blob = path.read_bytes()
    n = 16 * chunks + 4
    index = np.frombuffer(blob[-n:-4], dtype="<u8").reshape(chunks, 2).copy()
    edit(index)
    path.write_bytes(blob[:-n] + encode_shard_index(index))


@pytest.mark.parametrize(
    "what,edit,message",
    [
        ("absent chunk", lambda ix: ix.__setitem__(1, MISSING), "is absent"),
        ("short chunk", lambda ix: ix.__setitem__((1, 1), ix[1, 1] - 4), "bytes at offset"),
        ("unaligned", lambda ix: ix.__setitem__((1, 0), ix[1, 0] + 4), "at a row boundary"),
        ("past the end", lambda ix: ix.__setitem__((4, 0), 10**9), "inside the file"),
    ],
)
def test_a_shard_index_that_does_not_hold_every_chunk_is_refused(
    pair, tmp_path, what, edit, message
):
    store = _copy(pair[1], tmp_path)
    _rewrite_index(_shard(store), edit)  # same size, valid checksum: only the index lies
    with pytest.raises(StoreCorruptError, match=rf"source_embs/c/2/0: chunk \d .*{message}"):
        open_store(store).gather("source_embs", [0])


def test_a_damaged_shard_index_is_refused_naming_the_file(pair, tmp_path):
    store = _copy(pair[1], tmp_path)
    shard = _shard(store)
    blob = bytearray(shard.read_bytes())
    blob[-10] ^= 0xFF  # inside the index: the crc32c no longer matches
    shard.write_bytes(bytes(blob))
    s = open_store(store)
    with pytest.raises(StoreCorruptError, match=r"source_embs/c/2/0: the shard index's checksum"):
        s.gather("source_embs", [0])
    with pytest.raises(StoreCorruptError, match=r"source_embs/c/2/0"):
        JASPERSteeringDataset(store, "train")[0]


def test_other_layouts_read_through_zarr_python_with_one_warning(pair, tmp_path, caplog):
    """A store whose arrays were rewritten compressed (as another tool might) still reads the
    same rows, and says once what it costs and how to fix it."""
    store = _copy(pair[1], tmp_path)
    src = zarr.open_group(pair[1], mode="r")["source_embs"][...]
    g = zarr.open_group(store, mode="a", zarr_format=3)
    del g["source_embs"]
    a = g.create_array("source_embs", shape=src.shape, dtype=src.dtype, chunks=(7, 16))
    a[...] = src
    m = json.loads((store / "manifest.json").read_text())
    m["files"] = {k: v for k, v in m["files"].items() if not k.startswith("source_embs/")} | {
        p.relative_to(store).as_posix(): p.stat().st_size
        for p in (store / "source_embs").rglob("*")
        if p.is_file()
    }
    (store / "manifest.json").write_text(json.dumps(m))
    zarr_store._WARNED.discard(store)
    with caplog.at_level(logging.WARNING, logger="jasper_mmap.stores.zarr_store"):
        s = open_store(store)
        idx = [0, 7, 150, 3]
        np.testing.assert_array_equal(s.gather("source_embs", idx), src[idx])
        s.gather("source_embs", [1])
        np.testing.assert_array_equal(
            s.gather("question_embs", [2]), open_store(pair[1]).gather("question_embs", [2])
        )
    warned = [r.getMessage() for r in caplog.records if "zarr-python" in r.getMessage()]
    assert len(warned) == 1 and "--format zarr --overwrite" in warned[0], warned


def test_maps_of_a_closed_store_are_released(pair):
    _, z = pair
    import gc

    def mapped() -> int:
        text = Path("/proc/self/maps").read_text()
        return sum(str(Path(z).resolve()) in line for line in text.splitlines())

    before = mapped()
    s = open_store(z)
    s.gather("source_embs", [0, 50, 200])
    assert mapped() > before
    s.close()
    gc.collect()
    assert mapped() == before


def test_verify_names_the_shard_whose_bytes_changed(pair, tmp_path):
    from jasper_mmap.stores.verify import verify_store

    store = _copy(pair[1], tmp_path)
    assert verify_store(store, progress=False).ok
    shard = _shard(store, 3)
    with open(shard, "r+b") as f:  # one bit of a row, same size, index intact
        f.seek(70)
        b = f.read(1)
        f.seek(70)
        f.write(bytes([b[0] ^ 1]))
    report = verify_store(store, progress=False)
    assert len(report.problems) == 1, str(report)
    assert "source_embs/c/3/0: this shard of source_embs has crc32" in report.problems[0]


def test_verify_reports_shard_checksums_that_do_not_fit(pair, tmp_path):
    from jasper_mmap.stores.verify import verify_store

    store = _copy(pair[1], tmp_path)
    m = json.loads((store / "manifest.json").read_text())
    m["arrays"]["source_embs"]["shard_crc32"].pop()
    (store / "manifest.json").write_text(json.dumps(m))
    report = verify_store(store, progress=False)
    assert any("shard checksums for" in p for p in report.problems), str(report)
    assert not any("unexpected" in p for p in report.problems), str(report)


def test_zarr_open_group_reads_every_array_as_we_do(pair):
    _, z = pair
    store, group = open_store(z), zarr.open_group(z, mode="r")
    for name in store.names():
        entry = store.entry(name)
        got = store._read_raw(name, 0, None)  # the stored bytes, as mapped
        np.testing.assert_array_equal(group[entry["file"]][...], got, err_msg=name)
