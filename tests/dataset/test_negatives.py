"""Hot reload of hard negatives: generations, publication, workers, crashes, disk use."""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import load_pt

from jasper_mmap import JASPERSteeringDataset, create_loader, open_store, publish_negatives
from jasper_mmap.converters import convert_pt
from jasper_mmap.errors import ArtifactError


def table(g: int, n_pairs: int, n_neg: int, n_sources: int) -> tuple[np.ndarray, np.ndarray]:
    """Generation g's negatives: recognisable from any single row (see check_batch)."""
    p = np.arange(n_pairs)[:, None]
    j = np.arange(n_neg)[None, :]
    return (p * 7 + j * 3 + g) % n_sources, np.full((n_pairs, n_neg), 1 + g % 4)


def check_batch(batch, sources: np.ndarray, pairs: np.ndarray, n_neg: int) -> int:
    """Assert every row of the batch comes from the generation it reports; return it."""
    gens = batch["negatives_generation"].numpy()
    g = int(gens[0])
    assert (gens == g).all()
    negs, tiers = table(g, pairs.max() + 1, n_neg, len(sources))
    np.testing.assert_array_equal(batch["negative_embs"].numpy(), sources[negs[pairs]])
    np.testing.assert_array_equal(batch["negative_tiers"].numpy(), tiers[pairs])
    return g


@pytest.fixture()
def src(tmp_path, pt_dataset):
    return shutil.copytree(pt_dataset, tmp_path / "ds")


@pytest.fixture(params=["safetensors", "zarr"])
def store(request, tmp_path, pt_dataset):
    return convert_pt(pt_dataset, tmp_path / "store", format=request.param, progress=False)


def test_seed_flow_overwrite_pt_then_reload(src):
    ds = JASPERSteeringDataset(src, "train")
    assert ds.negatives_generation == 0
    before = ds[5]["negative_embs"]
    negs, tiers = table(1, 120, 6, 120)
    torch.save(torch.from_numpy(negs), src / "hard_negatives.pt")
    torch.save(torch.from_numpy(tiers), src / "negative_tiers.pt")
    assert ds.reload_negatives() == 1 and ds.negatives_generation == 1
    pair = load_pt(src / "train_idx.pt")[5]
    sources = load_pt(src / "source_embs.pt")
    np.testing.assert_array_equal(ds[5]["negative_embs"].numpy(), sources[negs[pair]])
    np.testing.assert_array_equal(ds[5]["negative_tiers"].numpy(), tiers[pair])
    assert not torch.equal(before, ds[5]["negative_embs"])
    assert ds.reload_negatives() == 1  # unchanged files: nothing new published
    fresh = JASPERSteeringDataset(src, "train")  # a new process sees the new generation too
    assert fresh.negatives_generation == 1
    assert sorted(p.name for p in (src / ".jasper_mmap_store/negatives").glob("gen-*.json")) == [
        "gen-000000.json",
        "gen-000001.json",
    ]


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_publish_and_reload_with_persistent_workers_mid_epoch(store, mode):
    s = open_store(store)
    sources, split = s.read("source_embs"), s.read("train_idx")
    assert publish_negatives(store, *table(1, 120, 6, 120)) == 1  # a checkable starting table
    loader = create_loader(
        store,
        "train",
        batch_size=4,
        num_workers=2,
        persistent_workers=True,
        shuffle=False,
        drop_last=False,
        report_generation=True,
        worker_mode=mode,
    )
    assert loader.dataset_obj.negatives_generation == 1
    it = iter(loader)
    for k in range(3):
        assert check_batch(next(it), sources, split[4 * k : 4 * k + 4], 6) == 1
    assert publish_negatives(store, *table(2, 120, 6, 120)) == 2
    assert loader.dataset_obj.reload_negatives() == 2
    gens = [check_batch(b, sources, split[4 * k : 4 * k + 4], 6) for k, b in enumerate(it, start=3)]
    prefetched = 2 * 2  # at most prefetch_factor x num_workers batches were made before the reload
    assert len(gens) > prefetched and set(gens[prefetched:]) == {2}, gens
    assert gens == sorted(gens)  # never back to the old generation
    if mode == "thread":  # threads gather the batches after the reload's next: all new
        assert set(gens[prefetched:]) == {2}
        return
    workers = [w.pid for w in loader._iterator._workers]
    assert {check_batch(b, sources, split[4 * k : 4 * k + 4], 6) for k, b in enumerate(loader)} == {
        2
    }
    assert [w.pid for w in loader._iterator._workers] == workers  # the same persistent workers


