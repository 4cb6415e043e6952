"""Helpers of the remote tests."""

from __future__ import annotations

import numpy as np
import torch

from jasper_mmap.remote.catalog import unit_pieces


def as_dict(batch) -> dict:
    return {k: batch[k] for k in batch.keys()}


def assert_batches_equal(a, b) -> None:
    a, b = as_dict(a), as_dict(b)
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype, k
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def assert_runs_equal(xs, ys) -> None:
    assert len(xs) == len(ys) > 0
    for x, y in zip(xs, ys, strict=True):
        assert_batches_equal(x, y)


def pairs_of(ds) -> np.ndarray:
    """The pair row of each sample of the dataset's split."""
    return np.asarray(ds.store.gather_unchecked(f"{ds.split}_idx", np.arange(len(ds))))


def sample_in_unit(ds, unit: int, unit_rows: int = 16) -> int:
    """A sample index of ``ds`` whose pair row lies in ``unit``."""
    hits = np.flatnonzero(pairs_of(ds) // unit_rows == unit)
    assert hits.size, f"no sample of {ds.split} in unit {unit}"
    return int(hits[0])


def unit_piece(catalog: dict, group: str, unit: int) -> tuple[str, str, int, int]:
    """(array, object key, start, stop) of the first piece of ``unit`` of ``group``."""
    arrays = catalog["groups"][group]["arrays"]
    name = sorted(arrays)[0]
    file, a, b = unit_pieces(arrays[name], unit, int(catalog["unit_rows"]))[0]
    return name, file, a, b


def flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0xFF
    return bytes(b)


def filled_mirror(bucket, store_path):
    """A store uploaded, and a node's mirror of it holding every unit the train split reads:
    ``(url, cache_dir, local dataset, remote dataset, every sample index)``."""
    from jasper_mmap import JASPERSteeringDataset

    url = bucket.upload(store_path)
    cache = bucket.cache()
    local = JASPERSteeringDataset(store_path, "train")
    ds = JASPERSteeringDataset(url, "train", cache_dir=cache)
    idx = list(range(len(ds)))
    assert_batches_equal(ds.__getitems__(idx), local.__getitems__(idx))
    return url, cache, local, ds, idx
