"""A small keyword pickle must not silently become a huge store (NOTE [expansion] in
converters/keyword_pickle.py): memo references let one long list stand for every pair."""

from __future__ import annotations

import pickle
import re
import shutil

import numpy as np
import pytest
import torch

from jasper_mmap import open_store
from jasper_mmap.converters import convert_pt
from jasper_mmap.errors import ArtifactError
from jasper_mmap.sources.pt import keywords as kp
from jasper_mmap.sources.pt.keywords import decode_keyword_rows

N_P = 120  # pairs of the conftest dataset


def _copy(pt_dataset, tmp_path):
    src = tmp_path / "ds"
    shutil.copytree(pt_dataset, src)
    return src


def _shared_growing_list(n: int) -> list[list[int]]:
    """The builder bug: every pair holds the same list, which grew by one id per pair."""
    rows = [[]] * n
    for i in range(n):
        rows[i].append(i % 7)
    return rows


def test_a_real_sized_shared_row_is_refused_before_writing_much(tmp_path):
    # one 1000-id list shared by 30000 pairs: a 63 KB pickle for 240 MB of keyword arrays
    path = tmp_path / "kw.pt"
    path.write_bytes(pickle.dumps([list(range(1000))] * 30000, protocol=4))
    handed = []
    with pytest.raises(ArtifactError) as info:
        decode_keyword_rows(path, lambda lens, vals: handed.append(8 * (lens.size + vals.size)))
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and re.search(r"\(x\d+, limit x64\)", msg), msg
    assert "[[] for _ in range(n)]" in msg and "MAX_EXPANSION" in msg, msg
    assert sum(handed) <= kp.EXPANSION_FLOOR + (8 << 20), "it went on well past the limit"


def test_convert_refuses_the_shared_growing_list_and_leaves_nothing(
    pt_dataset, tmp_path, monkeypatch
):
    monkeypatch.setattr(kp, "EXPANSION_FLOOR", 64 << 10, raising=False)  # tiny fixture
    src = _copy(pt_dataset, tmp_path)
    torch.save(_shared_growing_list(N_P), src / "pair_keyword_ids.pt")
    with pytest.raises(ArtifactError, match=r"pair_keyword_ids expands from \d+ bytes"):
        convert_pt(src, tmp_path / "store", progress=False)
    assert not (tmp_path / "store").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"], "a partial was left behind"


def test_honest_sharing_and_the_documented_override_still_convert(
    pt_dataset, tmp_path, monkeypatch
):
    monkeypatch.setattr(kp, "EXPANSION_FLOOR", 1 << 10)
    src = _copy(pt_dataset, tmp_path)
    torch.save([[1, 2]] * N_P, src / "pair_keyword_ids.pt")  # x12: shared, but small rows
    store = open_store(convert_pt(src, tmp_path / "a", progress=False))
    assert store.read("pair_keyword_values").tolist() == [1, 2] * N_P
    torch.save(_shared_growing_list(N_P), src / "pair_keyword_ids.pt")
    monkeypatch.setattr(kp, "MAX_EXPANSION", float("inf"))  # what the message tells
    store = open_store(convert_pt(src, tmp_path / "b", progress=False))
    assert np.diff(store.read("pair_keyword_offsets")).tolist() == [N_P] * N_P
