"""Batch plans (NOTE [batch plans] in jasper_mmap/dataset/batches.py): the bookkeeping of several batches done at
once gives the bytes of ``get_batch`` of each batch's indices at the moment it is served,
also after ``set_epoch``, ``force_steering``, assigned probabilities or ``reload_negatives``
between the plan and the batch; a subclass's own batches, a preloaded dataset and a bad index
go the one-by-one way; errors surface at their own batch."""

from __future__ import annotations

import threading
import traceback

import numpy as np
import pytest
import torch
from test_negatives import table

from jasper_mmap import JASPERSteeringDataset, create_loader, publish_negatives
from jasper_mmap.converters import convert_pt
from jasper_mmap.errors import SampleIndexError
from jasper_mmap.loading.loader import JasperLoader, collate_batch
from jasper_mmap.loading.threads import PLAN_BATCHES
from jasper_mmap.loading.tuner import GatherTuner

# batches of uneven sizes, in no order, a repeated row, one of a single sample
BATCHES = [[5, 1, 9, 1], list(range(20, 37)), [0], np.array([70, 3, 44, 12, 95]), [95] * 3]


def same(a, b) -> bool:
    """Two batches (dicts or SampleBatch) with the same keys in the same order and bytes."""
    return list(a.keys()) == list(b.keys()) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k])
        for k in a.keys()
    )


def inline_tuner() -> GatherTuner:
    tuner = GatherTuner(window_batches=10**9)
    tuner.inline = True
    return tuner


def gather_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("jasper-gather")]


@pytest.fixture(scope="module")
def st_store(tmp_path_factory, pt_dataset):
    return convert_pt(pt_dataset, tmp_path_factory.mktemp("plans") / "s", progress=False)


@pytest.fixture(scope="module")
def f16_store(tmp_path_factory, pt_dataset):
    dst = tmp_path_factory.mktemp("plans16") / "s"
    return convert_pt(pt_dataset, dst, dtype="float16", progress=False)


@pytest.mark.parametrize("report", [False, True])
def test_a_planned_batch_is_get_batch_of_its_indices(store_path, report):
    ds = JASPERSteeringDataset(store_path, "train", report_generation=report)
    ds.set_epoch(3)  # a mix of variants
    plan = ds.plan_batches(BATCHES)
    assert plan is not None and len(plan) == len(BATCHES)
    for j, indices in enumerate(BATCHES):
        got, want = ds.planned_batch(plan, j), ds.get_batch(indices)
        assert same(got, want), j
    variants = torch.cat([ds.planned_batch(plan, j)["steering_variant"] for j in range(5)])
    assert len(set(variants.tolist())) > 1  # the steering rows came from several tables


def test_a_planned_batch_of_a_float16_store_is_get_batch_of_its_indices(f16_store):
    ds = JASPERSteeringDataset(f16_store, "train")
    plan = ds.plan_batches(BATCHES)
    for j, indices in enumerate(BATCHES):
        assert same(ds.planned_batch(plan, j), ds.get_batch(indices)), j


def test_a_planned_batch_is_its_own_memory(st_store):
    """The small outputs are slices of the plan's arrays: another batch never writes them."""
    ds = JASPERSteeringDataset(st_store, "train")
    plan = ds.plan_batches(BATCHES)
    first = ds.planned_batch(plan, 0)
    kept = {k: first[k].clone() for k in first.keys()}
    for _ in range(3):
        for j in range(len(BATCHES)):
            ds.planned_batch(plan, j)
        for j in range(len(BATCHES)):
            ds.get_batch(BATCHES[j])
    assert same(first, kept)


def change_epoch(ds, store):
    ds.set_epoch(11)


def force_zero(ds, store):
    ds.force_steering("zero")


def assign_probs(ds, store):
    ds.steering_probs = {"zero": 0.0, "centroid": 0.0, "keyword": 0.0, "residual": 1.0}


def reload(ds, store):
    publish_negatives(store, *table(2, 120, 6, 120))
    ds.reload_negatives()


@pytest.mark.parametrize("change", [change_epoch, force_zero, assign_probs, reload])
def test_a_change_after_the_plan_reaches_its_batches(tmp_path, pt_dataset, change):
    store = convert_pt(pt_dataset, tmp_path / "s", progress=False)
    ds = JASPERSteeringDataset(store, "train", report_generation=True)
    ds.set_epoch(2)
    plan = ds.plan_batches(BATCHES)
    before = [ds.get_batch(b) for b in BATCHES]
    change(ds, store)
    after = [ds.get_batch(b) for b in BATCHES]
    assert any(not same(a, b) for a, b in zip(before, after, strict=True))  # it changed batches
    for j in range(len(BATCHES)):
        assert same(ds.planned_batch(plan, j), after[j]), j


