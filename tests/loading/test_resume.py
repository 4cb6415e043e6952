"""Exact, elastic resumption (NOTE [epoch order], NOTE [resuming], NOTE [control at
hand-out]): the stream of batches is a function of (seed, epoch, cursor, control calls) only."""

from __future__ import annotations

import json
import shutil
import tracemalloc
from typing import Protocol, runtime_checkable

import numpy as np
import pytest
import torch
from torch.utils.data import RandomSampler, SequentialSampler

from jasper_mmap import create_loader, publish_negatives, set_epoch
from jasper_mmap.converters import convert_pt
from jasper_mmap.dataset.batches import BATCH_KEYS
from jasper_mmap.errors import StoreNotFoundError
from jasper_mmap.loading.order import EpochOrder
from jasper_mmap.loading.resume import ResumeStateError

MODES = [
    {"num_workers": 0},
    {"num_workers": 2},
    {"num_workers": 4, "prefetch_factor": 4},
    {"num_workers": 2, "worker_mode": "process"},
]
MODE_IDS = ["loop", "threads2", "threads4-pf4", "processes2"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, pt_dataset):
    return convert_pt(pt_dataset, tmp_path_factory.mktemp("resume") / "s", progress=False)


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in BATCH_KEYS)


def take(it, k: int) -> list[dict]:
    out = []
    for _ in range(k):
        b = next(it)
        out.append({key: b[key].clone() for key in BATCH_KEYS})
    return out


def rest(it) -> list[dict]:
    return [{key: b[key].clone() for key in BATCH_KEYS} for b in it]


# -- the order ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 65, 1000, 4097, 100_003])
def test_the_order_is_a_permutation_of_seed_and_epoch(n):
    order = EpochOrder(n, seed=7, epoch=3, shuffle=True)
    perm = order.at(np.arange(n))
    assert np.array_equal(np.sort(perm), np.arange(n))
    again = EpochOrder(n, seed=7, epoch=3, shuffle=True).at(np.arange(n))
    assert np.array_equal(perm, again)
    if n > 5:
        assert not np.array_equal(perm, EpochOrder(n, 7, 4, True).at(np.arange(n)))
        assert not np.array_equal(perm, EpochOrder(n, 8, 3, True).at(np.arange(n)))
    assert np.array_equal(EpochOrder(n, 7, 3, False).at(np.arange(n)), np.arange(n))


def test_an_epoch_of_a_billion_samples_starts_without_a_list_of_them():
    tracemalloc.start()
    order = EpochOrder(10**9, seed=1, epoch=0, shuffle=True)
    first = order.at(np.arange(128))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20 and first.min() >= 0 and first.max() < 10**9
    assert np.unique(first).size == 128


def test_samplers_are_random_and_sequential_and_ignore_the_global_rng(store):
    train = create_loader(store, "train", 8)
    val = create_loader(store, "val", 8)
    assert isinstance(train.sampler, RandomSampler) and isinstance(val.sampler, SequentialSampler)
    assert hasattr(train.sampler, "set_epoch") and hasattr(val.sampler, "set_epoch")
    a = [b.copy() for b in train.batch_sampler]
    torch.randn(10)  # the global RNG moves: the order must not
    np.random.seed(123)
    b = [b.copy() for b in create_loader(store, "train", 8).batch_sampler]
    assert a == b


# -- same world size: any mode saved, any mode resumed ----------------------------------------


@pytest.mark.parametrize("saved", MODES[:2], ids=MODE_IDS[:2])
@pytest.mark.parametrize("resumed", MODES, ids=MODE_IDS)
def test_resume_in_any_mode_gives_the_same_remaining_batches(store, saved, resumed):
    ref = rest(iter(create_loader(store, "train", 8, epoch=2)))
    loader = create_loader(store, "train", 8, epoch=2, **saved)
    it = iter(loader)
    head = take(it, 5)
    state = json.loads(json.dumps(loader.state_dict()))  # JSON-safe
    del it
    again = create_loader(store, "train", 8, **resumed)
    again.load_state_dict(state)
    tail = rest(iter(again))
    assert len(head) + len(tail) == len(ref)
    assert all(same(x, y) for x, y in zip(head + tail, ref, strict=True))