def test_invalid_publish_is_refused_and_old_generation_stays(store):
    ds = JASPERSteeringDataset(store, "train", report_generation=True)
    before = ds.get_batch(np.arange(8))
    negs, tiers = table(1, 120, 6, 120)
    bad_negs = negs.copy()
    bad_negs[7, 2] = 120
    with pytest.raises(
        ArtifactError, match=r"negative source rows should be in \[0, 120\), but rows \[7\]"
    ):
        publish_negatives(store, bad_negs, tiers)
    with pytest.raises(ArtifactError, match=r"should have shape \[120, 6\].*but has \[120, 5\]"):
        publish_negatives(store, negs[:, :5], tiers[:, :5])
    with pytest.raises(ArtifactError, match="should hold integers"):
        publish_negatives(store, negs.astype(np.float32), tiers)
    assert ds.reload_negatives() == 0
    after = ds.get_batch(np.arange(8))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not [
        p for p in (store / "negatives").iterdir() if p.name.startswith(".") and "partial" in p.name
    ]
    assert not [p for p in store.iterdir() if "partial" in p.name]


_KILL_CODE = """
import sys, time
from pathlib import Path
import numpy as np
import jasper_mmap.stores.generations as N
point = sys.argv[3]
real_stream, real_json = N._stream, N.write_json_atomic
def pause():
    Path(sys.argv[2]).write_text(point)
    time.sleep(60)
def stream(rows, writer, lo, hi, what):
    out = real_stream(rows, writer, lo, hi, what)
    if point == "data":  # hard_negatives written, tiers not yet
        pause()
    return out
def write_json(path, obj, *rest):
    if point == "pointer" and path.name == "CURRENT.json":  # generation complete, not yet published
        pause()
    return real_json(path, obj, *rest)
N._stream, N.write_json_atomic = stream, write_json
n = np.arange(120)[:, None] * np.ones((1, 6), dtype=np.int64)
N.publish_generation(Path(sys.argv[1]), n % 120, np.ones((120, 6), dtype=np.int64))
"""


@pytest.mark.parametrize("point", ["data", "pointer"])
def test_publisher_killed_mid_write_leaves_previous_generation(store, tmp_path, point):
    ds = JASPERSteeringDataset(store, "train")
    want = ds.get_batch(np.arange(16))
    flag = tmp_path / "flag"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_CODE, str(store), str(flag), point])
    deadline = time.monotonic() + 60
    while not flag.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    again = JASPERSteeringDataset(store, "train")
    assert again.reload_negatives() == 0
    got = again.get_batch(np.arange(16))
    assert all(torch.equal(want[k], got[k]) for k in want)
    g = publish_negatives(store, *table(1, 120, 6, 120))  # a rerun succeeds
    assert g == (
        1 if point == "data" else 2
    )  # a complete but unpublished generation keeps its number
    assert again.reload_negatives() == g
    assert not [p for p in store.iterdir() if "partial" in p.name]  # the dead run's leftovers went


def test_unusual_tiers_are_published_with_a_warning(store, caplog):
    """Tiers are labels the in-RAM dataset passed through; a miner's tier 0 is served as 0."""
    import logging

    negs, tiers = table(1, 120, 6, 120)
    tiers[3] = 0
    with caplog.at_level(logging.WARNING):
        g = publish_negatives(store, negs, tiers)
    assert "outside the usual 1..4" in caplog.text
    s = open_store(store)
    assert s.live_generation() == g and any("1..4" in w for w in s.negatives_pointer["warnings"])
    ds = JASPERSteeringDataset(store, "train")
    pair = s.read("train_idx")[0]
    assert ds.get_batch([0])["negative_tiers"][0].tolist() == tiers[pair].tolist()


