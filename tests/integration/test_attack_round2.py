"""Issue 24, the second attack round on the writer and control fixes: a dataset copied in its
own process gets a shared control block of its own (1); stray generation names never break a
publish (2, 5); a fork child never keeps the store lock (6); a moved-aside store of a dead or
unknown writer is settled before a conversion checks its destination, and named wherever a
store is missing (3, 4, 8); odd paths get our errors (7); write errors advise for their errno (8)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import run_script

from jasper_mmap import JASPERSteeringDataset, open_store, publish_negatives
from jasper_mmap.converters import convert_pt
from jasper_mmap.errors import JasperError, StoreExistsError
from jasper_mmap.format.spec import MAX_GENERATION


def _run(tmp_path, script: str, *args: str, timeout: int = 180) -> str:
    return run_script(tmp_path, script, *args, timeout=timeout)


# -- 1: a copy made in the owner's process ---------------------------------------------------

_COPY_SCRIPT = r"""
import copy, io, pickle, sys
import torch
from jasper_mmap import JASPERSteeringDataset
from jasper_mmap.loading.loader import JasperLoader, collate_batch

def variants(ds, workers, ctx):
    ld = JasperLoader(ds, worker_mode="process", batch_size=16, shuffle=False,
                      num_workers=workers, persistent_workers=bool(workers),
                      collate_fn=collate_batch, multiprocessing_context=ctx)
    out = []
    for step in range(3):
        if step == 1: ds.set_epoch(7)
        if step == 2: ds.force_steering("zero")
        out.append(torch.cat([b["steering_variant"] for b in ld]).tolist())
    return out

def tsave(ds):
    buf = io.BytesIO(); torch.save(ds, buf); buf.seek(0)
    return torch.load(buf, weights_only=False)

if __name__ == "__main__":
    path = sys.argv[1]
    ref = variants(JASPERSteeringDataset(path, "train"), 0, None)
    assert ref[0] != ref[1] != ref[2], ref  # each change shows in the batches
    copies = {"deepcopy": copy.deepcopy, "pickle": lambda d: pickle.loads(pickle.dumps(d)),
              "torch.save": tsave}
    for ctx in ("fork", "spawn"):
        for label, make in copies.items():
            if ctx == "spawn" and label == "torch.save":
                continue  # the same pickle path as "pickle"; spawn workers are slow
            original = JASPERSteeringDataset(path, "train")
            ds = make(original)
            got = variants(ds, 1, ctx)
            print(ctx, label, "shared", ds._control.tensor.is_shared(),
                  ["same" if g == r else "DIFFERENT" for g, r in zip(got, ref)],
                  "original", original.epoch, original._control.snapshot().forced)
"""


def test_a_copy_in_the_same_process_has_its_own_shared_block(tmp_path, pt_dataset):
    out = _run(tmp_path, _COPY_SCRIPT, pt_dataset)
    lines = [x for x in out.splitlines() if x.startswith(("fork", "spawn"))]
    assert len(lines) == 5, out
    for line in lines:  # persistent workers follow the copy; the original is untouched
        assert "shared True ['same', 'same', 'same'] original 0 -1" in line, out


# -- 2, 5: stray generation names ------------------------------------------------------------


@pytest.fixture()
def store(tmp_path, pt_dataset):
    return convert_pt(pt_dataset, tmp_path / "store", progress=False)


def _negatives(store):
    with open_store(store) as s:
        c = s.counts
    shape = (c["n_pairs"], c["n_neg"])
    return np.zeros(shape, dtype=np.int64), np.ones(shape, dtype=np.int64)


def test_a_stray_name_never_takes_the_next_generation_past_the_bound(store):
    negs, tiers = _negatives(store)
    neg_dir = store / "negatives"
    top = MAX_GENERATION - 1
    (neg_dir / f"gen-{top}.txt").write_text("notes")  # not one of our names: ignored
    assert publish_negatives(store, negs, tiers) == 1
    stray = neg_dir / f"gen-{top}.json"  # one of ours: the number is taken, so refused
    stray.write_text("{}")
    before = (neg_dir / "CURRENT.json").read_bytes()
    with pytest.raises(StoreExistsError, match=f"gen-{top}.json") as e:
        publish_negatives(store, negs, tiers)
    assert "Nothing was published" in str(e.value)
    assert (neg_dir / "CURRENT.json").read_bytes() == before  # the store still opens
    assert JASPERSteeringDataset(store, "train").negatives_generation == 1
    stray.unlink()  # the fix the message gives works
    assert publish_negatives(store, negs, tiers) == 2


def test_a_generation_name_with_extra_leading_zeros_is_not_ours(store):
    negs, tiers = _negatives(store)
    neg_dir = store / "negatives"
    assert publish_negatives(store, negs, tiers) == 1
    stray = neg_dir / "gen-0000001.json"
    stray.write_bytes((neg_dir / "gen-000001.json").read_bytes())
    for g in (2, 3, 4):  # no raw "too many values to unpack", old generations collected
        assert publish_negatives(store, negs, tiers) == g
    names = sorted(os.listdir(neg_dir))
    assert "gen-000001.json" not in names and "gen-000002.json" not in names, names
    assert stray.exists() and json.loads(stray.read_text())["generation"] == 1  # left alone
    ds = JASPERSteeringDataset(store, "train")
    assert ds.reload_negatives() == 4


# -- 6: a fork child never keeps the store lock ----------------------------------------------

_FORK_LOCK_SCRIPT = r"""
import os, sys, threading, time
import jasper_mmap._fs.lock as A

