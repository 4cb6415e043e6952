"""An open dataset reads the store it opened, or fails clearly; it never mixes two stores
(issue 24, item 5; NOTE [store identity] in jasper_mmap/stores/identity.py).

A store replaced by ``convert-pt --overwrite`` (another dataset of the same shapes), moved or
rewritten under an open dataset: batches, lazily opened files, ``reload_negatives()``, and a
copy of the dataset unpickled in another process (a DataLoader worker started after the
overwrite) either serve the old store's rows or raise StoreReplacedError; never the new rows.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch

from jasper_mmap import JASPERSteeringDataset, open_store
from jasper_mmap._fs.files import write_json_atomic
from jasper_mmap.converters import convert_pt
from jasper_mmap.errors import JasperError, StoreReplacedError
from jasper_mmap.synthetic import SyntheticSpec, make_pt_dataset

BACKENDS = ("safetensors", "zarr")
IDX = list(range(0, 40, 3))


@pytest.fixture(scope="module")
def other_dataset(tmp_path_factory):
    """Another dataset with the same shapes as the session's, other values (seed 1)."""
    return make_pt_dataset(tmp_path_factory.mktemp("other") / "ds", SyntheticSpec(seed=1))


def _store(pt_dataset, tmp_path, backend):
    return convert_pt(pt_dataset, tmp_path / "store", format=backend, progress=False)


def _open(store):
    return JASPERSteeringDataset(store, check_sources=False)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _overwrite(other_dataset, store, backend):
    convert_pt(other_dataset, store, format=backend, overwrite=True, progress=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_after_an_overwrite_are_the_old_rows_or_store_replaced(
    pt_dataset, other_dataset, tmp_path, backend
):
    store = _store(pt_dataset, tmp_path, backend)
    ds = _open(store)
    before = ds.get_batch(IDX)
    _overwrite(other_dataset, store, backend)
    new = _open(store).get_batch(IDX)
    assert not _same(before, new)  # the new store really holds other rows
    # the maps of both backends (zarr: of its shard files) keep the old files' data
    assert _same(ds.get_batch(IDX), before)
    if backend == "zarr":  # what zarr-python reads (tables, other layouts) is gone with them
        with pytest.raises(StoreReplacedError, match="Open the dataset .* again"):
            ds.store.raw("question_embs")[...]


@pytest.mark.parametrize("backend", BACKENDS)
def test_reload_negatives_after_an_overwrite_is_store_replaced(
    pt_dataset, other_dataset, tmp_path, backend
):
    store = _store(pt_dataset, tmp_path, backend)
    ds = _open(store)
    ds.get_batch(IDX)
    _overwrite(other_dataset, store, backend)
    with pytest.raises(StoreReplacedError) as info:
        ds.reload_negatives()
    assert str(store) in str(info.value) and isinstance(info.value, RuntimeError)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_file_first_opened_after_an_overwrite_is_not_the_new_stores(
    pt_dataset, other_dataset, tmp_path, backend
):
    store = _store(pt_dataset, tmp_path, backend)
    s = open_store(store)  # nothing mapped yet
    _overwrite(other_dataset, store, backend)
    with pytest.raises(StoreReplacedError):
        s.gather("question_embs", [0, 1, 2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_copy_unpickled_after_an_overwrite_refuses_the_new_store(
    pt_dataset, other_dataset, tmp_path, backend
):
    """What a spawned (or forkserver) DataLoader worker started after the overwrite does."""
    store = _store(pt_dataset, tmp_path, backend)
    ds = _open(store)
    ds.get_batch(IDX)
    blob = pickle.dumps(ds)
    _overwrite(other_dataset, store, backend)
    worker = pickle.loads(blob)
    with pytest.raises(StoreReplacedError, match="was replaced by another store"):
        worker.get_batch(IDX)


def test_a_spawned_dataloader_worker_after_an_overwrite_fails_clearly(
    pt_dataset, other_dataset, tmp_path
):
    store = _store(pt_dataset, tmp_path, "safetensors")
    ds = _open(store)
    ds.get_batch(IDX)
    _overwrite(other_dataset, store, "safetensors")
    loader = torch.utils.data.DataLoader(
        ds, batch_size=8, num_workers=1, multiprocessing_context="spawn"
    )
    with pytest.raises(Exception, match="StoreReplacedError|was replaced by another store"):
        next(iter(loader))


def test_the_same_store_with_its_manifest_rewritten_still_opens_in_a_worker(store_path, tmp_path):
    """Same token, new manifest file (a rewrite): the same store; no false alarm."""
    store = shutil.copytree(store_path, tmp_path / "s")
    ds = _open(store)
    before = ds.get_batch(IDX)
    blob = pickle.dumps(ds)
    m = json.loads((store / "manifest.json").read_text())
    write_json_atomic(store / "manifest.json", m)  # a new inode, the same token
    assert _same(pickle.loads(blob).get_batch(IDX), before)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_store_without_a_token_falls_back_to_the_manifest_file(
    pt_dataset, other_dataset, tmp_path, backend
):
    store = _store(pt_dataset, tmp_path, backend)
    m = json.loads((store / "manifest.json").read_text())
    assert isinstance(m.pop("store_id"), str)  # written at conversion
    write_json_atomic(store / "manifest.json", m)  # as an older version wrote it
    ds = _open(store)
    before = ds.get_batch(IDX)
    assert _same(pickle.loads(pickle.dumps(ds)).get_batch(IDX), before)  # unchanged: fine
    blob = pickle.dumps(ds)
    _overwrite(other_dataset, store, backend)
    with pytest.raises(StoreReplacedError):
        pickle.loads(blob).get_batch(IDX)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_moved_store_is_still_read_where_it_went_but_reload_refuses(
    pt_dataset, tmp_path, backend
):
    store = _store(pt_dataset, tmp_path, backend)
    ds = _open(store)
    before = ds.get_batch(IDX)
    os.rename(store, tmp_path / "moved")
    assert _same(ds.get_batch(IDX), before)  # zarr too: its chunks come from the directory held
    with pytest.raises(StoreReplacedError, match="no longer the one at its path"):
        ds.reload_negatives()


def test_every_conversion_gets_its_own_token(pt_dataset, tmp_path):
    a = convert_pt(pt_dataset, tmp_path / "a", progress=False)
    b = convert_pt(pt_dataset, tmp_path / "b", progress=False)
    ta, tb = (json.loads((s / "manifest.json").read_text())["store_id"] for s in (a, b))
    assert ta != tb and len(ta) == 32 and int(ta, 16) >= 0


def test_store_replaced_error_is_ours():
    assert issubclass(StoreReplacedError, JasperError)
    assert issubclass(StoreReplacedError, RuntimeError)


def test_opened_path_names_the_directory_opened_not_the_path(pt_dataset, tmp_path):
    store = _store(pt_dataset, tmp_path, "safetensors")
    s = open_store(store)
    token = json.loads((store / "manifest.json").read_text())["store_id"]
    os.rename(store, tmp_path / "moved")
    store.mkdir()  # something else at the path now
    assert json.loads(s.opened_path("manifest.json").read_text())["store_id"] == token
