"""Checks of the input artifacts: shapes and counts up front, values block by block.

Every check raises :class:`ArtifactError`/:class:`ConfigError` naming the file, what was found,
what was expected and the fix. :class:`Stats` accumulates the integrity facts (min/max,
non-finite rows) that end up in the manifest, so readers never have to scan for them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jasper_mmap.errors import ArtifactError, ConfigError
from jasper_mmap.steering import SteeringSchedule

__all__ = [
    "CONFIG_COUNTS",
    "Notices",
    "REBUILD",
    "SplitCheck",
    "Stats",
    "check_block",
    "check_steering",
]

log = logging.getLogger(__name__)


REBUILD = "Re-run the dataset builder, or fix the file and convert again."


#: config key -> (array whose first dimension it counts)
CONFIG_COUNTS = {
    "n_questions": "question_embs",
    "n_sources": "source_embs",
    "n_keywords": "keyword_embs",
    "n_clusters": "centroid_embs",
    "n_pairs": "pair_index",
}


def check_steering(src: Path, config: dict[str, Any]) -> None:
    """Refuse missing steering probabilities, or ones the draw cannot use at epoch 0 or at
    the curriculum's end: the store would not open (the dataset checks them at construction).

    Raises:
        ConfigError: naming ``src/config.json``.
    """
    SteeringSchedule.from_config(config, str(src / "config.json")).check()


@dataclass
class Stats:
    """Integrity facts of one array, accumulated over its blocks."""

    min: float | int | None = None
    max: float | int | None = None
    nonfinite_rows: int = 0
    first_nonfinite: list[int] = field(default_factory=list)

    def update(self, block: np.ndarray) -> None:
        if block.size == 0:
            return
        if block.dtype.kind == "f":
            finite = np.isfinite(block)
            if not finite.all():
                rows = ~finite.reshape(block.shape[0], -1).all(axis=1)
                self.nonfinite_rows += int(rows.sum())
                self._bad_rows = np.flatnonzero(rows)
                block = block[finite]
                if block.size == 0:
                    return
        lo, hi = block.min().item(), block.max().item()
        self.min = lo if self.min is None else min(self.min, lo)
        self.max = hi if self.max is None else max(self.max, hi)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"min": self.min, "max": self.max}
        if self.nonfinite_rows:
            out["nonfinite_rows"] = self.nonfinite_rows
        return out


#: what the values index -> the in-RAM dataset's words for a reference past the end
_REFERENCES = {
    "question rows (column 0)": ("pair_index references question", "questions"),
    "source rows (column 1)": ("pair_index references source", "sources"),
    "negative source rows": ("hard_negatives references source", "sources"),
    "pair indices": ("Split indices reference pair", "pairs"),
    "cluster ids": ("pair_cluster_id references cluster", "clusters"),
    "keyword rows": ("pair_keyword_ids references keyword", "keywords"),
}


def _range_error(
    path: Path, block: np.ndarray, start: int, lo: int, hi: int, what: str
) -> ArtifactError:
    outside = (block < lo) | (block >= hi)
    bad = np.flatnonzero(outside.reshape(block.shape[0], -1).any(axis=1))
    rows = (bad[:5] + start).tolist()
    vals = block[bad[:5]].tolist()
    first = int(block[outside].flat[0])
    refers, things = _REFERENCES.get(what, (f"{what} hold", "rows"))
    return ArtifactError(
        f"{path}: {refers} {first}, but only {hi} {things} exist ({what} should be in "
        f"[{lo}, {hi}); rows {rows} hold {vals}; {len(bad)} bad rows in this block). {REBUILD}"
    )


#: array -> (lowest valid value, highest + 1 (a count key or a number), what the values are)
_BOUNDS: dict[str, tuple[int, int | str, str]] = {
    "pair_cluster_id": (0, "n_clusters", "cluster ids"),
    "hard_negatives": (0, "n_sources", "negative source rows"),
    "pair_keyword_values": (0, "n_keywords", "keyword rows"),
}


#: array -> (lowest, highest (inclusive), what): values outside are unusual, not wrong. The
#: in-RAM dataset accepted them, so they become notices (Notices), not refusals.
_USUAL: dict[str, tuple[float, float, str]] = {
    "negative_tiers": (1, 4, "tiers"),
    "pair_relevance": (0.0, 1.0, "relevance values"),
    "centroid_distances": (0.0, 2.0, "centroid distances"),
}


_TOL = 1e-4


class Notices:
    """Unusual but accepted input (values outside the usual ranges, repeated split pairs, counts
    in config.json that disagree with the files), counted per file and reported once each.

    With ``strict=True`` the first one raises ArtifactError instead (for callers that refuse
    such input).
    """

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self._found: dict[tuple[str, str], list[Any]] = {}

    def add(self, where: Path | str, what: str, count: int, example: str) -> None:
        """``count`` more rows of ``where`` show ``what`` (``example`` says where, first seen)."""
        if self.strict:
            raise ArtifactError(f"{where}: {what}: {example}. {REBUILD}")
        entry = self._found.setdefault((str(where), what), [0, example])
        entry[0] += count

    def note(self, message: str) -> None:
        """A notice that is not about rows (a count in config.json, ...)."""
        if self.strict:
            raise ConfigError(message)
        self._found.setdefault((message, ""), [0, ""])

    def messages(self) -> list[str]:
        """One line per kind of notice, in the order first seen."""
        return [
            where
            if not what
            else f"{where}: {what} ({count} in all; {example}); the in-RAM dataset accepted "
            f"this, so it was kept as it is"
            for (where, what), (count, example) in self._found.items()
        ]


def check_block(
    path: Path,
    name: str,
    block: np.ndarray,
    start: int,
    limits: dict[str, int],
    stats: Stats,
    allow_nonfinite: bool,
    notices: Notices | None = None,
) -> None:
    """Check one block (rows ``start:``) of array ``name``; update ``stats``.

    Values that would mis-index (out of range, negative) and NaN/Inf (unless allowed) raise;
    unusual values go to ``notices`` (raised when ``notices`` is None).
    """
    before = stats.nonfinite_rows
    stats.update(block)
    if stats.nonfinite_rows > before and not allow_nonfinite:
        rows = (stats._bad_rows[:5] + start).tolist()
        raise ArtifactError(
            f"{path}: rows {rows} hold NaN or Inf ({stats.nonfinite_rows - before} rows in "
            f"this block). Fix the embeddings, or pass --allow-nonfinite "
            f"(allow_nonfinite=True) to convert them as they are."
        )
    if name == "pair_index" and block.size:
        for col, key, what in (
            (0, "n_questions", "question rows (column 0)"),
            (1, "n_sources", "source rows (column 1)"),
        ):
            c = block[:, col]
            if c.min() < 0 or c.max() >= limits[key]:
                raise _range_error(path, c, start, 0, limits[key], what)
    elif name in _BOUNDS and block.size:
        lo, hi, what = _BOUNDS[name]
        hi = limits[hi] if isinstance(hi, str) else hi
        if block.min() < lo or block.max() >= hi:
            raise _range_error(path, block, start, lo, hi, what)
    elif name in _USUAL and block.size:
        lo, hi, what = _USUAL[name]
        outside = (block < lo - _TOL) | (block > hi + _TOL)
        rows = np.flatnonzero(outside.reshape(block.shape[0], -1).any(axis=1))
        if rows.size:
            notices = notices if notices is not None else Notices(strict=True)
            example = f"rows {(rows[:5] + start).tolist()} hold {block[rows[:5]].tolist()}"
            notices.add(path, f"{what} outside [{lo}, {hi}]", rows.size, example)


class SplitCheck:
    """Checks a split's pair indices block by block: in ``[0, n_pairs)``, non-empty; repeats are
    notices (or errors without ``notices``).

    Keeps one byte per pair (a seen-map), never the split itself.
    """

    def __init__(self, path: Path, n_pairs: int, notices: Notices | None = None) -> None:
        self.path, self.n_pairs, self.notices = path, n_pairs, notices
        self.seen = np.zeros(n_pairs, dtype=bool)
        self.count = 0

    def update(self, block: np.ndarray, start: int) -> None:
        if block.size == 0:
            return
        if block.min() < 0 or block.max() >= self.n_pairs:
            raise _range_error(self.path, block, start, 0, self.n_pairs, "pair indices")
        uniq, counts = np.unique(block, return_counts=True)
        repeated = uniq[(counts > 1) | self.seen[uniq]]
        if repeated.size:  # the in-RAM dataset served such pairs more than once per epoch
            notices = self.notices if self.notices is not None else Notices(strict=True)
            example = f"pairs {repeated[:5].tolist()} appear more than once"
            notices.add(self.path, "split repeats pairs", repeated.size, example)
        self.seen[block] = True
        self.count += block.size

    def finish(self) -> None:
        if self.count == 0:
            raise ArtifactError(
                f"{self.path}: split is empty. Remove the file (val/test are optional) or "
                f"re-run the dataset builder's split step."
            )
