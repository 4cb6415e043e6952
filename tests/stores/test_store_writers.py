"""Store writers after the attack on issue 24's fixes: a killed replacement without
``renameat2(RENAME_EXCHANGE)``, the store lock and fork children, lock files that are not
ours, full disks, read-only mounts, generation numbers and description fields, path spellings.
Hangs run in subprocesses with timeouts, so they fail instead of hanging the suite."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jasper_mmap import JASPERSteeringDataset, open_store, publish_negatives
from jasper_mmap._fs.partials import HOST_TAG
from jasper_mmap.converters import convert_pt
from jasper_mmap.errors import StoreNotFoundError

PIPES = {"capture_output": True, "text": True}
N_PAIRS, N_NEG = 120, 6


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], **PIPES)
    return int(done.stdout)


def zeros() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((N_PAIRS, N_NEG), "int64"), np.ones((N_PAIRS, N_NEG), "int64")


@pytest.fixture()
def store(tmp_path, pt_dataset):
    return convert_pt(pt_dataset, tmp_path / "store", progress=False)


# -- D2: a killed --overwrite where RENAME_EXCHANGE is missing ---------------------------------

KILL_BETWEEN_RENAMES = textwrap.dedent(
    """
    import os, signal, sys
    import jasper_mmap._fs.publish as A
    from jasper_mmap.converters import convert_pt
    A._exchange = lambda a, b: False  # NFS, CIFS, many FUSE filesystems
    real_rename = os.rename
    def rename(a, b):
        real_rename(a, b)
        if ".old-" in str(b):
            os.kill(os.getpid(), signal.SIGKILL)  # old store moved away, new not yet in
    A.os.rename = rename
    convert_pt(sys.argv[1], sys.argv[2], overwrite=True, progress=False)
    """
)


def test_a_replacement_killed_between_its_renames_is_restored_on_open(store, pt_dataset, caplog):
    done = subprocess.run(
        [sys.executable, "-c", KILL_BETWEEN_RENAMES, str(pt_dataset), str(store)],
        timeout=120,
        **PIPES,
    )
    assert done.returncode == -9, done.stderr[-2000:]
    assert not store.exists()
    (old,) = [p for p in store.parent.iterdir() if ".old-" in p.name]
    assert old.name.endswith(f"-{HOST_TAG}"), old.name  # tagged like a partial
    with caplog.at_level(logging.WARNING), open_store(store) as s:
        assert s.counts["n_pairs"] == N_PAIRS
    assert "restored" in caplog.text and old.name in caplog.text
    assert not old.exists()
    # and through the dataset-directory path (resolve_dataset)
    shutil.move(store, old)
    assert JASPERSteeringDataset(store, "train").store_path == store


def test_a_moved_aside_store_that_cannot_be_restored_is_named(store, monkeypatch):
    import jasper_mmap.format.store_dirs as A

    old = store.parent / f".store.old-{dead_pid()}-abcd1234-{HOST_TAG}"
    store.rename(old)
    monkeypatch.setattr(A, "store_lock", lambda *a, **k: (_ for _ in ()).throw(OSError(30, "ro")))
    with pytest.raises(StoreNotFoundError) as e:
        open_store(store)
    assert str(old) in str(e.value) and "mv " in str(e.value)


def test_a_dead_replacements_old_store_is_removed_by_the_next_writer(store, tmp_path):
    dead = dead_pid()
    old = store.parent / f".store.old-{dead}-abcd1234-{HOST_TAG}"
    shutil.copytree(store, old)
    not_ours = store.parent / f".store.old-{dead}-beef1234-{HOST_TAG}"
    not_ours.mkdir()
    (not_ours / "notes.txt").write_text("mine")
    publish_negatives(store, *zeros())
    assert not old.exists(), "a whole old store left beside the new one"
    assert (not_ours / "notes.txt").read_text() == "mine"  # not a store: never touched


def test_a_fallback_replacement_killed_while_deleting_leaves_nothing_behind(store, pt_dataset):
    code = textwrap.dedent(
        """
        import os, signal, sys, shutil
        import jasper_mmap._fs.publish as A
        from jasper_mmap.converters import convert_pt
        A._exchange = lambda a, b: False
        real = shutil.rmtree
        def rm(p, *a, **k):
            if os.path.basename(str(p)).startswith(".store.") and os.path.isdir(p):
                os.unlink(os.path.join(p, "manifest.json"))
                os.kill(os.getpid(), signal.SIGKILL)
            return real(p, *a, **k)
        A.shutil.rmtree = rm
        convert_pt(sys.argv[1], sys.argv[2], overwrite=True, progress=False)
        """
    )
    done = subprocess.run([sys.executable, "-c", code, str(pt_dataset), str(store)], **PIPES)
    assert done.returncode == -9, done.stderr[-2000:]
    publish_negatives(store, *zeros())
    left = [p.name for p in store.parent.iterdir() if p.name.startswith(".store.")]
    assert left in ([], [".store.lock"]), left


# -- H1: fork children never keep a store lock --------------------------------------------------

FORK_WHILE_PUBLISHING = textwrap.dedent(
    """
    import os, sys, threading, time
    import numpy as np
    from jasper_mmap import publish_negatives
    store = sys.argv[1]
    class Slow:  # a miner streaming its rows: the publish holds both locks meanwhile
        path = "miner"; shape = (120, 6); np_dtype = np.dtype("int64")
        def read_rows(self, a, b):
            time.sleep(1.0)
            return np.zeros((b - a, 6), dtype=np.int64)
    t = threading.Thread(target=publish_negatives, args=(store, Slow(), np.ones((120, 6), "int64")))
    t.start(); time.sleep(0.4)
    pid = os.fork()  # a worker forked while the miner thread holds the locks
    if pid == 0:
        time.sleep(60); os._exit(0)
    t.join()
    print(pid, flush=True)
    time.sleep(60)
    """
)


def test_a_child_forked_during_a_publish_does_not_keep_the_store_locked(store):
    trainer = subprocess.Popen(
        [sys.executable, "-c", FORK_WHILE_PUBLISHING, str(store)], stdout=subprocess.PIPE, text=True
    )
    try:
        child = int(trainer.stdout.readline())
        code = (
            "import sys, numpy as np; from jasper_mmap import publish_negatives\n"
            "print(publish_negatives(sys.argv[1], np.zeros((120, 6), 'int64'), "
            "np.ones((120, 6), 'int64')))"
        )
        try:
            done = subprocess.run([sys.executable, "-c", code, str(store)], timeout=20, **PIPES)
        except subprocess.TimeoutExpired:
            pytest.fail("a publish waited on the lock a forked worker inherited")
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.split() == ["2"]
    finally:
        trainer.kill()
        trainer.wait()
        try:
            os.kill(child, 9)
        except (ProcessLookupError, UnboundLocalError):
            pass


def test_a_child_unwinding_its_parents_lock_releases_nothing(tmp_path):
    code = textwrap.dedent(
        """
        import os, sys, fcntl, time
        from jasper_mmap._fs.lock import store_lock
        lock = os.path.join(sys.argv[1], ".s.lock")
        with store_lock(os.path.join(sys.argv[1], "s"), "testing"):
            pid = os.fork()
            if pid:
                os.waitpid(pid, 0)  # the child left the with block: the lock is still ours
                fd = os.open(lock, os.O_RDONLY)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    print("released by the child")
                except BlockingIOError:
                    print("held")
        if pid == 0:
            os._exit(0)
        """
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], timeout=60, **PIPES)
    assert done.stdout.split() == ["held"], done.stderr[-2000:]


# -- R1, R2: read-only and full filesystems (real mounts where root may make them) --------------


@pytest.fixture()
def mount(tmp_path):
    """``mount(args, target)``: a real mount, unmounted after the test; skips where not
    permitted (not root, no mount namespace rights)."""
    made = []

    def do(args: list[str], target) -> None:
        target.mkdir(exist_ok=True)
        done = subprocess.run(["mount", *args, str(target)], **PIPES)
        if done.returncode != 0:
            pytest.skip(f"cannot mount here: {done.stderr.strip()}")
        made.append(target)

    yield do
    for target in reversed(made):
        subprocess.run(["umount", "-l", str(target)], **PIPES)


def test_a_read_only_mount_with_no_lock_file_opens_and_refuses_publishes_clearly(
    tmp_path, pt_dataset, mount
):
    from jasper_mmap.errors import StoreWriteError

    base = tmp_path / "base"
    base.mkdir()
    ds = shutil.copytree(pt_dataset, base / "ds")
    JASPERSteeringDataset(ds, "train").close()  # its store beside it, up to date
    convert_pt(pt_dataset, base / "store", progress=False)
    assert not [p for p in base.rglob("*.lock")]
    ro = tmp_path / "ro"
    mount(["--bind", str(base)], ro)
    mount(["-o", "remount,bind,ro"], ro)
    with JASPERSteeringDataset(ro / "ds", "train") as d:
        assert len(d) > 0
    with pytest.raises(StoreWriteError, match="read-only"):
        publish_negatives(ro / "store", *zeros())


def test_a_full_disk_never_fails_the_release_of_a_lock(tmp_path, pt_dataset, mount):
    disk = tmp_path / "tiny"
    mount(["-t", "tmpfs", "-o", "size=2m", "tmpfs"], disk)
    store = convert_pt(pt_dataset, disk / "store", progress=False)
    (disk / ".store.lock").write_text("")  # a killed holder's: empty, ours to write into
    with open(disk / "filler", "wb") as f:  # the disk fills up
        with pytest.raises(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
    code = (
        "import sys; from jasper_mmap._fs.lock import store_lock\n"
        "with store_lock(sys.argv[1], 'testing'):\n"
        "    pass\n"
        "print('released')"
    )
    done = subprocess.run([sys.executable, "-c", code, str(store)], timeout=60, **PIPES)
    assert done.stdout.split() == ["released"], done.stderr[-2000:]


# -- R4, D1: lock files that are not ours ----------------------------------------------------


@pytest.mark.parametrize("kind", ["directory", "socket"])
def test_a_directory_or_socket_named_as_the_lock_is_refused_with_the_fix(store, kind):
    import socket

    from jasper_mmap.errors import StoreExistsError

    lock = store.parent / ".store.lock"
    if kind == "directory":
        lock.mkdir()
    else:
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(lock))
        s.close()
    with pytest.raises(StoreExistsError, match="is not a regular file.*Move it away"):
        publish_negatives(store, *zeros())
    assert lock.is_dir() if kind == "directory" else lock.is_socket()


@pytest.mark.parametrize("content", ['{"pid": 1, "note": "mine"}', ""])
def test_a_lock_file_hard_linked_to_a_users_file_is_never_written(store, tmp_path, content):
    mine = tmp_path / "mine.json"
    mine.write_text(content)
    os.link(mine, store.parent / ".store.lock")
    assert publish_negatives(store, *zeros()) == 1
    assert mine.read_text() == content


# -- R3, R5, S9: generation numbers, description fields, publish arguments, uint64 values ------


def test_a_stray_huge_generation_name_is_ignored_and_a_huge_live_one_refused(store):
    from jasper_mmap.errors import StoreFormatError

    neg = store / "negatives"
    (neg / f"gen-{2**63 - 1}.txt").write_text("not ours")
    assert publish_negatives(store, *zeros()) == 1
    assert publish_negatives(store, *zeros()) == 2
    assert json.loads((neg / "CURRENT.json").read_text())["generation"] == 2
    assert (neg / f"gen-{2**63 - 1}.txt").read_text() == "not ours"
    current = json.loads((neg / "CURRENT.json").read_text())
    current["generation"] = 2**62
    (neg / "CURRENT.json").write_text(json.dumps(current))
    with pytest.raises(StoreFormatError, match=r"generation.*2\*\*62"):
        open_store(store)


@pytest.mark.parametrize(
    "field, value",
    [
        ("created_unix", "yesterday"),
        ("created_unix", float("inf")),
        ("sources", [1, 2]),
        ("sources", {"hard_negatives.pt": 5}),
    ],
)
def test_a_malformed_description_field_is_a_format_error_naming_it(
    tmp_path, pt_dataset, field, value
):
    from jasper_mmap.errors import StoreFormatError
    from jasper_mmap.stores.verify import verify_store

    ds = shutil.copytree(pt_dataset, tmp_path / "ds")
    JASPERSteeringDataset(ds, "train").close()
    current = ds / ".jasper_mmap_store" / "negatives" / "CURRENT.json"
    desc = json.loads(current.read_text())
    desc[field] = value
    current.write_text(json.dumps(desc))
    with pytest.raises(StoreFormatError, match=f"'{field}'"):
        JASPERSteeringDataset(ds, "train")
    assert any(field in p for p in verify_store(ds / ".jasper_mmap_store").problems)


@pytest.mark.parametrize(
    "kwargs", [{"keep": "2"}, {"keep": 2.5}, {"sources": "x"}, {"sources": {"a": 1.0}}]
)
def test_a_wrong_publish_argument_is_refused_before_anything_is_published(store, kwargs):
    from jasper_mmap.errors import ArtifactError

    with pytest.raises(ArtifactError, match=next(iter(kwargs))):
        publish_negatives(store, *zeros(), **kwargs)
    assert not (store / "negatives" / "gen-000001.json").exists()


@pytest.mark.parametrize("reader", [False, True])
def test_uint64_values_past_int64_are_refused_not_wrapped(store, reader):
    from jasper_mmap.errors import ArtifactError

    negs, _ = zeros()
    tiers = values = np.ones((N_PAIRS, N_NEG), "uint64")
    values[3, 1] = 2**63 + 1
    if reader:

        class Tiers:
            path, shape, np_dtype = "tiers-reader", values.shape, values.dtype

            def read_rows(self, a, b):
                return values[a:b]

        tiers = Tiers()
    with pytest.raises(ArtifactError, match=r"rows \[3\].*int64"):
        publish_negatives(store, negs, tiers)
    assert not (store / "negatives" / "gen-000001.json").exists()


# -- S3: one dataset directory, however its path is spelled, has one cached store ---------------


def test_publish_through_another_spelling_reaches_the_trainers_cached_store(tmp_path, pt_dataset):
    ds = shutil.copytree(pt_dataset, tmp_path / "ds")
    (tmp_path / "link").symlink_to(ds)
    cache = tmp_path / "cache"
    trainer = JASPERSteeringDataset(ds, "train", cache_dir=cache)
    for spelling in (tmp_path / "link", tmp_path / "sub" / ".." / "ds"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        publish_negatives(spelling, *zeros(), cache_dir=cache)
    trainer.reload_negatives()
    assert trainer.negatives_generation == 2
    assert len(list(cache.iterdir())) == 1, sorted(p.name for p in cache.iterdir())
    trainer.close()


# -- R6, M3, M4: destinations that are not what they seem, from the CLI ------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from jasper_mmap.converters.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], timeout=120, **PIPES)


def test_odd_destinations_are_clear_cli_errors_without_tracebacks(tmp_path, pt_dataset):
    (tmp_path / "loop").symlink_to("loop")
    os.mkfifo(tmp_path / "fifo")
    bad = tmp_path / "bad"
    bad.mkdir()
    os.mkfifo(bad / "manifest.json")
    cases = {
        str(tmp_path / "loop"): "symbolic link loop",
        "/proc/self/x": "cannot create a directory there",
        str(tmp_path / "fifo" / "x"): r"is not a directory \(a FIFO",
        str(bad): "manifest.json is a FIFO.*rm -r",
    }
    for dst, said in cases.items():
        done = _cli(str(pt_dataset), dst, "--overwrite")
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert re.search(said, done.stderr), done.stderr