def test_skipped_batches_are_never_gathered(store):
    loader = create_loader(store, "train", 8)
    it = iter(loader)
    take(it, 6)
    state = loader.state_dict()
    del it
    again = create_loader(store, "train", 8, num_workers=2)
    asked: list[list[int]] = []
    ds = again.dataset
    real = ds.__getitems__

    def spy(indices, pin_memory=False):
        asked.append(list(map(int, indices)))
        return real(indices, pin_memory)

    ds.__getitems__ = spy
    ds.plan_batches = lambda batches: None  # every batch through __getitems__
    again.load_state_dict(state)
    tail = rest(iter(again))
    full = [b.copy() for b in create_loader(store, "train", 8).batch_sampler]
    assert asked == full[6:] and len(tail) == len(full) - 6


# -- elastic ------------------------------------------------------------------------------------


def _rank_batches(store, replicas: int, batch: int, state=None, drop_last=False) -> list[list]:
    out = []
    for r in range(replicas):
        ld = create_loader(
            store, "train", batch, distributed=True, num_replicas=replicas, rank=r,
            drop_last=drop_last,
        )  # fmt: skip
        if state is not None:
            ld.load_state_dict(state)
        out.append([b.copy() for b in ld.batch_sampler])
    return out


@pytest.mark.parametrize("new_replicas,new_batch", [(1, 7), (2, 5), (3, 4), (8, 1), (3, 6)])
def test_elastic_resume_serves_every_remaining_sample_once(store, new_replicas, new_batch):
    old = [
        create_loader(store, "train", 4, distributed=True, num_replicas=2, rank=r, drop_last=False)
        for r in range(2)
    ]
    iters = [iter(ld) for ld in old]
    for it in iters:
        take(it, 3)  # 3 batches per rank: 24 samples of the epoch
    states = [ld.state_dict() for ld in old]
    assert states[0] == states[1]  # identical on every rank
    assert states[0]["cursor"] == 24
    n = len(old[0].dataset)
    full = EpochOrder(n, old[0].dataset.seed, 0, True).at(np.arange(n))
    ranks = _rank_batches(store, new_replicas, new_batch, states[0])
    counts = {len(b) for b in ranks}
    assert len(counts) == 1  # every rank the same number of batches
    served = [i for batches in ranks for b in batches for i in b]
    remaining = set(full[24:].tolist())
    assert set(served) == remaining
    if (n - 24) % new_replicas == 0:  # no padding needed: each sample exactly once
        assert sorted(served) == sorted(remaining)
    else:  # padding repeats only the epoch's first samples, as DistributedSampler pads
        assert len(served) - len(remaining) < new_replicas


def test_the_same_global_batch_gives_the_same_global_batches(store):
    state = None
    ranks = _rank_batches(store, 2, 6, drop_last=True)
    old = create_loader(store, "train", 6, distributed=True, num_replicas=2, rank=0)
    it = iter(old)
    take(it, 2)
    state = old.state_dict()
    before = [sorted(a + b) for a, b in zip(*ranks, strict=True)][2:]
    after_ranks = _rank_batches(store, 4, 3, state, drop_last=True)
    after = [sorted(sum(group, [])) for group in zip(*after_ranks, strict=True)]
    assert before == after


# -- control changes take effect at the next batch handed out ------------------------------------


def _stream(store, kw, calls) -> list[dict]:
    """Batches of one epoch, with ``calls[k](loader)`` made after batch k is handed out."""
    loader = create_loader(store, "train", 8, **kw)
    out = []
    for k, b in enumerate(loader):
        out.append({key: b[key].clone() for key in BATCH_KEYS})
        if k in calls:
            calls[k](loader)
    return out


