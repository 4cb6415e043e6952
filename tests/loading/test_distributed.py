"""create_loader(distributed=True) on a real two-process gloo group."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp_mp

from jasper_mmap import create_loader, set_epoch


def _rank(rank: int, world: int, init: str, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        result = {}
        for split in ("train", "val"):
            workers = 2 if split == "train" else 0  # gather threads on the train split
            loader = create_loader(
                store, split, batch_size=4, distributed=True, drop_last=False, num_workers=workers
            )
            for epoch in (0, 1):
                set_epoch(loader, epoch)
                order = list(iter(loader.sampler_obj))
                rel = torch.cat([b["relevance"] for b in loader]).numpy()
                want = loader.dataset_obj.get_batch(order)["relevance"].numpy()
                assert np.array_equal(rel, want)
                assert loader.dataset_obj.epoch == epoch
                result[f"{split}{epoch}"] = np.array(order)
        np.savez(f"{out}/rank{rank}.npz", **result)
    finally:
        dist.destroy_process_group()


def test_two_ranks_get_disjoint_covering_epoch_shuffled_shards(tmp_path, store_path):
    init = f"file://{tmp_path / 'pg'}"
    ctx = tmp_mp.start_processes(
        _rank,
        args=(2, init, str(store_path), str(tmp_path)),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    while not ctx.join(timeout=120):
        pass
    r = [np.load(tmp_path / f"rank{i}.npz") for i in range(2)]
    for split, n in (("train", 96), ("val", 12)):
        for epoch in (0, 1):
            a, b = r[0][f"{split}{epoch}"], r[1][f"{split}{epoch}"]
            assert len(a) == len(b) == -(-n // 2)
            assert set(a) | set(b) == set(range(n))  # covering
            if n % 2 == 0:
                assert not set(a) & set(b)  # disjoint (padding repeats only for odd sizes)
    assert not np.array_equal(r[0]["train0"], r[0]["train1"])  # train reshuffles per epoch
    assert np.array_equal(r[0]["val0"], r[0]["val1"]) and np.array_equal(
        r[0]["val0"], np.arange(0, 12, 2)
    )
