"""The CLIs on object-store URLs: convert-pt to a URL, jasper-mmap info / verify / upload."""

from __future__ import annotations

import json

import pytest
from remote_helpers import assert_batches_equal, flip, unit_piece

from jasper_mmap import JASPERSteeringDataset
from jasper_mmap.cli import main as jasper_mmap
from jasper_mmap.converters.cli import main as convert_pt_cli
from jasper_mmap.remote.catalog import CATALOG
from jasper_mmap.remote.objects import ObjectStore

BACKENDS = ("safetensors", "zarr")


@pytest.mark.parametrize("fmt", BACKENDS)
def test_convert_pt_to_url_then_info_and_verify(bucket, pt_dataset, fmt, capsys):
    url = bucket.url()
    assert convert_pt_cli([str(pt_dataset), url, "--format", fmt, "--unit-rows", "16", "-q"]) == 0
    catalog = json.loads(ObjectStore(url).get(CATALOG))
    assert catalog["backend"] == fmt and catalog["unit_rows"] == 16
    capsys.readouterr()
    assert jasper_mmap(["info", url, "--cache-dir", str(bucket.cache())]) == 0
    out = capsys.readouterr().out
    assert "120 pairs" in out and fmt in out
    assert jasper_mmap(["verify", url, "--cache-dir", str(bucket.cache())]) == 0
    # the upload left no converted copy behind in the default cache's work area
    uploads = bucket.tmp / "default-cache" / "uploads"
    assert not uploads.exists() or not any(uploads.iterdir())


@pytest.mark.parametrize("store_path", ["safetensors"], indirect=True)  # backend-blind
def test_upload_cli_then_read(bucket, store_path, capsys):
    url = bucket.url()
    assert jasper_mmap(["upload", str(store_path), url, "--unit-rows", "16"]) == 0
    assert url in capsys.readouterr().out
    assert jasper_mmap(["upload", str(store_path), url, "--unit-rows", "16"]) == 1
    assert url in capsys.readouterr().err  # refused: not empty
    ds = JASPERSteeringDataset(url, "val", cache_dir=bucket.cache())
    local = JASPERSteeringDataset(store_path, "val")
    assert_batches_equal(ds.__getitems__([0, 3]), local.__getitems__([0, 3]))


@pytest.mark.parametrize("what", ["whole", "unit"])
def test_verify_names_an_altered_object(bucket, store_path, what, capsys):
    url = bucket.upload(store_path)
    objects = ObjectStore(url)
    catalog = json.loads(objects.get(CATALOG))
    if what == "whole":
        key = max(catalog["whole"], key=lambda k: catalog["whole"][k]["size"])
        at = len(objects.get(key)) // 2
    else:
        _, key, a, b = unit_piece(catalog, "steering", int(catalog["units"]) - 1)
        at = a + (b - a) // 2
    objects.put(key, flip(objects.get(key), at))
    capsys.readouterr()
    assert jasper_mmap(["verify", url, "--cache-dir", str(bucket.cache())]) != 0
    captured = capsys.readouterr()
    assert f"{url}/{key}" in captured.err + captured.out


def test_info_on_empty_url_fails(bucket, capsys):
    url = bucket.url("none")
    assert jasper_mmap(["info", url, "--cache-dir", str(bucket.cache())]) == 1
    assert url in capsys.readouterr().err