CALLS = {
    1: lambda ld: ld.dataset.force_steering("residual"),
    3: lambda ld: set_epoch(ld, ld.sampler.epoch) or ld.dataset.set_epoch(7),
    4: lambda ld: setattr(
        ld.dataset, "steering_probs", {"zero": 0, "centroid": 1, "keyword": 0, "residual": 0}
    ),
    6: lambda ld: ld.dataset.force_steering(None),
}


@pytest.mark.parametrize("kw", MODES[1:], ids=MODE_IDS[1:])
def test_the_stream_is_the_same_for_every_number_of_workers(store, kw):
    ref = _stream(store, {"num_workers": 0}, CALLS)
    got = _stream(store, kw, CALLS)
    assert len(got) == len(ref)
    for k, (a, b) in enumerate(zip(ref, got, strict=True)):
        assert same(a, b), k


def test_reload_applies_from_the_next_batch_handed_out(store, tmp_path):
    path = shutil.copytree(store, tmp_path / "s")
    n_pairs = len(create_loader(path, "train", 8).dataset.store.read("pair_index"))

    def reload(ld):
        negs = ld.dataset.store.read("hard_negatives")
        publish_negatives(path, np.roll(negs, 1, axis=0), ld.dataset.store.read("negative_tiers"))
        ld.dataset.reload_negatives()

    assert n_pairs
    ref = _stream(path, {"num_workers": 0}, {2: reload})
    path2 = shutil.copytree(store, tmp_path / "s2")
    path = path2
    got = _stream(path2, {"num_workers": 4, "prefetch_factor": 4}, {2: reload})
    assert all(same(a, b) for a, b in zip(ref, got, strict=True))
    assert not same(ref[3], _stream(store, {"num_workers": 0}, {})[3])


@pytest.mark.parametrize("workers", [0, 4])
@pytest.mark.parametrize("change", [1, 3, 4], ids=["force_steering", "set_epoch", "steering_probs"])
@pytest.mark.parametrize("at", ["before", "right after", "a batch after"])
def test_a_checkpoint_around_a_control_change_resumes_exactly(store, at, change, workers):
    """The reference makes a control change after its second batch; the checkpoint is taken
    just before that call, right after it, or one batch later."""
    ref = _stream(store, {"num_workers": 0}, {1: CALLS[change]})
    loader = create_loader(store, "train", 8, num_workers=workers)
    it = iter(loader)
    got = take(it, 2)
    if at != "before":
        CALLS[change](loader)
    if at == "a batch after":
        got += take(it, 1)
    state = loader.state_dict()
    del it
    again = create_loader(store, "train", 8, num_workers=2, worker_mode="process")
    if at == "before":  # the change comes after the checkpoint: made by the resumed run
        tail = _stream_from(again, state, {-1: CALLS[change]})
    else:
        again.load_state_dict(state)
        tail = rest(iter(again))
    assert len(got) + len(tail) == len(ref)
    assert all(same(a, b) for a, b in zip(got + tail, ref, strict=True))


def _stream_from(loader, state, calls) -> list[dict]:
    """The rest of the epoch from ``state``; ``calls[-1]`` is made before the first batch."""
    loader.load_state_dict(state)
    if -1 in calls:
        calls[-1](loader)
    out = []
    for k, b in enumerate(loader):
        out.append({key: b[key].clone() for key in BATCH_KEYS})
        if k in calls:
            calls[k](loader)
    return out


# -- epoch boundaries ---------------------------------------------------------------------------


def test_state_before_iter_after_the_end_and_twice_in_an_epoch(store):
    loader = create_loader(store, "train", 8, epoch=1)
    state0 = loader.state_dict()
    assert state0["cursor"] == 0
    ref = rest(iter(loader))
    end = loader.state_dict()  # after StopIteration: the rest of epoch 1 is empty
    again = create_loader(store, "train", 8)
    again.load_state_dict(end)
    assert rest(iter(again)) == []
    set_epoch(again, 2)
    epoch2 = rest(iter(again))
    assert len(epoch2) == len(ref) and not all(same(a, b) for a, b in zip(ref, epoch2, strict=True))
    fresh = create_loader(store, "train", 8)
    fresh.load_state_dict(state0)
    it = iter(fresh)
    head = take(it, 2)
    s1 = fresh.state_dict()
    del it
    second = create_loader(store, "train", 8)
    second.load_state_dict(s1)
    it = iter(second)
    mid = take(it, 3)
    s2 = second.state_dict()
    del it
    third = create_loader(store, "train", 8)
    third.load_state_dict(s2)
    tail = rest(iter(third))
    assert all(same(a, b) for a, b in zip(head + mid + tail, ref, strict=True))
    assert len(head + mid + tail) == len(ref)


