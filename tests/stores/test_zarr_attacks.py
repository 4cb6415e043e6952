"""Attacks on the zarr read path (NOTE [zarr shards as rows]): valid zarr stores that the
mapped path must read as zarr-python does, and damaged ones that must fail naming the file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import zarr

from jasper_mmap import open_store
from jasper_mmap.converters import convert_pt
from jasper_mmap.format.zarr_metadata import decode_shard_index
from jasper_mmap.stores import zarr_store
from jasper_mmap.stores.verify import verify_store
from jasper_mmap.synthetic.small import SyntheticSpec, make_pt_dataset

CHUNK, SHARD = 4 * 64, 5 * 4 * 64  # as tests/stores/test_zarr_rows.py: many chunks and shards


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("atk")
    src = make_pt_dataset(root / "ds", SyntheticSpec(n_pairs=203, n_neg=5))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(zarr_store, "ZARR_CHUNK_BYTES", CHUNK)
        mp.setattr(zarr_store, "ZARR_SHARD_BYTES", SHARD)
        return convert_pt(src, root / "z", format="zarr", progress=False)


def _zarr_rows(store, name):
    return zarr.open_group(str(store), mode="r")[name][...]


def test_unused_bytes_before_a_middle_shards_index_read_as_zarr_does(small, tmp_path):
    """A valid shard may hold bytes no chunk uses before its index; a first shard grown so
    (its file longer than the whole array's range) raised a raw ValueError from the
    mapping ("slot at 0 ... is not inside the page-aligned range"), and verify printed it."""
    store = shutil.copytree(small, tmp_path / "z")
    rel = "source_embs/c/0/0"
    meta = json.loads((store / "source_embs/zarr.json").read_text())
    conf = meta["codecs"][0]["configuration"]
    per = meta["chunk_grid"]["configuration"]["chunk_shape"][0] // conf["chunk_shape"][0]
    ib = 16 * per + 4
    blob = (store / rel).read_bytes()
    assert decode_shard_index(blob[-ib:], per) is not None
    grown = blob[:-ib] + bytes(1 << 20) + blob[-ib:]
    (store / rel).write_bytes(grown)
    m = json.loads((store / "manifest.json").read_text())
    m["files"][rel] = len(grown)
    (store / "manifest.json").write_text(json.dumps(m))
    s = open_store(store)
    n = s.shape("source_embs")[0]
    got = s.gather("source_embs", np.arange(n))
    np.testing.assert_array_equal(got, _zarr_rows(store, "source_embs"))
    assert verify_store(store, progress=False).ok


def test_array_of_zero_rows_reads_empty(tmp_path):
    """A dataset without keywords (keyword_embs [0, D]) converts; with D=24 float32 (96-byte
    rows) reading it raised ``ValueError: cannot reshape array of size 1024 into shape (24)``
    (the empty range is one page, not a whole number of rows)."""
    src = make_pt_dataset(tmp_path / "ds", SyntheticSpec(n_pairs=60, n_neg=5, dim=24))
    torch.save(torch.zeros(0, 24), src / "keyword_embs.pt")
    torch.save([[] for _ in range(60)], src / "pair_keyword_ids.pt")
    z = convert_pt(src, tmp_path / "z", format="zarr", progress=False)
    s = open_store(z)
    assert s.shape("keyword_embs") == (0, 24)
    assert s.read("keyword_embs").shape == (0, 24)
    assert s.gather("keyword_embs", []).shape == (0, 24)
    assert verify_store(z, progress=False).ok


def _loop(store, rel):
    (store / rel).unlink()
    (store / rel).symlink_to(store / rel)


def _not_a_dir(store, rel):
    shutil.rmtree(store / rel.rsplit("/", 1)[0])
    (store / rel.rsplit("/", 1)[0]).write_bytes(b"x")


@pytest.mark.parametrize("damage", [_loop, _not_a_dir])
def test_shard_path_that_cannot_be_opened_after_open_names_the_file(small, tmp_path, damage):
    """A shard replaced after the store was opened by a symlink to itself (ELOOP), or its
    folder by a file (ENOTDIR): the map path raised raw OSError / NotADirectoryError."""
    from jasper_mmap.errors import JasperError

    store = shutil.copytree(small, tmp_path / "z")
    rel = "source_embs/c/1/0"
    s = open_store(store)
    damage(store, rel)
    with pytest.raises(JasperError, match=rel):
        s.gather("source_embs", [0, 70])
    report = verify_store(store, progress=False)
    assert not report.ok and rel in str(report) and "unexpected" not in str(report).lower()


def test_shard_symlink_loop_before_open_names_the_file(small, tmp_path):
    """open_store and verify raised a raw ``OSError: [Errno 40] Too many levels of symbolic
    links`` from the recorded-files check."""
    from jasper_mmap.errors import StoreCorruptError

    store = shutil.copytree(small, tmp_path / "z")
    rel = "source_embs/c/1/0"
    _loop(store, rel)
    with pytest.raises(StoreCorruptError, match=rel):
        open_store(store)
    report = verify_store(store, progress=False)
    assert not report.ok and rel in str(report) and "unexpected" not in str(report).lower()
