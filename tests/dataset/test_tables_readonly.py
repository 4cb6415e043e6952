"""Table attributes refuse in-place writes with TableReadOnlyError instead of killing the
process (NOTE [read-only tables] in jasper_mmap/dataset/tables.py); everything else reads as a tensor."""

from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jasper_mmap import JASPERSteeringDataset
from jasper_mmap.errors import TableReadOnlyError


@pytest.fixture
def ds(pt_dataset):
    with JASPERSteeringDataset(pt_dataset, "train") as d:
        yield d


def _step(d, optimizer, **kw):
    """A user training a table directly: the optimizer writes into it."""
    p = torch.nn.Parameter(d.question_embs)
    opt = optimizer([p], lr=0.1, **kw)
    p.sum().backward()
    opt.step()


WRITES = {
    "setitem": lambda d: d.question_embs.__setitem__((0, 0), 1.0),
    "mul_": lambda d: d.source_embs.mul_(2),
    "normalize out=": lambda d: F.normalize(d.question_embs, dim=-1, out=d.question_embs),
    "hard_negatives setitem": lambda d: d.hard_negatives.__setitem__((0, 0), 1),
    "clamp_": lambda d: d.pair_relevance.clamp_(0, 1),
    "+=": lambda d: d.centroid_embs.__iadd__(1),
    "a slice's zero_": lambda d: d.steering_centroid[:3].zero_(),
    "a row's fill_": lambda d: d.question_embs[0].fill_(0),
    "unbind then fill_": lambda d: d.question_embs.unbind(0)[1].fill_(0),
    "transpose then fill_": lambda d: d.question_embs.T.fill_(0),
    "copy_ into": lambda d: d.source_embs.copy_(torch.zeros_like(d.source_embs)),
    "index_put_": lambda d: d.pair_index.index_put_((torch.tensor([0]),), torch.tensor(0)),
    "torch.add out=": lambda d: torch.add(d.question_embs, 1, out=d.question_embs),
    "copy.copy then fill_": lambda d: copy.copy(d.question_embs).fill_(0),
    "torch._foreach_add_": lambda d: torch._foreach_add_([d.question_embs], 1.0),
    "SGD(foreach=True) step": lambda d: _step(d, torch.optim.SGD, foreach=True),
    "AdamW(fused=True) step": lambda d: _step(d, torch.optim.AdamW, fused=True),
    "Adam step": lambda d: _step(d, torch.optim.Adam),
    "F.embedding max_norm": lambda d: F.embedding(
        torch.tensor([0, 1]), d.keyword_embs, max_norm=1e-3
    ),
    "F.batch_norm training": lambda d: F.batch_norm(
        torch.randn(4, d.question_embs.shape[1]),
        d.question_embs[0],
        d.question_embs[1].abs(),
        training=True,
    ),
    "narrow(input=) then fill_": lambda d: torch.narrow(
        input=d.question_embs, dim=0, start=0, length=2
    ).fill_(1),
    "aten.add_": lambda d: torch.ops.aten.add_.Tensor(d.question_embs, 1),
    "meshgrid's second output": lambda d: torch.meshgrid(
        d.question_embs[0], d.source_embs[0], indexing="ij"
    )[1].fill_(1),
    "F.relu inplace=True": lambda d: F.relu(d.centroid_embs, inplace=True),
    "F.dropout inplace (positional)": lambda d: F.dropout(d.centroid_embs, 0.5, True, True),
    "nn.ReLU(inplace=True) forward": lambda d: torch.nn.Sequential(
        torch.nn.ReLU(inplace=True), torch.nn.Linear(d.centroid_embs.shape[1], 2)
    )(d.centroid_embs),
    "nn.init.uniform_ (tensor by keyword)": lambda d: torch.nn.init.uniform_(d.centroid_embs),
    "nn.init.constant_": lambda d: torch.nn.init.constant_(d.source_embs, 1.0),
}


@pytest.mark.parametrize("write", WRITES.values(), ids=WRITES.keys())
def test_in_place_writes_are_refused_and_the_data_is_unchanged(ds, write):
    before = {k: getattr(ds, k).clone() for k in ("question_embs", "source_embs", "pair_index")}
    with pytest.raises(TableReadOnlyError, match=r"read-only view.*\.clone\(\)") as e:
        write(ds)
    assert isinstance(e.value, RuntimeError)
    assert all(torch.equal(getattr(ds, k), v) for k, v in before.items())


def test_the_same_calls_without_writing_run(ds):
    c = ds.centroid_embs
    assert torch.equal(F.relu(c), c.clone().clamp_min(0))
    assert torch.equal(F.dropout(c, 0.5, training=False), c)
    net = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(c.shape[1], 2))
    assert net(c).shape == (c.shape[0], 2)
    assert torch.cdist(ds.question_embs[:4], c).shape == (4, c.shape[0])
    w = ds.keyword_embs
    assert torch.equal(torch.nn.Embedding.from_pretrained(w)(torch.tensor([0, 1])), w[:2])
    x = torch.randn(4, ds.question_embs.shape[1])
    F.batch_norm(x, ds.question_embs[0], ds.question_embs[1].abs(), training=False)
    mine = [torch.zeros(ds.question_embs.shape[1])]
    torch._foreach_add_(mine, [ds.question_embs[0]])  # into the user's own tensors
    assert torch.equal(mine[0], ds.question_embs[0])


def test_a_write_names_the_table_and_the_store(ds):
    with pytest.raises(TableReadOnlyError) as e:
        ds.pair_relevance.clamp_(0, 1)
    assert "pair_relevance" in str(e.value) and str(ds.store.path) in str(e.value)


def test_numpy_views_are_read_only_and_copies_are_the_users(ds):
    q = ds.question_embs
    for view in (q.numpy(), np.asarray(q), q[2:4].numpy()):
        assert not view.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            view[0, 0] = 1.0
    for copy_ in (
        q.clone(),
        q * 2,
        q[torch.tensor([0, 2])],
        F.normalize(q, dim=-1),
        copy.deepcopy(q),
        q.to(torch.float64),
    ):
        assert type(copy_) is torch.Tensor
        copy_.zero_()  # the user's own memory
    assert q.abs().sum() > 0


def test_tables_read_save_and_print_as_plain_tensors(ds):
    q = ds.question_embs
    assert isinstance(q, torch.Tensor) and q.dtype == torch.float32
    assert torch.equal(q @ q.T, q.clone() @ q.clone().T)
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    saved = torch.load(buf)  # weights_only: needs no class of ours
    assert type(saved) is torch.Tensor and torch.equal(saved, q)
    assert type(pickle.loads(pickle.dumps(q))) is torch.Tensor
    assert repr(q[:1, :2]).startswith("tensor(")
    q.requires_grad_(False)  # not a write


def test_a_write_in_a_script_is_a_traceback_not_a_crash(pt_dataset):
    """Before, ``mul_`` on a table was a SIGSEGV: exit -11 and no message."""
    code = (
        "import sys; from jasper_mmap import JASPERSteeringDataset\n"
        "ds = JASPERSteeringDataset(sys.argv[1], 'train', use_mmap=False)\n"
        "ds.question_embs.mul_(2)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(pt_dataset)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "TableReadOnlyError" in r.stderr and "question_embs" in r.stderr