def test_disk_use_stays_bounded_over_many_reloads(store):
    ds = JASPERSteeringDataset(store, "train")
    ds.get_batch([0])
    sizes = []
    for g in range(1, 13):
        publish_negatives(store, *table(g, 120, 6, 120))
        ds.reload_negatives()
        ds.get_batch([0])
        sizes.append(sum(f.stat().st_size for f in (store / "negatives").rglob("*") if f.is_file()))
    metas = sorted(p.name for p in (store / "negatives").glob("gen-*.json"))
    assert metas == ["gen-000011.json", "gen-000012.json"]
    assert max(sizes[3:]) <= min(sizes[3:]) * 1.01  # flat after the first few


def test_a_generation_still_mapped_by_a_reader_is_not_removed(store):
    old = JASPERSteeringDataset(store, "train")
    old.get_batch([0])  # maps generation 0 and holds its lease
    for g in range(1, 5):
        publish_negatives(store, *table(g, 120, 6, 120))
    names = {p.name for p in (store / "negatives").glob("gen-*.json")}
    assert "gen-000000.json" in names and "gen-000001.json" not in names
    np.testing.assert_array_equal(
        old.get_batch([1])["negative_tiers"].numpy(),
        load_pt_tiers(store, 0)[[open_store(store).read("train_idx")[1]]],
    )
    old.close()
    publish_negatives(store, *table(5, 120, 6, 120))
    assert "gen-000000.json" not in {p.name for p in (store / "negatives").glob("gen-*.json")}


def load_pt_tiers(store, generation):
    s = open_store(store)
    s.use_generation(generation)
    return s.read("negative_tiers")


def _publisher(store: str, first: int, count: int, done) -> None:
    for g in range(first, first + count):
        publish_negatives(store, *table(g, 120, 6, 120))
        time.sleep(0.01)
    done.set()


@pytest.mark.slow
@pytest.mark.parametrize("store", ["safetensors"], indirect=True)
@pytest.mark.parametrize(
    "workers,persistent,mode",
    [
        (2, True, "process"),
        (2, False, "process"),
        (0, False, "thread"),
        (4, False, "thread"),
        (4, False, "thread-larger-than-ram"),
    ],
    ids=["persistent-workers", "fresh-workers", "no-workers", "threads", "threads-random"],
)
def test_stress_publisher_and_workers_never_tear_a_batch(
    store, workers, persistent, mode, monkeypatch
):
    if mode == "thread-larger-than-ram":  # the batch prefetch and its dense windows run too
        monkeypatch.setenv("JASPER_MMAP_MADVISE", "random")
        mode = "thread"
    s = open_store(store)
    sources, split = s.read("source_embs"), s.read("train_idx")
    publish_negatives(store, *table(1, 120, 6, 120))  # generation 1 follows the checkable table
    loader = create_loader(
        store,
        "train",
        batch_size=8,
        num_workers=workers,
        persistent_workers=persistent,
        worker_mode=mode,
        shuffle=False,
        drop_last=False,
        report_generation=True,
    )
    loader.dataset_obj.reload_negatives()
    ctx = mp.get_context("spawn")
    done = ctx.Event()
    pub = ctx.Process(target=_publisher, args=(str(store), 2, 15, done))
    pub.start()
    seen, batches, epochs = set(), 0, 0
    deadline = time.monotonic() + 120
    while (not done.is_set() or epochs < 3) and time.monotonic() < deadline:
        epochs += 1
        for k, batch in enumerate(loader):
            seen.add(check_batch(batch, sources, split[8 * k : 8 * k + 8], 6))
            batches += 1
            if k % 3 == 0:
                loader.dataset_obj.reload_negatives()
    pub.join(timeout=60)
    assert pub.exitcode == 0
    assert batches > 20 and len(seen) >= 3, (batches, seen)


def test_publish_on_a_full_disk_keeps_the_old_generation(store, monkeypatch):
    import errno

    from jasper_mmap.errors import StoreWriteError
    from jasper_mmap.stores import WRITERS

    writer = WRITERS[open_store(store).backend]
    original = writer.write

    def full(self, name, block):
        if name == "negative_tiers":
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, name, block)

    monkeypatch.setattr(writer, "write", full)
    with pytest.raises(
        StoreWriteError, match="could not write negatives generation 1: the disk is full"
    ):
        publish_negatives(store, *table(1, 120, 6, 120))
    assert open_store(store).live_generation() == 0
    assert not [p for p in store.iterdir() if "partial" in p.name]
    assert not list((store / "negatives").glob("gen-000001*"))
