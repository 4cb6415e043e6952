"""Keyword ids: every list of lists of ints a pickle can build is read; anything else refused."""

from __future__ import annotations

import os

import pytest
from pt_cases import (
    BAD_KEYWORD_FILES,
    BAD_KEYWORD_OBJECTS,
    SAVERS,
    VALID_KEYWORDS,
    Evil,
    _decode_peak,
    _far_repeats,
    decode,
    expect_refused,
    save_kw,
)

from jasper_mmap.sources.pt.keyword_rows import RowSink


@pytest.mark.parametrize("saver", SAVERS, ids=[f"{k}{p}" for k, p in SAVERS])
@pytest.mark.parametrize("name", list(VALID_KEYWORDS))
def test_valid_keyword_lists_decode_exactly(tmp_path, name, saver):
    obj = VALID_KEYWORDS[name]
    path = save_kw(tmp_path / "kw.pt", obj, saver)
    want = [[int(v) for v in row] for row in obj]
    assert decode(path) == want
    if name in ("repeats_far_apart", "upstream_fixture", "outer_tuple_of_lists") and saver[1] == 2:
        assert decode(path, block=7) == want  # rows flushed to the values file in tiny blocks


def test_far_repeat_read_back_from_the_values_file(tmp_path, monkeypatch):
    """With no cache, a memo reference to a row written out long ago is re-read from disk."""
    monkeypatch.setattr(RowSink, "CACHE_ROWS", 0)
    reads = []
    real_pread = os.pread
    monkeypatch.setattr(
        "jasper_mmap.sources.pt.keyword_rows.os.pread",
        lambda fd, n, off: reads.append(off) or real_pread(fd, n, off),
    )
    obj = _far_repeats()
    path = save_kw(tmp_path / "kw.pt", obj, ("torch", 2))
    assert decode(path, block=64) == obj
    assert reads, "the repeats should have been read back from the values file"


@pytest.mark.parametrize("shape", ["memo_references", "outer_tuple"])
def test_keyword_memory_stays_bounded(tmp_path, shape):
    """No per-row objects: 4x the rows costs at most the memo's 12 bytes per key (with array
    doubling) more, far below a list object per row (> 56 bytes)."""
    peaks = []
    for n in (10_000, 40_000):
        obj = [[0, 1, 2]] * n if shape == "memo_references" else tuple([i, 9] for i in range(n))
        rows, peak = _decode_peak(save_kw(tmp_path / "kw.pt", obj, ("pickle", 2)))
        assert rows == n
        peaks.append(peak)
    per_row = (peaks[1] - peaks[0]) / 30_000
    assert per_row < 40, f"{per_row:.0f} bytes per row (peaks {peaks})"
    assert peaks[0] < 2 << 20


@pytest.mark.parametrize("saver", [("pickle", 0), ("pickle", 2), ("torch", 2), ("torch", 4)])
@pytest.mark.parametrize("name", list(BAD_KEYWORD_OBJECTS))
def test_keyword_file_not_a_list_of_lists_refused(tmp_path, name, saver):
    obj, problem = BAD_KEYWORD_OBJECTS[name]
    path = save_kw(tmp_path / "kw.pt", obj, saver)
    problem = "should be a list of lists of int, but .*" + problem
    if saver == ("pickle", 0) and not isinstance(obj, list | tuple):  # may start otherwise
        problem = f"is neither a torch archive nor a pickled list|{problem}"
    expect_refused(path, lambda: decode(path), problem)


@pytest.mark.parametrize("saver", [("pickle", 0), ("pickle", 4), ("torch", 2)])
def test_keyword_pickle_with_a_global_is_not_executed(tmp_path, saver):
    marker = tmp_path / "pwned"
    path = save_kw(tmp_path / "kw.pt", [[1], [Evil(marker)]], saver)
    expect_refused(
        path, lambda: decode(path), r"Python global (posix|os)\.system.*nothing was executed"
    )
    assert not marker.exists()


@pytest.mark.parametrize("name", list(BAD_KEYWORD_FILES))
def test_bad_keyword_file_refused(tmp_path, name):
    make, problem = BAD_KEYWORD_FILES[name]
    path = tmp_path / "kw.pt"
    make(path)
    expect_refused(path, lambda: decode(path), problem)
