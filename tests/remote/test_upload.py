"""Uploading: refusals, a store replaced at the same URL, and what a reader sees."""

from __future__ import annotations

import json

import pytest
import torch
from remote_helpers import as_dict, assert_batches_equal, sample_in_unit

from jasper_mmap import JASPERSteeringDataset
from jasper_mmap.converters import convert_pt
from jasper_mmap.errors import (
    StoreCorruptError,
    StoreExistsError,
    StoreFormatError,
    StoreNotFoundError,
)
from jasper_mmap.remote.catalog import CATALOG
from jasper_mmap.remote.objects import ObjectStore
from jasper_mmap.synthetic import SyntheticSpec, make_pt_dataset


@pytest.fixture(scope="module")
def other_store(tmp_path_factory, store_path):
    """A store of the same backend and sizes as ``store_path`` with other data."""
    backend = json.loads((store_path / "manifest.json").read_text())["backend"]
    root = tmp_path_factory.mktemp(f"other-{backend}")
    pt = make_pt_dataset(root / "pt", SyntheticSpec(seed=7))
    return convert_pt(pt, root / "store", format=backend, progress=False)


def test_replaced_store_is_served_not_the_cached_one(bucket, store_path, other_store):
    url = bucket.upload(store_path)
    cache = bucket.cache()
    old = JASPERSteeringDataset(url, "val", cache_dir=cache)
    idx = list(range(len(old)))
    before = old.__getitems__(idx)
    old_root = old._remote.root
    bucket.upload(other_store, overwrite=True)
    new = JASPERSteeringDataset(url, "val", cache_dir=cache)
    assert new._remote.root != old_root
    got = new.__getitems__(list(range(len(new))))
    assert_batches_equal(
        got, JASPERSteeringDataset(other_store, "val").__getitems__(list(range(len(new))))
    )
    b, g = as_dict(before), as_dict(got)
    assert not torch.equal(g["question_emb"], b["question_emb"])  # other data indeed


@pytest.mark.parametrize("store_path", ["safetensors"], indirect=True)  # backend-blind
def test_upload_to_non_empty_prefix_refused(bucket, store_path):
    url = bucket.upload(store_path)
    with pytest.raises(StoreExistsError):
        bucket.upload(store_path)
    bucket.upload(store_path, overwrite=True)  # a store of ours: replaced when asked
    JASPERSteeringDataset(url, "val", cache_dir=bucket.cache())


@pytest.mark.parametrize("store_path", ["safetensors"], indirect=True)  # backend-blind
def test_foreign_prefix_never_written(bucket, store_path):
    url = bucket.url()
    objects = ObjectStore(url)
    objects.put("notes/readme.txt", b"not a store")
    for overwrite in (False, True):
        with pytest.raises(StoreExistsError) as e:
            bucket.upload(store_path, overwrite=overwrite)
        assert url in str(e.value)
    assert [m["path"] for m in objects.list()] == ["notes/readme.txt"]
    assert objects.get("notes/readme.txt") == b"not a store"


def test_empty_url_not_found(bucket):
    url = bucket.url("nothing-here")
    with pytest.raises(StoreNotFoundError) as e:
        JASPERSteeringDataset(url, "train", cache_dir=bucket.cache())
    assert isinstance(e.value, ValueError)
    assert url in str(e.value)


@pytest.mark.parametrize("store_path", ["safetensors"], indirect=True)  # backend-blind
def test_missing_catalog_is_a_format_error(bucket, store_path):
    url = bucket.upload(store_path)
    ObjectStore(url).delete(CATALOG)
    with pytest.raises(StoreFormatError) as e:
        JASPERSteeringDataset(url, "train", cache_dir=bucket.cache())
    assert url in str(e.value)


@pytest.mark.parametrize("store_path", ["safetensors"], indirect=True)  # backend-blind
def test_storage_options_endpoint(bucket, store_path, monkeypatch):
    url = bucket.upload(store_path)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.delenv("AWS_ALLOW_HTTP")
    ds = JASPERSteeringDataset(
        url, "val", cache_dir=bucket.cache(), storage_options={"endpoint_url": bucket.endpoint}
    )
    local = JASPERSteeringDataset(store_path, "val")
    assert_batches_equal(ds.__getitems__([0, 1]), local.__getitems__([0, 1]))


def test_open_dataset_never_mixes_a_replacing_store(bucket, store_path, other_store):
    """A dataset opened before the store was replaced never serves the new store's rows as
    its own: a unit it had not fetched yet is refused (its catalog's crc32), not mixed in."""
    url = bucket.upload(store_path)
    old = JASPERSteeringDataset(url, "train", cache_dir=bucket.cache())
    i = sample_in_unit(old, 0)
    old.__getitems__([i])
    bucket.upload(other_store, overwrite=True)
    j = sample_in_unit(old, 5)
    with pytest.raises(StoreCorruptError) as e:
        old.__getitems__([j])
    assert url in str(e.value)
    local = JASPERSteeringDataset(store_path, "train")
    assert_batches_equal(old.__getitems__([i]), local.__getitems__([i]))  # cached: still served
