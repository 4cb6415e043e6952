"""Issue 24, the attacker's round on the control block, indices, seeds, steering and
validate_first_batch: a process that received the dataset by pickling or that was forked
inside a DataLoader worker never writes the main process's control block (S1, S2); indices
are integers only, whatever wraps them (S4, S7, R7, M5); seeds and epochs are never masked
(S5, R7); a base steering probability outside [0, 1] is refused (S6); validate_first_batch
checks every first batch it is given (S8, R7, M7); a CPU loader does not ask to pin (minor)."""

from __future__ import annotations

import json
import math
import shutil
import warnings

import numpy as np
import pytest
import torch
from helpers import run_script
from torch.utils.data import DataLoader

from jasper_mmap import JASPERSteeringDataset, create_loader, validate_first_batch
from jasper_mmap.errors import ConfigError, JasperError, SampleIndexError, SampleIndexTypeError
from jasper_mmap.loading.loader import BatchValidationError


@pytest.fixture(scope="module")
def ds(pt_dataset):
    with JASPERSteeringDataset(pt_dataset, "train") as d:
        yield d


def _run(tmp_path, script: str, *args: str, timeout: int = 120) -> str:
    return run_script(tmp_path, script, *args, timeout=timeout)


# -- S1: a process that received the dataset by pickling -------------------------------------

_POOL_SCRIPT = r"""
import multiprocessing as mp, sys
from jasper_mmap import JASPERSteeringDataset

def child(ds):
    before = ds.epoch  # reads follow the owner until the child writes
    ds.force_steering("zero"); ds.set_epoch(9)
    return before, ds.epoch, ds._control.snapshot().forced

if __name__ == "__main__":
    for method in ("spawn", "fork"):
        ds = JASPERSteeringDataset(sys.argv[1], "train", epoch=2)
        with mp.get_context(method).Pool(1) as pool:
            got = pool.apply(child, (ds,))
        snap = ds._control.snapshot()
        print(method, got, snap.epoch, snap.forced)
"""


def test_a_pool_childs_writes_never_reach_the_parent(tmp_path, pt_dataset):
    out = _run(tmp_path, _POOL_SCRIPT, pt_dataset)
    assert "spawn (2, 9, 0) 2 -1" in out, out  # the child changed its own copy only
    assert "fork (2, 9, 0) 2 -1" in out, out


# -- S2: a grandchild forked inside one of our workers ---------------------------------------

_GRANDCHILD_SCRIPT = r"""
import os, sys
import torch
from jasper_mmap import create_loader

def init(worker_id):
    pid = os.fork()
    if pid == 0:
        try:
            d = torch.utils.data.get_worker_info().dataset
            d.force_steering("zero"); d.set_epoch(7)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)

loader = create_loader(sys.argv[1], "train", batch_size=4, num_workers=1,
                       worker_mode="process", worker_init_fn=init, shuffle=False,
                       multiprocessing_context="fork", persistent_workers=True)
next(iter(loader))
snap = loader.dataset_obj._control.snapshot()
print("main", snap.epoch, snap.forced)
loader.dataset_obj.force_steering("keyword")  # our worker still follows the main process
print("worker", sorted(set(next(iter(loader))["steering_variant"].tolist())))
"""


def test_a_grandchild_forked_in_our_worker_never_writes_the_main_block(tmp_path, pt_dataset):
    out = _run(tmp_path, _GRANDCHILD_SCRIPT, pt_dataset)
    assert "main 0 -1" in out and "worker [2]" in out, out


# -- S4, S7, R7, M5: integer indices only ------------------------------------------------------

NOT_INTEGERS = {
    "0-d bool tensor True": lambda ds: ds[torch.tensor(True)],
    "0-d bool tensor False": lambda ds: ds[torch.tensor(False)],
    "0-d complex tensor": lambda ds: ds[torch.tensor(1 + 0j)],
    "bool among ints": lambda ds: ds.get_batch([True, 1]),
    "np.bool_ among ints": lambda ds: ds.get_batch([np.bool_(False), 1]),
    "masked array": lambda ds: ds.get_batch(np.ma.array([0, 1], mask=[False, True])),
    "ragged list": lambda ds: ds.get_batch([[0, 1], [2]]),
    "requires_grad tensor": lambda ds: ds.get_batch(torch.tensor([1.0], requires_grad=True)),
    "complex tensor": lambda ds: ds.get_batch(torch.tensor([1 + 0j])),
    "object array": lambda ds: ds.get_batch(np.array([1, "a"], dtype=object)),
}


@pytest.mark.parametrize("call", NOT_INTEGERS.values(), ids=NOT_INTEGERS.keys())
def test_indices_that_are_not_integers_are_refused(ds, call):
    with pytest.raises(SampleIndexTypeError) as e:
        call(ds)
    assert isinstance(e.value, TypeError) and str(ds.dataset_dir) in str(e.value)


@pytest.mark.parametrize(
    "idx",
    [np.array([2**64 - 1], dtype=np.uint64), [2**64 - 1], [2**70]],
    ids=["uint64 max", "python 2**64-1", "python 2**70"],
)
def test_huge_indices_are_reported_as_themselves(ds, idx):
    with pytest.raises(SampleIndexError, match=r"Index \d{19,} out of range") as e:
        ds.get_batch(idx)
    assert isinstance(e.value, IndexError) and "Index -1" not in str(e.value)


