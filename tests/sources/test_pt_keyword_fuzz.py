"""Keyword ids: generated structures and mutated pickles."""

from __future__ import annotations

import io
import pickle
import pickletools

from hypothesis import event, given
from hypothesis import strategies as st
from pt_cases import FUZZ, SAVERS, _mutate, _Refusing, _RefusingPython, decode, save_kw

from jasper_mmap.errors import ArtifactError, ArtifactMissingError

# -- keyword ids: generated structures and mutated pickles -----------------------------------

_ROW_VALUES = st.one_of(st.integers(0, 300), st.integers(-(2**63), 2**63 - 1), st.booleans())


@FUZZ
@given(
    pool=st.lists(
        st.tuples(st.lists(_ROW_VALUES, max_size=6), st.booleans()), min_size=1, max_size=8
    ),  # fmt: skip
    picks=st.lists(st.integers(0, 7), max_size=60),
    outer_tuple=st.booleans(),
    saver=st.sampled_from(SAVERS),
    block=st.sampled_from([1, 5, 1 << 17]),
)
def test_fuzz_generated_keyword_structures(tmp_path, pool, picks, outer_tuple, saver, block):
    """Shared row objects (memo references), inner and outer tuples, every int encoding and
    protocol, tiny output blocks: decoded exactly as pickle builds them."""
    rows = [tuple(vals) if as_tuple else vals for vals, as_tuple in pool]
    obj = [rows[k % len(rows)] for k in picks]
    obj = tuple(obj) if outer_tuple else obj
    path = save_kw(tmp_path / "kw.pt", obj, saver)
    assert decode(path, block=block) == [[int(v) for v in row] for row in obj]


def _reference_rows(data: bytes):
    """What the pickle builds, read by Python's unpickler without globals (safe), or None."""
    unpickler = _Refusing if _safe_for_c_unpickler(data) else _RefusingPython
    try:
        got = unpickler(io.BytesIO(data)).load()
    except Exception:  # noqa: BLE001 - refused
        return None
    if not isinstance(got, list | tuple) or not all(
        isinstance(r, list | tuple) and all(type(v) in (int, bool) for v in r) for r in got
    ):
        return None
    return [[int(v) for v in r] for r in got]


def _safe_for_c_unpickler(data: bytes) -> bool:
    """The C unpickler sizes its memo by the largest key: skip records with huge keys."""
    try:
        return all(
            not (op.name.endswith(("PUT", "GET")) and isinstance(arg, int) and arg > 1 << 20)
            for op, arg, _ in pickletools.genops(data)
        )
    except Exception:  # noqa: BLE001 - then the unpickler stops at the same place
        return True


@FUZZ
@given(
    base=st.sampled_from(["shared", "tuples", "plain"]),
    protocol=st.sampled_from([0, 1, 2, 4]),
    data=st.data(),
)
def test_fuzz_mutated_keyword_pickles(tmp_path, base, protocol, data):
    """Mutated keyword pickles (ints, memo keys, cuts, byte flips): refused with an
    ArtifactError naming the file, or decoded exactly as the pickle builds them."""
    kw = [5, 6]
    obj = {
        "shared": [kw, [1], kw, [], kw, [2, 3]],
        "tuples": ([1, 2], (3,), (), (4, 5, 6, 7), [8]),
        "plain": [[i, i + 1] for i in range(6)],
    }[base]
    raw = pickle.dumps(obj, protocol=protocol)
    for _ in range(data.draw(st.integers(1, 3))):
        raw = _mutate(raw, data)
    path = tmp_path / "kw.pt"
    path.write_bytes(raw)
    try:
        got = decode(path)
    except (ArtifactError, ArtifactMissingError) as e:
        assert str(path) in str(e)
        event("refused")
        return
    assert got == _reference_rows(raw), "decoded something other than what the pickle builds"
    event("decoded")
