"""Checks of a conversion's input made before any data is read: shapes, dtypes, counts, SRC.

Every tensor's shape and dtype kind is checked against the others and ``config.json`` from its
metadata alone, so a dataset that cannot convert fails in a second, not after streaming
gigabytes. Counts in ``config.json`` that disagree with the files are notices (the in-RAM
dataset never read them); ``embedding_dim`` and ``n_neg``, which it did use, must agree.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from jasper_mmap._fs.files import describe_path
from jasper_mmap.errors import ArtifactError, ArtifactMissingError, ConfigError
from jasper_mmap.format.spec import CONFIG, STEERING_NAMES
from jasper_mmap.format.store_dirs import is_store
from jasper_mmap.format.values import CONFIG_COUNTS, Notices
from jasper_mmap.sources.pt.reader import TensorArtifact

__all__ = ["check_shapes", "check_source", "FLOAT_SOURCES", "INT_SOURCES"]

log = logging.getLogger(__name__)

#: float8 tensors are decoded to float32 by the reader (numpy has no float8)
FLOAT_SOURCES = {
    "torch.float32",
    "torch.float64",
    "torch.float16",
    "torch.bfloat16",
    "torch.float8_e4m3fn",
    "torch.float8_e5m2",
    "torch.float8_e4m3fnuz",
    "torch.float8_e5m2fnuz",
}
INT_SOURCES = {
    "torch.int64",
    "torch.int32",
    "torch.int16",
    "torch.int8",
    "torch.uint8",
    "torch.uint16",
    "torch.uint32",
    "torch.uint64",
}


def _expect(art: TensorArtifact, ndim: int, kinds: set[str], what: str) -> None:
    if len(art.shape) != ndim:
        raise ArtifactError(
            f"{art.path}: should be a {ndim}-D tensor ({what}), but has shape "
            f"{list(art.shape)}. Re-run the dataset builder."
        )
    if art.dtype not in kinds:
        want = "a float" if kinds is FLOAT_SOURCES else "an integer"
        raise ArtifactError(
            f"{art.path}: should hold {want} dtype ({what}), but holds {art.dtype}. "
            f"Re-run the dataset builder."
        )


def check_shapes(
    src: Path, arts: dict[str, TensorArtifact], config: dict[str, Any], notices: Notices
) -> dict[str, int]:
    """Check every shape/dtype against the others and config.json; return the counts.

    Counts in config.json that disagree with the files are notices (the in-RAM dataset never
    read them); shapes that disagree with each other, ``embedding_dim`` and ``n_neg`` (which it
    did use) are errors.
    """
    emb = ["question_embs", "source_embs", "keyword_embs", "centroid_embs"]
    steer = list(STEERING_NAMES)
    for name in emb + steer:
        _expect(arts[name], 2, FLOAT_SOURCES, "rows of embeddings")
    dims = {arts[n].shape[1] for n in emb + steer}
    want_d = config.get("embedding_dim")
    found = {Path(str(arts[n].path)).name: arts[n].shape[1] for n in emb + steer}
    if len(dims) == 1 and want_d is not None and dims != {want_d}:
        raise ConfigError(
            f"{src / 'config.json'}: embedding_dim={want_d}, but every embedding and steering file "
            f"has dimension {dims.pop()}. The files are the truth: fix config.json."
        )
    if dims == {0}:
        raise ArtifactError(
            f"{arts['question_embs'].path}: embeddings have dimension 0 (shape "
            f"{list(arts['question_embs'].shape)}), as every embedding and steering file has; "
            f"a row needs at least one value. Re-run the embedding step of the dataset builder."
        )
    if len(dims) > 1:
        raise ArtifactError(
            f"{src}: embedding dimensions disagree: config.json says embedding_dim="
            f"{want_d}, the files have {found}. Re-run the dataset builder so all agree."
        )
    _expect(arts["pair_index"], 2, INT_SOURCES, "question row, source row per pair")
    n_pairs = arts["pair_index"].shape[0]
    if arts["pair_index"].shape[1] != 2:
        raise ArtifactError(
            f"{arts['pair_index'].path}: should have shape [N_pairs, 2], but has "
            f"{list(arts['pair_index'].shape)}. Re-run the dataset builder."
        )
    pair_level = {
        "pair_cluster_id": INT_SOURCES,
        "pair_relevance": FLOAT_SOURCES,
        "centroid_distances": FLOAT_SOURCES,
    }
    for name, kinds in pair_level.items():
        _expect(arts[name], 1, kinds, "one value per pair")
    for name in ("hard_negatives", "negative_tiers"):
        _expect(arts[name], 2, INT_SOURCES, "[N_pairs, n_neg]")
    for name in [*pair_level, *steer, "hard_negatives", "negative_tiers"]:
        if arts[name].shape[0] != n_pairs:
            raise ArtifactError(
                f"{arts[name].path}: should have {n_pairs} rows (one per pair, as "
                f"pair_index.pt has), but has {arts[name].shape[0]}. Re-run the dataset builder."
            )
    n_neg = arts["hard_negatives"].shape[1]
    if n_neg == 0:
        raise ArtifactError(
            f"{arts['hard_negatives'].path}: holds 0 negatives per pair (shape "
            f"{list(arts['hard_negatives'].shape)}); training contrasts each target with its "
            f"negatives, so at least one is needed. Re-run the negative miner."
        )
    if arts["negative_tiers"].shape != arts["hard_negatives"].shape:
        raise ArtifactError(
            f"{arts['negative_tiers'].path}: shape {list(arts['negative_tiers'].shape)} "
            f"should equal hard_negatives' {list(arts['hard_negatives'].shape)}. Re-run the miner."
        )
    if config.get("n_neg") is not None and config["n_neg"] != n_neg:
        raise ConfigError(
            f"{src / 'config.json'}: n_neg={config['n_neg']}, but hard_negatives.pt has "
            f"{n_neg} negatives per pair. Fix config.json or the negatives."
        )
    for name in ("train_idx", "val_idx", "test_idx"):
        if name in arts:
            _expect(arts[name], 1, INT_SOURCES, "pair rows of the split")
    for key, name in CONFIG_COUNTS.items():
        if config.get(key) is not None and config[key] != arts[name].shape[0]:
            notices.note(
                f"{src / 'config.json'}: {key}={config[key]}, but {arts[name].path} has "
                f"{arts[name].shape[0]} rows; the files are the truth (the in-RAM dataset "
                f"never read this count), so the store has {arts[name].shape[0]}"
            )
    for art in arts.values():
        if art.dtype == "torch.float64":
            log.warning("%s: float64 is cast to float32", art.path)
    return {
        "embedding_dim": dims.pop(),
        "n_neg": n_neg,
        "n_pairs": n_pairs,
        "n_questions": arts["question_embs"].shape[0],
        "n_sources": arts["source_embs"].shape[0],
        "n_keywords": arts["keyword_embs"].shape[0],
        "n_clusters": arts["centroid_embs"].shape[0],
    }


def check_source(src: Path) -> None:
    """SRC must be a dataset directory; say what was probably meant when it is not."""
    if is_store(src):
        raise ArtifactError(
            f"{src}: is already a jasper_mmap store, not a dataset directory of .pt files. "
            f"Open it directly (JASPERSteeringDataset({str(src)!r}, ...)); to change its format "
            f"or precision, convert the original .pt directory it was made from."
        )
    if src.is_file():
        hint = (
            f" Did you mean its directory, {src.parent}?" if (src.parent / CONFIG).is_file() else ""
        )
        raise ArtifactError(
            f"{src}: is a file; convert-pt takes the dataset directory that holds config.json "
            f"and the .pt files.{hint}"
        )
    if not src.is_dir():
        # what is there, when it is something (a FIFO, a device, a link loop or to nothing)
        what = describe_path(src)
        fix = (
            "Check the path; it should hold config.json and the .pt files (docs/dataset_format.md)."
        )
        if what == "does not exist":
            raise ArtifactMissingError(f"{src}: dataset directory does not exist. {fix}")
        if what.endswith("which does not exist"):  # a link to nothing: missing, too
            raise ArtifactMissingError(f"{src}: {what}, so no dataset directory is there. {fix}")
        raise ArtifactError(f"{src}: {what}, not a dataset directory. {fix}")
