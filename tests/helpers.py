"""Reference reads of `.pt` artifacts for tests (loads whole files: tiny fixtures only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def load_pt(path: Path) -> np.ndarray:
    """The tensor in `path` as numpy (exact bits; bfloat16 as float32)."""
    t = torch.load(path, weights_only=True)
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


def keyword_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, values) of the list of lists in `path`."""
    lists = torch.load(path, weights_only=True)
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int64)
    values = np.array([v for x in lists for v in x], dtype=np.int64)
    return offsets, values