def test_a_new_iter_without_a_pending_resume_starts_at_batch_0(store):
    loader = create_loader(store, "train", 8)
    first = rest(iter(loader))
    loader2 = create_loader(store, "train", 8)
    it = iter(loader2)
    take(it, 3)
    del it
    assert all(same(a, b) for a, b in zip(rest(iter(loader2)), first, strict=True))


def test_lightning_order_load_iter_then_set_epoch(store):
    """Lightning restores the loader, calls iter(), then sampler.set_epoch(epoch)."""
    ref = rest(iter(create_loader(store, "train", 8, epoch=3)))
    loader = create_loader(store, "train", 8, epoch=3, num_workers=2)
    it = iter(loader)
    take(it, 4)
    state = loader.state_dict()
    del it
    again = create_loader(store, "train", 8, num_workers=2)
    again.load_state_dict(state)
    it = iter(again)
    again.sampler.set_epoch(3)  # the restored epoch: the restored position stays
    tail = rest(it)
    assert all(same(a, b) for a, b in zip(tail, ref[4:], strict=True)) and len(tail) == len(ref) - 4
    other = create_loader(store, "train", 8, num_workers=2)
    other.load_state_dict(state)
    it = iter(other)
    other.sampler.set_epoch(4)  # another epoch: its first batch
    set_epoch(other, 4)
    assert len(rest(it)) == len(ref)


# -- identity and negatives ------------------------------------------------------------------


def test_another_dataset_is_refused_naming_the_field_and_a_moved_store_resumes(
    store, tmp_path, pt_dataset
):
    loader = create_loader(store, "train", 8)
    it = iter(loader)
    take(it, 2)
    state = loader.state_dict()
    del it
    moved = shutil.copytree(store, tmp_path / "elsewhere")
    again = create_loader(moved, "train", 8)
    again.load_state_dict(state)  # the same data at another path
    assert len(again) == len(loader)  # len() is a whole epoch's, as frameworks count it
    assert len(rest(iter(again))) == len(loader) - 2
    with pytest.raises(ResumeStateError, match=r"data\.split"):
        create_loader(store, "val", 8).load_state_dict(state)
    bad = json.loads(json.dumps(state))
    bad["data"]["checksums"]["pair_index"] = 1
    with pytest.raises(ResumeStateError, match=r"data\.checksums"):
        create_loader(store, "train", 8).load_state_dict(bad)
    with pytest.raises(ResumeStateError, match="version"):
        create_loader(store, "train", 8).load_state_dict({**state, "version": 99})
    with pytest.raises(ValueError, match="state_dict"):
        create_loader(store, "train", 8).load_state_dict({"epoch": 1})


def test_negatives_saved_newer_published_and_collected(store, tmp_path):
    path = shutil.copytree(store, tmp_path / "s")
    loader = create_loader(path, "train", 8)
    it = iter(loader)
    take(it, 2)
    state = loader.state_dict()
    saved = state["control"]["negatives_generation"]
    del it
    negs, tiers = (
        loader.dataset.store.read("hard_negatives"),
        loader.dataset.store.read("negative_tiers"),
    )
    publish_negatives(path, np.roll(negs, 3, axis=0), tiers)
    again = create_loader(path, "train", 8)
    again.load_state_dict(state)
    assert again.dataset.negatives_generation == saved
    live = create_loader(path, "train", 8)
    live.load_state_dict(state, negatives="live")
    assert live.dataset.negatives_generation > saved
    del again, live, loader
    import gc

    gc.collect()  # no process holds the saved generation now
    for _ in range(3):  # the publisher collects generations older than the newest two
        publish_negatives(path, negs, tiers)
    late = create_loader(path, "train", 8)
    with pytest.raises(StoreNotFoundError, match='negatives="live"'):
        late.load_state_dict(state)
    late.load_state_dict(state, negatives="live")


