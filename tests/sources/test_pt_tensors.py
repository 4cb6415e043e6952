"""`.pt` tensors: every form weights_only loading accepts is read bit-exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pt_cases import F8, VALID_TENSORS, assert_same_tensor, torch_load

from jasper_mmap.sources.pt.reader import open_tensor


@pytest.mark.parametrize("name", list(VALID_TENSORS))
def test_valid_tensor_read_bit_exactly(tmp_path, name):
    t = VALID_TENSORS[name]()
    path = tmp_path / "t.pt"
    torch.save(t, path)
    loaded = torch_load(path)
    assert loaded is not None, "torch.load(weights_only=True) accepts it: so must we"
    assert_same_tensor(path, loaded)
    assert_same_tensor(path, t)


@pytest.mark.parametrize("protocol", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("name", ["float32", "parameter", "float8_e4m3fn_strided_view"])
def test_tensor_saved_with_any_pickle_protocol(tmp_path, name, protocol):
    t = VALID_TENSORS[name]()
    torch.save(t, tmp_path / "t.pt", pickle_protocol=protocol)
    assert_same_tensor(tmp_path / "t.pt", t)


@pytest.mark.parametrize("name", F8)
def test_float8_table_matches_torch_for_all_256_codes(tmp_path, name):
    t = torch.arange(256, dtype=torch.uint8).view(getattr(torch, name))
    torch.save(t, tmp_path / "t.pt")
    got = open_tensor(tmp_path / "t.pt").read_rows(0, 256)
    assert got.dtype == np.float32
    assert got.view(np.uint32).tolist() == t.float().numpy().view(np.uint32).tolist()
    assert np.isnan(got).sum() == torch.isnan(t.float()).sum().item() >= 1
