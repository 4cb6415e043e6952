"""Keyword ids -> offsets + values arrays, run in a child process beside the tensor streaming.

Decoding the ragged ``pair_keyword_ids`` pickle is Python-speed work (about 7 us per pair), so
:func:`convert_pt` runs it in a spawned child process while the main process streams the large
tensors; it writes two raw int64 files into the store's temporary directory, which the main
process then copies into the ``pairs`` unit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from jasper_mmap.errors import ArtifactError

from .checks import Stats, check_block
from .pt_reader import iter_keyword_rows

__all__ = ["parse_keywords"]


def parse_keywords(path: str, tmp: str, n_pairs: int, n_keywords: int) -> dict[str, Any]:
    """Decode ``path`` into ``tmp/.kw_offsets.bin`` (n_pairs + 1) and ``tmp/.kw_values.bin``.

    Returns:
        ``{"nnz", "offsets_stats", "values_stats"}``.

    Raises:
        ArtifactError: not a list of lists of int, wrong number of rows, ids out of range.
    """
    src, out = Path(path), Path(tmp)
    stats = Stats()
    rows = nnz = 0
    with open(out / ".kw_offsets.bin", "wb") as fo, open(out / ".kw_values.bin", "wb") as fv:
        fo.write(np.zeros(1, dtype=np.int64).tobytes())
        for lengths, values in iter_keyword_rows(src):
            check_block(
                src, "pair_keyword_values", values, nnz, {"n_keywords": n_keywords}, stats, False
            )
            fo.write((nnz + np.cumsum(lengths)).tobytes())
            fv.write(values.tobytes())
            rows += lengths.size
            nnz += values.size
    if rows != n_pairs:
        raise ArtifactError(
            f"{src}: should hold one list per pair ({n_pairs}, as pair_index.pt has), "
            f"but holds {rows}. Re-run the dataset builder."
        )
    return {"nnz": nnz, "values_stats": stats.as_dict(), "offsets_stats": {"min": 0, "max": nnz}}
