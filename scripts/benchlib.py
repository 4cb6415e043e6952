"""What the benchmark scripts share: the synthetic dataset of a given size and its store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from jasper_mmap.synthetic import SyntheticSpec, make_pt_dataset

#: batch size of every loader benchmark
B = 128
#: the `.pt` artifacts an in-RAM (seed-style) baseline loads
NAMES = [
    "question_embs",
    "source_embs",
    "pair_index",
    "hard_negatives",
    "negative_tiers",
    "pair_cluster_id",
    "pair_relevance",
    "centroid_distances",
    "steering_centroid",
    "steering_keyword_weighted",
    "steering_residual",
]


def ensure_dataset(workdir: Path, pairs: int, fmt: str = "safetensors") -> tuple[Path, Path]:
    """``(pt dir, store)`` of the D=384, n_neg=12 synthetic dataset of ``pairs`` pairs, made once
    (the store in format ``fmt``: ``store_PAIRS`` for safetensors, ``store_PAIRS_zarr``...)."""
    suffix = "" if fmt == "safetensors" else f"_{fmt}"
    src, store = workdir / f"pt_{pairs}", workdir / f"store_{pairs}{suffix}"
    if not (src / "config.json").exists():
        make_pt_dataset(
            src, SyntheticSpec(n_pairs=pairs, dim=384, n_neg=12, n_keywords=20000, n_clusters=64)
        )
    if not (store / "manifest.json").exists():
        subprocess.run(
            [sys.executable, "-m", "jasper_mmap.converters.cli", str(src), str(store), "--quiet"]
            + ["--format", fmt],
            check=True,
        )
    return src, store
