"""GPU throughput: preloaded batched gathering vs the memory-mapped CPU path vs the seed's way.

    python scripts/bench_gpu.py --workdir bench_out --pairs 200000 [--split train]

One run, one GPU, B=128, D=384, n_neg=12:
  (i)   `JASPERSteeringDataset(..., device="cuda")` + `iter_batches` (gathered on the GPU);
  (ii)  memory-mapped CPU path: `create_loader(..., pin_memory=True)` for num_workers 0 and 4,
        each batch copied to the GPU with `non_blocking=True`;
  (iii) the seed's in-RAM dataset on the GPU: every tensor on the GPU, one `__getitem__` per
        sample (per-sample indexing and steering draw), default collate stacking on the GPU.
Target: (i) at least 20x (iii). Needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from benchlib import NAMES, B, ensure_dataset

from jasper_mmap import JASPERSteeringDataset, create_loader
from jasper_mmap.steering import SteeringSchedule


class SeedGpuDataset(torch.utils.data.Dataset):
    """The seed's way on the GPU: all tensors on the device, one sample per __getitem__."""

    def __init__(self, src: Path, split: str) -> None:
        self.t = {n: torch.load(src / f"{n}.pt", weights_only=True).cuda() for n in NAMES}
        self.idx = torch.load(src / f"{split}_idx.pt", weights_only=True).cuda()
        probs = SteeringSchedule.from_config(json.loads((src / "config.json").read_text())).probs(0)
        self.probs = torch.tensor(probs, dtype=torch.float32, device="cuda")
        self.gen = torch.Generator(device="cuda").manual_seed(42)

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        t = self.t
        p = self.idx[i]
        q, s = t["pair_index"][p]
        v = torch.multinomial(self.probs, 1, generator=self.gen)[0]
        steer = torch.stack(
            [
                torch.zeros_like(t["steering_centroid"][p]),
                t["steering_centroid"][p],
                t["steering_keyword_weighted"][p],
                t["steering_residual"][p],
            ]
        )[v]
        return {
            "question_emb": t["question_embs"][q],
            "target_source_emb": t["source_embs"][s],
            "steering": steer,
            "negative_embs": t["source_embs"][t["hard_negatives"][p]],
            "cluster_id": t["pair_cluster_id"][p],
            "relevance": t["pair_relevance"][p],
            "centroid_distance": t["centroid_distances"][p],
            "steering_variant": v,
            "negative_tiers": t["negative_tiers"][p],
        }


def rate(batches, limit: int) -> float:
    """Samples/s over at most ``limit`` batches, GPU work included (synchronized)."""
    torch.cuda.synchronize()
    t, n = time.perf_counter(), 0
    for k, batch in enumerate(batches):
        n += batch["question_emb"].shape[0]
        if k + 1 >= limit:
            break
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t)


def to_gpu(loader):
    for batch in loader:
        yield {k: v.cuda(non_blocking=True) for k, v in batch.items()}


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workdir", type=Path, default=Path("bench_out"))
    ap.add_argument("--pairs", type=int, default=200000)
    ap.add_argument("--split", default="train")
    ap.add_argument("--batches", type=int, default=1000)
    args = ap.parse_args()
    print("$", " ".join([sys.executable, *sys.argv]))
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    src, store = ensure_dataset(args.workdir, args.pairs)
    t = time.perf_counter()
    pre = JASPERSteeringDataset(store, args.split, device="cuda")
    print(
        f"preload of {len(pre)} samples: {time.perf_counter() - t:.2f} s, {pre.memory_usage_mb:.0f} MB on GPU"
    )
    rates = {}
    rate(pre.iter_batches(B, shuffle=True), 20)  # warm-up
    rates["(i) GPU preload, batched gather (iter_batches)"] = rate(
        pre.iter_batches(B, shuffle=True), args.batches
    )
    for workers in (0, 4):
        loader = create_loader(
            store,
            args.split,
            B,
            num_workers=workers,
            pin_memory=True,
            persistent_workers=workers > 0,
        )
        rate(to_gpu(loader), 20)
        rates[f"(ii) memory-mapped CPU + pin_memory + copy, num_workers={workers}"] = rate(
            to_gpu(loader), args.batches
        )
    seed = SeedGpuDataset(src, args.split)
    seed_loader = torch.utils.data.DataLoader(seed, batch_size=B, shuffle=True)
    rate(seed_loader, 3)
    rates["(iii) seed's in-RAM per-sample dataset on the GPU"] = rate(
        seed_loader, max(10, args.batches // 20)
    )
    for name, r in rates.items():
        print(f"  {name:62s} {r:10.0f} samples/s")
    first = next(iter(rates.values()))
    print(f"  (i)/(iii) = {first / rates[list(rates)[-1]]:.0f}x (target >= 20x)")
    return 0


if __name__ == "__main__":
    np.random.seed(0)
    sys.exit(main())
