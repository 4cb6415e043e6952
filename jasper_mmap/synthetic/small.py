"""Synthetic JASPER datasets: clustered embeddings with consistent steering and 4-tier negatives.

Used by the tests (tiny), the README's example and the benchmarks (hundreds of thousands of
pairs). Sources are ``normalize(centroid + noise)``; a question sits near its target source;
steering vectors are derived from the pair's cluster, keywords and question as the seed
documents describe; negatives are drawn in the in-RAM dataset's four tiers (same cluster, adjacent
cluster, most similar other cluster, random distant cluster).

Each artifact is generated and saved one at a time, so peak memory is about the largest
artifact (``n_pairs * dim * 4`` bytes for a steering table), not the dataset.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

__all__ = ["SyntheticSpec", "make_pt_dataset", "synthetic_config"]


@dataclass(frozen=True)
class SyntheticSpec:
    """Sizes of a synthetic dataset (defaults: a tiny test fixture)."""

    n_pairs: int = 120
    dim: int = 16
    n_neg: int = 6
    n_questions: int | None = None  # default n_pairs // 2
    n_sources: int | None = None  # default n_pairs
    n_keywords: int = 40
    n_clusters: int = 5
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0

    def resolved(self) -> SyntheticSpec:
        return SyntheticSpec(
            **{
                **asdict(self),
                "n_questions": self.n_questions or max(1, self.n_pairs // 2),
                "n_sources": self.n_sources or max(self.n_clusters, self.n_pairs),
            }
        )


def normalize_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def tier_counts(n_neg: int) -> list[int]:
    """Split ``n_neg`` over the four tiers in the in-RAM dataset's proportions 3:4:3:2."""
    raw = np.array([3, 4, 3, 2], dtype=float) * n_neg / 12
    counts = np.floor(raw).astype(int)
    for i in np.argsort(raw - counts)[::-1][: n_neg - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def _draw_from_clusters(
    rng, clusters: np.ndarray, starts: np.ndarray, sizes: np.ndarray, order: np.ndarray
) -> np.ndarray:
    """One random source row from each cluster in ``clusters`` (sources sorted by cluster)."""
    size = np.maximum(sizes[clusters], 1)
    return order[starts[clusters] + (rng.random(clusters.shape) * size).astype(np.int64)]


def synthetic_config(counts: dict[str, int], builder: str, **extra: object) -> dict[str, object]:
    """config.json of a synthetic dataset: its counts, uniform steering, the in-RAM dataset's curriculum."""
    return {
        **counts,
        "steering_probabilities": {
            "zero": 0.25,
            "centroid": 0.25,
            "keyword": 0.25,
            "residual": 0.25,
        },
        "curriculum": {"zero_prob_start": 0.5, "zero_prob_end": 0.1, "epochs_total": 100},
        "random_seed": 42,
        "builder": builder,
        **extra,
    }


def make_pt_dataset(
    out: str | Path,
    spec: SyntheticSpec = SyntheticSpec(),
    save: Callable[[object, Path], None] | None = None,
    keyword_pickle: bool = False,
) -> Path:
    """Write a ``.pt`` dataset directory (docs/dataset_format.md) of the given size.

    Args:
        out: directory to create (may exist).
        spec: sizes and seed.
        save: how to write one artifact (default ``torch.save``); tests swap it to produce
            broken files.
        keyword_pickle: write ``pair_keyword_ids.pt`` with plain ``pickle`` (as some builders do).

    Returns:
        The directory.
    """
    import torch

    s = spec.resolved()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(s.seed)
    save = save or (lambda obj, path: torch.save(obj, path))

    def put(name: str, arr: np.ndarray) -> None:
        save(torch.from_numpy(np.ascontiguousarray(arr)), out / f"{name}.pt")

    C, D, P = s.n_clusters, s.dim, s.n_pairs
    centroids = normalize_rows(rng.standard_normal((C, D)))
    src_cluster = np.sort(rng.integers(0, C, s.n_sources))
    src_cluster[:C] = np.arange(C)  # every cluster owns at least one source
    src_cluster.sort()
    order = np.arange(s.n_sources)
    sizes = np.bincount(src_cluster, minlength=C)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    sources = normalize_rows(
        centroids[src_cluster] + 0.35 * rng.standard_normal((s.n_sources, D)) / np.sqrt(D) * 4
    )
    put("source_embs", sources)
    put("centroid_embs", centroids)

    q_of_pair = np.arange(P) % s.n_questions
    q_cluster = rng.integers(0, C, s.n_questions)
    cluster = q_cluster[q_of_pair]
    target = _draw_from_clusters(rng, cluster, starts, sizes, order)
    first_target = np.zeros(s.n_questions, dtype=np.int64)
    first_target[q_of_pair[::-1]] = target[::-1]
    first_target[np.bincount(q_of_pair, minlength=s.n_questions) == 0] = starts[q_cluster][
        np.bincount(q_of_pair, minlength=s.n_questions) == 0
    ]
    questions = normalize_rows(
        sources[first_target] + 0.5 * rng.standard_normal((s.n_questions, D)) / np.sqrt(D) * 2
    )
    put("question_embs", questions)
    put("pair_index", np.stack([q_of_pair, target], axis=1).astype(np.int64))
    put("pair_cluster_id", cluster.astype(np.int64))
    put("pair_relevance", rng.uniform(0.5, 1.0, P).astype(np.float32))
    q = questions[q_of_pair]
    put(
        "centroid_distances",
        np.clip(1.0 - (q * centroids[cluster]).sum(-1), 0.0, 2.0).astype(np.float32),
    )
    del sources

    kw_cluster = rng.integers(0, C, s.n_keywords)
    keywords = normalize_rows(
        centroids[kw_cluster] + 0.6 * rng.standard_normal((s.n_keywords, D)) / np.sqrt(D) * 3
    )
    put("keyword_embs", keywords)
    n_kw = rng.integers(0, 6, P)
    kw_ids = rng.integers(0, s.n_keywords, int(n_kw.sum()))
    offsets = np.concatenate([[0], np.cumsum(n_kw)])
    kw_lists = [kw_ids[offsets[i] : offsets[i + 1]].tolist() for i in range(P)]
    if keyword_pickle:
        with open(out / "pair_keyword_ids.pt", "wb") as f:
            pickle.dump(kw_lists, f, protocol=4)
    else:
        save(kw_lists, out / "pair_keyword_ids.pt")
    del kw_lists
    weights = centroids[cluster]  # pairs without keywords steer to their centroid
    has = np.flatnonzero(n_kw > 0)
    for lo in range(0, has.size, 65536):  # blocks bound the [nnz, D] temporary
        rows = has[lo : lo + 65536]
        a, b = offsets[rows[0]], offsets[rows[-1] + 1]
        weights[rows] = np.add.reduceat(keywords[kw_ids[a:b]], offsets[rows] - a, axis=0)
    put("steering_centroid", centroids[cluster])
    put("steering_keyword_weighted", normalize_rows(weights))
    del weights
    put("steering_residual", normalize_rows(centroids[cluster] - q))
    del q

    sim = centroids @ centroids.T
    np.fill_diagonal(sim, -np.inf)
    by_sim = np.argsort(-sim, axis=1)  # nearest other clusters first
    tiers = tier_counts(s.n_neg)
    negs, tier_ids = [], []
    for tier, k in enumerate(tiers, start=1):
        for _ in range(k):
            if tier == 1 or C == 1:
                c = cluster
            elif tier == 2:
                c = by_sim[cluster, rng.integers(0, min(3, C - 1), P)]
            elif tier == 3:
                c = by_sim[cluster, 0]
            else:
                c = by_sim[cluster, rng.integers(max(0, C - 1 - max(1, C // 2)), C - 1, P)]
            n = _draw_from_clusters(rng, c, starts, sizes, order)
            clash = n == target
            n[clash] = (n[clash] + 1) % s.n_sources
            negs.append(n)
            tier_ids.append(np.full(P, tier))
    put("hard_negatives", np.stack(negs, axis=1).astype(np.int64))
    put("negative_tiers", np.stack(tier_ids, axis=1).astype(np.int64))

    perm = rng.permutation(P)
    n_val, n_test = int(P * s.val_fraction), int(P * s.test_fraction)
    put("val_idx", np.sort(perm[:n_val]))
    put("test_idx", np.sort(perm[n_val : n_val + n_test]))
    put("train_idx", np.sort(perm[n_val + n_test :]))
    config = synthetic_config(
        {
            "embedding_dim": D,
            "n_neg": s.n_neg,
            "n_pairs": P,
            "n_questions": s.n_questions,
            "n_sources": s.n_sources,
            "n_keywords": s.n_keywords,
            "n_clusters": C,
        },
        builder="jasper_mmap.synthetic",
    )
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out
