"""Recycled output buffers (NOTE [recycled batch buffers]): reused only when nothing refers to
them, so a batch, a view, a numpy array or a tensor saved for backward is never overwritten."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from jasper_mmap import JASPERSteeringDataset, create_loader
from jasper_mmap.dataset.outputs import BufferPool

KEYS = ("question_emb", "target_source_emb", "steering", "negative_embs", "negative_tiers")


@pytest.fixture(scope="module")
def st_store(tmp_path_factory, pt_dataset):
    from jasper_mmap.converters import convert_pt

    return convert_pt(pt_dataset, tmp_path_factory.mktemp("buf") / "s", progress=False)


def loader_of(store, workers: int):
    gen = torch.Generator().manual_seed(11)
    return create_loader(store, "train", 8, num_workers=workers, generator=gen)


def cloned(loader) -> list[dict[str, torch.Tensor]]:
    return [{k: b[k].clone() for k in KEYS} for b in loader]


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_kept_whole_are_never_overwritten(st_store, workers):
    expected = cloned(loader_of(st_store, workers))
    kept = list(loader_of(st_store, workers))  # every batch held, none copied
    assert len(kept) == len(expected) > 8  # more batches than the pool keeps per shape
    for got, want in zip(kept, expected, strict=True):
        for k in KEYS:
            assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("workers", [0, 2])
def test_views_numpy_arrays_and_single_tensors_keep_their_rows(st_store, workers):
    """Only a part of some batches is kept; the batch dicts themselves are dropped."""
    expected = cloned(loader_of(st_store, workers))
    kept = []
    for i, b in enumerate(loader_of(st_store, workers)):
        if i % 3 == 0:
            kept.append((i, "view", b["negative_embs"][1:3, 2]))
        elif i % 3 == 1:
            kept.append((i, "numpy", b["question_emb"].numpy()))
        else:
            kept.append((i, "tensor", b["steering"]))
    for i, how, part in kept:
        if how == "view":
            assert torch.equal(part, expected[i]["negative_embs"][1:3, 2])
        elif how == "numpy":
            np.testing.assert_array_equal(part, expected[i]["question_emb"].numpy())
        else:
            assert torch.equal(part, expected[i]["steering"])


def test_buffers_are_reused_once_released_and_memory_stays_bounded(st_store):
    ds = JASPERSteeringDataset(st_store, "train")
    seen = set()
    for _ in range(30):
        batch = ds.get_batch(list(range(8)))
        seen.add(batch["question_emb"].data_ptr())
        del batch
    assert len(seen) == 1  # the same buffer every time once the batch is dropped
    held = [ds.get_batch(list(range(8))) for _ in range(20)]
    assert len({b["question_emb"].data_ptr() for b in held}) == 20  # never shared while held
    one = sum(t.numel() * t.element_size() for t in held[0].values())
    assert ds._pool.nbytes() <= ds._pool.capacity * one


def test_inputs_autograd_saved_for_backward_are_not_reused(st_store):
    ds = JASPERSteeringDataset(st_store, "train")
    dim = ds.embedding_dim
    torch.manual_seed(0)
    w = torch.randn(dim, dim, requires_grad=True)
    batch = ds.get_batch(list(range(8)))
    q_copy = batch["question_emb"].clone()
    loss = (batch["question_emb"] @ w).square().sum()  # autograd saves question_emb
    del batch
    for _ in range(10):  # would reuse the buffer if the saved tensor did not hold it
        ds.get_batch(list(range(8, 16)))
    loss.backward()
    want = torch.autograd.grad(((q_copy @ w).square().sum()), w)[0]
    torch.testing.assert_close(w.grad, want)


def test_the_pool_never_hands_one_array_to_two_threads():
    pool = BufferPool(capacity=4)
    errors = []

    def work(tid: int) -> None:
        for _ in range(200):
            a = pool.empty((64,), np.int64)
            a.fill(tid)
            time.sleep(0)
            if not (a == tid).all():
                errors.append(tid)
            del a

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert pool.nbytes() <= 4 * 64 * 8


def test_a_pool_of_capacity_zero_always_allocates():
    pool = BufferPool(capacity=0)
    for _ in range(3):
        a = pool.empty((4,), np.float32)
        assert a.shape == (4,) and a.dtype == np.float32
        del a
    assert pool.nbytes() == 0


def test_a_pickled_dataset_carries_no_buffers(st_store):
    import pickle

    ds = JASPERSteeringDataset(st_store, "train")
    held = [ds.get_batch(list(range(8))) for _ in range(3)]
    assert ds._pool.nbytes() > 0
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._pool.nbytes() == 0 and clone._pool.capacity == ds._pool.capacity
    assert torch.equal(clone.get_batch(list(range(8)))["question_emb"], held[0]["question_emb"])
