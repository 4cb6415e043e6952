"""`.pt` inputs: every valid form is read exactly, every malformed one is refused cleanly.

Rule: whatever ``torch.load(path, weights_only=True)`` accepts as a tensor, or what a pickle
builds as a list of lists of ints (``pickle.dump`` protocols 0-5, ``torch.save`` with any
``pickle_protocol``), is valid and must be read bit-exactly; anything else gives an
``ArtifactError`` naming the file and saying what was found, without executing anything.
Also: conversion never starts a child process (it works without a ``__main__`` guard, inside
``multiprocessing.Pool`` and DataLoader workers), and the keyword thread stops on cancel.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pt_cases import save_kw

from jasper_mmap import open_store
from jasper_mmap.converters import convert_pt
from jasper_mmap.synthetic import SyntheticSpec, make_pt_dataset

# -- through convert_pt ----------------------------------------------------------------------


def _keyword_lists(store) -> list[list[int]]:
    offsets, values = store.read("pair_keyword_offsets"), store.read("pair_keyword_values")
    return [values[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


def test_convert_tensors_of_every_valid_form(tmp_path):
    """Parameters, float8, uint16/32, bfloat16 and strided or offset views convert exactly."""
    src = make_pt_dataset(tmp_path / "src", SyntheticSpec())

    def load(name):
        return torch.load(src / f"{name}.pt", weights_only=True)

    def wider(t):  # a bigger tensor whose slice [3 : 3 + n] (every other column) is t
        big = torch.zeros(t.shape[0] + 5, 2 * t.shape[1], dtype=t.dtype)
        big[3 : 3 + t.shape[0], ::2] = t
        return big[3 : 3 + t.shape[0], ::2]

    forms = {
        "question_embs": torch.nn.Parameter(load("question_embs")),
        "source_embs": load("source_embs").to(torch.float8_e4m3fn),
        "keyword_embs": torch.nn.Parameter(load("keyword_embs").bfloat16()),
        "centroid_embs": load("centroid_embs").to(torch.float8_e5m2).t().contiguous().t(),
        "steering_residual": wider(load("steering_residual")),
        "steering_centroid": load("steering_centroid").t().contiguous().t(),
        "hard_negatives": load("hard_negatives").to(torch.uint16),
        "pair_index": wider(load("pair_index").to(torch.int32)),
        "pair_cluster_id": load("pair_cluster_id").to(torch.uint8),
        "train_idx": load("train_idx").to(torch.uint32),
    }
    for name, t in forms.items():
        torch.save(t, src / f"{name}.pt")
    with open_store(convert_pt(src, tmp_path / "store", progress=False)) as store:
        for name, t in forms.items():
            want = t.detach().float() if t.is_floating_point() else t.to(torch.int64)
            got = store.gather(name, np.arange(t.shape[0]))
            assert got.tobytes() == want.numpy().tobytes(), name


KEYWORD_FORMS = {
    "pickle_protocol_0": lambda lists: (lists, ("pickle", 0)),
    "pickle_protocol_1_outer_tuple_of_tuples": lambda lists: (
        tuple(tuple(r) for r in lists),
        ("pickle", 1),
    ),
    "torch_shared_rows": lambda lists: ([lists[0]] * len(lists), ("torch", 2)),
    "torch_protocol_5_upstream_pattern": lambda lists: (
        ([[0, 1, 2], [1, 3], [2, 4, 5]] * len(lists))[: len(lists)],
        ("torch", 5),
    ),
}


@pytest.mark.parametrize("form", list(KEYWORD_FORMS))
def test_convert_keyword_files_of_every_valid_form(tmp_path, form):
    src = make_pt_dataset(tmp_path / "src", SyntheticSpec())
    lists = torch.load(src / "pair_keyword_ids.pt", weights_only=True)
    lists[0] = lists[0] or [1]
    obj, saver = KEYWORD_FORMS[form](lists)
    save_kw(src / "pair_keyword_ids.pt", obj, saver)
    with open_store(convert_pt(src, tmp_path / "store", progress=False)) as store:
        assert _keyword_lists(store) == [list(r) for r in obj]
