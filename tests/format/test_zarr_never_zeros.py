"""zarr: never zeros; a removed chunk or a damaged shard is an error naming the file."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from damage_cases import GEN

from jasper_mmap import open_store
from jasper_mmap.errors import StoreCorruptError, StoreNotFoundError
from jasper_mmap.stores.verify import verify_store

# -- zarr: never zeros -------------------------------------------------------------------------


def test_zarr_records_every_file_and_each_generation_its_own(good):
    store = good["zarr"]
    m = json.loads((store / "manifest.json").read_text())
    gen = json.loads((store / f"{GEN}.json").read_text())
    on_disk = {
        p.relative_to(store).as_posix(): p.stat().st_size
        for p in store.rglob("*")
        if p.is_file() and p.suffix != ".json" or p.name == "zarr.json"
    }
    recorded = {**m["files"], **gen["files"]}
    assert recorded == on_disk
    assert set(gen["files"]) == {f for f in on_disk if f.startswith(f"{GEN}/")}
    assert json.loads((store / "negatives/CURRENT.json").read_text())["files"] == gen["files"]
    assert "source_embs/c/0/0" in m["files"] and "train_idx/c/0" in m["files"]


def test_safetensors_generation_records_its_file(good):
    store = good["safetensors"]
    gen = json.loads((store / f"{GEN}.json").read_text())
    assert gen["files"] == {f"{GEN}.safetensors": (store / f"{GEN}.safetensors").stat().st_size}
    entry = gen["arrays"]["hard_negatives"]
    assert entry["data_offsets"] == [0, 120 * 6 * 8]  # recorded at write time


@pytest.mark.parametrize(
    "rel", ["source_embs/c/0/0", "train_idx/c/0", f"{GEN}/hard_negatives/c/0/0"]
)
def test_zarr_chunk_removed_after_open_raises_not_zeros(good, tmp_path, rel):
    store = shutil.copytree(good["zarr"], tmp_path / "z")
    s = open_store(store)
    name = rel.split("/")[-4] if rel.startswith("negatives") else rel.split("/")[0]
    (store / rel).unlink()
    # a negatives generation's files are checked when it is leased, before anything is mapped
    missing = rf"{re.escape(rel)}: (chunk file of array '{name}'|store file) is missing"
    with pytest.raises(StoreNotFoundError, match=missing):
        s.gather(name, [0, 1])
    with pytest.raises(StoreNotFoundError, match=re.escape(rel)):
        s.read(name)
    with pytest.raises(StoreNotFoundError, match=re.escape(rel)):  # the handle tables.py uses
        s.raw(name)[...]


def test_zarr_damaged_shard_names_the_file(good, tmp_path):
    store = shutil.copytree(good["zarr"], tmp_path / "z")
    s = open_store(store)
    shard = store / "source_embs/c/0/0"
    with open(shard, "r+b") as f:  # same size: the crc32c of the shard index no longer matches
        f.seek(shard.stat().st_size - 4)
        f.write(b"\0\0\0\0")
    with pytest.raises(
        StoreCorruptError,
        match=r"source_embs/c/0/0: the shard index's checksum \(crc32c\) does not match: the "
        r"shard file of array 'source_embs' is damaged",
    ):
        s.gather("source_embs", [3])
    with pytest.raises(StoreCorruptError, match=r"source_embs/c/0/0"):
        s.read("source_embs", 0, 5)
    with pytest.raises(StoreCorruptError, match=r"source_embs/c/0/0"):
        s.raw("source_embs")[...]
    report = verify_store(store, progress=False)
    assert not report.ok and any("source_embs/c/0/0" in p for p in report.problems), str(report)


def test_zarr_store_without_recorded_files_still_opens(good, tmp_path):
    """Manifests written before every file was recorded keep the old check (and reads)."""
    store = shutil.copytree(good["zarr"], tmp_path / "z")
    m = json.loads((store / "manifest.json").read_text())
    m["files"] = {}
    (store / "manifest.json").write_text(json.dumps(m))
    for meta in ("negatives/CURRENT.json", f"{GEN}.json"):
        p = json.loads((store / meta).read_text())
        del p["files"]
        (store / meta).write_text(json.dumps(p))
    s = open_store(store)
    assert s.read("source_embs").tobytes() == open_store(good["zarr"]).read("source_embs").tobytes()
    assert verify_store(store, progress=False).ok
