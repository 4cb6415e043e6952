"""Attacks on exact resumption (NOTE [resuming]): malformed states are refused naming the
field, all or nothing; state_dict follows set_epoch; validate_first_batch keeps a resume."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from jasper_mmap import create_loader, set_epoch, validate_first_batch
from jasper_mmap.converters import convert_pt
from jasper_mmap.dataset.batches import BATCH_KEYS
from jasper_mmap.loading.resume import ResumeStateError


@pytest.fixture(scope="module")
def store(tmp_path_factory, pt_dataset):
    return convert_pt(pt_dataset, tmp_path_factory.mktemp("attacks") / "s", progress=False)


@pytest.fixture(scope="module")
def state(store):
    loader = create_loader(store, "train", 8)
    it = iter(loader)
    for _ in range(3):
        next(it)
    return json.loads(json.dumps(loader.state_dict()))


def rest(loader) -> list[dict]:
    return [{k: b[k].clone() for k in BATCH_KEYS} for b in loader]


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in BATCH_KEYS
    )


BAD = [
    ("order", "epoch", None, "order.epoch"),  # missing: KeyError before
    ("order", "epoch", 1.7, "order.epoch"),  # silently int(1.7) == 1 before
    ("order", "epoch", "1", "order.epoch"),
    ("order", "epoch", True, "order.epoch"),
    ("order", "epoch", float("nan"), "order.epoch"),  # bare int(nan) ValueError before
    ("order", "seed", 42.0, "order.seed"),
    ("order", "shuffle", 1, "order.shuffle"),
    ("order", "drop_last", "x", "order.drop_last"),
    ("control", "epoch", None, "control.epoch"),  # TypeError before
    ("control", "epoch", 2.5, "control.epoch"),
    ("control", "negatives_generation", None, "control.negatives_generation"),  # KeyError
    ("control", "negatives_generation", "abc", "control.negatives_generation"),
    ("control", "negatives_generation", 0.5, "control.negatives_generation"),
    ("control", "negatives_generation", -1, "control.negatives_generation"),
    ("control", "steering_probs", {"zero": float("nan")}, "control.steering_probs"),
    ("control", "steering_probs", {"x": True}, "control.steering_probs"),
    ("control", "steering_probs", {}, "control.steering_probs"),
    ("control", "steering_probs", {"zero": 0.5, "centroid": 0.5, "zz": 0.0}, "steering_probs"),
    (None, "version", True, "version"),
    (None, "version", 1.0, "version"),
]


@pytest.mark.parametrize("where,key,value,field", BAD, ids=[f"{w}.{k}={v!r}" for w, k, v, _ in BAD])
def test_a_malformed_field_is_refused_naming_it(store, state, where, key, value, field):
    bad = copy.deepcopy(state)
    target = bad if where is None else bad[where]
    if value is None and key != "steering_probs":
        target.pop(key)
    else:
        target[key] = value
    loader = create_loader(store, "train", 8)
    with pytest.raises(ResumeStateError, match=field.replace(".", r"\.")):
        loader.load_state_dict(bad)


def test_a_refused_state_changes_nothing(store, state):
    loader = create_loader(store, "train", 8)
    ds = loader.dataset_obj
    before = (ds._control.snapshot().epoch, loader.state_dict())
    bad = copy.deepcopy(state)
    bad["control"]["epoch"] = 5
    bad["control"]["steering_probs"] = {"zero": -1.0, "centroid": 2.0}
    with pytest.raises(ResumeStateError, match="steering_probs"):
        loader.load_state_dict(bad)
    assert (ds._control.snapshot().epoch, loader.state_dict()) == before


@pytest.mark.parametrize("how", ["loader", "sampler"])
def test_state_dict_after_set_epoch_is_the_new_epochs_start(store, how):
    loader = create_loader(store, "train", 8)
    for _ in loader:  # the whole of epoch 0
        pass
    if how == "loader":
        set_epoch(loader, 1)
    else:
        loader.sampler.set_epoch(1)
    state = loader.state_dict()
    assert (state["order"]["epoch"], state["cursor"]) == (1, 0)
    resumed = create_loader(store, "train", 8)
    resumed.load_state_dict(state)
    ref = create_loader(store, "train", 8)
    (set_epoch(ref, 1) if how == "loader" else ref.sampler.set_epoch(1))
    assert same(rest(resumed), rest(ref))


def test_state_dict_after_set_epoch_mid_epoch(store):
    loader = create_loader(store, "train", 8)
    it = iter(loader)
    next(it), next(it)
    set_epoch(loader, 1)
    assert loader.state_dict()["cursor"] == 0
    set_epoch(loader, 1)  # the same epoch again: still its start
    assert loader.state_dict()["cursor"] == 0


def test_state_dict_after_restarting_a_finished_epoch(store):
    loader = create_loader(store, "train", 8)
    for _ in loader:
        pass
    assert loader.state_dict()["cursor"] == len(loader.dataset)  # documented: the epoch's end
    set_epoch(loader, 0)  # the same epoch again, from its start
    assert loader.state_dict()["cursor"] == 0


def test_validate_first_batch_keeps_a_pending_resume(store, state):
    ref = create_loader(store, "train", 8)
    ref.load_state_dict(state)
    want = rest(ref)
    loader = create_loader(store, "train", 8, num_workers=2)
    loader.load_state_dict(state)
    validate_first_batch(loader)
    assert loader.state_dict() == state
    assert same(rest(loader), want)


def test_validate_first_batch_before_training_leaves_the_state_at_the_start(store):
    loader = create_loader(store, "train", 8)
    validate_first_batch(loader)
    assert loader.state_dict()["cursor"] == 0  # the loop that follows serves the whole epoch
    assert len(rest(loader)) == len(loader)


def test_a_generator_is_named_when_state_dict_refuses(store):
    loader = create_loader(store, "train", 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="generator="):
        loader.state_dict()


@pytest.mark.parametrize("change", ["steering_probs", "force_steering"])
def test_set_epoch_of_the_restored_epoch_keeps_the_restored_control(store, change):
    """The usual loop calls set_epoch(loader, epoch) at each epoch's start, also the resumed
    one: that must not drop the steering probabilities the state restored."""
    loader = create_loader(store, "train", 8)
    set_epoch(loader, 0)
    it = iter(loader)
    next(it), next(it)
    if change == "steering_probs":
        loader.dataset.steering_probs = {"zero": 0, "centroid": 0, "keyword": 1, "residual": 0}
    else:
        loader.dataset.force_steering("residual")
    state = json.loads(json.dumps(loader.state_dict()))
    want = rest(it)
    resumed = create_loader(store, "train", 8, num_workers=2)
    resumed.load_state_dict(state)
    set_epoch(resumed, state["order"]["epoch"])
    assert same(rest(resumed), want)
    set_epoch(resumed, 1)  # a new epoch: the curriculum's probabilities again
    assert resumed.state_dict()["control"]["steering_probs"] is None


def test_an_iterator_started_before_load_state_dict_does_not_move_the_saved_position(store, state):
    loader = create_loader(store, "train", 8)
    old = iter(loader)
    next(old)
    loader.load_state_dict(state)
    next(old)  # the stale iterator goes on
    assert loader.state_dict() == state
    want = create_loader(store, "train", 8)
    want.load_state_dict(state)
    assert same(rest(loader), rest(want))


def test_an_unused_iterator_from_before_load_state_dict_counts_from_the_state(store, state):
    start = copy.deepcopy(state)
    start["cursor"] = 0  # the same (epoch, cursor) as the iterator's own start
    loader = create_loader(store, "train", 8)
    it = iter(loader)
    loader.load_state_dict(start)
    next(it), next(it)
    assert loader.state_dict()["cursor"] == 16


def test_batch_size_none_is_named_when_state_dict_refuses(store):
    loader = create_loader(store, "train", None, drop_last=False)
    with pytest.raises(ValueError, match="batch_size=None"):
        loader.state_dict()
