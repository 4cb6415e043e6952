"""Steering variants: the curriculum of their probabilities and a counter-based draw.

# NOTE [counter-based steering RNG]
The variant of a sample is a pure function of ``(seed, epoch, pair)``: a splitmix64 hash of the
three gives a uniform number in [0, 1), compared with the cumulative variant probabilities of
that epoch. No RNG state exists anywhere, so the draw cannot depend on which worker serves a
sample, in which order, in which batch, with fork or spawn. ``pair`` is the pair row (the
split's value), so a sample keeps its draw whatever the split's order.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from jasper_mmap.errors import ConfigError

__all__ = [
    "VARIANTS",
    "SteeringSchedule",
    "compute_steering_probs",
    "distribution",
    "uniform",
    "draw_variants",
    "variant_index",
]

log = logging.getLogger(__name__)

#: variant names in index order: 0 = zero steering, 1 = centroid, 2 = keyword, 3 = residual
VARIANTS = ("zero", "centroid", "keyword", "residual")

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer, elementwise on uint64 (wrapping arithmetic), in place: ``x`` is
    a fresh array of the caller's."""
    x += _GOLDEN
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


_MASK64 = (1 << 64) - 1


@functools.lru_cache(maxsize=64)
def _epoch_key(seed: int, epoch: int) -> np.uint64:
    """``_mix(_mix(seed) ^ epoch)``, computed once per (seed, epoch) with Python integers."""

    def mix(x: int) -> int:  # _mix on one value
        x = (x + int(_GOLDEN)) & _MASK64
        x = ((x ^ (x >> 30)) * int(_M1)) & _MASK64
        x = ((x ^ (x >> 27)) * int(_M2)) & _MASK64
        return x ^ (x >> 31)

    return np.uint64(mix(mix(seed & _MASK64) ^ (epoch & _MASK64)))


def uniform(seed: int, epoch: int, ids: np.ndarray) -> np.ndarray:
    """Uniform floats in [0, 1), one per id, a pure function of (seed, epoch, id)."""
    ids = np.atleast_1d(np.asarray(ids, dtype=np.int64)).view(np.uint64)
    h = _mix(_epoch_key(int(seed), int(epoch)) ^ ids)  # a new array; arithmetic wraps
    h >>= np.uint64(11)
    return h.astype(np.float64) * (1.0 / (1 << 53))


def variant_index(variant: str | None) -> int:
    """Index of a variant name; ``None`` -> -1 (stochastic)."""
    if variant is None:
        return -1
    if variant not in VARIANTS:
        raise ValueError(
            f"variant should be one of {VARIANTS} or None, but got variant={variant!r}"
        )
    return VARIANTS.index(variant)


#: what the in-RAM dataset's formula uses for a curriculum key or a base key that is missing
CURRICULUM_DEFAULTS = {"zero_prob_start": 0.5, "zero_prob_end": 0.1, "epochs_total": 100}
MISSING_BASE_PROB = 0.3


def compute_steering_probs(config: Mapping[str, Any], epoch: int) -> dict[str, float]:
    """The in-RAM dataset's ``_compute_steering_probs``, edge cases included.

    No (or an empty) ``curriculum``: ``steering_probabilities`` as it is. Otherwise, whatever
    else the block holds, the zero probability moves linearly from ``zero_prob_start`` to
    ``zero_prob_end`` over ``epochs_total`` epochs (defaults 0.5, 0.1, 100; ``epochs_total`` 0
    counts as 1), and the rest is shared in proportion to the base probabilities without zero
    (a missing base key counts as 0.3); with a base zero of 1 the rest goes to centroid.
    """
    base = config["steering_probabilities"]
    curriculum = config.get("curriculum") or {}
    if not curriculum:
        return dict(base)
    c = {**CURRICULUM_DEFAULTS, **curriculum}
    progress = min(epoch / max(c["epochs_total"], 1), 1.0)
    zero = c["zero_prob_start"] + (c["zero_prob_end"] - c["zero_prob_start"]) * progress
    remaining = 1.0 - zero
    total_non_zero = 1.0 - base.get("zero", 0.0)
    if total_non_zero > 0:
        scale = remaining / total_non_zero
        rest = {v: base.get(v, MISSING_BASE_PROB) * scale for v in VARIANTS[1:]}
        return {"zero": zero, **rest}
    return {"zero": zero, "centroid": remaining, "keyword": 0.0, "residual": 0.0}


