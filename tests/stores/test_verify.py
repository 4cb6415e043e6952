"""jasper-mmap verify / info, and fuzzing of the manifest and safetensors-header parsers."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jasper_mmap.cli import EXIT_BROKEN_PIPE
from jasper_mmap.cli import main as cli_main
from jasper_mmap.converters import convert_pt
from jasper_mmap.dataset.publish import publish_negatives
from jasper_mmap.errors import JasperError
from jasper_mmap.format.manifest import read_valid_manifest
from jasper_mmap.format.safetensors_header import read_header
from jasper_mmap.stores import open_store
from jasper_mmap.stores.verify import verify_store
from jasper_mmap.synthetic import SyntheticSpec, make_pt_dataset


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
    assert re.search(r"pairs\.safetensors: .*question.*rows \[7\] hold \[1000000\]", text), text
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
        read_valid_manifest(tmp_path)
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


def test_info_and_verify_show_the_manifests_warnings(store, capsys):
    m = json.loads((store / "manifest.json").read_text())
    assert m["warnings"] == []  # always recorded, empty for a clean conversion
    m["warnings"] = ["config.json: n_keywords=41, but keyword_embs.pt has 40 rows; kept 40"]
    (store / "manifest.json").write_text(json.dumps(m))
    assert cli_main(["info", str(store)]) == 0
    assert "  warning: config.json: n_keywords=41" in capsys.readouterr().out
    assert cli_main(["info", str(store), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["warnings"] == m["warnings"]
    assert cli_main(["verify", str(store), "-q"]) == 0  # warnings are not problems
    out = capsys.readouterr().out
    assert "no problems" in out and "warning: config.json: n_keywords=41" in out


def _unusual_dataset(path: Path) -> Path:
    """A dataset with every kind of value convert-pt accepts with a warning."""
    src = make_pt_dataset(path, SyntheticSpec())

    def edit(name, fn):
        t = torch.load(src / f"{name}.pt", weights_only=True).clone()
        fn(t)
        torch.save(t, src / f"{name}.pt")

    edit("negative_tiers", lambda t: (t.__setitem__((6, 1), 7), t.__setitem__((9, 0), 0)))
    edit("pair_relevance", lambda t: t.__setitem__(8, 1.5))
    edit("centroid_distances", lambda t: t.__setitem__(3, 2.5))
    edit("train_idx", lambda t: t.__setitem__(10, t[3]))
    return src


@pytest.fixture(scope="module")
def unusual_src(tmp_path_factory):
    return _unusual_dataset(tmp_path_factory.mktemp("unusual") / "src")


@pytest.mark.parametrize("backend", ["safetensors", "zarr"])
def test_verify_passes_values_the_converter_accepted_with_warnings(
    tmp_path, unusual_src, backend, capsys
):
    """Tiers outside 1..4, relevance outside [0, 1], centroid distances outside [0, 2] and a
    repeated split pair are warnings of convert-pt; verify agrees: warnings, exit 0."""
    store = convert_pt(unusual_src, tmp_path / "s", format=backend, progress=False)
    recorded = json.loads((store / "manifest.json").read_text())["warnings"]
    kinds = ("tiers outside [1, 4]", "relevance values outside [0.0, 1.0]")
    kinds += ("centroid distances outside [0.0, 2.0]", "split repeats pairs")
    assert all(any(k in w for w in recorded) for k in kinds), recorded
    report = verify_store(store, progress=False)
    assert report.ok and not report.problems, str(report)
    assert len(report.checked) == 18
    assert report.warnings == recorded  # shown once each, not again as found by verify
    assert cli_main(["verify", str(store), "-q"]) == 0
    out = capsys.readouterr().out
    assert "18 arrays checked, no problems" in out, out
    assert out.count("  warning: ") == 4 and all(k in out for k in kinds), out


def test_verify_still_fails_damage_beside_the_warnings(tmp_path, unusual_src, capsys):
    """The arrays that hold accepted unusual values are still checked in full."""
    store = convert_pt(unusual_src, tmp_path / "s", progress=False)
    tier = int(open_store(store).read("negative_tiers")[20, 0])
    _poke(store, "negative_tiers", 20, struct.pack("<q", tier % 4 + 1))  # another usual tier
    _poke(store, "train_idx", 0, struct.pack("<q", 10**6))  # past n_pairs
    report = verify_store(store, progress=False)
    text = str(report)
    assert len(report.problems) == 2 and len(report.warnings) == 4, text
    assert "negative_tiers has crc32" in text and "its bytes changed on disk" in text, text
    assert re.search(r"Split indices reference pair 1000000.*rows \[0\]", text), text
    assert cli_main(["verify", str(store), "-q"]) == 1
    assert "2 problem(s)" in capsys.readouterr().out


def test_verify_warns_of_unusual_values_no_recorded_warning_reports(store):
    """Tiers outside 1..4 published later as a new negatives generation (not in the
    manifest's warnings): a warning that verify found itself, not a problem."""
    s = open_store(store)
    negs, tiers = s.read("hard_negatives"), s.read("negative_tiers").copy()
    s.close()
    tiers[3, 2] = tiers[4, 0] = 9
    assert publish_negatives(store, negs, tiers) == 1
    report = verify_store(store, progress=False)
    assert report.ok, str(report)
    (w,) = report.warnings
    assert "gen-000001.safetensors: tiers outside [1, 4] (2 in all; rows [3, 4]" in w, w


def test_info_on_a_pt_dataset_directory_says_so_without_overwrite(pt_dataset, tmp_path, capsys):
    # a copy without the store other tests' openings of the shared fixture leave inside it
    ds = tmp_path / "ds"
    shutil.copytree(pt_dataset, ds, ignore=shutil.ignore_patterns(".jasper_mmap_store*"))
    assert cli_main(["info", str(ds)]) == 1
    err = capsys.readouterr().err
    assert "is a .pt dataset directory, not a store" in err, err
    assert f"convert-pt {ds} STORE" in err and "--overwrite" not in err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text('{"format": "something else"}')
    assert cli_main(["verify", str(tmp_path / "other"), "-q"]) == 1
    out = capsys.readouterr().out
    assert "is not a jasper_mmap store" in out and "--overwrite" not in out


@pytest.mark.parametrize("command", [["info"], ["info", "--json"], ["verify", "-q"]])
def test_closed_output_pipe_is_quiet(store, command):
    """`jasper-mmap info STORE | head -1`: no BrokenPipeError traceback."""
    args = [sys.executable, "-m", "jasper_mmap.cli", command[0], str(store), *command[1:]]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == EXIT_BROKEN_PIPE, err
    assert err == "", err


# -- structure-aware fuzzing: mutations of the manifest and of safetensors headers -------------

_ODD = st.sampled_from(
    [None, True, 0, -1, 1, 7, 2**63, 1.5, "", "x", "float8", "int64", "bfloat16", "F32", "I32"]
    + [[], {}, [0], [1, 2], [0, 0], [2, 1], [-1, 16], ["a"], {"a": 1}]
)


@pytest.fixture(scope="module")
def fuzz_stores(tmp_path_factory, pt_dataset):
    """Per backend: a good store, a digest of every array's bytes, its counts (the reference)."""
    out = {}
    for backend in ("safetensors", "zarr"):
        path = convert_pt(
            pt_dataset, tmp_path_factory.mktemp("fuzz") / backend, format=backend, progress=False
        )
        s = open_store(path)
        digests = {n: hashlib.blake2b(s.read(n).tobytes()).hexdigest() for n in s.names()}
        out[backend] = (path, digests, dict(s.counts))
    return out


def _paths(obj, prefix=()):
    """Every path to a value inside ``obj`` (dict keys, list indices)."""
    items = (
        obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    )
    for k, v in items:
        yield (*prefix, k)
        yield from _paths(v, (*prefix, k))


def _get(obj, path):
    for k in path:
        obj = obj[k]
    return obj


def _mutate(obj, data) -> str:
    """Apply one structure-aware mutation to ``obj`` in place; return what was done."""
    paths = list(_paths(obj))
    path = data.draw(st.sampled_from(paths))
    parent, key = _get(obj, path[:-1]), path[-1]
    op = data.draw(st.sampled_from(["delete", "set", "rename", "swap", "nudge", "dtype"]))
    if op == "delete":
        del parent[key]
    elif op == "set":
        parent[key] = data.draw(_ODD | _JSON)
    elif op == "rename" and isinstance(parent, dict):
        new = data.draw(st.sampled_from([f"{key}X", *(k for k in parent if k != key)] or [key]))
        parent[new] = parent.pop(key)
    elif op == "swap":  # with the value of the same key elsewhere (another entry's shape...)
        twins = [p for p in paths if p[-1] == key and p != path and p[: len(path)] != path]
        if twins:
            other = data.draw(st.sampled_from(twins))
            oparent = _get(obj, other[:-1])
            parent[key], oparent[other[-1]] = oparent[other[-1]], parent[key]
    elif op == "nudge" and type(parent[key]) is int:
        parent[key] += data.draw(st.sampled_from([-8, -1, 1, 8]))
    elif op == "dtype" and isinstance(parent[key], str):
        parent[key] = data.draw(
            st.sampled_from(["float32", "float16", "bfloat16", "int64", "F32", "F16", "BF16"])
            | st.sampled_from(["I64", "I32", "U8", "F64", "XX"])
        )
    return f"{op} {path}"


def _check_outcome(path: Path, reference, what: str) -> None:
    """Open raises only our errors, or the store reads exactly as before; verify never
    raises, and passes only a store that reads exactly as before."""
    ref_path, arrays, counts = reference
    try:
        s = open_store(path)
    except JasperError:
        opened = False
    else:
        opened = True
        assert dict(s.counts) == counts, what
        for name, digest in arrays.items():
            assert hashlib.blake2b(s.read(name).tobytes()).hexdigest() == digest, (what, name)
        s.close()
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        status = cli_main(["verify", str(path), "-q"])
    text = out.getvalue()
    assert status in (0, 1) and "unexpected" not in text and "Traceback" not in text, text
    assert status == 1 or opened, (what, text)


def _linked_copy(src: Path, dst: Path) -> Path:
    """A copy whose data files are hard links (cheap); rewrite a file by replacing it."""
    return shutil.copytree(src, dst, copy_function=os.link)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["safetensors", "zarr"])
