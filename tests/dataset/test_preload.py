"""Preloading a split (CPU in CI, CUDA where present): equality, fit check, hot reload."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from jasper_mmap import BATCH_KEYS, JASPERSteeringDataset, create_loader, publish_negatives
from jasper_mmap.converters import convert_pt
from jasper_mmap.dataset.preload import PreloadTooLargeError

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.gpu,
    ),
]


def assert_same(a, b):
    for key in BATCH_KEYS:
        assert torch.equal(a[key].cpu(), b[key].cpu()), key


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("split", ["train", "val"])
def test_preloaded_and_mapped_batches_are_identical(store_path, device, split):
    mapped = JASPERSteeringDataset(store_path, split, epoch=7)
    pre = JASPERSteeringDataset(store_path, split, epoch=7, device=device, preload=True)
    idx = np.random.default_rng(0).integers(0, len(mapped), 40)
    for epoch, forced in ((7, None), (0, None), (100, "residual")):
        for ds in (mapped, pre):
            ds.set_epoch(epoch)
            ds.force_steering(forced)
        got = pre.get_batch(idx)
        assert got["question_emb"].device.type == device
        assert_same(mapped.get_batch(idx), got)
    assert pre.memory_usage_mb > mapped.memory_usage_mb
    n, d, k = len(pre), pre.embedding_dim, pre.n_neg
    assert (
        pre.memory_usage_mb * 2**20 >= 4 * d * 3 * n + 8 * n * k
    )  # steering tables + negatives at least


@pytest.mark.parametrize("device", DEVICES)
def test_fit_check_refuses_with_sizes_and_a_suggestion(store_path, device):
    with pytest.raises(
        PreloadTooLargeError,
        match=r"needs \d+\.\d MB .*only 0\.0 MB are available.*memory-mapped CPU",
    ):
        JASPERSteeringDataset(
            store_path, "train", device=device, preload=True, preload_budget_bytes=1000
        )
    with pytest.raises(MemoryError):  # also the builtin users catch
        JASPERSteeringDataset(
            store_path, "train", device=device, preload=True, preload_budget_bytes=1000
        )
    ok = JASPERSteeringDataset(
        store_path, "val", device=device, preload=True, preload_budget_bytes=10**8
    )
    assert ok.memory_usage_mb * 2**20 < 10**8


@pytest.mark.parametrize("device", DEVICES)
def test_hot_reload_on_a_preloaded_dataset(tmp_path, pt_dataset, device):
    store = convert_pt(pt_dataset, tmp_path / "store", progress=False)
    pre = JASPERSteeringDataset(store, "train", device=device, preload=True, report_generation=True)
    mapped = JASPERSteeringDataset(store, "train", report_generation=True)
    rng = np.random.default_rng(3)
    publish_negatives(store, rng.integers(0, 120, (120, 6)), rng.integers(1, 5, (120, 6)))
    assert pre.reload_negatives() == 1 and mapped.reload_negatives() == 1
    idx = np.arange(len(pre))
    got = pre.get_batch(idx)
    assert_same(mapped.get_batch(idx), got)
    assert (got["negatives_generation"].cpu() == 1).all()


@pytest.mark.parametrize("device", DEVICES)
def test_seed_pattern_plain_dataloader_and_fast_path(store_path, device):
    pre = JASPERSteeringDataset(store_path, "train", device=device, preload=True)
    loader = DataLoader(pre, batch_size=16, shuffle=True)
    seen = torch.cat([b["relevance"].cpu() for b in loader])
    assert seen.shape == (len(pre),)
    batches = list(pre.iter_batches(16, shuffle=True))
    assert sum(b["relevance"].shape[0] for b in batches) == len(pre)
    again = list(pre.iter_batches(16, shuffle=True))
    assert all(
        torch.equal(a["relevance"], b["relevance"]) for a, b in zip(batches, again, strict=True)
    )
    fast = create_loader(
        store_path, "train", 16, device=device, preload=True, shuffle=False, drop_last=False
    )
    assert_same(next(iter(fast)), pre.get_batch(np.arange(16)))


def test_cpu_preload_in_dataloader_workers_is_rebuilt_per_worker(store_path):
    loader = create_loader(store_path, "val", 4, num_workers=2, preload=True, shuffle=False)
    mapped = JASPERSteeringDataset(store_path, "val")
    for k, batch in enumerate(loader):
        assert_same(mapped.get_batch(np.arange(4 * k, min(4 * k + 4, len(mapped)))), batch)


@pytest.mark.gpu
def test_cuda_loader_refuses_workers(store_path):
    with pytest.raises(ValueError, match="num_workers should be 0"):
        create_loader(store_path, "val", 4, num_workers=2, device="cuda")


def test_cuda_without_a_gpu_is_a_clear_error(store_path, monkeypatch):
    """The README's GPU snippet run on a machine without CUDA: our error, not torch's."""
    from jasper_mmap.errors import DeviceUnavailableError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for call in (
        lambda: JASPERSteeringDataset(store_path, "val", device="cuda"),
        lambda: create_loader(store_path, "val", 4, device="cuda:0"),
    ):
        with pytest.raises(DeviceUnavailableError, match="CUDA is not available") as e:
            call()
        assert isinstance(e.value, RuntimeError) and "device=None" in str(e.value)
