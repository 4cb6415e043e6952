"""Hot reload under real use: leases in every process, the newest publication wins, only the
dataset's own files count, an n_neg change, and the conversion lock's waiting message."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import load_pt
from test_negatives import check_batch, table

from jasper_mmap import JASPERSteeringDataset, create_loader, open_store, publish_negatives
from jasper_mmap.converters import convert_pt
from jasper_mmap.dataset.resolve import STORE_DIRNAME, resolve_store
from jasper_mmap.errors import StoreNotFoundError


@pytest.fixture()
def src(tmp_path, pt_dataset):
    return shutil.copytree(pt_dataset, tmp_path / "ds")


@pytest.fixture(params=["safetensors", "zarr"])
def store(request, tmp_path, pt_dataset):
    return convert_pt(pt_dataset, tmp_path / "store", format=request.param, progress=False)


def gens_on_disk(store) -> list[str]:
    return sorted(p.name for p in (store / "negatives").glob("gen-*.json"))


# -- item 4: a generation in use is never deleted -----------------------------------------------


@pytest.mark.parametrize("workers", [0, 2], ids=["nw0", "nw2-fresh-workers"])
def test_reload_then_more_publishes_keeps_serving_what_was_reloaded(store, workers):
    """The tracker's repro: publish, reload, publish twice more, next epoch."""
    s = open_store(store)
    sources, split = s.read("source_embs"), s.read("train_idx")
    loader = create_loader(
        store, "train", 8, num_workers=workers, shuffle=False, report_generation=True
    )
    next(iter(loader))
    publish_negatives(store, *table(1, 120, 6, 120))
    assert loader.dataset_obj.reload_negatives() == 1
    publish_negatives(store, *table(2, 120, 6, 120))
    publish_negatives(store, *table(3, 120, 6, 120))
    assert "gen-000001.json" in gens_on_disk(store), "generation 1 is in use and was deleted"
    for _ in range(2):  # two more epochs: fresh workers each time at num_workers=2
        for k, batch in enumerate(loader):
            assert check_batch(batch, sources, split[8 * k : 8 * k + 8], 6) == 1
    loader.dataset_obj.reload_negatives()
    publish_negatives(store, *table(4, 120, 6, 120))
    assert "gen-000001.json" not in gens_on_disk(store), "let go after the switch"