def test_plans_are_none_where_batches_are_made_one_by_one(st_store, monkeypatch):
    ds = JASPERSteeringDataset(st_store, "train")
    assert ds.plan_batches(BATCHES) is not None
    assert ds.plan_batches([[0, 1], [len(ds)]]) is None  # out of range: raised at its batch
    assert ds.plan_batches([[-1]]) is None

    class Mine(JASPERSteeringDataset):
        def get_batch(self, indices, pin_memory=False):
            return super().get_batch(indices, pin_memory)

    assert Mine(st_store, "train").plan_batches(BATCHES) is None
    patched = JASPERSteeringDataset(st_store, "train")
    patched.__getitems__ = lambda indices, pin_memory=False: None
    assert patched.plan_batches(BATCHES) is None
    assert JASPERSteeringDataset(st_store, "train", preload=True).plan_batches(BATCHES) is None
    monkeypatch.setattr(type(ds.store), "reads_ahead", property(lambda self: True))
    assert ds.plan_batches(BATCHES) is None  # read ahead from disk batch by batch


@pytest.mark.parametrize("ahead", [False, True])
def test_a_thread_loader_serves_plans_with_the_bytes_of_no_workers(st_store, monkeypatch, ahead):
    served = []
    real = JASPERSteeringDataset.planned_batch

    def spy(self, plan, j, pin_memory=False):
        served.append((len(plan), j))
        return real(self, plan, j, pin_memory)

    monkeypatch.setattr(JASPERSteeringDataset, "planned_batch", spy)
    ref = create_loader(st_store, "train", 8, num_workers=0, shuffle=False, drop_last=False)
    loader = create_loader(st_store, "train", 8, num_workers=2, shuffle=False, drop_last=False)
    loader.gather_tuner = None if ahead else inline_tuner()
    want = list(ref)
    assert served == []  # num_workers=0 takes one batch at a time from the sampler
    got = list(loader)
    assert len(got) == len(want) == len(served) and all(map(same, got, want))
    assert max(n for n, _ in served) == min(PLAN_BATCHES, len(want))


def test_a_subclass_that_makes_its_own_batches_keeps_them_with_threads(st_store):
    class Tagged(JASPERSteeringDataset):
        def __getitems__(self, indices, pin_memory=False):
            batch = super().__getitems__(indices, pin_memory)
            batch.batch["tag"] = torch.as_tensor(list(indices))
            return batch

    loader = JasperLoader(
        Tagged(st_store, "train"), batch_size=8, num_workers=2, collate_fn=collate_batch
    )
    assert len(loader) > 2
    for k, batch in enumerate(loader):
        assert batch["tag"].tolist() == list(range(8 * k, 8 * k + 8))


@pytest.mark.parametrize("ahead", [False, True])
def test_an_index_out_of_range_raises_at_its_own_batch(st_store, ahead):
    n = len(JASPERSteeringDataset(st_store, "train"))
    sampler = [[0, 1], [2, 3], [4, n], [5, 6]]
    loader = create_loader(st_store, "train", None, num_workers=2, batch_sampler=sampler)
    loader.gather_tuner = None if ahead else inline_tuner()
    seen = []
    with pytest.raises(SampleIndexError, match=rf"Index {n} out of range"):
        for batch in loader:
            seen.append(batch["question_emb"].shape[0])
    assert seen == [2, 2]
    assert not gather_threads() or all(not t.is_alive() for t in gather_threads())


@pytest.mark.parametrize("ahead", [False, True])
def test_an_error_while_serving_a_plan_surfaces_with_its_own_traceback(st_store, ahead):
    loader = create_loader(st_store, "train", 8, num_workers=2, shuffle=False)
    loader.gather_tuner = None if ahead else inline_tuner()
    ds = loader.dataset_obj
    real = ds._serve

    def broken(plan, j, pin_memory):
        if j == 3:
            raise RuntimeError("batch 3 is cursed")
        return real(plan, j, pin_memory)

    ds._serve = broken
    seen = 0
    with pytest.raises(RuntimeError, match="batch 3 is cursed") as info:
        for _ in loader:
            seen += 1
    assert seen == 3
    assert "in broken" in "".join(traceback.format_tb(info.value.__traceback__))
    for t in gather_threads():
        t.join(10)
    assert not gather_threads()


