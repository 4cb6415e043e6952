"""A loader's position as a small, JSON-safe state, and resuming from it.

# NOTE [resuming]
``loader.state_dict()`` holds what the rest of an epoch depends on and nothing else:
- the data's identity, without paths: the split, its length, the crc32 the store recorded for
  the split's indices and the per-pair arrays, and a digest of the steering and curriculum
  config; the same store at another path (or copied to another machine) resumes, another
  dataset is refused naming the field that differs;
- the order: seed, epoch, shuffle, drop_last (NOTE [epoch order] in jasper_mmap/loading/order.py),
  and the canonical partition it follows, if any (NOTE [partitioned order]; a resume adopts
  it, whatever the new world size);
- the global cursor: samples of the epoch consumed by all ranks together (batches handed to
  the training loop, not gathered ahead), the same on every rank and meaningful at any world
  size and batch size;
- the control state: forced variant, assigned steering probabilities, negatives generation.
``load_state_dict`` checks it, sets the dataset's control state and the sampler's epoch and
cursor; the next iterator starts at the cursor without reading anything before it. Lightning
restores a loader, then calls ``iter()``, then ``sampler.set_epoch(epoch)``: a ``set_epoch`` of
the restored epoch before a batch of that iterator is handed out keeps the restored position;
any other epoch starts at its first batch.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from jasper_mmap.errors import ConfigError, JasperError
from jasper_mmap.format.spec import NEGATIVE_ARRAYS, PAIR_ARRAYS
from jasper_mmap.steering import VARIANTS, check_epoch, distribution

__all__ = ["STATE_VERSION", "ResumeStateError", "data_identity", "check_state"]

STATE_VERSION = 1


class ResumeStateError(JasperError, ValueError):
    """A loader state that cannot resume this loader (another dataset, split or version)."""


def _digest(obj: Any) -> str:
    return hashlib.blake2b(
        json.dumps(obj, sort_keys=True, default=str).encode(), digest_size=16
    ).hexdigest()


def data_identity(dataset: Any) -> dict[str, Any]:
    """What identifies the data of ``dataset``'s split, without paths."""
    store = dataset.store
    # the negatives change with every publication: the state names their generation instead
    names = [f"{dataset.split}_idx", *(n for n in PAIR_ARRAYS if n not in NEGATIVE_ARRAYS)]
    crcs = {n: store.entry(n).get("crc32") for n in names if store.has(n)}
    return {
        "split": dataset.split,
        "length": len(dataset),
        "checksums": crcs,
        "steering": _digest(dict(dataset.schedule.config)),
    }


