"""A dataset directory's cached store and ``store_format`` (found by an attack round: the
cached store was reused whatever backend was asked, silently)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jasper_mmap import JASPERSteeringDataset, publish_negatives
from jasper_mmap.errors import StoreFormatError
from jasper_mmap.synthetic.small import SyntheticSpec, make_pt_dataset


def test_the_cached_store_is_never_replaced_for_another_backend(tmp_path):
    src = make_pt_dataset(tmp_path / "ds", SyntheticSpec(n_pairs=23, n_neg=2))
    cache = tmp_path / "cache"
    z = JASPERSteeringDataset(src, "val", cache_dir=cache, store_format="zarr")
    assert z.store.backend == "zarr"
    negs = np.roll(z.store.read("hard_negatives"), 1, axis=0)
    publish_negatives(src, negs, z.store.read("negative_tiers"), cache_dir=cache)  # only here
    with pytest.raises(StoreFormatError, match="is a zarr store, and store_format='safetensors'"):
        JASPERSteeringDataset(src, "val", cache_dir=cache, store_format="safetensors")
    again = JASPERSteeringDataset(src, "val", cache_dir=cache)  # default: the cached store's
    assert again.store.backend == "zarr"
    assert np.array_equal(again.store.read("hard_negatives"), negs)  # nothing was lost
    other = JASPERSteeringDataset(src, "val", cache_dir=tmp_path / "c2", store_format="safetensors")
    assert other.store.backend == "safetensors"
    fresh = JASPERSteeringDataset(src, "val", cache_dir=tmp_path / "c3")  # none cached yet
    assert fresh.store.backend == "safetensors"
    a, b = other.get_batch([0, 1]), fresh.get_batch([0, 1])
    assert all(torch.equal(a[k], b[k]) for k in a)
