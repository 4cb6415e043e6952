"""The integrity functions other modules call."""

from __future__ import annotations

import json
import shutil

import pytest
from damage_cases import GEN

from jasper_mmap import open_store
from jasper_mmap.cli import main as cli_main
from jasper_mmap.errors import StoreCorruptError, StoreFormatError, StoreNotFoundError
from jasper_mmap.format.recorded import check_files, data_files
from jasper_mmap.stores.verify import verify_store

# -- the functions other modules call ----------------------------------------------------------


def test_data_files_lists_every_file_under_each_path(good):
    store = good["zarr"]
    got = data_files(store, ["zarr.json", "train_idx", f"{GEN}"])
    assert got["zarr.json"] == (store / "zarr.json").stat().st_size
    assert {"train_idx/zarr.json", "train_idx/c/0", f"{GEN}/zarr.json"} <= set(got)
    assert f"{GEN}/hard_negatives/c/0/0" in got and list(got) == sorted(got)
    with pytest.raises(
        StoreNotFoundError, match="nope: data file or directory to record is missing"
    ):
        data_files(store, ["nope"])


def test_check_files_raises_our_errors_naming_the_file(good, tmp_path):
    store = shutil.copytree(good["safetensors"], tmp_path / "s")
    rel = f"{GEN}.safetensors"
    files = data_files(store, [rel])
    check_files(store, files, str(store / "negatives/gen-000000.json"))  # fine
    with pytest.raises(
        StoreCorruptError,
        match=rf"{rel}: file is \d+ bytes, but gen-000000\.json records 1 \(truncated",
    ):
        check_files(store, {rel: 1}, str(store / "negatives/gen-000000.json"))
    with pytest.raises(StoreFormatError, match=r"'files' should map relative paths"):
        check_files(store, {"../x": 1}, "where")
    (store / rel).unlink()
    with pytest.raises(
        StoreNotFoundError,
        match=rf"{rel}: store file is missing \(gen-000000\.json lists it\)\. Re-create",
    ):
        check_files(store, files, str(store / "negatives/gen-000000.json"))


def test_open_names_how_many_more_problems_and_verify_lists_them_all(good, tmp_path, capsys):
    store = shutil.copytree(good["safetensors"], tmp_path / "s")
    m = json.loads((store / "manifest.json").read_text())
    m["arrays"]["source_embs"]["shape"] = "abc"
    m["arrays"]["pair_index"]["stored_dtype"] = "float8"
    (store / "manifest.json").write_text(json.dumps(m))
    (store / "config.json").unlink()
    with pytest.raises(
        StoreFormatError, match=r"\(2 more problem\(s\); `jasper-mmap verify .*` lists all\)"
    ):
        open_store(store)
    assert cli_main(["verify", str(store), "-q"]) == 1
    out = capsys.readouterr().out
    assert "3 problem(s)" in out and "'shape' should be" in out and "'float8' is unknown" in out
    assert "config.json is missing" in out and "array data not read" in out


def test_verify_still_reads_the_data_of_sound_arrays(good, tmp_path):
    """A problem that concerns one array leaves the others' data checks (crc32) running."""
    store = shutil.copytree(good["safetensors"], tmp_path / "s")
    m = json.loads((store / "manifest.json").read_text())
    m["arrays"]["pair_relevance"]["stored_dtype"] = "float8"
    m["arrays"]["steering_residual"]["crc32"] ^= 1
    (store / "manifest.json").write_text(json.dumps(m))
    report = verify_store(store, progress=False)
    assert len(report.problems) == 2, str(report)
    assert "steering_residual has crc32" in str(report) and "pair_relevance" not in report.checked