def distribution(probs: Mapping[str, Any], where: str, fix: str | None = None) -> np.ndarray:
    """The four variant probabilities to draw from, checked.

    Raises:
        ConfigError: a name other than the four variants, a value that is not a finite
            non-negative number, or a sum that is not 1 (the in-RAM dataset could not draw
            from them either).
    """
    if not isinstance(probs, Mapping):  # a tensor or a list: which variant is which?
        raise ConfigError(
            f"{where}: steering probabilities should map {VARIANTS} to finite non-negative "
            f"numbers summing to 1, but got a {type(probs).__name__} ({probs!r:.80}). "
            + (fix or "Fix steering_probabilities in that config.json.")
            + " Give a dict of variant names, e.g. {'zero': 0.25, 'centroid': 0.25, ...}."
        )
    unknown = sorted(set(map(str, probs)) - set(VARIANTS))
    try:
        p = np.array([float(probs.get(v, 0.0)) for v in VARIANTS])
    except (TypeError, ValueError, AttributeError):
        p = np.array([np.nan])
    if unknown or not np.isfinite(p).all() or (p < 0).any() or abs(p.sum() - 1.0) > 1e-6:
        raise ConfigError(
            f"{where}: steering probabilities should map {VARIANTS} to finite non-negative "
            f"numbers summing to 1, but they are {dict(probs)!r} (sum {p.sum():.6g}). "
            + (
                fix
                or f"Fix steering_probabilities/curriculum in that config.json (a missing base "
                f"key counts as {MISSING_BASE_PROB} under a curriculum)."
            )
        )
    return p / p.sum()


_TOO_LARGE = " (an integer too large for a float)"

#: seeds and epochs are stored and hashed as 64-bit integers; torch's generators take seeds
#: below 2**64, and a shuffle seeds one with seed + epoch (DistributedSampler)
SEED_LIMIT = 2**63


def check_seed(value: Any, where: str, fix: str) -> int:
    """``value`` as a seed: an integer (not a bool) in [0, 2**63).

    Raises:
        ConfigError: anything else (a ValueError), naming ``where``; never masked or cast,
            so no two seeds draw alike.
    """
    ok = isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)
    if ok and 0 <= int(value) < SEED_LIMIT:
        return int(value)
    raise ConfigError(
        f"{where} should be an integer in [0, 2**63), but got {value!r:.60}; it is never "
        f"masked or cast (two seeds would draw alike, and shuffling would overflow). {fix}"
    )


def check_epoch(value: Any, where: str) -> int:
    """``value`` as an epoch: an integer, or a float that is one, in [-2**63, 2**63).

    Raises:
        ConfigError: NaN, infinite, fractional, a bool or another type, or out of range (a
            ValueError, as ``int(nan)`` was).
    """
    if isinstance(value, float | np.floating) and math.isfinite(value) and value == int(value):
        value = int(value)
    ok = isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)
    if ok and -SEED_LIMIT <= int(value) < SEED_LIMIT:
        return int(value)
    raise ConfigError(
        f"{where}: the epoch should be an integer in [-2**63, 2**63), but got {value!r:.60}. "
        f"Pass the epoch number (an int)."
    )


def _too_large(value: Any) -> bool:
    """Whether ``value`` is an integer that no float can hold (``float()`` overflows)."""
    if type(value) is not int:
        return False
    try:
        float(value)
    except OverflowError:
        return True
    return False


