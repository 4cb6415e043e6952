"""Shared fixtures: tiny synthetic `.pt` datasets and stores built in tmp_path."""

from __future__ import annotations

import threading

import pytest
import torch

from jasper_mmap.converters import convert_pt
from jasper_mmap.synthetic import SyntheticSpec, make_pt_dataset

BACKENDS = ("safetensors", "zarr")


@pytest.fixture(scope="session")
def pt_dataset(tmp_path_factory):
    """A tiny valid `.pt` dataset directory (120 pairs, D=16, n_neg=6); treat as read-only."""
    return make_pt_dataset(tmp_path_factory.mktemp("pt") / "ds", SyntheticSpec())


@pytest.fixture(scope="session", params=BACKENDS)
def store_path(request, tmp_path_factory, pt_dataset):
    """A store converted from `pt_dataset`, once per backend; treat as read-only."""
    dst = tmp_path_factory.mktemp(request.param) / "store"
    return convert_pt(pt_dataset, dst, format=request.param, progress=False)


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Fail a test that leaves non-daemon threads running behind it."""
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon]
    assert not leaked, f"test leaked threads: {leaked}"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip cleanly on a machine without CUDA (``pytest -m gpu`` selects
    them where there is one)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
