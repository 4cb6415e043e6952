"""Issue 24, the dataset and loader items: indices are integers only (item 7), every batch
output is checked for NaN/Inf (item 8), a loader without batches is a JasperError (item 12),
a forked child that is not a DataLoader worker has its own control block and never hangs
(item 6), and a table attribute can never kill the interpreter, ``.data =`` included (item 3)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from jasper_mmap import JASPERSteeringDataset, create_loader, validate_first_batch
from jasper_mmap.errors import JasperError, SampleIndexTypeError
from jasper_mmap.loading.loader import BatchValidationError
from jasper_mmap.synthetic import SyntheticSpec, make_pt_dataset


@pytest.fixture(scope="module")
def ds(pt_dataset):
    with JASPERSteeringDataset(pt_dataset, "train") as d:
        yield d


# -- item 7: integer indices only, everywhere ------------------------------------------------

NOT_INTEGERS = {
    "bool mask": lambda n: np.ones(n, dtype=bool),
    "bool tensor": lambda n: torch.tensor([True, False, True]),
    "python bools": lambda n: [True, False],
    "floats": lambda n: [0.0, 1.7],
    "float tensor": lambda n: torch.tensor([1.0, 2.0]),
    "float32 array": lambda n: np.array([3.9], dtype=np.float32),
    "objects": lambda n: [1, None],
}


@pytest.mark.parametrize("make", NOT_INTEGERS.values(), ids=NOT_INTEGERS.keys())
@pytest.mark.parametrize("preload", [False, True])
def test_indices_that_are_not_integers_are_refused_never_cast(pt_dataset, make, preload):
    with JASPERSteeringDataset(pt_dataset, "train", preload=preload) as d:
        bad = make(len(d))
        for call in (d.get_batch, d.__getitems__, d.__getitem__):
            with pytest.raises(SampleIndexTypeError, match=r"should be .*int") as e:
                call(bad)
            assert isinstance(e.value, TypeError) and isinstance(e.value, JasperError)
        assert d.plan_batches([bad]) is None  # no plan of cast indices; the batch raises


def test_the_message_names_the_dataset_and_the_fix(ds):
    """The directory the user passed, not the hidden store inside it (issue 24 item 17)."""
    with pytest.raises(SampleIndexTypeError) as e:
        ds.get_batch(np.ones(4, dtype=bool))
    msg = str(e.value)
    assert msg.startswith(f"{ds.dataset_dir}: ") and "boolean mask" in msg
    assert "np.flatnonzero(mask)" in msg


def test_a_loader_with_float_batches_raises_in_every_mode(pt_dataset):
    for mode, workers in (("thread", 0), ("thread", 2), ("process", 0)):
        loader = create_loader(
            pt_dataset,
            "train",
            batch_size=4,
            num_workers=workers,
            worker_mode=mode,
            batch_sampler=[[0.0, 1.5, 2.0]],
            pin_memory=False,
        )
        with pytest.raises(SampleIndexTypeError):
            next(iter(loader))


def test_integer_indices_of_every_kind_still_work(ds):
    want = ds.get_batch([1, 2, 3])
    for idx in (
        np.array([1, 2, 3], dtype=np.uint8),
        np.array([[1, 2, 3]], dtype=np.int32),
        torch.tensor([1, 2, 3]),
        (1, 2, 3),
        range(1, 4),
    ):
        got = ds.get_batch(idx)
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert ds.get_batch([])["relevance"].shape == (0,)


# -- item 8: every output is checked for NaN/Inf ------------------------------------------------


def _corrupting(key, value):
    def collate(data):
        batch = dict(data.batch)
        batch[key] = batch[key].clone()
        batch[key].view(-1)[:] = value  # the whole output: NaN fails every range comparison
        return batch

    return collate


FLOAT_KEYS = (
    "relevance",
    "centroid_distance",
    "question_emb",
    "target_source_emb",
    "steering",
    "negative_embs",
)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_non_finite_values_in_any_output_are_refused(pt_dataset, key, value):
    loader = create_loader(
        pt_dataset, "train", batch_size=4, pin_memory=False, collate_fn=_corrupting(key, value)
    )
    for cls in (BatchValidationError, AssertionError, ValueError):
        with pytest.raises(cls, match=rf"{key} holds NaN/Inf in batch rows \[0, 1, 2, 3\]"):
            validate_first_batch(loader)


# -- item 12: a loader with no batches -----------------------------------------------------------


def test_a_loader_without_batches_is_a_jasper_error_naming_the_fix(pt_dataset):
    n = len(JASPERSteeringDataset(pt_dataset, "train"))
    loader = create_loader(pt_dataset, "train", batch_size=n + 1, pin_memory=False)  # drop_last
    with pytest.raises(BatchValidationError) as e:
        validate_first_batch(loader)
    assert isinstance(e.value, JasperError) and isinstance(e.value, AssertionError)
    msg = str(e.value)
    assert "yields no batches" in msg and f"batch_size={n + 1}" in msg
    assert "drop_last=False" in msg and str(loader.dataset_obj.store_path) in msg


# -- item 6: a forked child that is not a DataLoader worker ---------------------------------------

_FORK_SCRIPT = r"""
import os, sys, time
import numpy as np, torch
from jasper_mmap import JASPERSteeringDataset

