"""NOTE [durability]: a mirror is not fsynced where a boot id exists; what an OS crash could
leave is found at the first open after a reboot, and nothing of it is read."""

from __future__ import annotations

import os
import shutil

import numpy as np
from remote_helpers import assert_batches_equal, filled_mirror, sample_in_unit, unit_piece

from jasper_mmap import JASPERSteeringDataset
from jasper_mmap.remote import cache as cache_mod


def _zero(path, a: int, b: int) -> None:
    with open(path, "r+b") as f:
        f.seek(a)
        f.write(bytes(b - a))


def test_after_a_reboot_damage_is_found_and_fetched_again(bucket, store_path):
    url, cache, local, ds, idx = filled_mirror(bucket, store_path)  # every unit present
    remote = ds._remote
    store, cat = remote.path, remote.catalog
    assert (remote.root / "have" / "boot_id").read_text() == cache_mod._boot_id()
    # what a power loss could leave: a unit marked present whose rows never reached the disk,
    # a whole file renamed into place with zeros, a sparse file's fixed bytes lost
    unit = 1
    _, file, a, b = unit_piece(cat, "steering", unit)
    _zero(store / file, a, b)
    whole = max(cat["whole"], key=lambda rel: cat["whole"][rel]["size"])
    _zero(store / whole, 0, int(cat["whole"][whole]["size"]))
    sparse = [rel for rel, spec in cat["sparse"].items() if spec["always"]]
    damaged_sparse = sparse[0]
    x, y, *_ = cat["sparse"][damaged_sparse]["always"][0]
    with open(store / damaged_sparse, "r+b") as f:
        f.seek(x)
        f.write(bytes(255 - c for c in f.read(y - x)))
    gens = remote.gen_catalog(remote.generation)
    gen_unit_file = None
    if "negatives" in gens["groups"]:  # a generation's unit too
        _, gen_unit_file, ga, gb = unit_piece(gens, "negatives", 2)
        _zero(store / gen_unit_file, ga, gb)
    del ds
    # a reboot: the mirror says it was written under another boot
    (remote.root / "have" / "boot_id").write_text("another-boot")
    again = JASPERSteeringDataset(url, "train", cache_dir=cache)
    steering = again._remote._have_map("steering")
    assert (remote.root / "have" / "boot_id").read_text() == cache_mod._boot_id()
    assert_batches_equal(again.__getitems__(idx), local.__getitems__(idx))
    assert (store / whole).read_bytes() == (store_path / whole).read_bytes()
    assert again._remote.summary()["units_fetched"] >= 1
    assert np.asarray(steering.view).all()
    if gen_unit_file is not None:
        assert (store / gen_unit_file).read_bytes() == (store_path / gen_unit_file).read_bytes()


def test_without_a_boot_id_every_unit_is_fsynced_before_it_is_marked(
    bucket, store_path, monkeypatch
):
    url = bucket.upload(store_path)
    calls: list[str] = []
    real_fsync = os.fsync
    real_mark = cache_mod._HaveMap.mark

    def fsync(fd):
        calls.append("fsync")
        real_fsync(fd)

    def mark(self, u, sync):
        calls.append(f"mark sync={sync}")
        real_mark(self, u, sync)

    monkeypatch.setattr(cache_mod.os, "fsync", fsync)
    monkeypatch.setattr(cache_mod._HaveMap, "mark", mark)
    for boot, synced in (("a-boot", False), (None, True)):
        monkeypatch.setattr(cache_mod, "_boot_id", lambda boot=boot: boot)
        ds = JASPERSteeringDataset(url, "train", cache_dir=bucket.cache(str(boot)))
        i = sample_in_unit(ds, 1)
        calls.clear()
        ds.__getitems__([i])
        marks = [c for c in calls if c.startswith("mark")]
        assert marks and all(m == f"mark sync={synced}" for m in marks), calls
        if synced:  # the rows' fsync comes before the have byte
            assert calls.index("fsync") < calls.index(marks[0]), calls
        else:
            assert "fsync" not in calls, calls


def test_a_cache_of_another_layout_version_is_never_read(bucket, store_path):
    url, cache, local, ds, idx = filled_mirror(bucket, store_path)  # every unit present
    root = ds._remote.root
    assert root.name.startswith(f"v{cache_mod.CACHE_LAYOUT}-")
    del ds
    # the same store mirrored by an older layout (complete, every unit marked present), its
    # bytes not the store's: a reader of this version makes its own mirror beside it
    old = root.with_name(f"v{cache_mod.CACHE_LAYOUT - 1}-" + root.name.split("-", 1)[1])
    shutil.copytree(root, old)
    shutil.rmtree(root)
    for p in (old / "store").rglob("*"):
        if p.is_file() and p.name != "manifest.json":
            p.write_bytes(b"\xff" * p.stat().st_size)
    again = JASPERSteeringDataset(url, "train", cache_dir=cache)
    assert again._remote.root == root
    assert_batches_equal(again.__getitems__(idx), local.__getitems__(idx))
