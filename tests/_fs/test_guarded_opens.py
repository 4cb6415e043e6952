"""Files a user or another process controls are opened without blocking and parsed with
bounded nesting (NOTE [regular files only] in jasper_mmap/_fs/files.py): the call sites issue 24 left
unguarded. A hang is tested in a subprocess with a timeout."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from jasper_mmap import open_store, publish_negatives
from jasper_mmap._fs.lock import _say_holder, lock_holder
from jasper_mmap.converters import convert_pt
from jasper_mmap.errors import StoreReplacedError
from jasper_mmap.format.store_dirs import is_store

PIPES = {"capture_output": True, "text": True}
DEEP = "[" * 5000 + "]" * 5000  # parses only with recursion (RecursionError in json)


def _run(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-c", code, *args], timeout=timeout, **PIPES)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung for {timeout} s (a blocking open of a FIFO)")


def _negatives(g: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((120, 6), g, "int64"), np.ones((120, 6), "int64")


# -- 1. is_store: a FIFO or a deeply nested manifest at the destination of convert-pt ---------


def test_a_fifo_manifest_at_the_destination_never_hangs_convert_pt(tmp_path, pt_dataset):
    dst = tmp_path / "dst"
    dst.mkdir()
    os.mkfifo(dst / "manifest.json")
    code = (
        "import sys; from jasper_mmap.converters import convert_pt\n"
        "from jasper_mmap.format.store_dirs import is_store\n"
        "print(is_store(sys.argv[2]))\n"
        "try:\n"
        "    convert_pt(sys.argv[1], sys.argv[2], overwrite=True, progress=False)\n"
        "except FileExistsError as e:\n"
        "    print(type(e).__name__)"
    )
    done = _run(code, str(pt_dataset), str(dst))
    assert done.stdout.split() == ["False", "StoreExistsError"], done.stderr[-2000:]
    assert (dst / "manifest.json").exists()  # not ours: never deleted


def test_a_deeply_nested_manifest_is_not_a_store(tmp_path):
    (tmp_path / "manifest.json").write_text(DEEP)
    assert is_store(tmp_path) is False


# -- 2. lock holder information nested 2,000 levels deep ---------------------------------------


def test_a_deeply_nested_lock_file_names_another_process_and_is_not_truncated(tmp_path):
    deep = "[" * 2000 + "]" * 2000  # fits the 4 KiB read
    assert lock_holder(io.StringIO(deep)) == "another process"
    (tmp_path / "lock").write_text(deep)
    with open(tmp_path / "lock", "r+", encoding="utf-8") as f:
        _say_holder(f, "testing")
    assert (tmp_path / "lock").read_text() == deep


# -- 3. negatives/.publish.lock: opened non-blocking, regular files only -----------------------


def test_a_fifo_publish_lock_is_refused_not_waited_on(tmp_path, pt_dataset):
    store = convert_pt(pt_dataset, tmp_path / "store", progress=False)
    os.mkfifo(store / "negatives" / ".publish.lock")
    code = (
        "import sys, numpy as np; from jasper_mmap import publish_negatives\n"
        "try:\n"
        "    publish_negatives(sys.argv[1], np.zeros((120, 6), 'int64'), np.ones((120, 6), 'int64'))\n"
        "except FileExistsError as e:\n"
        "    print(e)"
    )
    done = _run(code, str(store))
    assert "publish lock" in done.stdout and "a FIFO (named pipe), not a regular file" in (
        done.stdout
    ), done.stderr[-2000:]


def test_a_symlinked_publish_lock_is_refused_and_its_target_untouched(tmp_path, pt_dataset):
    store = convert_pt(pt_dataset, tmp_path / "store", progress=False)
    precious = tmp_path / "notes.txt"
    precious.write_text("mine")
    (store / "negatives" / ".publish.lock").symlink_to(precious)
    with pytest.raises(FileExistsError, match="is a symbolic link, not a regular file"):
        publish_negatives(store, *_negatives(1))
    assert precious.read_text() == "mine"


def test_the_publish_lock_older_publishers_take_is_still_taken(tmp_path, pt_dataset):
    """Older versions' publishers take only negatives/.publish.lock: a publish waits on it."""
    store = convert_pt(pt_dataset, tmp_path / "store", progress=False)
    lock = store / "negatives" / ".publish.lock"
    lock.touch()
    code = (
        "import fcntl, sys, time\n"
        "f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True)\n"
        "time.sleep(3)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        t0 = time.monotonic()
        assert publish_negatives(store, *_negatives(1)) == 1
        assert time.monotonic() - t0 > 1.5
    finally:
        holder.wait(timeout=30)


# -- 4. the collector: a FIFO swapped in for an old description after the listing ------------


def test_a_fifo_description_swapped_in_never_hangs_the_collector(tmp_path, pt_dataset):
    store = convert_pt(pt_dataset, tmp_path / "store", progress=False)
    assert publish_negatives(store, *_negatives(1)) == 1
    assert publish_negatives(store, *_negatives(2)) == 2
    meta = store / "negatives" / "gen-000001.json"  # collected by the next publish
    meta.unlink()
    os.mkfifo(meta)
    # Path.is_file says "regular file": the FIFO appeared between the listing and the open
    code = (
        "import sys, numpy as np; from pathlib import Path\n"
        "Path.is_file = lambda self: True\n"
        "from jasper_mmap import publish_negatives\n"
        "for g in (3,):\n"
        "    print(publish_negatives(sys.argv[1], np.full((120, 6), g), np.ones((120, 6), 'int64')))"
    )
    done = _run(code, str(store))
    assert done.stdout.split() == ["3"], done.stderr[-2000:]
    assert meta.exists()  # not a regular file: not ours to remove


# -- 5. resolve._n_neg_fix reads config.json non-blocking ------------------------------------


def test_a_fifo_config_never_hangs_the_n_neg_advice(tmp_path):
    os.mkfifo(tmp_path / "config.json")
    code = (
        "import sys; from pathlib import Path; from jasper_mmap.dataset.resolve import _n_neg_fix\n"
    )
    code += "print(_n_neg_fix(Path(sys.argv[1]), 7, 6))"
    done = _run(code, str(tmp_path))
    assert done.stdout.strip() == (
        "Open the dataset again (its store is rebuilt with n_neg=7); or write negatives "
        "with n_neg=6."
    ), done.stderr[-2000:]


# -- 6. fsync_tree / fsync_dir: a FIFO inside is skipped, never waited on --------------------


def test_fsync_tree_skips_a_fifo(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "data").write_bytes(b"x")
    os.mkfifo(tmp_path / "sub" / "pipe")
    code = "import sys; from jasper_mmap._fs.publish import fsync_tree, fsync_dir\n"
    code += "fsync_tree(sys.argv[1]); fsync_dir(sys.argv[1] + '/sub/pipe'); print('done')"
    done = _run(code, str(tmp_path))
    assert done.stdout.strip() == "done", done.stderr[-2000:]


# -- 7. the copy-on-write table map opens the store this process opened ----------------------


def test_a_large_table_maps_the_store_opened_not_the_one_now_at_the_path(
    tmp_path, pt_dataset, monkeypatch
):
    from jasper_mmap.dataset import tables

    store = convert_pt(pt_dataset, tmp_path / "store", progress=False)
    s = open_store(store)
    want = np.array(s.raw("source_embs"))
    os.rename(store, tmp_path / "moved")
    shutil.copytree(tmp_path / "moved", store)  # another store's files at the path now
    monkeypatch.setattr(tables, "SMALL_TABLE_BYTES", 0)  # take the copy-on-write map
    got = tables.table_array(s, "source_embs")
    assert np.array_equal(got, want)
    assert got.flags.writeable


def test_a_table_file_replaced_under_the_opened_store_is_a_replaced_store(
    tmp_path, pt_dataset, monkeypatch
):
    from jasper_mmap.dataset import tables

    store = convert_pt(pt_dataset, tmp_path / "store", progress=False)
    s = open_store(store)
    s.raw("source_embs")
    rel = s.entry("source_embs")["file"]
    shutil.copy(store / rel, tmp_path / "copy")
    os.replace(tmp_path / "copy", store / rel)  # same bytes, another file
    monkeypatch.setattr(tables, "SMALL_TABLE_BYTES", 0)
    with pytest.raises(StoreReplacedError, match="would mix two stores"):
        tables.table_array(s, "source_embs")


# -- 8. a generation's fix never advises publishing or converting over a replaced store ------


def test_the_generation_fix_of_a_replaced_store_is_only_to_open_it_again(tmp_path, pt_dataset):
    from jasper_mmap.format.integrity import _generation_fix

    store = convert_pt(pt_dataset, tmp_path / "store", progress=False)
    manifest = json.loads((store / "manifest.json").read_text())
    assert _generation_fix(store, manifest).startswith("Publish the negatives again")
    convert_pt(pt_dataset, store, overwrite=True, progress=False)  # another conversion
    fix = _generation_fix(store, manifest)
    assert fix.startswith(f"The store at {store} was replaced by another conversion"), fix
    assert "Publish" not in fix and "convert-pt" not in fix
    assert fix.endswith("do not convert over it.")
