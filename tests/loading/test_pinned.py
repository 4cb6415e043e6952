"""``pin_memory=True`` with CUDA: batches are gathered straight into pinned tensors (no copy
after the gather) and are the same batches as without pinning.

Without a GPU, pinning itself cannot happen; the first test then stands in torch's allocator
with one that records what the loader asked for as pinned, and checks that every output of
every batch lives in such an allocation. The CUDA tests check real pinning, non-blocking
copies and the reuse of pinned blocks; they skip without a CUDA device."""

from __future__ import annotations

import pytest
import torch

from jasper_mmap import BATCH_KEYS, create_loader

cuda = pytest.mark.gpu


def loader_of(store, workers: int, pin: bool, **kw):
    gen = torch.Generator().manual_seed(7)  # the same shuffled order for every loader
    return create_loader(
        store, "train", 8, num_workers=workers, pin_memory=pin, generator=gen, **kw
    )


def storage_of(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.fixture(scope="module")
def reference(store_path):
    """The batches of a loader without pinning (cloned: they outlive the pool's buffers)."""
    return [{k: b[k].clone() for k in BATCH_KEYS} for b in loader_of(store_path, 0, False)]


@pytest.mark.parametrize("workers", [0, 2, 4])
def test_pinned_outputs_are_the_gathers_own_buffers_and_the_same_batches(
    store_path, reference, workers, monkeypatch
):
    pinned: dict[int, torch.Tensor] = {}  # storage address -> the tensor asked for as pinned
    real_empty = torch.empty

    def empty(*args, pin_memory=False, **kw):
        t = real_empty(*args, **kw)
        if pin_memory:
            pinned[storage_of(t)] = t  # kept alive: an address is never reused meanwhile
        return t

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    loader = loader_of(store_path, workers, True)
    got = 0
    for batch, ref in zip(loader, reference, strict=True):
        for k in BATCH_KEYS:
            assert torch.equal(batch[k], ref[k]), k
            # in a pinned allocation of the gather itself: nothing copies it afterwards
            assert storage_of(batch[k]) in pinned, f"{k} is not in a pinned buffer"
        got += 1
    assert got == len(reference) > 3


@cuda
@pytest.mark.parametrize("workers", [0, 4])
def test_pinned_batches_copy_to_the_gpu_without_blocking(store_path, reference, workers):
    loader = loader_of(store_path, workers, True)
    stream = torch.cuda.Stream()
    for batch, ref in zip(loader, reference, strict=True):
        assert all(batch[k].is_pinned() for k in BATCH_KEYS)
        with torch.cuda.stream(stream):
            on_gpu = {k: batch[k].to("cuda", non_blocking=True) for k in BATCH_KEYS}
        stream.synchronize()
        for k in BATCH_KEYS:
            assert torch.equal(on_gpu[k].cpu(), ref[k]), k


@cuda
def test_pinned_blocks_are_reused_across_batches(store_path):
    """torch's caching host allocator hands a freed pinned block out again: over many
    batches the outputs live in far fewer distinct blocks than they were allocated."""
    loader = loader_of(store_path, 2, True)
    seen, outputs = set(), 0
    for _ in range(4):
        for batch in loader:
            seen.update(storage_of(batch[k]) for k in BATCH_KEYS)
            outputs += len(BATCH_KEYS)
            del batch
    assert len(seen) < outputs / 4, (len(seen), outputs)
