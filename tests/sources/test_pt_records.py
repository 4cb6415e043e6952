"""`.pt` tensors: hand-made records (any field value, written the way torch.save writes it)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from pt_cases import (
    _OFFSET,
    BAD_FILES,
    BAD_RECORDS,
    VALID_RECORDS,
    assert_same_tensor,
    expect_refused,
    tensor_file,
    tensor_pickle,
    torch_load,
    write_archive,
)

from jasper_mmap.converters import convert_pt
from jasper_mmap.sources.pt.reader import open_tensor
from jasper_mmap.synthetic import SyntheticSpec, make_pt_dataset


@pytest.mark.parametrize("name", list(VALID_RECORDS))
def test_valid_hand_made_record(tmp_path, name):
    fields = VALID_RECORDS[name]
    path = tensor_file(tmp_path / "t.pt", **fields)
    # the reference: torch reading the same record (protocol 2, which its weights_only reader
    # handles; mapped to the CPU where the record names a CUDA device)
    ref = tensor_file(tmp_path / "ref.pt", **{**fields, "protocol": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = torch.load(ref, weights_only=True, map_location="cpu")
    assert_same_tensor(path, want)


def test_big_endian_archive(tmp_path):
    want = np.arange(12, dtype=np.float32).reshape(4, 3) * 1.5
    path = tensor_file(tmp_path / "t.pt", data=want.astype(">f4").tobytes(), byteorder=b"big")
    block = open_tensor(path).read_rows(0, 4)
    assert block.dtype == np.dtype(">f4")  # the converter swaps blocks to little-endian
    assert block.astype("<f4").tobytes() == torch_load(path).numpy().tobytes() == want.tobytes()


@pytest.mark.parametrize("name", list(BAD_RECORDS))
def test_malformed_tensor_record_refused(tmp_path, name):
    fields, problem = BAD_RECORDS[name]
    path = tensor_file(tmp_path / "t.pt", **fields)
    expect_refused(path, lambda: open_tensor(path), problem)


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_tensor_file_refused(tmp_path, name):
    make, problem = BAD_FILES[name]
    marker_before = set(tmp_path.iterdir())
    make(tmp_path / "t.pt")
    path = tmp_path / "t.pt"
    expect_refused(path, lambda: open_tensor(path), problem)
    assert set(tmp_path.iterdir()) - marker_before == {path}


def test_negative_offset_never_becomes_rows(tmp_path):
    """Regression: a negative storage offset converted, with zip header bytes as embeddings."""
    src = make_pt_dataset(tmp_path / "src", SyntheticSpec())
    t = torch.load(src / "question_embs.pt", weights_only=True)
    n, d = t.shape
    raw = tensor_pickle(offset=-d, size=(n, d), stride=(d, 1), numel=n * d)
    write_archive(src / "question_embs.pt", raw, {"0": t.numpy().tobytes()})
    assert torch_load(src / "question_embs.pt") is None  # torch refuses it too
    expect_refused(
        src / "question_embs.pt",
        lambda: convert_pt(src, tmp_path / "store", progress=False),
        _OFFSET + f" -{d},",
    )
    assert not (tmp_path / "store").exists()
