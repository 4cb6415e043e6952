"""convert_pt / convert-pt: atomic publication, overwrite rules, verification, CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import load_pt

from jasper_mmap import open_store
from jasper_mmap.converters import convert_pt
from jasper_mmap.converters.cli import main as cli_main
from jasper_mmap.errors import ArtifactError, StoreExistsError
from jasper_mmap.stores.safetensors_store import SafetensorsWriter
from jasper_mmap.synthetic import SyntheticSpec, make_pt_dataset


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("backend", ["safetensors", "zarr"])
def test_failure_mid_conversion_leaves_no_store_and_no_stray_files(
    tmp_path, pt_dataset, monkeypatch, backend
):
    from jasper_mmap.stores import WRITERS

    calls = {"n": 0}
    original = WRITERS[backend].write

    def failing_write(self, name, block):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device (injected)")
        return original(self, name, block)

    monkeypatch.setattr(WRITERS[backend], "write", failing_write)
    with pytest.raises(OSError, match="injected"):
        convert_pt(pt_dataset, tmp_path / "store", format=backend, progress=False)
    assert calls["n"] == 5
    assert not (tmp_path / "store").exists()
    assert _leftovers(tmp_path) == []


def test_verification_refuses_a_store_whose_rows_differ(tmp_path, pt_dataset, monkeypatch):
    original = SafetensorsWriter.write

    def corrupting_write(self, name, block):
        if name == "source_embs":
            block = block.copy()
            block[:] = 0
        return original(self, name, block)

    monkeypatch.setattr(SafetensorsWriter, "write", corrupting_write)
    with pytest.raises(ArtifactError, match="verification failed: rows .* of source_embs differ"):
        convert_pt(pt_dataset, tmp_path / "store", progress=False)
    assert not (tmp_path / "store").exists()
    assert _leftovers(tmp_path) == []


def test_refuses_to_overwrite_without_flag_and_replaces_with_it(tmp_path, pt_dataset):
    dst = convert_pt(pt_dataset, tmp_path / "store", progress=False)
    before = (dst / "manifest.json").read_text()
    with pytest.raises(
        StoreExistsError, match="already exists and is a jasper_mmap store.*--overwrite"
    ):
        convert_pt(pt_dataset, dst, progress=False)
    assert (dst / "manifest.json").read_text() == before
    convert_pt(pt_dataset, dst, format="zarr", overwrite=True, progress=False)
    assert open_store(dst).backend == "zarr"
    assert not (dst / "embeddings.safetensors").exists()
    assert _leftovers(tmp_path) == []


def test_refuses_a_file_or_non_empty_directory_as_destination(tmp_path, pt_dataset):
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreExistsError, match="is a file"):
        convert_pt(pt_dataset, tmp_path / "f", progress=False)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("mine")
    with pytest.raises(StoreExistsError, match="non-empty directory"):
        convert_pt(pt_dataset, tmp_path / "d", progress=False)
    assert (tmp_path / "d" / "keep.txt").read_text() == "mine"


def test_stale_partial_of_a_dead_run_is_removed(tmp_path, pt_dataset):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    stale = tmp_path / f".store.partial-{dead.stdout.strip()}-abcd1234"
    stale.mkdir()
    (stale / "embeddings.safetensors").write_bytes(b"half")
    convert_pt(pt_dataset, tmp_path / "store", progress=False)
    assert not stale.exists()
    assert _leftovers(tmp_path) == []


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_a_killed_writer_not_yet_reaped_counts_as_gone(tmp_path, pt_dataset):
    """A SIGKILLed converter stays a zombie until its parent reaps it (a container's PID 1
    may never do so): the next run still removes its partial directory."""
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".store.partial-{writer.pid}-abcd1234"
        stale.mkdir()
        (stale / "embeddings.safetensors").write_bytes(b"half")
        os.kill(writer.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while b") Z" not in open(f"/proc/{writer.pid}/stat", "rb").read():  # not reaped
            assert time.monotonic() < deadline
            time.sleep(0.01)
        convert_pt(pt_dataset, tmp_path / "store", progress=False)
        assert not stale.exists()
        assert _leftovers(tmp_path) == []
    finally:
        writer.kill()
        writer.wait(timeout=30)


@pytest.mark.parametrize("point", ["embeddings.safetensors", "steering.safetensors", "negatives"])
def test_sigkill_mid_conversion_publishes_nothing_and_rerun_succeeds(tmp_path, point):
    src = make_pt_dataset(tmp_path / "ds", SyntheticSpec(n_pairs=4000, dim=64, n_neg=8))
    code = (
        "import sys; from jasper_mmap.converters import convert_pt; "
        "convert_pt(sys.argv[1], sys.argv[2], progress=False, block_bytes=4096)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(src), str(tmp_path / "store")])
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(f".store.partial-*/{point}")):
        assert proc.poll() is None and time.monotonic() < deadline, (
            "converter ended before the kill"
        )
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (tmp_path / "store").exists()
    convert_pt(src, tmp_path / "store", progress=False)
    assert open_store(tmp_path / "store").shape("pair_index") == (4000, 2)
    assert _leftovers(tmp_path) == []


def test_non_contiguous_and_offset_tensors_convert(tmp_path, pt_dataset):
    import shutil

    src = tmp_path / "ds"
    shutil.copytree(pt_dataset, src)
    q = load_pt(src / "question_embs.pt")
    torch.save(torch.from_numpy(q.T.copy()).T, src / "question_embs.pt")  # column-major view
    r = torch.from_numpy(
        np.concatenate([np.zeros(7, np.float32), load_pt(src / "pair_relevance.pt")])
    )
    torch.save(r[7:], src / "pair_relevance.pt")  # storage offset 7
    store = open_store(convert_pt(src, tmp_path / "store", progress=False))
    assert store.read("question_embs").tobytes() == q.tobytes()
    assert store.read("pair_relevance").tobytes() == r[7:].numpy().tobytes()


def test_cli_converts_quietly_and_reports_errors(tmp_path, pt_dataset, capsys):
    assert cli_main([str(pt_dataset), str(tmp_path / "s"), "--quiet"]) == 0
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    assert cli_main([str(pt_dataset), str(tmp_path / "s"), "--quiet"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert (
        cli_main([str(pt_dataset), str(tmp_path / "z"), "--format", "zarr", "--dtype", "bfloat16"])
        == 0
    )
    assert "wrote" in capsys.readouterr().out


def test_cli_shows_a_byte_progress_bar_when_asked(tmp_path, pt_dataset, capsys):
    convert_pt(pt_dataset, tmp_path / "s", progress=True)
    err = capsys.readouterr().err
    assert "convert-pt" in err and "B/s" in err and "100%" in err


def test_full_disk_and_unwritable_destination_get_clear_errors(tmp_path, pt_dataset, monkeypatch):
    import errno

    import jasper_mmap.converters.convert as conv
    from jasper_mmap.errors import StoreWriteError

    original = SafetensorsWriter.write

    def full(self, name, block):
        if name == "steering_residual":
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, name, block)

    monkeypatch.setattr(SafetensorsWriter, "write", full)
    with pytest.raises(
        StoreWriteError,
        match=r"store: could not write the store: the disk is full .*Nothing was published",
    ):
        convert_pt(pt_dataset, tmp_path / "store", progress=False)
    assert not (tmp_path / "store").exists() and _leftovers(tmp_path) == []
    monkeypatch.setattr(SafetensorsWriter, "write", original)

    def read_only(dst):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(conv, "partial_dir", read_only)
    with pytest.raises(StoreWriteError, match="the filesystem is read-only") as info:
        convert_pt(pt_dataset, tmp_path / "store", progress=False)
    assert isinstance(info.value, OSError) and info.value.errno == errno.EROFS