def test_preloaded_dataset_resumes(store):
    ref = rest(iter(create_loader(store, "train", 8, preload=True)))
    loader = create_loader(store, "train", 8, preload=True)
    it = iter(loader)
    head = take(it, 3)
    state = loader.state_dict()
    del it
    again = create_loader(store, "train", 8, preload=True)
    again.load_state_dict(state)
    tail = rest(iter(again))
    assert all(same(a, b) for a, b in zip(head + tail, ref, strict=True))


@runtime_checkable
class _Stateful(Protocol):  # torchdata.stateful_dataloader.Stateful's protocol
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state_dict: dict) -> None: ...


def test_the_loader_is_stateful(store):
    assert isinstance(create_loader(store, "train", 8), _Stateful)


def test_validate_first_batch_and_set_epoch_after_iter_do_not_move_the_order(store):
    from jasper_mmap import validate_first_batch

    ref = rest(iter(create_loader(store, "train", 8)))
    loader = create_loader(store, "train", 8, num_workers=2)
    validate_first_batch(loader)  # takes a batch of its own iterator
    assert all(same(a, b) for a, b in zip(rest(iter(loader)), ref, strict=True))
    epoch1 = rest(iter(create_loader(store, "train", 8, epoch=1)))
    it = iter(loader)
    set_epoch(loader, 1)  # after iter(), before its first batch: epoch 1 from its start
    got = rest(it)
    assert len(got) == len(epoch1) and all(same(a, b) for a, b in zip(got, epoch1, strict=True))


@pytest.mark.parametrize(
    "kw", [{}, {"num_workers": 2, "worker_mode": "process", "persistent_workers": True}]
)
def test_val_and_persistent_workers_resume(store, kw):
    ref = rest(iter(create_loader(store, "val", 4)))
    loader = create_loader(store, "val", 4, **kw)
    it = iter(loader)
    head = take(it, 1)
    state = loader.state_dict()
    del it
    again = create_loader(store, "val", 4, **kw)
    again.load_state_dict(state)
    tail = rest(iter(again))
    assert len(head) + len(tail) == len(ref)
    assert all(same(a, b) for a, b in zip(head + tail, ref, strict=True))


def test_a_batch_sampler_of_ones_own_has_no_position(store):
    from torch.utils.data import BatchSampler, SequentialSampler

    ds_len = len(create_loader(store, "train", 8).dataset)
    own = BatchSampler(SequentialSampler(range(ds_len)), 8, drop_last=True)
    loader = create_loader(store, "train", 8, batch_sampler=own)
    with pytest.raises(ValueError, match="sampler of your own .* no position"):
        loader.state_dict()
    with pytest.raises(ValueError, match="sampler of your own"):
        loader.load_state_dict({})


def test_another_drop_last_is_said(store, caplog):
    import logging

    loader = create_loader(store, "train", 8)  # drop_last=True (train's default)
    state = loader.state_dict()
    again = create_loader(store, "train", 8, drop_last=False)
    with caplog.at_level(logging.WARNING, logger="jasper_mmap.loading.loader"):
        again.load_state_dict(state)
    assert "saved with drop_last=True; this loader has drop_last=False" in caplog.text


@pytest.mark.gpu
def test_a_dataset_preloaded_to_the_gpu_resumes(store):
    ref = rest(iter(create_loader(store, "train", 8, device="cuda")))
    loader = create_loader(store, "train", 8, device="cuda")
    it = iter(loader)
    head = take(it, 3)
    state = loader.state_dict()
    del it
    again = create_loader(store, "train", 8, device="cuda")
    again.load_state_dict(state)
    tail = rest(iter(again))
    assert len(head) + len(tail) == len(ref)
    assert all(same(a, b) for a, b in zip(head + tail, ref, strict=True))
