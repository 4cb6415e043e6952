"""jasper-mmap verify / info, and fuzzing of the manifest and safetensors-header parsers."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jasper_mmap.cli import main as cli_main
from jasper_mmap.converters import convert_pt
from jasper_mmap.errors import JasperError
from jasper_mmap.layout import read_manifest
from jasper_mmap.stores import open_store
from jasper_mmap.stores.safetensors_store import read_header
from jasper_mmap.verify import verify_store


@pytest.fixture()
def store(tmp_path, pt_dataset):
    return convert_pt(pt_dataset, tmp_path / "s", progress=False)


@pytest.mark.parametrize("backend", ["safetensors", "zarr"])
def test_verify_passes_a_good_store(tmp_path, pt_dataset, backend):
    dst = convert_pt(pt_dataset, tmp_path / backend, format=backend, progress=False)
    report = verify_store(dst, progress=False)
    assert report.ok, str(report)
    assert len(report.checked) == 18


def _poke(store, name: str, row: int, value: bytes) -> None:
    s = open_store(store)
    e = s.entry(name)
    start, header = read_header(store / e["file"])
    row_bytes = int(np.prod(e["shape"][1:])) * 8
    with open(store / e["file"], "r+b") as f:
        f.seek(start + header[name]["data_offsets"][0] + row * row_bytes)
        f.write(value)


def test_verify_reports_changed_bytes_and_bad_indices(store, capsys):
    _poke(store, "pair_index", 7, struct.pack("<q", 10**6))  # question row past N_q
    _poke(store, "pair_relevance", 0, b"")  # no-op: keeps this array clean
    e = open_store(store).entry("steering_residual")
    path = store / e["file"]
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 64)
        f.write(b"\x7f" * 8)  # same size, different bytes
    report = verify_store(store, progress=False)
    text = str(report)
    assert not report.ok and len(report.problems) == 2, text
    assert (
        "pairs.safetensors: question rows (column 0) should be in [0, 60), but rows [7] hold [1000000]"
        in text
    )
    assert "steering_residual has crc32" in text and "its bytes changed on disk" in text
    assert cli_main(["verify", str(store), "-q"]) == 1
    assert "2 problem(s)" in capsys.readouterr().out


def test_info_summarises_from_the_manifest(store, capsys):
    assert cli_main(["info", str(store)]) == 0
    out = capsys.readouterr().out
    assert (
        "safetensors store, format version 1" in out
        and "120 pairs" in out
        and "generation 0" in out
    )
    assert cli_main(["info", str(store), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["counts"]["n_neg"] == 6 and info["arrays"]["source_embs"]["shape"] == [120, 16]
    assert cli_main(["info", str(store.parent / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(blob=st.binary(max_size=400))
def test_any_manifest_bytes_give_our_error_or_a_manifest(tmp_path, blob):
    (tmp_path / "manifest.json").write_bytes(blob)
    try:
        read_manifest(tmp_path)
    except JasperError:
        pass


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=12), c, max_size=4),
    max_leaves=12,
)
_MANIFESTS = st.fixed_dictionaries(
    {},
    optional={
        "format": st.just("jasper-mmap-store") | _JSON,
        "format_version": st.just(1) | _JSON,
        "backend": st.sampled_from(["safetensors", "zarr"]) | _JSON,
        "arrays": st.just({}) | _JSON,
        "counts": st.just({}) | _JSON,
        "files": st.dictionaries(
            st.sampled_from(["", "\0", "/etc/passwd", "../x", "a"]) | st.text(max_size=12),
            _JSON,
            max_size=3,
        )
        | _JSON,
    },
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(obj=_MANIFESTS | _JSON)
def test_any_json_manifest_gives_our_error(tmp_path, obj):
    (tmp_path / "manifest.json").write_text(json.dumps(obj))
    try:
        open_store(tmp_path)
    except JasperError:
        pass


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(blob=st.binary(max_size=300), claimed=st.integers(min_value=0, max_value=2**64 - 1))
def test_any_safetensors_header_bytes_give_our_error(tmp_path, blob, claimed):
    for data in (blob, struct.pack("<Q", claimed) + blob, struct.pack("<Q", len(blob)) + blob):
        path = tmp_path / "x.safetensors"
        path.write_bytes(data)
        try:
            read_header(path)
        except JasperError:
            pass