store = sys.argv[1]
lock = str(A.lock_path_of(store))

def fork_and_count():
    # a child reports how many of its descriptors lead to the lock file
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        hits = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                hits += os.readlink(f"/proc/self/fd/{fd}") == lock
            except OSError:
                pass
        os.write(w, bytes([hits])); os._exit(0)
    os.close(w); hits = os.read(r, 1)[0]; os.close(r); os.waitpid(pid, 0)
    return hits

real_open = A._open_lock
mode, results = None, []

def patched(path, st):
    got = real_open(path, st)
    if mode == "same thread":  # a fork at this very instant, from this thread
        results.append(fork_and_count())
    elif mode == "other thread":  # another thread forks while the descriptor is unregistered
        t = threading.Thread(target=lambda: results.append(fork_and_count()))
        t.start(); t.join(0.5)  # the fork waits for the registration: do not wait on it
        patched.thread = t
    return got

A._open_lock = patched
for mode in ("same thread", "other thread"):
    with A.store_lock(store, "test"):
        pass
    if mode == "other thread":
        patched.thread.join(10)
    print(mode, results[-1])
A._open_lock = real_open
mode = None

# a thread taking and releasing the lock while this one forks, bounded in time
stop = threading.Event()
def churn():
    while not stop.is_set():
        with A.store_lock(store, "churn"):
            pass
t = threading.Thread(target=churn); t.start()
found = forks = 0
t0 = time.monotonic()
while time.monotonic() - t0 < 1.5:
    found += fork_and_count() > 0; forks += 1