@pytest.mark.parametrize("store", ["safetensors"], indirect=True)
def test_every_process_that_maps_a_generation_holds_its_lease(store):
    """A second process reading generation 1 keeps it on disk while this one moves on."""
    publish_negatives(store, *table(1, 120, 6, 120))
    code = (
        "import sys, time; from jasper_mmap import JASPERSteeringDataset as D\n"
        "d = D(sys.argv[1], 'train'); d.get_batch([0, 1]); print('mapped', flush=True)\n"
        "sys.stdin.readline(); print(int(d.get_batch([0])['negative_tiers'][0, 0]), flush=True)"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(store)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "mapped"
    for g in range(2, 6):
        publish_negatives(store, *table(g, 120, 6, 120))
    assert "gen-000001.json" in gens_on_disk(store)
    child.stdin.write("go\n")
    child.stdin.flush()
    assert child.stdout.readline().strip() == str(1 + 1 % 4)  # generation 1's tiers
    assert child.wait(timeout=60) == 0
    publish_negatives(store, *table(6, 120, 6, 120))
    assert "gen-000001.json" not in gens_on_disk(store)


def test_a_removed_generation_falls_back_to_the_live_one_with_a_warning(store, caplog):
    for g in range(1, 5):
        publish_negatives(store, *table(g, 120, 6, 120))  # generation 1 is gone
    s = open_store(store)
    with pytest.raises(StoreNotFoundError, match="generation 1 was removed"):
        s.use_generation(1)
    with caplog.at_level(logging.WARNING):
        assert s.serve(1) == 4
    assert "generation 1 was removed" in caplog.text


# -- item 5: the newest publication wins, whichever route it came by ---------------------------


def save_negatives(src, g: int) -> None:
    negs, tiers = table(g, 120, 6, 120)
    torch.save(torch.from_numpy(negs), src / "hard_negatives.pt")
    torch.save(torch.from_numpy(tiers), src / "negative_tiers.pt")


def tiers_of(ds) -> int:
    return int(ds.get_batch([0])["negative_tiers"][0, 0])


def test_a_publication_on_a_pt_dataset_is_not_undone_by_its_unchanged_pt_files(src):
    ds = JASPERSteeringDataset(src, "train")
    assert publish_negatives(src, *table(1, 120, 6, 120)) == 1
    assert ds.reload_negatives() == 1 and tiers_of(ds) == 1 + 1 % 4
    assert ds.reload_negatives() == 1, "unchanged .pt files were republished over it"
    again = JASPERSteeringDataset(src, "train")  # reopening keeps it too
    assert again.negatives_generation == 1 and tiers_of(again) == 2


def test_pt_files_rewritten_after_a_publication_win(src):
    ds = JASPERSteeringDataset(src, "train")
    publish_negatives(src, *table(1, 120, 6, 120))
    ds.reload_negatives()
    time.sleep(0.02)
    save_negatives(src, 2)  # the miner rewrites the .pt files later
    assert ds.reload_negatives() == 2 and tiers_of(ds) == 1 + 2 % 4
    assert ds.reload_negatives() == 2  # and only once


@pytest.mark.parametrize("via", ["dataset dir", "store"])
def test_a_publication_after_the_pt_files_were_rewritten_wins(src, caplog, via):
    ds = JASPERSteeringDataset(src, "train")
    save_negatives(src, 2)
    time.sleep(0.02)
    target = src if via == "dataset dir" else src / STORE_DIRNAME
    g = publish_negatives(target, *table(3, 120, 6, 120))  # newer than the files
    with caplog.at_level(logging.INFO):
        assert ds.reload_negatives() == g
        assert ds.reload_negatives() == g
    assert tiers_of(ds) == 1 + 3 % 4, "older .pt files replaced a newer publication"
    if via == "store":  # the files were never taken in: they are older, so they are skipped
        assert g == 1 and "published after them" in caplog.text
    else:  # publishing through the dataset dir took the files in first, then published
        assert g == 2


# -- item 9: only the dataset's own files count ---------------------------------------------------


@pytest.mark.parametrize(
    "extra", ["hard_negatives_backup_epoch5.pt", "model.pt", "notes.txt", "old/source_embs.pt"]
)
def test_unrelated_files_beside_the_dataset_never_make_its_store_stale(src, tmp_path, extra):
    store = convert_pt(src, tmp_path / "store", progress=False)
    JASPERSteeringDataset(src, "train")  # builds the cached store
    cached = src / STORE_DIRNAME / "manifest.json"
    built = cached.stat().st_mtime_ns
    (src / extra).parent.mkdir(exist_ok=True)
    torch.save(torch.zeros(3), src / extra)
    JASPERSteeringDataset(store, "train")  # no StoreStaleError
    JASPERSteeringDataset(src, "train")
    assert cached.stat().st_mtime_ns == built, "the cached store was rebuilt"


def test_a_changed_dataset_file_still_makes_it_stale(src, tmp_path):
    from jasper_mmap.errors import StoreStaleError

    store = convert_pt(src, tmp_path / "store", progress=False)
    rel = load_pt(src / "pair_relevance.pt")
    torch.save(torch.from_numpy(rel[::-1].copy()), src / "pair_relevance.pt")
    with pytest.raises(StoreStaleError, match="pair_relevance.pt"):
        JASPERSteeringDataset(store, "train")


# -- item 10: the miner changes n_neg -------------------------------------------------------------


def test_negatives_with_a_new_n_neg_rebuild_the_store(src):
    JASPERSteeringDataset(src, "train")
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("n_neg", None)
    (src / "config.json").write_text(json.dumps(cfg))
    ds = JASPERSteeringDataset(src, "train")
    time.sleep(0.02)
    negs, tiers = table(1, 120, 4, 120)
    torch.save(torch.from_numpy(negs), src / "hard_negatives.pt")
    torch.save(torch.from_numpy(tiers), src / "negative_tiers.pt")
    with pytest.raises(ValueError, match="n_neg"):
        ds.reload_negatives()  # a running dataset cannot change its n_neg: says so
    for _ in range(2):  # opening again rebuilds, every time after works
        again = JASPERSteeringDataset(src, "train")
        assert again.n_neg == 4
        assert again.get_batch([0, 1])["negative_embs"].shape == (2, 4, 16)


def test_a_config_n_neg_that_disagrees_with_new_negatives_says_what_to_fix(src):
    JASPERSteeringDataset(src, "train")
    time.sleep(0.02)
    negs, tiers = table(1, 120, 4, 120)
    torch.save(torch.from_numpy(negs), src / "hard_negatives.pt")
    torch.save(torch.from_numpy(tiers), src / "negative_tiers.pt")
    with pytest.raises(ValueError, match="n_neg=6.*4 negatives per pair"):
        JASPERSteeringDataset(src, "train")


# -- item 3 (last part): waiting on another process's conversion says who and how long --------


def test_waiting_for_the_conversion_lock_names_the_holder(src, caplog, monkeypatch):
    import jasper_mmap.dataset.resolve as resolve

    lock_path = src / f".{STORE_DIRNAME}.lock"
    holder = open(lock_path, "w")  # (the copied fixture may hold an old lock file)
    fcntl.flock(holder, fcntl.LOCK_EX)
    holder.write(json.dumps({"pid": 4242, "host": "nodeA", "since": time.time() - 75}))
    holder.flush()
    import jasper_mmap._fs.lock as lock

    monkeypatch.setattr(lock, "WAIT_LOG_SECONDS", 0.1)
    real_holder, calls = resolve._holder, []

    def holder_then_release(lock_file):  # the holder finishes once the waiter has said so
        calls.append(real_holder(lock_file))
        if len(calls) == 2:
            holder.close()
        return calls[-1]

    monkeypatch.setattr(resolve, "_holder", holder_then_release)
    with caplog.at_level(logging.INFO, logger="jasper_mmap.dataset.resolve"):
        resolve_store(src)
    assert "waiting for process 4242 on nodeA, converting for 7" in caplog.text
    assert len(calls) == 2, "the waiter logs again every WAIT_LOG_SECONDS"
    assert open_store(src / STORE_DIRNAME).counts["n_pairs"] == 120
    info = json.loads(lock_path.read_text())
    assert info["pid"] == os.getpid()
    np.testing.assert_array_equal(
        open_store(src / STORE_DIRNAME).read("train_idx"), load_pt(src / "train_idx.pt")
    )
