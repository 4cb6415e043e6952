"""Keyword ids -> offsets + values arrays, run in a child process beside the tensor streaming.

Decoding the ragged ``pair_keyword_ids`` pickle is Python-speed work (about 7 us per pair), so
:func:`convert_pt` runs it in a spawned child process while the main process streams the large
tensors; it writes two raw int64 files into the store's temporary directory, which the main
process then copies into the ``pairs`` unit.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path
from typing import Any

import numpy as np

from jasper_mmap.errors import ArtifactError

from .checks import Stats
from .keyword_pickle import iter_keyword_rows

__all__ = ["parse_keywords", "KeywordJob"]


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
            ends = np.cumsum(lengths)
            _check_ids(src, values, ends, rows, n_keywords)
            stats.update(values)
            fo.write((nnz + ends).tobytes())
            fv.write(values.tobytes())
            rows += lengths.size
            nnz += values.size
    if rows != n_pairs:
        raise ArtifactError(
            f"{src}: should hold one list per pair ({n_pairs}, as pair_index.pt has), "
            f"but holds {rows}. Re-run the dataset builder."
        )
    return {"nnz": nnz, "values_stats": stats.as_dict(), "offsets_stats": {"min": 0, "max": nnz}}


def _check_ids(
    src: Path, values: np.ndarray, ends: np.ndarray, first_row: int, n_keywords: int
) -> None:
    """Keyword ids must be rows of keyword_embs; name the pairs whose lists break that."""
    bad = np.flatnonzero((values < 0) | (values >= n_keywords))
    if bad.size:
        pairs = (first_row + np.searchsorted(ends, bad, side="right"))[:5].tolist()
        raise ArtifactError(
            f"{src}: keyword ids should be rows of keyword_embs.pt, in [0, {n_keywords}), but "
            f"the lists of pairs {pairs} hold {values[bad[:5]].tolist()}. Re-run the "
            f"dataset builder."
        )


def _child(conn, *args: Any) -> None:
    try:
        conn.send((True, parse_keywords(*args)))
    except BaseException as e:  # noqa: BLE001 - sent to the parent, which re-raises it
        conn.send((False, e))
    finally:
        conn.close()


class KeywordJob:
    """:func:`parse_keywords` in a spawned child process; ``result()`` waits, ``cancel()`` kills."""

    def __init__(self, path: str, tmp: str, n_pairs: int, n_keywords: int) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(
            target=_child,
            args=(child_conn, path, tmp, n_pairs, n_keywords),
            name="convert-pt-keywords",
            daemon=True,
        )
        self._proc.start()
        child_conn.close()
        self._result: dict[str, Any] | None = None

    def result(self) -> dict[str, Any]:
        """Wait for the child; return its result or re-raise its error."""
        if self._result is None:
            try:
                ok, value = self._conn.recv()
            except EOFError:
                self._proc.join()
                raise RuntimeError(
                    f"keyword parser process died (exit code {self._proc.exitcode})"
                ) from None
            self._proc.join()
            if not ok:
                raise value
            self._result = value
        return self._result

    def cancel(self) -> None:
        """Stop the child if it still runs and reap it."""
        if self._proc.is_alive():
            self._proc.kill()
        self._proc.join()
        self._conn.close()