def _is_number(value: Any) -> bool:
    """Whether ``value`` is a JSON number the formula can compute with: an int or float (not
    a bool, not a string), within a float's range."""
    return type(value) in (int, float) and not _too_large(value)


@dataclass(frozen=True)
class SteeringSchedule:
    """Variant probabilities per epoch, from ``config.json`` (see :func:`compute_steering_probs`).

    Attributes:
        config: the ``steering_probabilities`` and ``curriculum`` blocks.
        where: the file they came from, for error messages.
    """

    config: Mapping[str, Any]
    where: str = "config.json"

    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: str = "config.json") -> SteeringSchedule:
        """Check the blocks' types (not their values: see :meth:`probs`).

        Raises:
            ConfigError: ``steering_probabilities`` missing or not an object, ``curriculum``
                not an object, or a curriculum value that is not a number.
        """
        base, cur = config.get("steering_probabilities"), config.get("curriculum")
        if not isinstance(base, Mapping):
            raise ConfigError(
                f"{where}: steering_probabilities should be an object mapping {VARIANTS} to "
                f"probabilities, but got {base!r}. Add it to config.json."
            )
        if cur is not None and not isinstance(cur, Mapping):
            raise ConfigError(f"{where}: curriculum should be an object, but got {cur!r}.")
        for key in CURRICULUM_DEFAULTS:
            value = (cur or {}).get(key, 0)
            if not _is_number(value):
                raise ConfigError(
                    f"{where}: curriculum {key} should be a number, but got {key}={value!r:.60}"
                    f"{_TOO_LARGE if _too_large(value) else ''}. Fix the curriculum in that "
                    f"config.json."
                )
        for key, value in base.items():
            # the message distribution() gives, saying which value; a base value outside
            # [0, 1] (NaN, Infinity) is refused here too, since under a curriculum the formula
            # would turn it into a valid-looking distribution (all non-zero mass to centroid)
            if not _is_number(value):
                problem = f"a number, but got {key}={value!r:.60}"
                problem += _TOO_LARGE if _too_large(value) else ""
                fix = "numbers, not strings"
            elif not 0.0 <= value <= 1.0:
                problem = f"a finite number in [0, 1], but got {key}={value!r:.60}"
                fix = "each a probability in [0, 1]"
            else:
                continue
            raise ConfigError(
                f"{where} at epoch 0: steering probabilities should map {VARIANTS} to "
                f"finite non-negative numbers summing to 1, but they are {dict(base)!r:.200}"
                f" (steering_probabilities {key} should be {problem}). Fix "
                f"steering_probabilities/curriculum in that config.json ({fix})."
            )
        return cls({"steering_probabilities": dict(base), "curriculum": dict(cur or {})}, where)

    def as_dict(self, epoch: int) -> dict[str, float]:
        """The in-RAM dataset's ``steering_probs`` at ``epoch`` (unchecked, as it computes it)."""
        return compute_steering_probs(self.config, epoch)

    def check(self) -> None:
        """Raise :class:`ConfigError` unless the draw can use the probabilities at epoch 0 and
        at the curriculum's last epoch (after which they stay), as a dataset's construction
        and its ``set_epoch`` calls would."""
        self.probs(0)
        if self.config["curriculum"]:
            total = float({**CURRICULUM_DEFAULTS, **self.config["curriculum"]}["epochs_total"])
            if math.isfinite(total):  # an infinite curriculum stays at its start: epoch 0
                self.probs(math.ceil(max(total, 1)))  # the formula's end: progress reaches 1

    def probs(self, epoch: int) -> np.ndarray:
        """Probabilities of (zero, centroid, keyword, residual) at ``epoch``, checked.

        Raises:
            ConfigError: the formula gives values the draw cannot use (NaN, negative, a sum
                other than 1) at this epoch.
        """
        return distribution(self.as_dict(epoch), f"{self.where} at epoch {epoch}")


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
