"""NOTE [node cache]: one download per node, shared by datasets, loaders and threads."""

from __future__ import annotations

import threading

import pytest

from jasper_mmap import JASPERSteeringDataset, create_loader


def _epoch(loader) -> int:
    return sum(1 for _ in loader)


def _distinct_units(ds) -> int:
    """Units (of every group) the whole split can need."""
    from remote_helpers import pairs_of

    r = ds._remote
    units = set((pairs_of(ds) // r.unit_rows).tolist()) | {0}
    groups = len(r._groups(ds.negatives_generation))
    return len(units) * groups


def test_same_cache_dir_fetches_each_unit_once(bucket, store_path):
    url = bucket.upload(store_path)
    cache = bucket.cache()
    first = create_loader(url, "train", 16, seed=1, cache_dir=cache)
    assert _epoch(first) > 0
    s1 = first.dataset_obj._remote.summary()
    assert 0 < s1["units_fetched"] <= _distinct_units(first.dataset_obj)
    second = create_loader(url, "train", 16, seed=2, cache_dir=cache)
    assert _epoch(second) > 0
    s2 = second.dataset_obj._remote.summary()
    assert s2["units_fetched"] == 0
    assert s2["units_hit"] > 0
    # only the manifest, catalog and generation listing/json are read again: small
    assert s2["bytes_fetched"] < s1["bytes_fetched"] / 4, (s1, s2)


@pytest.mark.parametrize("store_path", ["safetensors"], indirect=True)  # backend-blind
def test_separate_cache_dirs_each_fetch(bucket, store_path):
    url = bucket.upload(store_path)
    a = JASPERSteeringDataset(url, "train", cache_dir=bucket.cache())
    b = JASPERSteeringDataset(url, "train", cache_dir=bucket.cache())
    assert a._remote.root != b._remote.root
    a.__getitems__([0, 1])
    b.__getitems__([0, 1])
    assert a._remote.summary()["units_fetched"] > 0
    assert b._remote.summary()["units_fetched"] > 0


def test_gather_threads_fetch_each_unit_once(bucket, store_path):
    url = bucket.upload(store_path)
    loader = create_loader(url, "train", 8, num_workers=4, seed=5, cache_dir=bucket.cache())
    assert _epoch(loader) > 0
    ds = loader.dataset_obj
    fetched = ds._remote.summary()["units_fetched"]
    assert 0 < fetched <= _distinct_units(ds)
    # the have maps agree: each present unit counted once
    present = sum(
        int(ds._remote._have_map(n).view.sum())
        for n, _ in ds._remote._groups(ds.negatives_generation)
    )
    assert present == fetched


def test_two_datasets_in_one_process_share_unit_locks(bucket, store_path):
    """While one dataset of a process fetches a unit, another dataset of the same process
    (same cache_dir: e.g. a train and a val loader) waits for it instead of fetching it too."""
    url = bucket.upload(store_path)
    cache = bucket.cache()
    a = JASPERSteeringDataset(url, "train", cache_dir=cache)
    b = JASPERSteeringDataset(url, "train", cache_dir=cache)
    entered, release = threading.Event(), threading.Event()
    real = a._remote.objects.get_ranges

    def slow(key, ranges):
        entered.set()
        release.wait(30)
        return real(key, ranges)

    a._remote.objects.get_ranges = slow
    errors: list[BaseException] = []

    def run(ds) -> None:
        try:
            ds.__getitems__([0])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    ta = threading.Thread(target=run, args=(a,))
    ta.start()
    try:
        assert entered.wait(30)
        tb = threading.Thread(target=run, args=(b,))
        tb.start()
        tb.join(timeout=1.0)  # b must wait for a's fetch of the same units
    finally:
        release.set()
        ta.join(timeout=60)
    tb.join(timeout=60)
    assert not errors, errors
    assert a._remote.summary()["units_fetched"] > 0
    assert b._remote.summary()["units_fetched"] == 0
