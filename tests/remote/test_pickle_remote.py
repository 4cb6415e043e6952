"""A dataset read through the node cache pickles as its URL and paths, not its data."""

from __future__ import annotations

import pickle

from remote_helpers import assert_batches_equal

from jasper_mmap import JASPERSteeringDataset


def test_remote_dataset_pickles_small(bucket, store_path):
    url = bucket.upload(store_path)
    ds = JASPERSteeringDataset(url, "train", cache_dir=bucket.cache())
    idx = [0, 5, 17, 40]
    want = ds.__getitems__(idx)
    raw = pickle.dumps(ds)
    assert len(raw) < 200_000
    copy = pickle.loads(raw)
    assert copy._remote is not None and copy._remote.url == url
    assert_batches_equal(copy.__getitems__(idx), want)
    assert_batches_equal(copy.__getitems__([90, 91]), ds.__getitems__([90, 91]))
