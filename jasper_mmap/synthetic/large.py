"""Synthetic stores of any size, written block by block with bounded memory.

Unlike :func:`jasper_mmap.synthetic.make_pt_dataset` (which builds each artifact in RAM and
saves it with torch), this writes straight into a safetensors store, so a store larger than RAM
can be made on any machine. Every row is a pure function of (seed, array, block), so a block
can be regenerated when another array needs it (sources from questions, steering from
questions), and the layout keeps clusters contiguous so "a random source of cluster c" is one
integer draw:

* question ``q`` belongs to cluster ``q * C // n_questions``; pair ``p`` asks question
  ``p // 2`` and targets source ``p`` (so ``n_sources = n_pairs = 2 * n_questions``);
* questions are ``normalize(centroid + noise)`` (noise of norm ~0.8), sources
  ``normalize(question + noise)`` (norm ~0.5);
* steering: the cluster centroid, the normalized mean of the pair's keywords (the centroid for
  a pair without keywords), and ``normalize(centroid - question)``;
* negatives in the in-RAM dataset's four tiers (3:4:3:2): same cluster, one of the 3 nearest clusters,
  the nearest cluster, a random cluster from the farther half;
* splits by pair number: ``p % every == 0`` is val, ``== 1`` test, the rest train (or, with
  ``sparse_train``, only ``== 2``: a smaller train split that still spans the whole store).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from jasper_mmap.format.manifest import write_store_metadata
from jasper_mmap.format.spec import CONFIG, STEERING_NAMES
from jasper_mmap.format.store_dirs import publishing
from jasper_mmap.stores import WRITERS
from jasper_mmap.stores.base import StoreWriter
from jasper_mmap.synthetic import synthetic_config
from jasper_mmap.synthetic.small import normalize_rows, tier_counts

__all__ = [
    "make_store",
    "make_pt_dir",
    "pairs_for_bytes",
    "is_synthetic_pt_dir",
    "mark_synthetic_pt_dir",
    "SYNTHETIC_MARKER",
]

log = logging.getLogger(__name__)

_BLOCK = 16384  # pairs per block (an even number: two pairs per question)


def pairs_for_bytes(nbytes: int, dim: int = 384, n_neg: int = 12) -> int:
    """Number of pairs whose store is about ``nbytes`` (float32 embeddings)."""
    per_pair = 4 * dim * (3 + 1 + 0.5) + 8 * (2 + 2 * n_neg + 1 + 1 + 2.5) + 8 + 8
    return int(nbytes // per_pair) // 2 * 2


class _Gen:
    """Deterministic blocks of every array of one synthetic dataset."""

    def __init__(
        self,
        n_pairs: int,
        dim: int,
        n_neg: int,
        n_clusters: int,
        n_keywords: int,
        seed: int,
        every: int,
        sparse_train: bool = False,
    ) -> None:
        self.P, self.Q, self.D, self.K, self.C = n_pairs, n_pairs // 2, dim, n_keywords, n_clusters
        self.n_neg, self.seed, self.every, self.sparse_train = n_neg, seed, every, sparse_train
        rng = self.rng("tables", 0)
        self.centroids = normalize_rows(rng.standard_normal((n_clusters, dim)))
        kw_cluster = rng.integers(0, n_clusters, n_keywords)
        self.keywords = normalize_rows(
            self.centroids[kw_cluster] + 0.3 * rng.standard_normal((n_keywords, dim))
        )
        sim = self.centroids @ self.centroids.T
        np.fill_diagonal(sim, -np.inf)
        self.by_sim = np.argsort(-sim, axis=1)
        self.n_kw = np.concatenate(
            [
                self.rng("nkw", b).integers(0, 6, hi - lo, dtype=np.int8)
                for b, lo, hi in self.blocks()
            ]
        )
        self.kw_offsets = np.concatenate([[0], np.cumsum(self.n_kw)])

    def rng(self, what: str, block: int) -> np.random.Generator:
        key = [self.seed, sum(map(ord, what)) * 7919 + len(what), block]
        return np.random.default_rng(key)

    def blocks(self) -> Iterator[tuple[int, int, int]]:
        for b, lo in enumerate(range(0, self.P, _BLOCK)):
            yield b, lo, min(self.P, lo + _BLOCK)

    def cluster_of_question(self, q: np.ndarray) -> np.ndarray:
        return (q * self.C // self.Q).astype(np.int64)

    def cluster_range(self, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sources of cluster c: [2 * first question, 2 * last question + 2)."""
        first = -(-c * self.Q // self.C)
        end = -(-(c + 1) * self.Q // self.C)
        return 2 * first, 2 * end

    def questions(self, b: int, lo: int, hi: int) -> np.ndarray:
        q = np.arange(lo // 2, (hi + 1) // 2)
        noise = self.rng("q", b).standard_normal((q.size, self.D), dtype=np.float32)
        return normalize_rows(
            self.centroids[self.cluster_of_question(q)] + (0.8 / np.sqrt(self.D)) * noise
        )

    def sources(self, b: int, lo: int, hi: int) -> np.ndarray:
        q = np.repeat(self.questions(b, lo, hi), 2, axis=0)[: hi - lo]
        noise = self.rng("s", b).standard_normal(q.shape, dtype=np.float32)
        return normalize_rows(q + (0.5 / np.sqrt(self.D)) * noise)

    def cluster(self, lo: int, hi: int) -> np.ndarray:
        return self.cluster_of_question(np.arange(lo, hi) // 2)

    def keyword_ids(self, b: int, lo: int, hi: int) -> np.ndarray:
        n = int(self.kw_offsets[hi] - self.kw_offsets[lo])
        return self.rng("kw", b).integers(0, self.K, n)

    def steering(self, kind: str, b: int, lo: int, hi: int) -> np.ndarray:
        cent = self.centroids[self.cluster(lo, hi)]
        if kind == "steering_centroid":
            return cent
        if kind == "steering_residual":
            q = np.repeat(self.questions(b, lo, hi), 2, axis=0)[: hi - lo]
            return normalize_rows(cent - q)
        ids, n = self.keyword_ids(b, lo, hi), self.n_kw[lo:hi]
        out = cent.copy()
        has = np.flatnonzero(n > 0)
        if has.size:
            starts = (self.kw_offsets[lo:hi] - self.kw_offsets[lo])[has]
            out[has] = np.add.reduceat(self.keywords[ids], starts, axis=0)
        return normalize_rows(out)

    def negatives(self, b: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        rng, c = self.rng("neg", b), self.cluster(lo, hi)
        cols, tiers = [], []
        for tier, k in enumerate(tier_counts(self.n_neg), start=1):
            for _ in range(k):
                if tier == 1 or self.C == 1:
                    cc = c
                elif tier == 2:
                    cc = self.by_sim[c, rng.integers(0, min(3, self.C - 1), c.size)]
                elif tier == 3:
                    cc = self.by_sim[c, 0]
                else:
                    cc = self.by_sim[c, rng.integers((self.C - 1) // 2, self.C - 1, c.size)]
                a, e = self.cluster_range(cc)
                n = a + (rng.random(c.size) * (e - a)).astype(np.int64)
                clash = n == np.arange(lo, hi)
                n[clash] = np.where(n[clash] + 1 < e[clash], n[clash] + 1, a[clash])
                cols.append(n)
                tiers.append(np.full(c.size, tier))
        return np.stack(cols, 1), np.stack(tiers, 1)

    def split(self, name: str) -> np.ndarray:
        p = np.arange(self.P)
        r = p % self.every
        train = r == 2 if self.sparse_train else r >= 2
        return p[{"val": r == 0, "test": r == 1, "train": train}[name]]


def _write_rows(writer: StoreWriter, name: str, blocks: Iterator[np.ndarray], stats: dict) -> None:
    lo_, hi_ = None, None
    for block in blocks:
        writer.write(name, np.ascontiguousarray(block))
        if block.size:
            lo_ = block.min().item() if lo_ is None else min(lo_, block.min().item())
            hi_ = block.max().item() if hi_ is None else max(hi_, block.max().item())
    stats[name] = {"min": lo_, "max": hi_}


def make_store(
    dst: str | Path,
    n_pairs: int,
    *,
    dim: int = 384,
    n_neg: int = 12,
    n_clusters: int = 64,
    n_keywords: int = 20000,
    seed: int = 0,
    every: int = 10,
    sparse_train: bool = False,
    overwrite: bool = False,
    progress=None,
    format: str = "safetensors",
) -> Path:
    """Write a synthetic store (``format`` safetensors or zarr) of ``n_pairs`` pairs at
    ``dst``, block by block.

    Memory stays at a few blocks (``_BLOCK`` pairs) plus 9 bytes per pair (keyword counts and
    offsets), whatever the embedding bytes. The store appears with one atomic rename when complete.
    """
    if format not in WRITERS:
        raise ValueError(f"format should be one of {list(WRITERS)}, but got format={format!r}")
    Path(dst).expanduser().absolute().parent.mkdir(parents=True, exist_ok=True)
    n_pairs = n_pairs // 2 * 2
    t0 = time.perf_counter()
    with publishing(dst, overwrite=overwrite) as (tmp, dst):  # NOTE [never destroy ...]
        g = _Gen(n_pairs, dim, n_neg, n_clusters, n_keywords, seed, every, sparse_train)
        entries, stats = _write_all(g, tmp, progress, WRITERS[format](tmp))
        config = _config(g)
        keys = ("embedding_dim", "n_neg", "n_pairs", "n_questions", "n_sources")
        counts = {k: config[k] for k in (*keys, "n_keywords", "n_clusters")}
        counts["n_keyword_values"] = int(g.kw_offsets[-1])
        for name, e in entries.items():
            e["stats"] = stats.get(name, {})
        (tmp / CONFIG).write_text(json.dumps(config, indent=1))
        write_store_metadata(
            tmp,
            format,
            entries,
            counts,
            writer="jasper_mmap.synthetic_store",
            source={"dir": None, "files": {}},
        )
    log.info(
        "wrote synthetic store %s (%d pairs) in %.1f s", dst, n_pairs, time.perf_counter() - t0
    )
    return dst


def _config(g: _Gen) -> dict:
    counts = {
        "embedding_dim": g.D,
        "n_neg": g.n_neg,
        "n_pairs": g.P,
        "n_questions": g.Q,
        "n_sources": g.P,
        "n_keywords": g.K,
        "n_clusters": g.C,
    }
    return synthetic_config(counts, builder="jasper_mmap.synthetic_store", seed=g.seed)


#: marks a ``.pt`` directory written by :func:`make_pt_dir`: the only kind it replaces
SYNTHETIC_MARKER = ".jasper_mmap_synthetic"


def mark_synthetic_pt_dir(path: Path) -> None:
    """Mark ``path`` as a synthetic ``.pt`` directory that :func:`make_pt_dir` may replace."""
    (Path(path) / SYNTHETIC_MARKER).write_text("written by jasper_mmap's synthetic generators\n")


def is_synthetic_pt_dir(path: Path) -> bool:
    """Whether ``path`` is a ``.pt`` directory written by :func:`make_pt_dir`."""
    return (Path(path) / SYNTHETIC_MARKER).is_file()


def make_pt_dir(
    dst: str | Path,
    n_pairs: int,
    *,
    dim: int = 384,
    n_neg: int = 12,
    n_clusters: int = 64,
    n_keywords: int = 20000,
    seed: int = 0,
    every: int = 10,
    sparse_train: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write the same synthetic dataset as a ``.pt`` directory (docs/dataset_format.md), streaming.

    Every artifact is written block by block (:mod:`jasper_mmap.sources.pt.writer`), so the directory
    (and any single file in it) can be larger than RAM; ``torch.load`` reads every file,
    ``pair_keyword_ids.pt`` included (a torch archive holding the list of lists).
    The directory is built under a temporary name and appears with one rename. An existing
    non-empty ``dst`` is replaced only with ``overwrite`` and only if this function wrote it
    (it holds ``SYNTHETIC_MARKER``); any other directory is refused.

    Raises:
        StoreExistsError: ``dst`` is not empty and is not a synthetic directory we wrote, or
            ``overwrite`` is false.
    """
    from jasper_mmap.sources.pt.writer import write_lists_pt, write_tensor_pt

    Path(dst).expanduser().absolute().parent.mkdir(parents=True, exist_ok=True)
    what = "a synthetic .pt directory written by make_pt_dir"
    with publishing(dst, overwrite=overwrite, is_ours=is_synthetic_pt_dir, what=what) as (
        tmp,
        dst,
    ):
        g = _Gen(n_pairs // 2 * 2, dim, n_neg, n_clusters, n_keywords, seed, every, sparse_train)
        for unit, arrays in _units(g).items():
            for name, shape in arrays:
                if name == "pair_keyword_offsets":
                    write_lists_pt(tmp / "pair_keyword_ids.pt", _keyword_lists(g))
                elif name != "pair_keyword_values":
                    write_tensor_pt(tmp / f"{name}.pt", shape, _dtype(name), _rows(g, name))
            log.debug("wrote unit %s", unit)
        (tmp / CONFIG).write_text(json.dumps(_config(g), indent=1))
        mark_synthetic_pt_dir(tmp)
    return dst


def _keyword_lists(g: _Gen) -> Iterator[np.ndarray]:
    for b, lo, hi in g.blocks():
        ids, off = g.keyword_ids(b, lo, hi), g.kw_offsets[lo : hi + 1] - g.kw_offsets[lo]
        for i in range(hi - lo):
            yield ids[off[i] : off[i + 1]]


def _dtype(name: str) -> str:
    floats = (
        name.endswith("embs")
        or name.startswith("steering")
        or name in ("pair_relevance", "centroid_distances")
    )
    return "float32" if floats else "int64"


def _units(g: _Gen) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    P, Q, D, k = g.P, g.Q, g.D, g.n_neg
    nnz = int(g.kw_offsets[-1])
    return {
        "embeddings": [
            ("question_embs", (Q, D)),
            ("source_embs", (P, D)),
            ("keyword_embs", (g.K, D)),
            ("centroid_embs", (g.C, D)),
        ],
        "steering": [(n, (P, D)) for n in STEERING_NAMES],
        "pairs": [
            ("pair_index", (P, 2)),
            ("pair_cluster_id", (P,)),
            ("pair_relevance", (P,)),
            ("centroid_distances", (P,)),
            ("pair_keyword_offsets", (P + 1,)),
            ("pair_keyword_values", (nnz,)),
        ],
        "splits": [(f"{s}_idx", (g.split(s).size,)) for s in ("train", "val", "test")],
        "negatives/gen-000000": [("hard_negatives", (P, k)), ("negative_tiers", (P, k))],
    }


def _write_all(g: _Gen, tmp: Path, progress, writer: StoreWriter) -> tuple[dict, dict]:
    entries, stats = {}, {}
    for unit, arrays in _units(g).items():
        specs = [(n, s, _dtype(n)) for n, s in arrays]
        writer.begin_unit(unit, specs)
        for name, _, _ in specs:
            _write_rows(writer, name, _rows(g, name), stats)
            if progress is not None:
                progress(name)
        for name, e in writer.end_unit().items():
            shape, dtype = next((s, d) for n, s, d in specs if n == name)
            entries[name] = {
                **e,
                "shape": list(shape),
                "dtype": dtype,
                "stored_dtype": dtype,
                "source": None,
                "source_dtype": None,
            }
    return entries, stats


def _rows(g: _Gen, name: str) -> Iterator[np.ndarray]:
    """Blocks of rows of array ``name``, in order."""
    if name == "question_embs":
        for b, lo, hi in g.blocks():
            yield g.questions(b, lo, hi)
    elif name == "source_embs":
        for b, lo, hi in g.blocks():
            yield g.sources(b, lo, hi)
    elif name in ("keyword_embs", "centroid_embs"):
        yield g.keywords if name == "keyword_embs" else g.centroids
    elif name.startswith("steering"):
        for b, lo, hi in g.blocks():
            yield g.steering(name, b, lo, hi).astype(np.float32)
    elif name.endswith("_idx"):
        yield g.split(name[:-4])
    elif name == "pair_keyword_offsets":
        yield g.kw_offsets.astype(np.int64)
    else:
        yield from _pair_rows(g, name)


def _pair_rows(g: _Gen, name: str) -> Iterator[np.ndarray]:
    for b, lo, hi in g.blocks():
        if name == "pair_index":
            yield np.stack([np.arange(lo, hi) // 2, np.arange(lo, hi)], 1)
        elif name == "pair_cluster_id":
            yield g.cluster(lo, hi)
        elif name == "pair_relevance":
            yield g.rng("rel", b).uniform(0.5, 1.0, hi - lo).astype(np.float32)
        elif name == "centroid_distances":
            q = np.repeat(g.questions(b, lo, hi), 2, axis=0)[: hi - lo]
            cos = (q * g.centroids[g.cluster(lo, hi)]).sum(1)
            yield np.clip(1.0 - cos, 0.0, 2.0).astype(np.float32)
        elif name == "pair_keyword_values":
            yield g.keyword_ids(b, lo, hi)
        elif name in ("hard_negatives", "negative_tiers"):
            negs, tiers = g.negatives(b, lo, hi)
            yield negs if name == "hard_negatives" else tiers
