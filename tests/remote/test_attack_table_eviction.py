"""Attack: a table attribute of a remote dataset, read while the node's loader evicts units under
a cache budget, must equal the local store's (it reads punched zeros: _make_table prefetches
every unit, then reads the maps with no eviction re-check, NOTE [eviction])."""

from __future__ import annotations

import torch

from jasper_mmap import JASPERSteeringDataset, create_loader
from jasper_mmap.converters import convert_pt
from jasper_mmap.loading.loader import set_epoch
from jasper_mmap.synthetic import SyntheticSpec, make_pt_dataset


def test_table_attribute_during_eviction_equals_local(bucket, tmp_path):
    make_pt_dataset(tmp_path / "pt", SyntheticSpec(n_pairs=2000))
    store = convert_pt(tmp_path / "pt", tmp_path / "store", format="safetensors", progress=False)
    url = bucket.upload(store)
    want = JASPERSteeringDataset(store, "train").steering_centroid.clone()
    loader = create_loader(
        url,
        "train",
        8,
        seed=2,
        window_every_epoch=True,
        cache_limit=680_000,
        cache_dir=bucket.cache("node"),
    )
    ds = loader.dataset_obj
    wrong = []
    for epoch in range(1):
        set_epoch(loader, epoch)
        for i, _ in enumerate(loader):
            if i % 10 == 0:  # the table's first access (a miner reading it mid-epoch)
                ds._tables.pop("steering_centroid", None)
                if not torch.equal(ds.steering_centroid, want):
                    wrong.append((epoch, i))
    assert ds._remote.summary()["units_evicted"] > 0
    assert wrong == []