stop.set(); t.join()
print("race", forks, found)
"""


def test_a_fork_never_inherits_an_unregistered_lock_descriptor(tmp_path, store):
    out = _run(tmp_path, _FORK_LOCK_SCRIPT, store, timeout=60)
    assert "same thread 0" in out, out
    assert "other thread 0" in out, out
    forks, found = map(int, out.split("race ")[1].split())
    assert forks > 10 and found == 0, out


# -- 3, 4, 8 (b01 c): a store moved aside by a killed replacement ------------------------------


def _move_aside(store, pid: int, tag: str):
    old = store.parent / f".{store.name}.old-{pid}-0badf00d-{tag}"
    os.rename(store, old)
    return old


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_conversion_never_resurrects_a_moved_aside_store(store, pt_dataset):
    from jasper_mmap._fs.partials import HOST_TAG

    old = _move_aside(store, _dead_pid(), HOST_TAG)  # killed between the two renames
    with pytest.raises(StoreExistsError, match="moved aside") as e:
        convert_pt(pt_dataset, store, progress=False)  # refused at once, not at its end
    assert f"mv {old} {store}" in str(e.value) and "--overwrite" in str(e.value)
    assert not os.path.lexists(store) and old.is_dir()  # nothing resurrected or removed
    convert_pt(pt_dataset, store, overwrite=True, progress=False)
    assert (store / "manifest.json").is_file() and not old.exists()


@pytest.mark.parametrize("why", ["another namespace", "a running pid"])
def test_a_moved_aside_store_of_an_unknown_writer_is_named(store, why, caplog):
    from jasper_mmap._fs.partials import HOST_TAG
    from jasper_mmap.format.store_dirs import warn_stale_partials

    pid, tag = (2, "0123abcd") if why == "another namespace" else (os.getppid(), HOST_TAG)
    old = _move_aside(store, pid, tag)
    with pytest.raises(JasperError, match="does not exist") as e:
        JASPERSteeringDataset(store, "train")
    assert f"mv {old} {store}" in str(e.value), str(e.value)
    r = subprocess.run(
        [sys.executable, "-m", "jasper_mmap.cli", "info", str(store)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and f"mv {old} {store}" in r.stdout + r.stderr, r
    with caplog.at_level("WARNING"):
        assert old in warn_stale_partials(store)
    assert f"mv {old} {store}" in caplog.text
    assert old.is_dir() and not os.path.lexists(store)  # never restored or removed here


# -- 7: odd paths get our errors -------------------------------------------------------------


class _BytesPath:
    def __init__(self, p: bytes) -> None:
        self.p = p

    def __fspath__(self) -> bytes:
        return self.p


_ODD_PATHS = {
    "no such user": ("~nosuchuser_zz/x", "no user 'nosuchuser_zz'"),
    "NUL": ("/tmp/st\0x", "NUL character"),
    "long name": ("/tmp/" + "n" * 300, "past the 255"),
    "long path": ("/tmp/" + "/".join(["d" * 200] * 25), "past the 4096"),
    "not a path": (3, "should be a path"),
}


@pytest.mark.parametrize("case", sorted(_ODD_PATHS))
def test_an_odd_path_gets_our_error_everywhere(case, pt_dataset, tmp_path, capsys):
    from jasper_mmap.cli import main as cli_main
    from jasper_mmap.converters.cli import main as convert_main
    from jasper_mmap.stores.verify import store_info, verify_store

    value, said = _ODD_PATHS[case]
    negs = np.zeros((3, 2), dtype=np.int64)
    calls = {
        "open": lambda: JASPERSteeringDataset(value, "train"),
        "publish": lambda: publish_negatives(value, negs, negs),
        "convert dst": lambda: convert_pt(pt_dataset, value, progress=False),
        "convert src": lambda: convert_pt(value, tmp_path / "dst", progress=False),
        "open_store": lambda: open_store(value),
        "store_info": lambda: store_info(value),
    }
    for name, call in calls.items():
        with pytest.raises(JasperError, match=said) as e:
            call()
        assert isinstance(e.value, ValueError), name  # as the builtin users catch
    report = verify_store(value)  # never raises for a problem: reports it
    assert any(said in p for p in report.problems), report.problems
    if isinstance(value, str) and "\0" not in value:  # what a command line can pass
        capsys.readouterr()
        assert convert_main([str(pt_dataset), value]) == 1
        for command in ("info", "verify"):
            assert cli_main([command, value]) == 1
        err = capsys.readouterr().err
        assert err.count(said) == 3 and "Traceback" not in err, err


def test_a_bytes_path_is_a_path(store_path, tmp_path, pt_dataset):
    from jasper_mmap.stores.verify import store_info, verify_store

    for value in (os.fsencode(store_path), _BytesPath(os.fsencode(store_path))):
        assert len(JASPERSteeringDataset(value, "train")) > 0
        assert store_info(value)["store"] == str(store_path)
        assert verify_store(value).problems == []
        open_store(value).close()
    dst = convert_pt(os.fsencode(pt_dataset), os.fsencode(tmp_path / "st"), progress=False)
    assert dst == tmp_path / "st"


# -- 8: a ragged list; write errors advise for their errno -----------------------------------


def test_a_ragged_list_of_negatives_is_our_error(store):
    from jasper_mmap.errors import ArtifactError

    before = (store / "negatives" / "CURRENT.json").read_bytes()
    with pytest.raises(ArtifactError, match="hard_negatives.*cannot be made into one") as e:
        publish_negatives(store, [[1, 2], [3]], [[1, 1], [1]])
    assert isinstance(e.value, ValueError)
    assert (store / "negatives" / "CURRENT.json").read_bytes() == before


@pytest.mark.parametrize(
    "code, says, never",
    [
        ("EROFS", "writable filesystem", "free space"),
        ("EACCES", "permission", "free space"),
        ("EPERM", "permission", "free space"),
        ("ENOSPC", "free space", "permission"),
        ("EDQUOT", "quota", "permission"),
    ],
)
def test_a_write_errors_advice_matches_its_errno(code, says, never):
    import errno

    from jasper_mmap.errors import StoreWriteError, write_error

    e = OSError(getattr(errno, code), os.strerror(getattr(errno, code)))
    err = write_error("/x/store", e, "a negatives generation")
    assert isinstance(err, StoreWriteError) and err.errno == e.errno
    assert says in str(err) and never not in str(err), str(err)