@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_manifest_mutations_give_our_error_or_the_same_data(fuzz_stores, backend, data):
    src, *_ = fuzz_stores[backend]
    target = data.draw(st.sampled_from(["manifest.json", "negatives/CURRENT.json"]))
    with tempfile.TemporaryDirectory() as tmp:
        store = _linked_copy(src, Path(tmp) / "s")
        obj = json.loads((store / target).read_text())
        what = _mutate(obj, data)
        (store / target).unlink()
        (store / target).write_text(json.dumps(obj))
        _check_outcome(store, fuzz_stores[backend], f"{target}: {what}")


@pytest.mark.slow
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_safetensors_header_mutations_give_our_error_or_the_same_data(fuzz_stores, data):
    src, *_ = fuzz_stores["safetensors"]
    rel = data.draw(
        st.sampled_from(["embeddings", "pairs", "steering", "splits", "negatives/gen-000000"]).map(
            lambda u: f"{u}.safetensors"
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        store = _linked_copy(src, Path(tmp) / "s")
        raw = (store / rel).read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8 : 8 + n])
        what = _mutate(header, data)
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob = blob.ljust(n) if len(blob) <= n else blob
        (store / rel).unlink()
        (store / rel).write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])
        if len(blob) != n and data.draw(st.booleans()):  # consistent tampering: re-recorded
            for meta in ("manifest.json", "negatives/CURRENT.json"):
                obj = json.loads((store / meta).read_text())
                if rel in obj.get("files", {}):
                    obj["files"][rel] = (store / rel).stat().st_size
                    (store / meta).unlink()
                    (store / meta).write_text(json.dumps(obj))
        _check_outcome(store, fuzz_stores["safetensors"], f"{rel} header: {what}")


def test_verify_reports_probabilities_no_dataset_can_open_with(store):
    """convert-pt refuses them now; a store made before, or edited since, may hold them."""
    config = json.loads((store / "config.json").read_text())
    config["steering_probabilities"] = {"zero": 1.0, "centroid": 1.0, "keyword": 0, "residual": 0}
    config.pop("curriculum", None)
    (store / "config.json").write_text(json.dumps(config))
    report = verify_store(store, progress=False)
    assert not report.ok
    [problem] = [p for p in report.problems if "steering probabilities" in p]
    assert problem.startswith(f"{store / 'config.json'} at epoch 0:")
    assert problem.endswith("The dataset cannot be opened until then.")
