"""One writer at a time, on the store it opened (DESIGN guarantee 10; issue 24).

Every writer of a store (``convert_pt``/``--overwrite``, ``publish_negatives`` and its
clean-up, the auto-convert of a dataset directory) takes one store-level lock that lives
beside the store (``.NAME.lock``); these tests race them in real processes, bounded in time.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from jasper_mmap import JASPERSteeringDataset, open_store, publish_negatives
from jasper_mmap._fs.partials import HOST_TAG
from jasper_mmap.converters import convert_pt
from jasper_mmap.errors import (
    ArtifactError,
    JasperError,
    StoreExistsError,
    StoreReplacedError,
    StoreWriteError,
)

STRESS = textwrap.dedent(
    """
    import sys, time, traceback
    import numpy as np
    role, src, store, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    from jasper_mmap import publish_negatives
    from jasper_mmap.converters import convert_pt
    from jasper_mmap.errors import JasperError
    deadline, done, lost = time.monotonic() + seconds, 0, 0
    negs = (np.arange(120)[:, None] * 7 + np.arange(6)[None, :] * 3) % 120
    tiers = np.ones((120, 6), dtype=np.int64)
    while time.monotonic() < deadline:
        try:
            if role == "convert":
                convert_pt(src, store, overwrite=True, progress=False)
            else:
                publish_negatives(store, negs, tiers)
            done += 1
        except JasperError as e:  # a lost race must be one of ours, naming the fix
            lost += 1
            print("lost:", e, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            sys.exit(3)
    print(role, done, lost)
    """
)


def _race(src: Path, store: Path, seconds: float) -> list[str]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", STRESS, role, str(src), str(store), str(seconds)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for role in ("convert", "publish")
    ]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=seconds + 120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a writer hung racing another one")
        assert p.returncode == 0, f"a writer raised a raw exception:\n{err[-3000:]}"
        outs.append(out)
    return outs


@pytest.mark.slow
def test_overwrite_racing_publish_never_breaks_the_store(tmp_path, pt_dataset):
    """convert-pt --overwrite in one process, publish_negatives in another, for a few seconds:
    no raw exception, every publish either lands in the store it opened or fails with one of
    our errors, and the store opens (its live generation on disk) after every round."""
    store = convert_pt(pt_dataset, tmp_path / "store", progress=False)
    for _ in range(3):
        outs = _race(pt_dataset, store, 4.0)
        with open_store(store) as s:  # the live generation's files are there and whole
            g = s.live_generation()
            s.use_generation(g)
        assert all(o.split()[1] != "0" for o in outs), outs  # both really wrote


# -- helpers ----------------------------------------------------------------------------------

N_PAIRS, N_NEG, N_SOURCES = 120, 6, 120


def table(g: int, n_neg: int = N_NEG) -> tuple[np.ndarray, np.ndarray]:
    negs = (np.arange(N_PAIRS)[:, None] * 7 + np.arange(n_neg)[None, :] * 3 + g) % N_SOURCES
    return negs, np.full((N_PAIRS, n_neg), 1 + g % 4)


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], **PIPES)
    return int(done.stdout)


PIPES = {"capture_output": True, "text": True}


@pytest.fixture()
def src(tmp_path, pt_dataset):
    # without the store that other tests' openings of the shared fixture leave inside it
    ignore = shutil.ignore_patterns(".jasper_mmap_store*")
    return shutil.copytree(pt_dataset, tmp_path / "ds", ignore=ignore)


# -- item 1: the lock itself ------------------------------------------------------------------


def test_the_lock_is_reentrant_in_a_thread_and_excludes_other_threads(tmp_path):
    from jasper_mmap._fs.lock import store_lock

    store = tmp_path / "store"
    order = []
    with store_lock(store, "testing") as real:
        assert real == store.resolve()
        with store_lock(tmp_path / "." / "store", "testing again"):  # the same lock, nested
            pass

        def take():
            with store_lock(store, "other"):
                order.append("other")

        other = threading.Thread(target=take)
        other.start()
        other.join(0.5)
        assert other.is_alive(), "another thread took the lock while this one held it"
        order.append("first")
    other.join(10)
    assert not other.is_alive() and order == ["first", "other"]


def test_a_publish_waits_for_a_conversion_and_names_its_holder(tmp_path, pt_dataset, caplog):
    """The holder (another process) converts; the publisher waits, says who, then publishes
    into the store it opens once the lock is its own."""
    store = convert_pt(pt_dataset, tmp_path / "store", progress=False)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from jasper_mmap._fs.lock import store_lock\n"
            "with store_lock(sys.argv[1], 'converting'):\n"
            "    print('held', flush=True); time.sleep(1.5)",
            str(store),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO, logger="jasper_mmap._fs"):
        assert publish_negatives(store, *table(1)) == 1
    assert time.monotonic() - t0 > 0.5
    assert f"waiting for process {holder.pid} on" in caplog.text and "converting for" in caplog.text
    holder.wait(10)


def test_a_symlink_or_fifo_named_as_the_lock_is_refused_and_left_alone(tmp_path, pt_dataset):
    store = convert_pt(pt_dataset, tmp_path / "store", progress=False)
    precious = tmp_path / "precious.txt"
    precious.write_text("do not truncate")
    lock = tmp_path / ".store.lock"
    lock.symlink_to(precious)
    with pytest.raises(StoreExistsError, match="is a symbolic link"):
        publish_negatives(store, *table(1))
    assert precious.read_text() == "do not truncate"
    lock.unlink()
    os.mkfifo(lock)
    code = (
        "import sys; from jasper_mmap import publish_negatives; import numpy as np\n"
        "try:\n"
        "    publish_negatives(sys.argv[1], np.zeros((120, 6), 'int64'), np.ones((120, 6), 'int64'))\n"
        "except FileExistsError as e:\n"
        "    print(e)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(store)], timeout=60, **PIPES)
    assert "is not a regular file" in done.stdout, done.stderr[-2000:]


def test_a_lock_file_that_is_not_ours_is_locked_but_never_truncated(tmp_path, pt_dataset):
    store = convert_pt(pt_dataset, tmp_path / "store", progress=False)
    lock = tmp_path / ".store.lock"
    lock.write_text("a user's notes\n")
    assert publish_negatives(store, *table(1)) == 1
    assert lock.read_text() == "a user's notes\n"


# -- item 4: publish_negatives reaches the store the trainer reads ----------------------------


@pytest.fixture()
def pt_and_h5(src):
    pytest.importorskip("h5py")
    JASPERSteeringDataset.convert_pt_to_hdf5(src)  # dataset.h5 beside the .pt files
    return src


def test_publish_into_a_directory_reaches_the_store_a_pt_dataset_reads(pt_and_h5):
    ds = JASPERSteeringDataset(pt_and_h5, "train", storage_format="pt")
    assert publish_negatives(pt_and_h5, *table(1)) == 1  # "auto" alone would mean dataset.h5
    assert ds.reload_negatives() == 1
    np.testing.assert_array_equal(ds.hard_negatives.numpy(), table(1)[0])
    assert not (pt_and_h5 / ".jasper_mmap_store_hdf5").exists()  # nothing converted on the side


def test_publish_with_both_stores_made_asks_which_and_takes_storage_format(pt_and_h5):
    ds_pt = JASPERSteeringDataset(pt_and_h5, "train", storage_format="pt")
    ds_h5 = JASPERSteeringDataset(pt_and_h5, "train")  # auto: dataset.h5
    with pytest.raises(ArtifactError, match="storage_format='pt' or 'hdf5'"):
        publish_negatives(pt_and_h5, *table(1))
    assert publish_negatives(pt_and_h5, *table(2), storage_format="pt") == 1
    assert ds_pt.reload_negatives() == 1 and ds_h5.reload_negatives() == 0
    assert publish_negatives(pt_and_h5, *table(3), storage_format="hdf5") == 1
    assert ds_h5.reload_negatives() == 1
    np.testing.assert_array_equal(ds_h5.hard_negatives.numpy(), table(3)[0])


# -- item 10: a read-only dataset directory with an up-to-date store beside it ------------------


def _read_only(monkeypatch, directory: Path) -> None:
    """``directory`` is not writable (tests run as root, where chmod does not hold)."""
    real_access = os.access

    def access(path, mode, *a, **kw):
        if Path(path) == directory and mode & os.W_OK:
            return False
        return real_access(path, mode, *a, **kw)

    monkeypatch.setattr(os, "access", access)


def test_a_read_only_dataset_dir_uses_its_up_to_date_store(src, tmp_path, monkeypatch):
    from jasper_mmap.dataset.resolve import resolve_store

    beside = resolve_store(src)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _read_only(monkeypatch, src)
    assert resolve_store(src) == beside
    assert JASPERSteeringDataset(src, "train").store_path == beside
    assert not (tmp_path / "cache").exists(), "converted again into the cache"
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "note": "edited"}))  # now stale
    assert resolve_store(src).parent == tmp_path / "cache" / "jasper_mmap"


# -- item 11: names are not patterns ------------------------------------------------------------


@pytest.mark.parametrize("name", ["store[1]", "run**2", "a?b*"])
def test_glob_characters_in_a_destination_name(tmp_path, pt_dataset, name, caplog):
    left = tmp_path / f".{name}.partial-{dead_pid()}-abcd1234-{HOST_TAG}"
    left.mkdir()
    (left / "junk").write_bytes(b"x" * 100)
    dst = convert_pt(pt_dataset, tmp_path / name, progress=False)
    assert not left.exists(), "a killed run's partial of this destination was kept"
    assert open_store(dst).counts["n_pairs"] == N_PAIRS
    assert publish_negatives(dst, *table(1)) == 1
    # another destination's leftover is named with advice that works in a shell
    other = tmp_path / f".{name}x.partial-{dead_pid()}-abcd1234-{HOST_TAG}"
    other.mkdir()
    with caplog.at_level(logging.WARNING, logger="jasper_mmap.format.store_dirs"):
        convert_pt(pt_dataset, tmp_path / name, progress=False, overwrite=True)
    assert other.exists() and f"rm -r '{other}'" in caplog.text


# -- item 12: raw exceptions where one of ours belongs ----------------------------------------


def test_a_stray_file_among_the_generations_is_left_alone(tmp_path, pt_dataset):
    store = convert_pt(pt_dataset, tmp_path / "store", progress=False)
    neg = store / "negatives"
    stray = {"gen-000000 (copy).json": b"{}", "gen-000001.json.bak": b"x", "gen-x.json": b"{}"}
    for name, data in stray.items():
        (neg / name).write_bytes(data)
    for g in range(1, 5):  # publishes, and collects generations older than the newest two
        assert publish_negatives(store, *table(g)) == g
    assert not (neg / "gen-000000.json").exists()  # collected
    assert all((neg / n).read_bytes() == d for n, d in stray.items())  # not ours: kept


def test_no_writable_cache_names_cache_dir(src, tmp_path, monkeypatch):
    _read_only(monkeypatch, src)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home" / ".cache"))
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **kw):
        if tmp_path / "home" in (self, *self.parents):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *a, **kw)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(StoreWriteError, match="cache_dir=") as e:
        JASPERSteeringDataset(src, "train")
    assert isinstance(e.value, JasperError) and str(src) in str(e.value)
    assert JASPERSteeringDataset(src, "train", cache_dir=tmp_path / "c").store_path.is_dir()


def test_a_full_disk_with_no_lock_file_is_a_clear_error(src, monkeypatch):
    import builtins
    import errno

    (src / ".jasper_mmap_store.lock").unlink(missing_ok=True)

    def full(real):
        def opener(path, *a, **kw):
            if str(path).endswith(".lock"):  # creating it needs a directory entry
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return real(path, *a, **kw)

        return opener

    monkeypatch.setattr(builtins, "open", full(builtins.open))
    monkeypatch.setattr(os, "open", full(os.open))
    with pytest.raises(StoreWriteError, match="the disk is full") as e:
        JASPERSteeringDataset(src, "train")
    assert ".jasper_mmap_store.lock" in str(e.value) and "free space" in str(e.value)


# -- item 14: n_neg changed under a running dataset: say what to edit -------------------------


def test_changed_n_neg_says_which_config_key_to_edit(src):
    ds = JASPERSteeringDataset(src, "train")
    time.sleep(0.02)
    negs, tiers = table(1, n_neg=4)
    torch.save(torch.from_numpy(negs), src / "hard_negatives.pt")
    torch.save(torch.from_numpy(tiers), src / "negative_tiers.pt")
    with pytest.raises(ArtifactError, match=r'Set "n_neg": 4 in .*config.json \(it says 6\)'):
        ds.reload_negatives()
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "n_neg": 4}))  # as the message says
    assert JASPERSteeringDataset(src, "train").n_neg == 4


@pytest.mark.slow
def test_reload_from_two_threads_during_publishes_never_fails(tmp_path, pt_dataset):
    """Generations published (and old ones collected) by another process while two threads
    reload: every reload serves a live generation; none raises "call reload_negatives()"."""
    store = convert_pt(pt_dataset, tmp_path / "store", progress=False)
    ds = JASPERSteeringDataset(store, "train")
    code = (
        "import sys, time, numpy as np; from jasper_mmap import publish_negatives\n"
        "t = time.monotonic() + float(sys.argv[2])\n"
        "while time.monotonic() < t:\n"
        "    publish_negatives(sys.argv[1], np.zeros((120, 6), 'int64'), np.ones((120, 6), 'int64'))"
    )
    publishers = [subprocess.Popen([sys.executable, "-c", code, str(store), "5"]) for _ in "ab"]
    errors, seen = [], set()

    def reload():
        while publishers[0].poll() is None:
            try:
                seen.add(ds.reload_negatives())
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

    threads = [threading.Thread(target=reload) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [p.wait(60) for p in publishers] == [0, 0]
    assert not errors, errors[:3]
    assert len(seen) > 2  # it really raced the publishers
    ds.get_batch(np.arange(4))


# -- item 5 (the message): never advise converting over a store the user replaced -------------


def test_after_an_overwrite_with_another_dataset_the_advice_is_not_to_convert_over_it(
    tmp_path, pt_dataset
):
    from jasper_mmap.synthetic import SyntheticSpec, make_pt_dataset

    other = make_pt_dataset(tmp_path / "other", SyntheticSpec(n_pairs=80, n_neg=4, seed=3))
    store = convert_pt(pt_dataset, tmp_path / "store", progress=False)
    ds = JASPERSteeringDataset(store, "train")
    convert_pt(other, store, progress=False, overwrite=True)  # on purpose: another dataset
    publish_negatives(store, np.zeros((80, 4), "int64"), np.ones((80, 4), "int64"))
    with pytest.raises(StoreReplacedError) as e:  # the open dataset never reads the new store
        ds.reload_negatives()
    assert "open the dataset (or store) again" in str(e.value).lower()
    # it may say what replaced the store; it never advises converting over it again
    assert not re.search(r"convert-pt [^-\s]\S* [^-\s]", str(e.value)) and str(
        pt_dataset
    ) not in str(e.value)
    assert JASPERSteeringDataset(store, "train").n_neg == 4  # the new store is intact


# -- attacks beyond the issue -----------------------------------------------------------------


def test_a_fifo_or_directory_named_as_a_generation_never_blocks_a_publish(tmp_path, pt_dataset):
    """Old generations are collected by their description; a FIFO there would block the
    collector's open forever, a directory would raise a raw IsADirectoryError."""
    store = convert_pt(pt_dataset, tmp_path / "store", progress=False)
    os.mkfifo(store / "negatives" / "gen-000000x.json")  # not a generation's name either
    (store / "negatives" / "gen-000001.json").mkdir()
    os.mkfifo(store / "negatives" / "gen-000002.json")
    code = (
        "import sys, numpy as np; from jasper_mmap import publish_negatives\n"
        "for _ in range(3):\n"
        "    print(publish_negatives(sys.argv[1], np.zeros((120, 6), 'int64'), "
        "np.ones((120, 6), 'int64')))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(store)], timeout=120, **PIPES)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["3", "4", "5"]  # numbers taken by anything are skipped
    assert (store / "negatives" / "gen-000001.json").is_dir()  # not ours: left alone


def test_a_store_reached_through_a_symlink_shares_the_lock_of_its_real_path(tmp_path):
    from jasper_mmap._fs.lock import store_lock

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    order = []

    def take():
        with store_lock(tmp_path / "link", "other"):
            order.append("link")

    with store_lock(tmp_path / "real", "testing"):
        other = threading.Thread(target=take)
        other.start()
        other.join(0.5)
        order.append("real")
    other.join(10)
    assert order == ["real", "link"]
    assert not (tmp_path / ".link.lock").exists()


def test_writers_exclude_each_other_although_the_lock_file_comes_and_goes(tmp_path):
    """Each holder that created the lock file removes it when done; four processes doing a
    read-sleep-write increment under the lock still never overlap, and no file is left."""
    counter = tmp_path / "count"
    counter.write_text("0")
    code = (
        "import sys, time; from pathlib import Path; from jasper_mmap._fs.lock import store_lock\n"
        "c = Path(sys.argv[2])\n"
        "for _ in range(25):\n"
        "    with store_lock(sys.argv[1], 'counting'):\n"
        "        n = int(c.read_text()); time.sleep(0.001); c.write_text(str(n + 1))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "store"), str(counter)])
        for _ in range(4)
    ]
    assert [p.wait(120) for p in procs] == [0] * 4
    assert counter.read_text() == "100"
    assert not (tmp_path / ".store.lock").exists()


def test_overwrite_and_publish_leave_no_lock_file_beside_the_store(tmp_path, pt_dataset):
    store = convert_pt(pt_dataset, tmp_path / "store", progress=False)
    convert_pt(pt_dataset, store, progress=False, overwrite=True)
    publish_negatives(store, *table(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
