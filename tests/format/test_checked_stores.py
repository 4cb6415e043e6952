"""NOTE [checked stores]: a store found sound is not read again while no file changed."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
from damage_cases import BOTH, GEN, PARAMS

from jasper_mmap import JASPERSteeringDataset, open_store
from jasper_mmap.cli import main as cli_main
from jasper_mmap.errors import StoreCorruptError

# -- NOTE [checked stores]: a store found sound is not read again while no file changed -----


@pytest.fixture
def files_look_old(monkeypatch):
    """Let integrity trust files written just now (the racy window is 2 s), and forget what
    other tests found sound."""
    from jasper_mmap.format import integrity

    monkeypatch.setattr(integrity, "_RACY_SECONDS", -1e9)
    monkeypatch.setattr(integrity, "_CHECKED", {})
    return integrity


def _count_full_checks(monkeypatch, integrity) -> list[int]:
    calls: list[int] = []
    real = integrity._structure_problems
    monkeypatch.setattr(integrity, "_structure_problems", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize(("case", "backend"), PARAMS)
def test_damage_after_a_sound_open_is_refused_at_the_next_open(
    case, backend, good, tmp_path, files_look_old
):
    """Every case of the catalogue, done to a store this process already opened and found
    sound (so its file states are remembered): the next open still refuses it."""
    import time

    store = shutil.copytree(good[backend], tmp_path / "s")
    open_store(store)
    assert str(store) in files_look_old._CHECKED
    time.sleep(0.02)  # past a tick of the kernel's coarse clock, which stamps ctime
    case.mutate(store)
    with pytest.raises(case.error) as info:
        open_store(store)
    assert re.search(case.match, str(info.value)), str(info.value)


@pytest.mark.parametrize("backend", BOTH)
def test_a_sound_store_opened_again_is_only_stat_ed(
    good, tmp_path, backend, files_look_old, monkeypatch
):
    """The second open of an unchanged store reads and checks nothing again, serves the same
    live generation, and a dataset over it reads the same rows; a touch of any one file it
    looked at (same bytes, new ctime) brings the full check back."""
    import time

    from jasper_mmap import publish_negatives

    integrity = files_look_old
    store_dir = shutil.copytree(good[backend], tmp_path / "s")
    full = _count_full_checks(monkeypatch, integrity)
    first = open_store(store_dir)
    second = open_store(store_dir)
    assert len(full) == 1
    assert second.generation == first.generation == 0
    ds = JASPERSteeringDataset(store_dir, "train", check_sources=False)
    assert len(full) == 1
    assert ds[0]["question_emb"].equal(JASPERSteeringDataset(store_dir, "train")[0]["question_emb"])
    rels = integrity._CHECKED[str(store_dir)][0]
    assert {"manifest.json", "config.json", "negatives/CURRENT.json", f"{GEN}.json"} <= set(rels)
    for rel in ("config.json", f"{GEN}.json", rels[-1]):
        time.sleep(0.02)
        os.utime(store_dir / rel)  # content unchanged: a full check again, and it passes
        before = len(full)
        open_store(store_dir)
        assert len(full) == before + 1, rel
    negs, tiers = first.read("hard_negatives"), first.read("negative_tiers")
    publish_negatives(store_dir, negs[:, ::-1].copy(), tiers[:, ::-1].copy())
    before = len(full)
    assert open_store(store_dir).generation == 1 and len(full) == before + 1


def test_a_store_written_just_now_is_checked_in_full_at_every_open(good, tmp_path, monkeypatch):
    """Within the racy window (files changed less than 2 s ago) nothing is remembered."""
    from jasper_mmap.format import integrity

    monkeypatch.setattr(integrity, "_CHECKED", {})
    store_dir = shutil.copytree(good["safetensors"], tmp_path / "s")  # ctime: now
    full = _count_full_checks(monkeypatch, integrity)
    open_store(store_dir)
    open_store(store_dir)
    assert len(full) == 2 and str(store_dir) not in integrity._CHECKED


def test_verify_always_checks_in_full(good, tmp_path, files_look_old, monkeypatch):
    store_dir = shutil.copytree(good["safetensors"], tmp_path / "s")
    open_store(store_dir)
    full = _count_full_checks(monkeypatch, files_look_old)
    assert cli_main(["verify", str(store_dir), "-q"]) == 0
    assert len(full) == 1


def test_threads_opening_a_changed_store_at_once_all_succeed(good, tmp_path, files_look_old):
    """The memo is shared by the process's threads: a stale entry found by several of them at
    once is dropped once, and every open checks in full and succeeds."""
    import threading
    import time

    store_dir = shutil.copytree(good["safetensors"], tmp_path / "s")
    errors = []
    for _ in range(10):
        open_store(store_dir)
        time.sleep(0.01)
        os.utime(store_dir / "config.json")
        barrier = threading.Barrier(4)

        def opener(barrier=barrier):
            barrier.wait()
            try:
                open_store(store_dir)
            except BaseException as e:  # noqa: BLE001 - collected for the assertion
                errors.append(e)

        threads = [threading.Thread(target=opener) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_a_file_changed_during_the_full_check_is_not_remembered(good, tmp_path, monkeypatch):
    """The racy window counts from the start of the check: a file written while the check
    ran (here: after it read the file) is checked again at the next open, however long the
    check took."""
    import time

    from jasper_mmap.format import integrity

    monkeypatch.setattr(integrity, "_CHECKED", {})
    monkeypatch.setattr(integrity, "_RACY_SECONDS", 0.3)
    store_dir = shutil.copytree(good["safetensors"], tmp_path / "s")
    time.sleep(0.4)  # the copy is older than the window
    real = integrity._structure_problems

    def slow_check(*args):
        problems = real(*args)
        with open(store_dir / "pairs.safetensors", "ab") as f:
            f.write(b"\0" * 8)  # after the check read it
        time.sleep(0.4)  # the check "ran" longer than the window
        return problems

    monkeypatch.setattr(integrity, "_structure_problems", slow_check)
    open_store(store_dir)
    monkeypatch.setattr(integrity, "_structure_problems", real)
    with pytest.raises(StoreCorruptError, match=r"pairs\.safetensors"):
        open_store(store_dir)


@pytest.mark.parametrize("backend", BOTH)
def test_a_store_that_does_not_record_its_files_is_remembered_by_the_files_it_reads(
    good, tmp_path, backend, files_look_old, monkeypatch
):
    """Stores written before every file was recorded: the check still reads each array's
    data file header or zarr.json, so a change to one of those is seen at the next open."""
    import time

    store_dir = shutil.copytree(good[backend], tmp_path / "s")
    m = json.loads((store_dir / "manifest.json").read_text())
    m["files"] = {}
    (store_dir / "manifest.json").write_text(json.dumps(m))
    for rel in (f"{GEN}.json", "negatives/CURRENT.json"):
        p = json.loads((store_dir / rel).read_text())
        del p["files"]
        (store_dir / rel).write_text(json.dumps(p))
    full = _count_full_checks(monkeypatch, files_look_old)
    open_store(store_dir)
    open_store(store_dir)
    assert len(full) == 1
    time.sleep(0.02)
    rel = "embeddings.safetensors" if backend == "safetensors" else "question_embs/zarr.json"
    meta = "question_embs/zarr.json"
    if backend == "zarr":
        z = json.loads((store_dir / meta).read_text())
        z["shape"] = [z["shape"][0] + 1, *z["shape"][1:]]
        (store_dir / meta).write_text(json.dumps(z))
    else:
        with open(store_dir / rel, "ab") as f:
            f.write(b"\0")
    with pytest.raises(StoreCorruptError, match=re.escape(rel)):
        open_store(store_dir)
    assert len(full) == 2


def test_a_store_opened_before_a_publication_serves_the_live_generation(good, tmp_path):
    """The generation checked at open is not served if another went live before first use."""
    from jasper_mmap import publish_negatives

    store_dir = shutil.copytree(good["safetensors"], tmp_path / "s")
    reader = open_store(store_dir)
    other = open_store(store_dir)
    publish_negatives(store_dir, other.read("hard_negatives"), other.read("negative_tiers"))
    assert reader.generation == reader.live_generation() == 1
