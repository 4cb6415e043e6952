"""Fixtures of the store-integrity tests (tests/format)."""

from __future__ import annotations

import pytest
from damage_cases import BOTH

from jasper_mmap.converters import convert_pt


@pytest.fixture(scope="module")
def good(tmp_path_factory, pt_dataset):
    """One good store per backend, converted from the session's `.pt` dataset."""
    root = tmp_path_factory.mktemp("good")
    return {b: convert_pt(pt_dataset, root / b, format=b, progress=False) for b in BOTH}