ds = JASPERSteeringDataset(sys.argv[1], "train")
idx = np.arange(len(ds))
before = ds.get_batch(idx)  # the parent gathers on torch's intra-op (OpenMP) threads
before = {k: v.clone() for k, v in before.items()}
r, w = os.pipe()
pid = os.fork()
if pid == 0:  # the user's own child: its changes are its own, and it reads batches
    ds.set_epoch(7)
    ds.force_steering("zero")
    b = ds.get_batch(idx)
    ok = ds.epoch == 7 and bool((b["steering_variant"] == 0).all())
    # the child's own DataLoader workers (fork) follow the child, not the grandparent
    loader = torch.utils.data.DataLoader(
        ds, batch_size=64, num_workers=2, multiprocessing_context="fork",
        persistent_workers=True, collate_fn=lambda s: s.batch,
    )
    first = next(iter(loader))
    ds.force_steering("centroid")
    later = next(iter(loader))
    ok = ok and bool((first["steering_variant"] == 0).all())
    ok = ok and bool((later["steering_variant"] == 1).all())
    os.write(w, b"ok" if ok else b"wrong")
    os._exit(0)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
    time.sleep(0.05)
else:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    print("CHILD HUNG"); sys.exit(3)
print("child:", os.read(r, 16).decode(), "status", status)
after = ds.get_batch(idx)
same = ds.epoch == 0 and all(torch.equal(after[k], before[k]) for k in before)
print("parent unchanged:", same)
ds.set_epoch(3)  # and the parent's own changes still work
print("parent epoch:", ds.epoch)
"""


@pytest.mark.slow
def test_a_forked_child_has_its_own_control_block_and_never_hangs(tmp_path):
    # rows large enough that a batch gathers with torch.index_select on the intra-op threads
    src = make_pt_dataset(tmp_path / "ds", SyntheticSpec(n_pairs=2000, dim=64))
    r = subprocess.run(
        [sys.executable, "-c", _FORK_SCRIPT, str(src)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = r.stdout + r.stderr[-3000:]
    assert r.returncode == 0, out
    assert "child: ok status 0" in r.stdout, out
    assert "parent unchanged: True" in r.stdout and "parent epoch: 3" in r.stdout, out


_FORK_CONTROL_SCRIPT = r"""
import os, sys
from jasper_mmap import JASPERSteeringDataset

