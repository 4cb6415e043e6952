"""The store layout: which arrays a store holds, in which unit, and its manifest.

A store is a directory::

    manifest.json            format name + version, arrays, counts, integrity facts, sources
    config.json              the dataset's config.json, passed through unchanged
    <unit>.safetensors ...   (safetensors backend) one file per unit below
    data.zarr/               (zarr backend) one zarr v3 group, one array per name
    negatives/CURRENT.json   pointer to the live negatives generation
    negatives/gen-000000.*   one immutable generation: hard_negatives + negative_tiers

# NOTE [negatives generations]
``hard_negatives`` and ``negative_tiers`` always change together, so they live in their own
unit, one immutable file (safetensors) or group (zarr) per *generation*. ``CURRENT.json`` names
the live generation and is replaced with one atomic ``os.replace``; a generation is never
rewritten in place, so a reader that mapped it keeps valid data until it lets go. The manifest
describes the generation written by the converter; later generations are described by their
pointer file. The hot-reload code builds on this.
"""

from __future__ import annotations

#
from dataclasses import dataclass

#

__all__ = [
    "ARRAYS",
    "ArraySpec",
    "CONFIG",
    "FLOAT_ROLES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST",
    "MAX_GENERATION",
    "NEGATIVES_DIR",
    "POINTER",
    "NEGATIVE_ARRAYS",
    "PAIR_ARRAYS",
    "SPLITS",
    "generation_name",
]

FORMAT_NAME = "jasper-mmap-store"


FORMAT_VERSION = 1


MANIFEST = "manifest.json"


CONFIG = "config.json"


NEGATIVES_DIR = "negatives"


POINTER = "CURRENT.json"


@dataclass(frozen=True)
class ArraySpec:
    """One array of a store.

    Attributes:
        name: array name in the store (also the safetensors key / zarr array name).
        source: ``.pt`` file it comes from (``None`` for arrays derived from another file).
        unit: the file (safetensors) or group prefix it lives in.
        role: ``embedding`` and ``steering`` (float, can be stored at reduced precision),
            ``float`` (float32 kept exact), ``index`` (int64), ``split``, ``negatives``.
        ndim: number of dimensions.
        required: whether a dataset directory must provide it.
    """

    name: str
    source: str | None
    unit: str
    role: str
    ndim: int
    required: bool = True


ARRAYS: tuple[ArraySpec, ...] = (
    ArraySpec("question_embs", "question_embs.pt", "embeddings", "embedding", 2),
    ArraySpec("source_embs", "source_embs.pt", "embeddings", "embedding", 2),
    ArraySpec("keyword_embs", "keyword_embs.pt", "embeddings", "embedding", 2),
    ArraySpec("centroid_embs", "centroid_embs.pt", "embeddings", "embedding", 2),
    ArraySpec("pair_index", "pair_index.pt", "pairs", "index", 2),
    ArraySpec("pair_cluster_id", "pair_cluster_id.pt", "pairs", "index", 1),
    ArraySpec("pair_relevance", "pair_relevance.pt", "pairs", "float", 1),
    ArraySpec("centroid_distances", "centroid_distances.pt", "pairs", "float", 1),
    ArraySpec("pair_keyword_offsets", "pair_keyword_ids.pt", "pairs", "index", 1),
    ArraySpec("pair_keyword_values", None, "pairs", "index", 1),
    ArraySpec("steering_centroid", "steering_centroid.pt", "steering", "steering", 2),
    ArraySpec(
        "steering_keyword_weighted", "steering_keyword_weighted.pt", "steering", "steering", 2
    ),
    ArraySpec("steering_residual", "steering_residual.pt", "steering", "steering", 2),
    ArraySpec("train_idx", "train_idx.pt", "splits", "split", 1),
    ArraySpec("val_idx", "val_idx.pt", "splits", "split", 1, required=False),
    ArraySpec("test_idx", "test_idx.pt", "splits", "split", 1, required=False),
    ArraySpec("hard_negatives", "hard_negatives.pt", NEGATIVES_DIR, "negatives", 2),
    ArraySpec("negative_tiers", "negative_tiers.pt", NEGATIVES_DIR, "negatives", 2),
)


#: roles whose arrays may be stored as float16/bfloat16 (readers always return float32)
FLOAT_ROLES = ("embedding", "steering")


SPLITS = ("train", "val", "test")


#: generation numbers are below this: the control block's slot is an int64, and a publish adds
#: one to the largest number in use, so a stray ``gen-<huge>`` name is ignored, never followed
MAX_GENERATION = 2**62


def generation_name(generation: int) -> str:
    """Return the file/group stem of negatives generation ``generation``."""
    return f"gen-{generation:06d}"


BACKEND_NAMES = ("safetensors", "zarr")


#: the arrays of a negatives generation (NOTE [negatives generations]), not of the manifest
NEGATIVE_ARRAYS = ("hard_negatives", "negative_tiers")


#: the per-pair arrays a batch reads (read-ahead plans them; the batch engine gathers them)
PAIR_ARRAYS = (
    "pair_index",
    "hard_negatives",
    "negative_tiers",
    "pair_cluster_id",
    "pair_relevance",
    "centroid_distances",
)


#: every count a manifest records (format.values.CONFIG_COUNTS: which array a config count sizes) (all non-negative integers; embedding_dim at least 1)
COUNT_KEYS = (
    "embedding_dim",
    "n_neg",
    "n_pairs",
    "n_questions",
    "n_sources",
    "n_keywords",
    "n_clusters",
    "n_keyword_values",
)


SPECS = {s.name: s for s in ARRAYS}


STEERING_TABLES = {1: "steering_centroid", 2: "steering_keyword_weighted", 3: "steering_residual"}


STEERING_NAMES = tuple(STEERING_TABLES.values())  # variant v > 0 reads STEERING_NAMES[v - 1]