def test_integer_tensors_and_lists_still_index(ds):
    want = ds.get_batch([3, 4])["question_emb"]
    assert torch.equal(ds[torch.tensor(3)]["question_emb"], want[0])
    for idx in (torch.tensor([3, 4]), np.array([3, 4], dtype=np.uint8), (3, np.int32(4))):
        assert torch.equal(ds.get_batch(idx)["question_emb"], want)


# -- S5, R7: seeds and epochs are never masked ---------------------------------------------------


def _with_config(tmp_path, pt_dataset, **changes):
    src = tmp_path / "ds"
    shutil.copytree(pt_dataset, src, ignore=shutil.ignore_patterns(".jasper*", "*.store*"))
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (src / "config.json").write_text(json.dumps(config))  # allow_nan: NaN literals too
    return src


def test_a_config_seed_of_2_pow_64_is_refused(tmp_path, pt_dataset):
    src = _with_config(tmp_path, pt_dataset, random_seed=2**64)
    with pytest.raises(ConfigError, match="random_seed should be an integer in") as e:
        JASPERSteeringDataset(src, "train", cache_dir=tmp_path / "cache")
    assert "config.json" in str(e.value)


@pytest.mark.parametrize("seed", [2**64, 2**63, -1, True, 1.5])
def test_a_seed_argument_out_of_range_is_refused(pt_dataset, seed):
    with pytest.raises(ConfigError, match=r"seed= should be an integer in \[0, 2\*\*63\)"):
        JASPERSteeringDataset(pt_dataset, "train", seed=seed)


def test_the_largest_seed_shuffles(pt_dataset):
    ds = JASPERSteeringDataset(pt_dataset, "train", seed=2**63 - 1)
    assert len(next(ds.iter_batches(8, shuffle=True))["cluster_id"]) == 8


@pytest.mark.parametrize("epoch", [2**64, math.nan, math.inf, 1.5, True, "3"])
def test_set_epoch_refuses_what_it_cannot_store(ds, epoch):
    with pytest.raises(ConfigError, match="the epoch should be an integer") as e:
        ds.set_epoch(epoch)
    assert isinstance(e.value, ValueError) and ds.epoch == 0


# -- S6: base steering probabilities under a curriculum ------------------------------------------


@pytest.mark.parametrize("zero", [math.nan, math.inf, 1.5, -0.5])
def test_a_base_probability_outside_0_1_is_refused_under_a_curriculum(tmp_path, pt_dataset, zero):
    base = {"zero": zero, "centroid": 0.3, "keyword": 0.3, "residual": 0.3}
    curriculum = {"zero_prob_start": 0.5, "zero_prob_end": 0.1, "epochs_total": 10}
    src = _with_config(tmp_path, pt_dataset, steering_probabilities=base, curriculum=curriculum)
    with pytest.raises(ConfigError, match=r"steering_probabilities zero should be a finite"):
        JASPERSteeringDataset(src, "train", cache_dir=tmp_path / "cache")


def test_assigned_steering_probs_that_are_not_a_mapping_are_refused(ds):
    with pytest.raises(ConfigError, match="but got a Tensor") as e:
        ds.steering_probs = torch.tensor([0.25, 0.25, 0.25, 0.25])
    assert isinstance(e.value, ValueError) and ds._control.snapshot().override is None


# -- S8, R7, M7: validate_first_batch ---------------------------------------------------------


def _sample_batch(x):
    return x.batch if hasattr(x, "batch") else torch.utils.data.default_collate(x)


def _cluster_out_of_range(x):
    b = torch.utils.data.default_collate(x)
    b["cluster_id"][0] = 10**6
    return b


def _numpy_batch(x):
    return {k: v.numpy() for k, v in torch.utils.data.default_collate(x).items()}


def test_validate_first_batch_refuses_an_empty_first_batch(ds):
    loader = DataLoader(ds, batch_sampler=[[], [0, 1]], collate_fn=_sample_batch)
    with pytest.raises(BatchValidationError, match="holds no samples"):
        validate_first_batch(loader)


def test_validate_first_batch_checks_clusters_of_a_closed_dataset(pt_dataset):
    closed = JASPERSteeringDataset(pt_dataset, "train")
    closed.close()
    loader = DataLoader(closed, batch_size=4, collate_fn=_cluster_out_of_range)
    with pytest.raises(BatchValidationError, match=r"cluster_id should be in \[0, "):
        validate_first_batch(loader)


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        (dict(batch_size=None), "single samples, not batches"),
        (dict(batch_size=4, collate_fn=lambda x: x), "should be a mapping"),
        (dict(batch_size=4, collate_fn=_numpy_batch), "got a numpy array, not a tensor"),
        (dict(batch_size=4, collate_fn=lambda x: {1: 2, "a": 3}), r"it has \['a', 1\]"),
    ],
    ids=["batch_size=None", "list collate", "numpy collate", "mixed key types"],
)
def test_validate_first_batch_names_what_the_batch_is(ds, kwargs, problem):
    with pytest.raises(BatchValidationError, match=problem) as e:
        validate_first_batch(DataLoader(ds, **kwargs))
    assert isinstance(e.value, JasperError) and isinstance(e.value, AssertionError)


# -- minor: pinning without an accelerator ---------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only default")
def test_a_cpu_process_loader_does_not_ask_to_pin(pt_dataset):
    loader = create_loader(pt_dataset, "train", batch_size=8, num_workers=1, worker_mode="process")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        next(iter(loader))
    assert not [w for w in seen if "pin_memory" in str(w.message)], [str(w.message) for w in seen]