def test_changes_mid_epoch_reach_the_very_next_batch_in_the_loop(tmp_path, pt_dataset):
    """Gathering in the loop, a batch planned before a change is served after it: it must
    carry the change (the threads' depth of old batches applies only to batches gathered
    ahead)."""
    store = convert_pt(pt_dataset, tmp_path / "s", progress=False)
    publish_negatives(store, *table(1, 120, 6, 120))
    loader = create_loader(store, "train", 4, num_workers=2, shuffle=False, report_generation=True)
    loader.gather_tuner = inline_tuner()
    loader.dataset_obj.reload_negatives()
    gens, variants = [], []
    for k, batch in enumerate(loader):
        gens.append(int(batch["negatives_generation"][0]))
        variants.append(set(batch["steering_variant"].tolist()))
        if k == 2:
            publish_negatives(store, *table(2, 120, 6, 120))
            loader.dataset_obj.reload_negatives()
        if k == 5:
            loader.dataset_obj.force_steering("keyword")
    assert gens == [1] * 3 + [2] * (len(gens) - 3)
    assert all(v == {2} for v in variants[6:]) and len(variants) > 8
    assert not all(v == {2} for v in variants[:6])


def test_a_wrapper_set_on_the_class_is_kept_with_threads(st_store, monkeypatch):
    real = JASPERSteeringDataset.__getitems__

    def tagged(self, indices, pin_memory=False):
        batch = real(self, indices, pin_memory)
        batch.batch["tag"] = torch.as_tensor(list(indices))
        return batch

    monkeypatch.setattr(JASPERSteeringDataset, "__getitems__", tagged)
    loader = create_loader(st_store, "train", 8, num_workers=2, shuffle=False)
    assert loader.dataset_obj.plan_batches(BATCHES) is None
    tags = [batch["tag"].tolist() for batch in loader]
    assert tags == [list(range(8 * k, 8 * k + 8)) for k in range(len(tags))] and len(tags) > 2


class Flaky:
    """A batch sampler whose batch ``at`` fails (the sampler's own error)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def __iter__(self):
        for k in range(10):
            if k == self.at:
                raise LookupError(f"sampler broke at batch {k}")
            yield [2 * k, 2 * k + 1]

    def __len__(self) -> int:
        return 10


@pytest.mark.parametrize("ahead", [False, True])
@pytest.mark.parametrize("at", [0, 5])
def test_a_sampler_error_surfaces_after_the_batches_before_it(st_store, ahead, at):
    loader = create_loader(st_store, "train", None, num_workers=2, batch_sampler=Flaky(at))
    loader.gather_tuner = None if ahead else inline_tuner()
    it = iter(loader)
    seen = []
    with pytest.raises(LookupError, match=f"broke at batch {at}") as info:
        for batch in it:
            seen.append(batch["question_emb"].shape[0])
    assert seen == [2] * at
    assert "in __iter__" in "".join(traceback.format_tb(info.value.__traceback__))
    with pytest.raises(StopIteration):
        next(it)  # the epoch ended with the error; no batch comes after it
    assert not it.alive


@pytest.mark.parametrize("ahead", [False, True])
def test_a_read_error_while_planning_surfaces_at_its_own_batch(st_store, monkeypatch, ahead):
    """An error reading the negatives of batch 6 (of a plan of 16): batches 0-5 come out,
    batch 6 raises it, and the epoch ends there."""
    loader = create_loader(st_store, "train", 4, num_workers=2, shuffle=False)
    loader.gather_tuner = None if ahead else inline_tuner()
    store = loader.dataset_obj.store
    split = store.read("train_idx")
    cursed = int(split[6 * 4 + 1])  # a pair of batch 6
    real = type(store).gather_unchecked

    def take(self, name, idx, out=None, generation=None):
        if name == "hard_negatives" and cursed in np.asarray(idx).tolist():
            raise OSError(f"disk error reading the negatives of pair {cursed}")
        return real(self, name, idx, out, generation)

    monkeypatch.setattr(type(store), "gather_unchecked", take)
    it = iter(loader)
    seen = []
    with pytest.raises(OSError, match=f"pair {cursed}"):
        for batch in it:
            seen.append(batch["question_emb"].shape[0])
    assert seen == [4] * 6
    with pytest.raises(StopIteration):
        next(it)
    for t in gather_threads():
        t.join(10)
    assert not gather_threads()


@pytest.mark.parametrize("ahead", [False, True])
def test_an_interrupt_while_planning_ends_the_epoch_and_its_threads(st_store, monkeypatch, ahead):
    loader = create_loader(st_store, "train", 4, num_workers=2, shuffle=False)
    loader.gather_tuner = None if ahead else inline_tuner()
    ds = loader.dataset_obj
    real, calls = ds._plan, []

    def plan(batches, *args, **kwargs):
        calls.append(len(batches))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(batches, *args, **kwargs)

    ds._plan = plan
    it = iter(loader)
    seen = 0
    with pytest.raises(KeyboardInterrupt):
        for _ in it:
            seen += 1
    assert calls[0] == PLAN_BATCHES and seen <= PLAN_BATCHES
    assert not it.alive
    with pytest.raises(StopIteration):
        next(it)
    for t in gather_threads():
        t.join(10)
    assert not gather_threads()