def check_state(state: Any, identity: dict[str, Any], where: str) -> dict[str, Any]:
    """``state`` checked against this loader's data ``identity``; returned as it is.

    Raises:
        ResumeStateError: not a state of ours, another version, or a field that differs.
    """
    if not isinstance(state, dict) or state.get("kind") != "jasper_mmap.loader":
        raise ResumeStateError(
            f"{where}: load_state_dict got {type(state).__name__}, not a state from a "
            f"jasper_mmap loader's state_dict(). Pass what loader.state_dict() returned."
        )
    version = state.get("version")
    if not _is_int(version) or version != STATE_VERSION:
        raise ResumeStateError(
            f"{where}: the state's version is {state.get('version')!r}; this jasper_mmap reads "
            f"version {STATE_VERSION}. Resume with the jasper_mmap version that saved it."
        )
    data = state.get("data")
    if not isinstance(data, dict):
        raise ResumeStateError(f"{where}: the state has no 'data' object. {_FIX}")
    for key in ("split", "length", "checksums", "steering"):
        if data.get(key) != identity[key]:
            raise ResumeStateError(
                f"{where}: the state was saved for another dataset: data.{key} is "
                f"{_short(data.get(key))} there and {_short(identity[key])} here. Resume with "
                f"the store (and split) the run was trained on."
            )
    order, control = state.get("order"), state.get("control")
    if not isinstance(order, dict) or not isinstance(control, dict):
        raise ResumeStateError(f"{where}: the state lacks 'order' or 'control'. {_FIX}")
    cursor = state.get("cursor")
    if not (isinstance(cursor, int) and not isinstance(cursor, bool)) or not (
        0 <= cursor <= identity["length"]
    ):
        raise ResumeStateError(
            f"{where}: the state's cursor should be an integer in [0, {identity['length']}], "
            f"but got {cursor!r:.40}. {_FIX}"
        )
    _check_fields(order, control, where)
    part = order.get("partition")
    if part is not None and not (
        isinstance(part, dict)
        and set(part) == {"parts", "unit_rows", "window", "every_epoch"}
        and all(_is_int(part[k]) and part[k] >= 1 for k in ("parts", "unit_rows", "window"))
        and isinstance(part["every_epoch"], bool)
    ):
        raise ResumeStateError(
            f"{where}: the state's order.partition should be null or "
            f'{{"parts", "unit_rows", "window": integers >= 1, "every_epoch": a bool}}, but '
            f"got {part!r:.80}. {_FIX}"
        )
    forced = control.get("forced")
    if forced is not None and forced not in VARIANTS:
        raise ResumeStateError(f"{where}: control.forced {forced!r:.40} is not a variant. {_FIX}")
    probs = control.get("steering_probs")
    if probs is not None:
        ok = isinstance(probs, dict) and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in probs.values()
        )
        try:  # checked here, before load_state_dict changes anything (all or nothing)
            if ok:
                distribution(probs, "control.steering_probs", _FIX)
        except ConfigError:
            ok = False
        if not ok:
            raise ResumeStateError(
                f"{where}: control.steering_probs is malformed ({probs!r:.80}): it should map "
                f"{VARIANTS} to finite non-negative numbers summing to 1, or be null. {_FIX}"
            )
    return state


def _is_int(value: Any) -> bool:
    """A Python int (not a bool): what state_dict writes and JSON reads back. numpy integers
    are refused with the rest: a state is plain JSON data."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_fields(order: dict[str, Any], control: dict[str, Any], where: str) -> None:
    """The order's and the control state's fields: present, of their types and ranges, so
    that load_state_dict never fails half-way (nor casts a wrong value into a right one)."""
    for name, ok, want in (
        ("order.seed", _is_int(order.get("seed")) and order.get("seed") >= 0, "an integer >= 0"),
        ("order.shuffle", isinstance(order.get("shuffle"), bool), "true or false"),
        ("order.drop_last", isinstance(order.get("drop_last"), bool), "true or false"),
        (
            "control.negatives_generation",
            _is_int(control.get("negatives_generation"))
            and control.get("negatives_generation") >= 0,
            "an integer >= 0",
        ),
    ):
        if not ok:
            value = (order if name.startswith("order.") else control).get(name.split(".")[1])
            raise ResumeStateError(
                f"{where}: the state's {name} should be {want}, but got {value!r:.40}. {_FIX}"
            )
    for name, value in (
        ("order.epoch", order.get("epoch")),
        ("control.epoch", control.get("epoch")),
    ):
        try:
            if not _is_int(value):  # an int only: JSON keeps ints (1.0 was not saved)
                raise ConfigError(name)
            check_epoch(value, name)
        except ConfigError:
            raise ResumeStateError(
                f"{where}: the state's {name} should be an integer epoch, but got "
                f"{value!r:.40}. {_FIX}"
            ) from None


_FIX = "Pass what loader.state_dict() returned, unchanged."


def _short(value: Any) -> str:
    return f"{value!r:.80}"


def probs_dict(override: np.ndarray | None) -> dict[str, float] | None:
    """Assigned steering probabilities as ``{variant: p}`` (None: the curriculum's)."""
    if override is None:
        return None
    return {v: float(p) for v, p in zip(VARIANTS, override.tolist(), strict=True)}
