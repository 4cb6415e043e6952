"""Keyword ids -> offsets + values arrays, decoded in a thread beside the tensor streaming.

Decoding the ragged ``pair_keyword_ids`` pickle is Python-speed work (a few microseconds per
pair), so :func:`convert_pt` runs it in a thread of its own process while the main thread streams
the large tensors (whose ``pread``, numpy checks and writes release the GIL). A thread, not a
child process: a process would need the ``spawn`` start method, which re-imports the user's
script (hanging scripts without an ``if __name__ == "__main__":`` guard) and cannot start inside
daemonic processes such as ``multiprocessing.Pool`` workers. The thread writes two raw int64
files into the store's temporary directory, which the main thread then copies into the
``pairs`` unit.

NOTE [thread, not inline]: on the 2-core development machine a thread and decoding inline (when
the pairs unit needs the result) convert equally fast within noise (200k pairs: medians 6.5 s
and 6.2 s over 8 shuffled rounds; 800k: 22.5 s and 23.4 s over 9), because the pure-Python
decoder and the main thread share the GIL. The thread is kept because a malformed keyword file
can then fail the conversion within seconds (``KeywordJob.check()``, polled per block) instead
of after all embeddings were streamed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jasper_mmap.errors import ArtifactError
from jasper_mmap.format.values import Stats
from jasper_mmap.sources.pt.keywords import KeywordsCancelled, decode_keyword_rows

__all__ = ["parse_keywords", "KeywordJob"]


def parse_keywords(
    path: str,
    tmp: str,
    n_pairs: int,
    n_keywords: int,
    stop: threading.Event | None = None,
    decode: Callable[..., None] | None = None,
) -> dict[str, Any]:
    """Decode ``path`` into ``tmp/.kw_offsets.bin`` (n_pairs + 1) and ``tmp/.kw_values.bin``.

    ``decode(on_rows, spill, stop)`` reads another kind of source (``dataset.h5``; see
    :mod:`jasper_mmap.sources.directory`); by default ``path`` is a pickled list of lists.

    Returns:
        ``{"nnz", "offsets_stats", "values_stats"}``.

    Raises:
        ArtifactError: not a list of lists of int, wrong number of rows, ids out of range.
        KeywordsCancelled: ``stop`` was set.
    """
    src, out = Path(path), Path(tmp)
    stats = Stats()
    done = {"rows": 0, "nnz": 0}
    with open(out / ".kw_offsets.bin", "wb") as fo, open(out / ".kw_values.bin", "w+b") as fv:
        fo.write(np.zeros(1, dtype=np.int64).tobytes())

        def on_rows(lengths: np.ndarray, values: np.ndarray) -> None:
            ends = np.cumsum(lengths)
            _check_ids(src, values, ends, done["rows"], n_keywords)
            stats.update(values)
            fo.write((done["nnz"] + ends).tobytes())
            done["rows"] += lengths.size
            done["nnz"] += values.size

        if decode is None:
            decode_keyword_rows(src, on_rows, spill=fv, stop=stop)
        else:
            decode(on_rows, fv, stop or threading.Event())
    if done["rows"] != n_pairs:
        raise ArtifactError(
            f"{src}: should hold one list per pair ({n_pairs}, as pair_index.pt has), "
            f"but holds {done['rows']}. Re-run the dataset builder."
        )
    return {
        "nnz": done["nnz"],
        "values_stats": stats.as_dict(),
        "offsets_stats": {"min": 0, "max": done["nnz"]},
    }


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


class KeywordJob:
    """:func:`parse_keywords` in a thread; ``result()`` waits for it, ``cancel()`` stops it.

    Errors raised while decoding are re-raised by ``result()`` as they are (same type and
    message). ``cancel()`` sets a flag the decoder checks at least every 64 KiB of input, then
    joins the thread, so no thread outlives the job.
    """

    def __init__(
        self,
        path: str,
        tmp: str,
        n_pairs: int,
        n_keywords: int,
        decode: Callable[..., None] | None = None,
    ) -> None:
        self._stop = threading.Event()
        self._result: dict[str, Any] | None = None
        self._error: BaseException | None = None
        self._decode = decode
        self._thread = threading.Thread(
            target=self._run,
            args=(path, tmp, n_pairs, n_keywords),
            name="convert-pt-keywords",
        )
        self._thread.start()

    def _run(self, *args: Any) -> None:
        try:
            self._result = parse_keywords(*args, stop=self._stop, decode=self._decode)
        except KeywordsCancelled:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the caller by result()
            self._error = e

    def check(self) -> None:
        """Raise the decoding's error now if it already failed (does not wait)."""
        if self._error is not None and not self._thread.is_alive():
            raise self._error

    def result(self) -> dict[str, Any]:
        """Wait for the decoding; return its result or raise its error."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._result is None:
            raise RuntimeError("keyword decoding was cancelled before it finished")
        return self._result

    def cancel(self) -> None:
        """Stop the decoding if it still runs, and wait for its thread to end."""
        self._stop.set()
        self._thread.join()
