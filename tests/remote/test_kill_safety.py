"""A node cache left by a killed process is finished or refetched, never trusted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from remote_helpers import assert_batches_equal, sample_in_unit, unit_piece

from jasper_mmap import JASPERSteeringDataset
from jasper_mmap._fs.partials import partial_name

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _child(code: str, url: str, cache) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO)
    prelude = "import os, signal, sys\nfrom jasper_mmap import JASPERSteeringDataset\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code), url, str(cache)],
        env=env,
        capture_output=True,
        timeout=120,
    )


def _reopened_serves_local(url, cache, store_path, store, step: int) -> None:
    """Opened again, the mirror at ``store`` is finished (its manifest written last) and
    serves every ``step``-th sample as the local store does."""
    ds = JASPERSteeringDataset(url, "train", cache_dir=cache)
    assert (store / "manifest.json").exists()
    local = JASPERSteeringDataset(store_path, "train")
    idx = list(range(0, len(ds), step))
    assert_batches_equal(ds.__getitems__(idx), local.__getitems__(idx))


def _mirror_dir(cache):
    (store,) = list(cache.glob("*/v*/store"))
    return store


def test_killed_after_rows_written_before_have_byte(bucket, store_path):
    url = bucket.upload(store_path)
    cache = bucket.cache()
    local = JASPERSteeringDataset(store_path, "train")
    unit = 2
    i = sample_in_unit(local, unit)
    # the child writes unit 2's rows (altered after the crc check) and is killed before the
    # have byte is set: what it wrote must not be trusted
    proc = _child(
        f"""
        from jasper_mmap.remote import cache as c
        real_pwrite = os.pwrite
        def pwrite(fd, data, at):
            return real_pwrite(fd, bytes(len(data)), at)  # zeros: not the store's rows
        def mark(self, u, sync):
            os.kill(os.getpid(), signal.SIGKILL)
        c._HaveMap.mark = mark
        ds = JASPERSteeringDataset(sys.argv[1], "train", cache_dir=sys.argv[2])
        c.os.pwrite = pwrite
        ds.__getitems__([{i}])
        """,
        url,
        cache,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    ds = JASPERSteeringDataset(url, "train", cache_dir=cache)
    assert ds._remote._have_map("steering").view[unit] == 0
    assert_batches_equal(ds.__getitems__([i]), local.__getitems__([i]))
    assert ds._remote.summary()["units_fetched"] >= 1
    assert ds._remote._have_map("steering").view[unit] == 1


@pytest.mark.parametrize("store_path", ["zarr"], indirect=True)  # the most files
def test_killed_while_filling_the_mirror(bucket, store_path):
    url = bucket.upload(store_path)
    cache = bucket.cache()
    # killed at the tenth rename of a fetched file into place: some files in place, others
    # written to temporary names, no manifest
    proc = _child(
        """
        from jasper_mmap.remote import cache as c
        real_replace, n = c.os.replace, [0]
        def replace(a, b):
            n[0] += 1
            if n[0] == 10:
                os.kill(os.getpid(), signal.SIGKILL)
            real_replace(a, b)
        c.os.replace = replace
        JASPERSteeringDataset(sys.argv[1], "train", cache_dir=sys.argv[2])
        """,
        url,
        cache,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    store = _mirror_dir(cache)
    assert not (store / "manifest.json").exists()
    left = [p for p in store.rglob("*") if ".partial-" in p.name]
    assert left  # what the killed opener was writing
    _reopened_serves_local(url, cache, store_path, store, step=7)
    assert not [p for p in store.rglob("*") if ".partial-" in p.name]  # removed, not kept


def test_unfinished_mirror_with_garbage_partial_is_finished(bucket, store_path):
    url = bucket.upload(store_path)
    cache = bucket.cache()
    ds = JASPERSteeringDataset(url, "train", cache_dir=cache)
    store = ds._remote.path
    cat = ds._remote.catalog
    whole = sorted(cat["whole"])[0]
    sparse = sorted(cat["sparse"])[0]
    del ds
    # as a kill before the end leaves it: no manifest, a whole file and a sparse file missing,
    # a temporary file of garbage beside the whole file's place
    (store / "manifest.json").unlink()
    (store / whole).unlink()
    (store / sparse).unlink()
    junk = (store / whole).with_name(partial_name((store / whole).name))
    junk.write_bytes(b"\xff" * int(cat["whole"][whole]["size"]))
    _reopened_serves_local(url, cache, store_path, store, step=5)
    assert (store / whole).read_bytes() == (store_path / whole).read_bytes()


def test_rows_present_without_have_byte_are_refetched(bucket, store_path):
    url = bucket.upload(store_path)
    cache = bucket.cache()
    ds = JASPERSteeringDataset(url, "train", cache_dir=cache)
    unit = 1
    i = sample_in_unit(ds, unit)
    ds.__getitems__([i])
    hm = ds._remote._have_map("steering")
    assert hm.view[unit] == 1
    # a unit's rows altered in the sparse file, its have byte 0 (a write not finished)
    _, file, a, b = unit_piece(ds._remote.catalog, "steering", unit)
    with open(ds._remote.path / file, "r+b") as f:
        f.seek(a)
        f.write(bytes(b - a))
    with open(hm.path, "r+b") as f:
        f.seek(unit)
        f.write(b"\x00")
    del ds
    again = JASPERSteeringDataset(url, "train", cache_dir=cache)
    local = JASPERSteeringDataset(store_path, "train")
    assert_batches_equal(again.__getitems__([i]), local.__getitems__([i]))
    assert again._remote.summary()["units_fetched"] == 1
    assert np.asarray(again._remote._have_map("steering").view)[unit] == 1