ds = JASPERSteeringDataset(sys.argv[1], "train")
ds.get_batch([0, 1])
pid = os.fork()
if pid == 0:
    ds.set_epoch(9)
    ds.force_steering("residual")
    ds.steering_probs = {"zero": 1.0, "centroid": 0.0, "keyword": 0.0, "residual": 0.0}
    os._exit(0 if ds.epoch == 9 else 1)
_, status = os.waitpid(pid, 0)
snap = ds._control.snapshot()
print("parent:", status, snap.epoch, snap.forced, snap.override)
"""


def test_a_forked_childs_set_epoch_and_force_steering_stay_in_the_child(pt_dataset):
    r = subprocess.run(
        [sys.executable, "-c", _FORK_CONTROL_SCRIPT, str(pt_dataset)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "parent: 0 0 -1 None" in r.stdout, r.stdout + r.stderr[-3000:]


# -- item 3: no table attribute can kill the interpreter ------------------------------------------

_DATA_SCRIPT = r"""
import hashlib, pathlib, sys
import torch
import jasper_mmap.dataset.tables as tables
from jasper_mmap import JASPERSteeringDataset

store, small = pathlib.Path(sys.argv[1]), int(sys.argv[2])
tables.SMALL_TABLE_BYTES = small  # 0: every table is a copy-on-write map of the store's file
digest = lambda: {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in store.rglob("*.safetensors")}
files = digest()
ds = JASPERSteeringDataset(store, "train")
before = ds.get_batch(list(range(8)))
before = {k: v.clone() for k, v in before.items()}
for attr in ("centroid_embs", "keyword_embs", "question_embs", "source_embs", "steering_residual"):
    table = getattr(ds, attr)
    want = table.clone()
    layer = torch.nn.Linear(table.shape[1], table.shape[0])
    layer.weight.data = table  # initialise a head from the table, as with the in-RAM dataset
    for opt in (torch.optim.SGD(layer.parameters(), lr=1.0), torch.optim.Adam(layer.parameters())):
        layer(torch.randn(3, table.shape[1])).sum().backward()
        opt.step()
    mine = torch.empty(0).set_(getattr(ds, attr).untyped_storage())
    mine.fill_(5.0)
    fresh = getattr(JASPERSteeringDataset(store, "train"), attr)
    assert torch.equal(fresh, want), attr  # another dataset, and the file, never see the writes
for attr in ("hard_negatives", "pair_index", "split_indices"):
    torch.empty(0, dtype=torch.int64).set_(getattr(ds, attr).untyped_storage()).fill_(10**9)
