"""The main job: synthetic data -> convert-pt -> train a JASPER predictor through create_loader.

    python scripts/main_job.py [--workdir example_out] [--pairs 20000] [--epochs 6]

Makes a small synthetic `.pt` dataset, converts it into a store (a progress bar on a terminal), and
trains the in-RAM dataset's example `SimpleJASPERPredictor` with its InfoNCE loss for a few epochs
through `create_loader` (2 gather threads, steering curriculum). Prints per-epoch
train/val loss, throughput and memory, then the example's zero-vs-centroid steering validation
comparison, and saves a PNG plot of the loss curves.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from jasper_mmap import create_loader, set_epoch, validate_first_batch
from jasper_mmap.converters import convert_pt
from jasper_mmap.synthetic import SyntheticSpec, make_pt_dataset


class SimpleJASPERPredictor(nn.Module):
    """Predict the target embedding from the question and the steering vector (the in-RAM dataset's example)."""

    def __init__(self, embedding_dim: int, hidden_dim: int = 512) -> None:
        super().__init__()
        self.predictor = nn.Sequential(
            nn.Linear(embedding_dim * 2, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, embedding_dim),
        )

    def forward(self, question_emb: torch.Tensor, steering: torch.Tensor) -> torch.Tensor:
        return self.predictor(torch.cat([question_emb, steering], dim=-1))


def contrastive_loss(predicted, target, negatives, temperature: float = 0.07) -> torch.Tensor:
    """InfoNCE: the target against the batch's hard negatives (the example's loss)."""
    predicted, target = F.normalize(predicted, dim=-1), F.normalize(target, dim=-1)
    negatives = F.normalize(negatives, dim=-1)
    pos = (predicted * target).sum(-1, keepdim=True) / temperature
    neg = torch.bmm(negatives, predicted.unsqueeze(-1)).squeeze(-1) / temperature
    logits = torch.cat([pos, neg], dim=1)
    labels = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, labels)


def rss_anon_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("RssAnon:"))


def run_epoch(model, loader, optimizer=None) -> tuple[float, int, float]:
    """Mean loss, samples and seconds of one pass (trains when an optimizer is given)."""
    total, n, t = 0.0, 0, time.perf_counter()
    model.train(optimizer is not None)
    with torch.set_grad_enabled(optimizer is not None):
        for batch in loader:
            pred = model(batch["question_emb"], batch["steering"])
            loss = contrastive_loss(pred, batch["target_source_emb"], batch["negative_embs"])
            if optimizer is not None:
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            total += loss.item() * len(pred)
            n += len(pred)
    return total / max(n, 1), n, time.perf_counter() - t


def train(store: Path, epochs: int, workers: int, batch_size: int = 128, log=print) -> dict:
    """Train and validate; return the per-epoch losses and the steering comparison."""
    torch.manual_seed(0)
    kw = dict(num_workers=workers)  # gather threads (NOTE [thread loading])
    train_loader = create_loader(store, "train", batch_size, **kw)
    val_loader = create_loader(store, "val", batch_size, **kw)
    validate_first_batch(train_loader)
    model = SimpleJASPERPredictor(train_loader.dataset_obj.embedding_dim)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    history = {"train": [], "val": []}
    for epoch in range(epochs):
        set_epoch(train_loader, epoch)
        loss, n, secs = run_epoch(model, train_loader, optimizer)
        val, _, _ = run_epoch(model, val_loader)
        history["train"].append(loss)
        history["val"].append(val)
        probs = train_loader.dataset_obj.steering_probs
        log(
            f"epoch {epoch}: train {loss:.4f}  val {val:.4f}  {n / secs:,.0f} samples/s  "
            f"P(zero)={probs['zero']:.2f}  RssAnon {rss_anon_mb():.0f} MB"
        )
    for variant in ("zero", "centroid"):
        val_loader.dataset_obj.force_steering(variant)
        history[f"val_{variant}"] = run_epoch(model, val_loader)[0]
    val_loader.dataset_obj.force_steering(None)
    return history


def plot(history: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("train", "val"):
        ax.plot(range(len(history[key])), history[key], marker="o", label=f"{key} loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("InfoNCE loss")
    ax.set_title("SimpleJASPERPredictor on a synthetic JASPER dataset")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--workdir",
        type=Path,
        default=Path("example_out"),
        help="where the dataset, its store and the plot go (default: %(default)s)",
    )
    ap.add_argument(
        "--pairs", type=int, default=20000, help="synthetic pairs (default: %(default)s)"
    )
    ap.add_argument(
        "--dim", type=int, default=384, help="embedding dimension (default: %(default)s)"
    )
    ap.add_argument("--epochs", type=int, default=6, help="training epochs (default: %(default)s)")
    ap.add_argument(
        "--workers",
        type=int,
        default=2,
        help="create_loader's num_workers (gather threads) (default: %(default)s)",
    )
    args = ap.parse_args()
    t0 = time.perf_counter()
    src, store = args.workdir / "pt_dataset", args.workdir / "store"
    spec = SyntheticSpec(n_pairs=args.pairs, dim=args.dim, n_neg=12, n_keywords=2000, n_clusters=32)
    make_pt_dataset(src, spec)
    print(f"made {src}: {args.pairs} pairs, D={args.dim}")
    convert_pt(src, store, overwrite=True, progress=None)  # a bar on a terminal only
    print(f"converted to {store}")
    history = train(store, args.epochs, args.workers)
    zero, centroid = history["val_zero"], history["val_centroid"]
    print(
        f"validation with zero steering: {zero:.4f}; with centroid steering: {centroid:.4f} "
        f"(centroid steering {'lowers' if centroid < zero else 'raises'} the validation loss by "
        f"{abs(zero - centroid) / zero * 100:.1f}%)"
    )
    png = args.workdir / "loss_curves.png"
    plot(history, png)
    print(
        f"loss {history['train'][0]:.4f} -> {history['train'][-1]:.4f}; plot: {png}; "
        f"total {time.perf_counter() - t0:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
