"""Steering variants: the curriculum of their probabilities and a counter-based draw.

# NOTE [counter-based steering RNG]
The variant of a sample is a pure function of ``(seed, epoch, pair)``: a splitmix64 hash of the
three gives a uniform number in [0, 1), compared with the cumulative variant probabilities of
that epoch. No RNG state exists anywhere, so the draw cannot depend on which worker serves a
sample, in which order, in which batch, with fork or spawn. ``pair`` is the pair row (the
split's value), so a sample keeps its draw whatever the split's order.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ConfigError

__all__ = ["VARIANTS", "SteeringSchedule", "uniform", "draw_variants", "variant_index"]

log = logging.getLogger(__name__)

#: variant names in index order: 0 = zero steering, 1 = centroid, 2 = keyword, 3 = residual
VARIANTS = ("zero", "centroid", "keyword", "residual")

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer, elementwise on uint64 (wrapping arithmetic)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def uniform(seed: int, epoch: int, ids: np.ndarray) -> np.ndarray:
    """Uniform floats in [0, 1), one per id, a pure function of (seed, epoch, id)."""
    ids = np.asarray(ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = _mix(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
        h = _mix(h ^ np.uint64(epoch & 0xFFFFFFFFFFFFFFFF))
        h = _mix(h ^ ids)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def variant_index(variant: str | None) -> int:
    """Index of a variant name; ``None`` -> -1 (stochastic)."""
    if variant is None:
        return -1
    if variant not in VARIANTS:
        raise ValueError(
            f"variant should be one of {VARIANTS} or None, but got variant={variant!r}"
        )
    return VARIANTS.index(variant)


@dataclass(frozen=True)
class SteeringSchedule:
    """Variant probabilities per epoch, from ``config.json``.

    With a curriculum holding ``zero_prob_start``/``zero_prob_end``/``epochs_total``, the zero
    probability moves linearly from start (epoch 0) to end (epoch ``epochs_total`` and later);
    the other three share the rest in proportion to ``steering_probabilities``. Without one,
    ``steering_probabilities`` (default uniform) holds at every epoch.
    """

    base: tuple[float, float, float, float]
    zero_start: float | None = None
    zero_end: float | None = None
    epochs_total: int = 0

    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: str = "config.json") -> SteeringSchedule:
        raw = config.get("steering_probabilities") or {v: 0.25 for v in VARIANTS}
        try:
            base = np.array([float(raw.get(v, 0.0)) for v in VARIANTS])
        except (TypeError, ValueError, AttributeError):
            raise ConfigError(
                f"{where}: steering_probabilities should map {VARIANTS} to numbers, but got "
                f"{raw!r}. Fix the file."
            ) from None
        if (base < 0).any() or base.sum() <= 0:
            raise ConfigError(
                f"{where}: steering_probabilities should be non-negative with a positive sum, "
                f"but got {raw!r}. Fix the file."
            )
        base = tuple((base / base.sum()).tolist())
        cur = config.get("curriculum")
        if not cur:
            return cls(base)
        if "zero_prob_start" not in cur and "zero_prob_end" not in cur:
            log.info(
                "%s: curriculum %s has no zero_prob_* keys; steering probabilities stay fixed",
                where,
                sorted(cur),
            )
            return cls(base)
        try:
            start, end = float(cur["zero_prob_start"]), float(cur["zero_prob_end"])
            total = int(cur.get("epochs_total", 0))
        except (KeyError, TypeError, ValueError):
            raise ConfigError(
                f"{where}: curriculum should hold numeric zero_prob_start, zero_prob_end and "
                f"epochs_total, but got {cur!r}. Fix the file."
            ) from None
        if not (0 <= start <= 1 and 0 <= end <= 1) or total < 0:
            raise ConfigError(
                f"{where}: curriculum zero probabilities should be in [0, 1] and epochs_total "
                f">= 0, but got {cur!r}. Fix the file."
            )
        return cls(base, start, end, total)

    def probs(self, epoch: int) -> np.ndarray:
        """Probabilities of (zero, centroid, keyword, residual) at ``epoch``."""
        base = np.array(self.base)
        if self.zero_start is None:
            return base
        t = (
            1.0
            if self.epochs_total == 0
            else min(max(epoch, 0), self.epochs_total) / self.epochs_total
        )
        zero = self.zero_start + (self.zero_end - self.zero_start) * t
        rest = base[1:] / base[1:].sum() if base[1:].sum() > 0 else np.full(3, 1 / 3)
        return np.concatenate([[zero], (1.0 - zero) * rest])


def draw_variants(
    seed: int, epoch: int, pairs: np.ndarray, probs: np.ndarray, forced: int = -1
) -> np.ndarray:
    """Variant index (int64) of each pair at ``epoch``; ``forced >= 0`` overrides the draw."""
    pairs = np.asarray(pairs)
    if forced >= 0:
        return np.full(pairs.shape, forced, dtype=np.int64)
    edges = np.cumsum(probs)
    edges[-1] = np.inf  # rounding never leaves a draw past the last variant
    return np.searchsorted(edges, uniform(seed, epoch, pairs), side="right").astype(np.int64)
