"""The partitioned order (NOTE [partitioned order]): a fixed canonical partition of the pair
units, parts-periodic epochs, exact and elastic resumption; on a local store (the object-store
tests in tests/remote check that the same order serves the same batches from a bucket)."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from jasper_mmap import create_loader
from jasper_mmap.converters import convert_pt
from jasper_mmap.loading.order import Partition, PartitionedOrder
from jasper_mmap.loading.resume import ResumeStateError
from jasper_mmap.synthetic import SyntheticSpec, make_pt_dataset

UNIT = 8


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("partition")
    pt = make_pt_dataset(root / "ds", SyntheticSpec(n_pairs=300, seed=4))
    return convert_pt(pt, root / "store", progress=False)


def loader(store, world=1, rank=0, **kw):
    kw.setdefault("partition", True)
    kw.setdefault("unit_rows", UNIT)
    kw.setdefault("drop_last", False)
    return create_loader(
        store, "train", 3, distributed=True, num_replicas=world, rank=rank, seed=11, **kw
    )


def batches(ld) -> list[list[int]]:
    return [list(map(int, b)) for b in ld.batch_sampler]


def pairs_of(ld) -> np.ndarray:
    ds = ld.dataset_obj
    return ds.store.gather_unchecked("train_idx", np.arange(len(ds)))


@pytest.mark.parametrize("parts", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("epoch", [0, 1, 5])
def test_each_epoch_is_a_permutation(parts, epoch):
    pairs = np.random.default_rng(parts).permutation(1000)[:777]
    p = Partition(pairs, UNIT, parts)
    order = PartitionedOrder(p, seed=3, epoch=epoch).at(np.arange(777))
    assert np.array_equal(np.sort(order), np.arange(777))


def test_the_partition_depends_on_the_split_and_the_two_numbers_only():
    pairs = np.random.default_rng(0).permutation(5000)[:4000]
    a, b = Partition(pairs, UNIT, 4), Partition(pairs, UNIT, 4)
    assert np.array_equal(a.owner, b.owner)
    sizes = np.bincount(a.owner[pairs // UNIT], minlength=4)
    assert sizes.max() - sizes.min() <= UNIT  # balanced to within one unit's samples
    assert a.m * 4 + a._tail.size == 4000
    other = PartitionedOrder(a, seed=3, epoch=1).at(np.arange(4000))
    assert not np.array_equal(other, PartitionedOrder(a, seed=3, epoch=2).at(np.arange(4000)))
    assert not np.array_equal(other, PartitionedOrder(a, seed=4, epoch=1).at(np.arange(4000)))


def test_epoch_zero_goes_unit_by_unit_within_a_window():
    pairs = np.arange(4000)
    p = Partition(pairs, UNIT, 1, window=1)
    first = PartitionedOrder(p, seed=3, epoch=0).part_order(0)
    units = first // UNIT
    # window of one unit: each unit's samples one after the other, units in a shuffled order
    switches = np.flatnonzero(np.diff(units)) + 1
    assert len(switches) == len(np.unique(units)) - 1
    assert not np.array_equal(units[np.r_[0, switches]], np.sort(units[np.r_[0, switches]]))
    later = PartitionedOrder(p, seed=3, epoch=1).part_order(0) // UNIT
    assert len(np.flatnonzero(np.diff(later))) > 5 * len(switches)  # uniform: mixed


@pytest.mark.parametrize("world", [2, 4])
def test_a_rank_reads_its_parts_when_the_world_divides_them(store, world):
    seen = collections.Counter()
    for rank in range(world):
        ld = loader(store, world, rank, canonical_parts=4)
        owner = ld.sampler.partition.owner
        units = pairs_of(ld) // UNIT
        got = [i for b in batches(ld) for i in b]
        tail = ld.sampler.partition._tail.size
        foreign = sum(owner[units[i]] % world != rank for i in got)
        assert foreign <= tail // world + 3  # only the tail (and its padding) is not local
        assert len(got) - foreign > 0.7 * len(got)
        seen.update(got)
    n = len(pairs_of(ld))
    assert set(seen) == set(range(n))


@pytest.mark.parametrize("new_world", [1, 3, 4])
def test_resume_on_another_world_size_serves_the_rest_exactly_once(store, new_world):
    k = 4
    old = [loader(store, 2, r, canonical_parts=4) for r in range(2)]
    consumed = []
    for ld in old:
        planned = batches(ld)
        it = iter(ld)
        for _ in range(k):
            next(it)
        consumed += [i for b in planned[:k] for i in b]
        state = ld.state_dict()
    assert state["order"]["partition"] == {
        "parts": 4,
        "unit_rows": UNIT,
        "window": 16,
        "every_epoch": False,
    }
    assert state["cursor"] == 2 * k * 3
    remaining = []
    for r in range(new_world):  # created without the partition: the state's is adopted
        ld = loader(store, new_world, r, partition=False)
        ld.load_state_dict(state)
        assert ld.sampler.partition_spec() == state["order"]["partition"]
        remaining += [i for b in batches(ld) for i in b]
    n = len(pairs_of(old[0]))
    assert len(consumed) + len(remaining) == n  # 96 samples: no padding at 1, 3 or 4 ranks
    assert sorted(consumed + remaining) == list(range(n))


def test_resume_on_the_same_world_continues_the_same_batches(store):
    full = batches(loader(store, 2, 1, canonical_parts=2))
    ld = loader(store, 2, 1, canonical_parts=2)
    it = iter(ld)
    for _ in range(5):
        next(it)
    again = loader(store, 2, 1, canonical_parts=2)
    again.load_state_dict(ld.state_dict())
    assert batches(again) == full[5:]


def test_a_malformed_partition_in_a_state_is_refused(store):
    ld = loader(store)
    state = ld.state_dict()
    for bad in ({"parts": 0, "unit_rows": 8, "window": 16}, {"parts": 2}, "x", [2, 8, 16]):
        state["order"]["partition"] = bad
        with pytest.raises(ResumeStateError, match="order.partition"):
            loader(store).load_state_dict(state)


def test_without_partition_the_state_says_null_and_the_order_is_unchanged(store):
    plain = create_loader(store, "train", 3, seed=11, drop_last=False)
    assert plain.state_dict()["order"]["partition"] is None
    ld = loader(store, partition=False)
    assert batches(ld) == batches(plain)
