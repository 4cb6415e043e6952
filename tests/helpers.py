"""Helpers shared by test modules: reference reads of `.pt` artifacts (whole files: tiny fixtures
only) and running a script in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
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


def run_script(tmp_path: Path, script: str, *args: str, timeout: int = 120) -> str:
    """Run ``script`` from a file in a fresh interpreter (spawned children import
    ``__main__``'s functions from it); fail with its output unless it exits 0. Its stdout."""
    path = tmp_path / "script.py"
    path.write_text(script)
    r = subprocess.run(
        [sys.executable, str(path), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    return r.stdout
