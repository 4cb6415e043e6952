"""The per-sample random draws: a pure function of (seed, epoch, id), the same on every
version, process and thread."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from jasper_mmap.steering import draw_variants, uniform

MASK = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """The splitmix64 finalizer on one value, written out with Python integers."""
    x = (x + 0x9E3779B97F4A7C15) & MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def reference(seed: int, epoch: int, ids) -> list[float]:
    key = splitmix64(splitmix64(int(seed) & MASK) ^ (int(epoch) & MASK))
    return [(splitmix64(key ^ (int(i) & MASK)) >> 11) / float(1 << 53) for i in ids]


SEEDS = [0, 1, 42, -1, 2**63 + 5, 2**64 + 3, np.uint64(2**64 - 1), np.int64(-5)]
EPOCHS = [0, 1, 7, -3, 2**40, np.uint64(2**63)]


@pytest.mark.parametrize("seed", SEEDS, ids=str)
def test_uniform_is_splitmix64_of_seed_epoch_and_id(seed):
    ids = np.array([0, 1, 2, 95, 2**31, 2**62 + 7, -1], dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning from the wrapping arithmetic
        for epoch in EPOCHS:
            got = uniform(seed, epoch, ids)
            assert got.dtype == np.float64
            assert got.tolist() == reference(seed, epoch, ids), (seed, epoch)


def test_uniform_keeps_the_shape_of_its_ids_and_stays_in_0_1():
    assert uniform(3, 4, 17).shape == (1,)
    assert uniform(3, 4, 17).tolist() == reference(3, 4, [17])
    two_d = np.arange(12).reshape(3, 4)
    got = uniform(3, 4, two_d)
    assert got.shape == (3, 4)
    assert got.reshape(-1).tolist() == reference(3, 4, range(12))
    many = uniform(0, 0, np.arange(100_000))
    assert 0.0 <= many.min() and many.max() < 1.0
    assert abs(many.mean() - 0.5) < 0.01


def test_draw_variants_follows_the_probabilities_and_forcing():
    pairs = np.arange(60_000)
    probs = np.array([0.5, 0.2, 0.2, 0.1])
    v = draw_variants(7, 2, pairs, probs)
    assert v.dtype == np.int64
    np.testing.assert_allclose(np.bincount(v, minlength=4) / v.size, probs, atol=0.01)
    u = np.array(reference(7, 2, pairs[:500]))
    np.testing.assert_array_equal(v[:500], np.searchsorted(np.cumsum(probs), u, side="right"))
    assert (draw_variants(7, 2, pairs[:10], probs, forced=3) == 3).all()