after = ds.get_batch(list(range(8)))
assert all(torch.equal(after[k], before[k]) for k in before), "batches changed"
assert digest() == files, "the store's files changed"
print("survived")
"""


@pytest.mark.slow
@pytest.mark.parametrize("small", [32 << 20, 0], ids=["copied", "copy-on-write"])
def test_data_assignment_then_optimizer_step_never_kills_the_process(store_path, small):
    """Before: ``layer.weight.data = ds.centroid_embs`` then ``optimizer.step()`` was a
    SIGSEGV (exit -11/139) on a safetensors store: the Parameter wrote into the read-only map."""
    r = subprocess.run(
        [sys.executable, "-c", _DATA_SCRIPT, str(store_path), str(small)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, (r.returncode, r.stdout[-1000:], r.stderr[-3000:])
    assert "survived" in r.stdout


@pytest.fixture
def cow(monkeypatch):
    """Every table of a safetensors store a copy-on-write map (the path of large tables)."""
    import jasper_mmap.dataset.tables as tables

    monkeypatch.setattr(tables, "SMALL_TABLE_BYTES", 0)


def test_copy_on_write_tables_are_bit_identical_and_still_refuse_writes(pt_dataset, cow):
    from test_tables_readonly import WRITES

    from jasper_mmap.dataset.tables import TABLES
    from jasper_mmap.errors import TableReadOnlyError

    with JASPERSteeringDataset(pt_dataset, "train") as d:
        copied = {}
        for attr in TABLES:
            t = getattr(d, attr)
            if isinstance(t, torch.Tensor):
                copied[attr] = t.clone()
                assert t._table_owned == 0  # a map: its untouched pages are the page cache's
        for write in WRITES.values():
            with pytest.raises(TableReadOnlyError):
                write(d)
        for attr, want in copied.items():
            assert torch.equal(getattr(d, attr), want), attr
    with JASPERSteeringDataset(pt_dataset, "train") as plain:  # copied (small) tables
        for attr, want in copied.items():
            got = getattr(plain, attr)
            assert got.dtype == want.dtype and torch.equal(got, want), attr


def test_small_tables_are_copies_counted_in_memory_usage(pt_dataset):
    with JASPERSteeringDataset(pt_dataset, "train") as d:
        held = d.memory_usage_mb
        c = d.centroid_embs
        assert c._table_owned == c.numel() * 4
        assert d.memory_usage_mb * 2**20 == pytest.approx(held * 2**20 + c._table_owned)


def test_a_refused_copy_on_write_map_is_a_memory_error_naming_the_fix(pt_dataset, cow, monkeypatch):
    import errno

    import jasper_mmap.dataset.tables as tables
    from jasper_mmap.errors import TableMemoryError

    def refused(*a, **k):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    allowed = tables._map_copy_on_write
    monkeypatch.setattr(tables, "_map_copy_on_write", refused)
    with JASPERSteeringDataset(pt_dataset, "train") as d:
        with pytest.raises(TableMemoryError) as e:
            _ = d.question_embs
        assert isinstance(e.value, MemoryError) and isinstance(e.value, JasperError)
        msg = str(e.value)
        assert msg.startswith(f"question_embs ({d.store_path}): the kernel refused")
        assert "vm.overcommit_memory" in msg and "dataset.store.gather('question_embs'" in msg
        monkeypatch.setattr(tables, "_map_copy_on_write", allowed)
        assert d.get_batch([0])["question_emb"].shape == (1, 16)  # batches are unaffected
        assert d.question_embs.shape[1] == 16  # and the table once the kernel allows it


def test_a_store_file_replaced_since_opening_is_never_mixed_in(pt_dataset, tmp_path, cow):
    import os
    import shutil

    from jasper_mmap.errors import StoreReplacedError

    d = JASPERSteeringDataset(pt_dataset, "train")
    store = tmp_path / "store"
    shutil.copytree(d.store_path, store)
    with JASPERSteeringDataset(store, "train") as ds:
        ds.get_batch([0, 1])  # the store maps its files
        f = store / ds.store.entry("question_embs")["file"]
        shutil.copyfile(f, tmp_path / "other")
        os.replace(tmp_path / "other", f)  # another file (inode) under the same name
        with pytest.raises(StoreReplacedError, match=r"was replaced since this dataset opened it"):
            _ = ds.question_embs


_KEYWORD_ARRAYS_SCRIPT = r"""
import sys, warnings
import torch
from jasper_mmap import JASPERSteeringDataset

warnings.simplefilter("ignore")
ds = JASPERSteeringDataset(sys.argv[1], "train")
want = ds.pair_keyword_ids[3]
torch.from_numpy(ds.pair_keyword_ids.values).fill_(0)  # the list's public arrays
torch.from_numpy(ds.pair_keyword_ids.offsets).fill_(0)
assert JASPERSteeringDataset(sys.argv[1], "train").pair_keyword_ids[3] == want
print("survived")
"""


def test_the_keyword_lists_arrays_are_never_the_read_only_map(pt_dataset):
    """Before: ``torch.from_numpy(ds.pair_keyword_ids.values).fill_(0)``: SIGSEGV (exit 139)."""
    r = subprocess.run(
        [sys.executable, "-c", _KEYWORD_ARRAYS_SCRIPT, str(pt_dataset)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "survived" in r.stdout, (r.returncode, r.stderr[-3000:])
