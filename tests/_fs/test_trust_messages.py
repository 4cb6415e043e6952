"""Messages for odd inputs say what is there (a FIFO, a device, a symbolic link loop, a link
to nothing), never that it is missing, and never let a raw exception out: sources of
convert-pt and the dataset, ``jasper-mmap info`` on a damaged dataset store, and manifest
values that do not fit the int64 indices readers use (issue 24's attacker, messages round).
Anything that could block on a FIFO runs in a subprocess with a timeout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jasper_mmap._fs.files import describe_path
from jasper_mmap.converters import convert_pt
from jasper_mmap.errors import ArtifactError, ArtifactMissingError
from jasper_mmap.sources.directory import detect_storage_format

PIPES = {"capture_output": True, "text": True}


def _run(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-c", code, *args], timeout=timeout, **PIPES)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung for {timeout} s (a blocking open of a FIFO)")


def _copy_dataset(pt_dataset: Path, dst: Path, *, pt: bool = True) -> Path:
    """A copy of the shared dataset (config.json, and its .pt files when ``pt``)."""
    dst.mkdir()
    for f in pt_dataset.iterdir():
        if f.is_file() and (pt or f.name == "config.json"):
            shutil.copy(f, dst / f.name)
    return dst


# -- M2: dataset.h5 that is a FIFO ------------------------------------------------------------


@pytest.mark.parametrize("requested", ["auto", "hdf5"])
def test_a_fifo_dataset_h5_is_named_a_fifo_not_missing(tmp_path, pt_dataset, requested):
    pytest.importorskip("h5py")
    src = _copy_dataset(pt_dataset, tmp_path / "h5only", pt=False)
    os.mkfifo(src / "dataset.h5")
    with pytest.raises(ArtifactError) as e:
        detect_storage_format(src, requested)
    msg = str(e.value)
    assert msg.startswith(f"{src / 'dataset.h5'}: is a FIFO (named pipe), not a regular file")
    assert "Replace it with the dataset.h5 file itself" in msg
    assert "not found" not in msg and "No dataset files" not in msg


def test_a_fifo_dataset_h5_beside_pt_files(tmp_path, pt_dataset):
    pytest.importorskip("h5py")
    src = _copy_dataset(pt_dataset, tmp_path / "both")
    os.mkfifo(src / "dataset.h5")
    for requested in ("auto", "hdf5"):
        with pytest.raises(ArtifactError, match=r"is a FIFO \(named pipe\).*storage_format='pt'"):
            detect_storage_format(src, requested)
    assert detect_storage_format(src, "pt") == "pt"  # asked for the .pt files: read them


def test_convert_pt_source_hdf5_names_the_fifo_and_never_hangs(tmp_path, pt_dataset):
    pytest.importorskip("h5py")
    src = _copy_dataset(pt_dataset, tmp_path / "h5only", pt=False)
    os.mkfifo(src / "dataset.h5")
    code = (
        "import sys; from jasper_mmap.converters import convert_pt\n"
        "try:\n"
        "    convert_pt(sys.argv[1], sys.argv[2], source='hdf5', progress=False)\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)"
    )
    done = _run(code, str(src), str(tmp_path / "out"))
    assert done.stdout.startswith("ArtifactError "), done.stdout + done.stderr[-2000:]
    assert "is a FIFO (named pipe)" in done.stdout
    assert not (tmp_path / "out").exists()


# -- M3: odd paths as the source ----------------------------------------------------------------


def _odd_paths(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    loop, loop2 = tmp_path / "loop", tmp_path / "loop2"
    os.symlink(loop2, loop)
    os.symlink(loop, loop2)
    dangling = tmp_path / "dangling"
    os.symlink(tmp_path / "nowhere" / "x", dangling)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    return {
        "loop": (loop, "is a symbolic link loop"),
        "dangling": (dangling, f"is a symbolic link to '{tmp_path / 'nowhere' / 'x'}'"),
        "fifo": (fifo, "is a FIFO (named pipe)"),
        "devnull": (Path("/dev/null"), "is a character device"),
    }


@pytest.mark.parametrize("kind", ["loop", "dangling", "fifo", "devnull"])
def test_convert_pt_says_what_an_odd_source_is(tmp_path, kind):
    src, what = _odd_paths(tmp_path)[kind]
    want = ArtifactMissingError if kind == "dangling" else ArtifactError
    with pytest.raises(want) as e:
        convert_pt(src, tmp_path / "out", progress=False)
    msg = str(e.value)
    assert msg.startswith(f"{src}: {what}"), msg
    assert "does not exist. Check" not in msg and "config.json" in msg
    assert not (tmp_path / "out").exists()


def test_convert_pt_cli_odd_sources_give_one_line_errors(tmp_path):
    for src, what in _odd_paths(tmp_path).values():
        done = subprocess.run(
            [sys.executable, "-m", "jasper_mmap.converters.cli", str(src), str(tmp_path / "o")],
            timeout=60,
            **PIPES,
        )
        assert done.returncode == 1, done.stderr
        assert "Traceback" not in done.stderr
        assert done.stderr.strip() == done.stderr.strip().splitlines()[-1]
        assert f"{src}: {what}" in done.stderr, done.stderr


def test_describe_path_never_raises(tmp_path):
    (tmp_path / "f").write_text("x")
    assert describe_path(tmp_path / "f") == "is a regular file"
    assert describe_path(tmp_path) == "is a directory"
    assert describe_path(tmp_path / "none") == "does not exist"
    assert describe_path(tmp_path / "f" / "x").startswith("cannot exist")
    assert describe_path("") == "is an empty path"
    assert describe_path("a\0b").startswith("is not a usable path")


# -- M4 and odd store paths: jasper-mmap info / verify ----------------------------------------


def _cli(capsys, *argv: str) -> tuple[int, str]:
    from jasper_mmap.cli import main

    status = main(list(argv))
    out = capsys.readouterr()
    return status, out.out + out.err


@pytest.mark.parametrize("command", ["info", "verify"])
def test_info_names_the_damaged_store_of_a_dataset_directory(tmp_path, pt_dataset, capsys, command):
    src = _copy_dataset(pt_dataset, tmp_path / "ds")
    store = src / ".jasper_mmap_store"
    store.mkdir()
    os.mkfifo(store / "manifest.json")
    status, out = _cli(capsys, command, str(src))
    assert status == 1
    assert f"its store {store} is damaged" in out, out
    assert f"{store / 'manifest.json'} is a FIFO (named pipe), not a regular file" in out
    assert f"Remove {store}" in out
    assert "is missing" not in out


@pytest.mark.parametrize("kind", ["loop", "dangling", "fifo", "devnull"])
def test_info_says_what_an_odd_store_path_is(tmp_path, capsys, kind):
    path, what = _odd_paths(tmp_path)[kind]
    status, out = _cli(capsys, "info", str(path))
    assert status == 1
    assert out.startswith(f"jasper-mmap: error: {path}: {what}"), out
    assert "not a store directory" in out and "does not exist. Check" not in out


def test_info_refuses_an_empty_store_path(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # '' was read as the current directory
    status, out = _cli(capsys, "info", "")
    assert status == 1
    assert "the store path is empty" in out, out


# -- M6 and a20/a21: manifest values that do not fit, fields typed where read -------------------


def _edited_store(store_path: Path, tmp_path: Path, edit, rel: str = "manifest.json") -> Path:
    store = tmp_path / "store"
    shutil.copytree(store_path, store)
    for name in [rel] if rel == "manifest.json" else ["negatives/CURRENT.json", rel]:
        doc = json.loads((store / name).read_text())
        edit(doc)
        (store / name).write_text(json.dumps(doc))
    return store


def _set(*keys, value):
    def edit(doc):
        for k in keys[:-1]:
            doc = doc[k]
        doc[keys[-1]] = value

    return edit


CASES = {
    "n_pairs 2**64": (("counts", "n_pairs"), 2**64, "'counts.n_pairs' is 18446744073709551616"),
    "n_sources 2**63": (
        ("counts", "n_sources"),
        2**63,
        "'counts.n_sources' is 9223372036854775808",
    ),
    "store_id 5": (("store_id",), 5, "'store_id' should be the token string"),
    "created_unix str": (("created_unix",), "yesterday", "'created_unix' should be a finite"),
    "stats NaN": (("arrays", "pair_relevance", "stats", "max"), float("nan"), "'stats.max'"),
    "nonfinite_rows str": (
        ("arrays", "question_embs", "stats", "nonfinite_rows"),
        "all",
        "'stats.nonfinite_rows' should be a row count",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_manifest_values_that_do_not_fit_are_named(store_path, tmp_path, case):
    from jasper_mmap import open_store
    from jasper_mmap.errors import StoreFormatError
    from jasper_mmap.stores.verify import verify_store

    keys, value, said = CASES[case]
    store = _edited_store(store_path, tmp_path, _set(*keys, value=value))
    with pytest.raises(StoreFormatError) as e:
        open_store(store)
    assert str(e.value).startswith(f"{store / 'manifest.json'}: "), str(e.value)
    assert said in str(e.value)
    report = verify_store(store, progress=False)
    text = str(report)
    assert any(said in p for p in report.problems), text
    assert all(p.startswith(str(store)) for p in report.problems), text
    assert "Maximum allowed dimension" not in text and "please report" not in text


def test_verify_never_sizes_a_split_check_from_untrusted_counts(store_path, tmp_path):
    """n_pairs that fits int64 but disagrees with pair_index: the splits are not checked
    against it (a seen-map of 2**40 bytes would be a MemoryError, 'please report it')."""
    from jasper_mmap.stores.verify import verify_store

    store = _edited_store(store_path, tmp_path, _set("counts", "n_pairs", value=2**40))
    report = verify_store(store, progress=False)
    assert not report.ok
    assert "please report" not in str(report) and "MemoryError" not in str(report), str(report)
    assert any("'pair_index' has shape" in p for p in report.problems)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "yesterday"])
def test_a_generation_created_unix_that_is_no_time_is_named(store_path, tmp_path, value):
    from jasper_mmap import open_store
    from jasper_mmap.errors import StoreFormatError
    from jasper_mmap.stores.verify import verify_store

    rel = "negatives/gen-000000.json"
    store = _edited_store(store_path, tmp_path, _set("created_unix", value=value), rel)
    # the live generation's two descriptions (CURRENT.json, gen-000000.json) both hold it
    with pytest.raises(
        StoreFormatError, match=r"(CURRENT|gen-000000)\.json: 'created_unix' should be a finite"
    ):
        open_store(store)
    report = verify_store(store, progress=False)
    assert any("'created_unix' should be a finite" in p for p in report.problems)


@pytest.mark.parametrize("bad", ["", None])
def test_an_empty_or_missing_path_is_never_the_current_directory(bad, tmp_path, monkeypatch):
    from jasper_mmap import JASPERSteeringDataset
    from jasper_mmap.converters import convert_pt
    from jasper_mmap.errors import JasperError

    monkeypatch.chdir(tmp_path)  # an empty path used to mean this directory
    with pytest.raises(JasperError, match="not a path|should be a path"):
        JASPERSteeringDataset(bad, "train")
    with pytest.raises(JasperError, match="should be a path"):
        convert_pt(bad, tmp_path / "store", progress=False)
    assert list(tmp_path.iterdir()) == []
