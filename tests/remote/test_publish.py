"""NOTE [remote publish]: negatives generations published to object storage."""

from __future__ import annotations

import threading

import pytest
import torch

from jasper_mmap import JASPERSteeringDataset, publish_negatives
from jasper_mmap.remote.objects import ObjectStore


def _negatives(ds, shift: int):
    negs = torch.roll(ds.hard_negatives.clone(), shifts=shift, dims=1)
    tiers = torch.roll(ds.negative_tiers.clone(), shifts=shift, dims=1)
    return negs.numpy(), tiers.numpy()


def test_published_generation_seen_by_another_node(bucket, store_path):
    url = bucket.upload(store_path)
    reader = JASPERSteeringDataset(url, "train", cache_dir=bucket.cache("reader"))
    g0 = reader.negatives_generation
    before = reader.hard_negatives.clone()
    negs, tiers = _negatives(reader, 1)
    g = publish_negatives(url, negs, tiers, cache_dir=bucket.cache("publisher"))
    assert g > g0
    assert reader.reload_negatives() == g
    assert torch.equal(reader.hard_negatives, torch.from_numpy(negs))
    assert torch.equal(reader.negative_tiers, torch.from_numpy(tiers))
    assert not torch.equal(reader.hard_negatives, before)
    # a node opening afresh serves it too, batches included
    fresh = JASPERSteeringDataset(url, "train", cache_dir=bucket.cache("fresh"))
    assert fresh.negatives_generation == g
    batch = fresh.__getitems__([0, 1, 2])
    assert torch.equal(batch["negative_tiers"], reader.__getitems__([0, 1, 2])["negative_tiers"])
    assert torch.equal(batch["negative_embs"], reader.__getitems__([0, 1, 2])["negative_embs"])


def test_racing_publishers_get_distinct_generations(bucket, store_path):
    url = bucket.upload(store_path)
    base = JASPERSteeringDataset(url, "train", cache_dir=bucket.cache("base"))
    published = {1: _negatives(base, 1), 2: _negatives(base, 2)}
    got: dict[int, int] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def publish(k: int) -> None:
        try:
            barrier.wait(timeout=30)
            got[k] = publish_negatives(url, *published[k], cache_dir=bucket.cache(f"pub{k}"))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=publish, args=(k,)) for k in published]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(set(got.values())) == 2
    reader = JASPERSteeringDataset(url, "train", cache_dir=bucket.cache("reader"))
    assert reader.negatives_generation == max(got.values())
    for k, g in got.items():  # each generation holds its own publisher's data, whole
        reader.use_negatives_generation(g)
        assert torch.equal(reader.hard_negatives, torch.from_numpy(published[k][0])), (k, g)
        assert torch.equal(reader.negative_tiers, torch.from_numpy(published[k][1])), (k, g)


@pytest.mark.parametrize("store_path", ["safetensors"], indirect=True)  # backend-blind
def test_stale_claim_skipped(bucket, store_path):
    url = bucket.upload(store_path)
    ds = JASPERSteeringDataset(url, "train", cache_dir=bucket.cache("reader"))
    g0 = ds.negatives_generation
    # a publisher killed after its claim: a claimed number without a json
    ObjectStore(url).put(f"negatives/gen-{g0 + 1:06d}.claim", b"", create=True)
    assert ds.reload_negatives() == g0  # a claim alone is never read
    negs, tiers = _negatives(ds, 3)
    g = publish_negatives(url, negs, tiers, cache_dir=bucket.cache("publisher"))
    assert g == g0 + 2
    assert ds.reload_negatives() == g
    assert torch.equal(ds.hard_negatives, torch.from_numpy(negs))


def test_publisher_node_serves_its_generation_from_cache(bucket, store_path):
    url = bucket.upload(store_path)
    cache = bucket.cache("node")
    ds = JASPERSteeringDataset(url, "train", cache_dir=cache)
    negs, tiers = _negatives(ds, 2)
    g = publish_negatives(url, negs, tiers, cache_dir=cache)
    assert ds.reload_negatives() == g
    before = ds._remote.summary()["units_fetched"]
    batch = ds.__getitems__(list(range(len(ds))))
    # the negatives' units were written by the publish: not fetched again, and right
    name = f"negatives-gen-{g:06d}"
    assert ds._remote._have_map(name).view.all()
    assert ds._remote.summary()["units_fetched"] - before <= ds._remote.units  # steering only
    other = JASPERSteeringDataset(url, "train", cache_dir=bucket.cache("other"))
    idx = list(range(len(ds)))
    assert torch.equal(batch["negative_tiers"], other.__getitems__(idx)["negative_tiers"])
    assert torch.equal(batch["negative_embs"], other.__getitems__(idx)["negative_embs"])
