"""Never destroy what we did not make: convert-pt, make_store/make_pt_dir and the scripts.

Every case runs the way users run it (the CLI in a subprocess, the library call) against a
directory that must survive byte for byte. See NOTE [never destroy what we did not make].
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jasper_mmap import open_store
from jasper_mmap._fs.partials import partial_dir
from jasper_mmap._fs.publish import publish_dir
from jasper_mmap.converters import convert_pt
from jasper_mmap.converters.cli import main as cli_main
from jasper_mmap.errors import StoreExistsError, StoreNotFoundError
from jasper_mmap.format.store_dirs import is_store
from jasper_mmap.synthetic import SyntheticSpec, make_pt_dataset
from jasper_mmap.synthetic.large import make_pt_dir, make_store

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "jasper_mmap.converters.cli"]


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (symlinks not followed) with a hash of its bytes."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in files + [d for d in dirs if Path(dirpath, d).is_symlink()]:
            p = Path(dirpath, name)
            rel = p.relative_to(root).as_posix()
            out[rel] = (
                "link:" + os.readlink(p)
                if p.is_symlink()
                else hashlib.blake2b(p.read_bytes(), digest_size=8).hexdigest()
            )
    return out


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args, "--quiet"], capture_output=True, text=True, timeout=120)


@pytest.fixture
def home(tmp_path):
    """A user's directory: a dataset, a sibling file, a thesis and a CSV tree beside it."""
    make_pt_dataset(tmp_path / "work" / "ds", SyntheticSpec(n_pairs=60))
    (tmp_path / "work" / "notes.txt").write_text("do not lose me")
    thesis = tmp_path / "work" / "thesis"
    thesis.mkdir()
    (thesis / "main.tex").write_text("\\documentclass{article}")
    csv = tmp_path / "work" / "csv" / "2026"
    csv.mkdir(parents=True)
    (csv / "a.csv").write_text("x,y\n1,2\n")
    return tmp_path / "work"


def refused(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "convert-pt: error:" in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    return proc.stderr


@pytest.mark.parametrize("flag", [(), ("--overwrite",)], ids=["plain", "overwrite"])
@pytest.mark.parametrize("dst", ["ds", "..", "thesis"])
def test_convert_pt_never_replaces_the_source_its_parents_or_foreign_directories(home, dst, flag):
    before = tree(home.parent)
    proc = subprocess.run(
        [*CLI, str(home / "ds"), dst, "--quiet", *flag],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=home,
    )
    msg = refused(proc)
    assert "--overwrite" not in msg, "the refusal must not invite the flag that destroys data"
    assert tree(home.parent) == before


@pytest.mark.parametrize("flag", [(), ("--overwrite",)], ids=["plain", "overwrite"])
@pytest.mark.parametrize("dst", [".", "csv", "ds/..", "./ds/", "ds/../ds", "~"])
def test_convert_pt_main_refuses_every_spelling_of_a_precious_directory(
    home, dst, flag, monkeypatch, capsys
):
    """The same CLI entry point in-process, for the other spellings of the same places."""
    monkeypatch.chdir(home)
    monkeypatch.setenv("HOME", str(home))
    before = tree(home.parent)
    assert cli_main([str(home / "ds"), dst, "--quiet", *flag]) == 1
    err = capsys.readouterr().err
    assert "convert-pt: error:" in err and "--overwrite" not in err
    assert tree(home.parent) == before


@pytest.mark.parametrize("target", ["ds", ".", "thesis", ".."])
def test_a_symlinked_destination_is_judged_by_what_it_points_to(home, target):
    link = home / "link"
    link.symlink_to(home / target, target_is_directory=True)
    before = tree(home.parent)
    refused(run_cli(str(home / "ds"), str(link), "--overwrite"))
    assert tree(home.parent) == before
    assert not list(home.parent.rglob(".*partial*")), "a temporary directory was left behind"


def test_a_symlink_to_a_store_replaces_that_store_and_stays_a_link(home, tmp_path):
    (tmp_path / "stores").mkdir()
    real = convert_pt(home / "ds", tmp_path / "stores" / "v1", progress=False)
    link = home / "current"
    link.symlink_to(real, target_is_directory=True)
    assert run_cli(str(home / "ds"), str(link)).returncode == 1  # exists: needs the flag
    proc = run_cli(str(home / "ds"), str(link), "--overwrite", "--format", "zarr")
    assert proc.returncode == 0, proc.stderr
    assert link.is_symlink() and Path(os.readlink(link)) == real
    assert open_store(real).backend == "zarr"
    assert not list(home.rglob(".*partial*")) and not list(real.parent.glob(".*partial*"))


def test_a_symlink_to_an_empty_directory_is_filled(home, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    link = home / "to_empty"
    link.symlink_to(empty, target_is_directory=True)
    proc = run_cli(str(home / "ds"), str(link))
    assert proc.returncode == 0, proc.stderr
    assert link.is_symlink() and open_store(empty).counts["n_pairs"] == 60


def test_a_store_inside_the_source_directory_is_allowed(home):
    """The dataset's own cache (DATASET/.jasper_mmap_store) lives inside the source."""
    store = convert_pt(home / "ds", home / "ds" / "my_store", progress=False)
    convert_pt(home / "ds", store, overwrite=True, progress=False)
    assert open_store(store).counts["n_pairs"] == 60


def test_without_the_flag_an_existing_store_is_kept_and_the_flag_is_named(home, tmp_path):
    store = convert_pt(home / "ds", tmp_path / "store", progress=False)
    before = tree(store)
    refused(run_cli(str(home / "ds"), str(store)), "--overwrite", "jasper_mmap store")
    assert tree(store) == before


def test_a_file_or_a_missing_parent_is_a_clear_error(home):
    refused(run_cli(str(home / "ds"), str(home / "notes.txt"), "--overwrite"), "is a file")
    with pytest.raises(StoreNotFoundError, match="parent directory"):
        convert_pt(home / "ds", home / "no" / "such" / "dir", progress=False)


def test_two_conversions_into_one_new_destination_give_one_store_and_one_clear_error(
    home, tmp_path
):
    make_pt_dataset(tmp_path / "big", SyntheticSpec(n_pairs=3000, dim=64))
    dst = tmp_path / "out"
    procs = [
        subprocess.Popen(
            [*CLI, str(tmp_path / "big"), str(dst), "--quiet"],
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 1], results
    err = next(e for rc, e in results if rc == 1)
    assert "Traceback" not in err and "convert-pt: error:" in err
    assert open_store(dst).counts["n_pairs"] == 3000
    assert not list(tmp_path.glob(".*partial*"))


def test_publish_puts_back_a_foreign_directory_that_appeared_after_the_check(tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "precious.txt").write_text("mine")
    tmp = partial_dir(dst)
    (tmp / "manifest.json").write_text("{}")
    with pytest.raises(StoreExistsError, match="put back unchanged"):
        publish_dir(tmp, dst, replace=True, is_ours=is_store)
    assert (dst / "precious.txt").read_text() == "mine"
    assert not tmp.exists()


def test_an_empty_destination_swapped_for_a_store_while_converting_is_fine(home, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert open_store(convert_pt(home / "ds", empty, progress=False)).counts["n_pairs"] == 60


# -- the synthetic generators and scripts/make_synthetic.py ----------------------------------


def make_synthetic(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "scripts" / "make_synthetic.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("form", [(), ("--in-ram",), ("--store",)], ids=["pt", "in-ram", "store"])
@pytest.mark.parametrize("flag", [(), ("--overwrite",)], ids=["plain", "overwrite"])
def test_make_synthetic_never_writes_over_a_users_dataset(home, form, flag):
    before = tree(home)
    proc = make_synthetic(str(home / "ds"), "--pairs", "40", "--dim", "8", *form, *flag)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "make_synthetic: error:" in proc.stderr
    assert "--overwrite" not in proc.stderr or "store" in " ".join(form)
    assert tree(home) == before


@pytest.mark.parametrize("form", [(), ("--store",)], ids=["pt", "store"])
def test_make_synthetic_replaces_only_its_own_output(tmp_path, form):
    dst = tmp_path / "syn"
    args = (str(dst), "--pairs", "40", "--dim", "8", *form)
    assert make_synthetic(*args).returncode == 0
    again = make_synthetic(*args)
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert "--overwrite" in again.stderr
    assert make_synthetic(*args, "--seed", "3", "--overwrite").returncode == 0


def test_make_store_and_make_pt_dir_refuse_foreign_directories(home):
    for fn in (make_store, make_pt_dir):
        for target in (home / "ds", home / "thesis", home):
            with pytest.raises(StoreExistsError, match="is not a"):
                fn(target, 40, dim=8, n_keywords=10, n_clusters=4, overwrite=True)
    assert (home / "notes.txt").read_text() == "do not lose me"


def test_partials_of_other_destinations_are_named_never_removed(home, caplog):
    """A killed conversion to ``old`` left ``.old.partial-PID-TOKEN``; a run to ``new`` names it
    (size and fix) but keeps it: a writer on another host may own it. Its own are removed."""
    code = "import os; print(os.getpid())"
    dead = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    dead = dead.strip()  # a process that has ended
    other = home / f".old.partial-{dead}-abcd1234"
    (other / "negatives").mkdir(parents=True)
    (other / "embeddings.safetensors").write_bytes(b"x" * 200_000)
    (other / "negatives" / "gen-000000.safetensors").write_bytes(b"y" * 100)
    mine = home / f".new.partial-{dead}-abcd1234"
    mine.mkdir()
    live = home / f".busy.partial-{os.getppid()}-abcd1234"  # its writer runs
    live.mkdir()
    a_file = home / f".notes.json.partial-{dead}-abcd1234"  # a partial file, not a store's
    a_file.write_text("{}")
    before = tree(other)
    with caplog.at_level(logging.WARNING, logger="jasper_mmap"):
        convert_pt(home / "ds", home / "new", progress=False)
    assert tree(other) == before and live.is_dir() and a_file.is_file()
    assert not mine.exists()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1, warned
    assert warned[0].startswith(f"{other}: a hidden partial directory (")
    assert f"left by a conversion to {home / 'old'} " in warned[0]
    assert f"(pid {dead}) is not running on this host" in warned[0]
    assert re.search(r"directory \(\d+(\.\d+)?kB\)", warned[0]), warned[0]  # ~200 kB
    assert f"rm -r {other}" in warned[0]
    assert f"convert to {home / 'old'} again (that run removes it)" in warned[0]


def test_a_partial_of_another_host_is_never_judged_by_its_pid(home, caplog):
    """On a filesystem shared between machines (or containers), a PID that is not running here
    may be a live writer there: a partial with another host's tag is neither removed nor named;
    this host's, and older names without a tag, are removed once their writer is gone."""
    from jasper_mmap._fs.partials import HOST_TAG, partial_name

    code = "import os; print(os.getpid())"
    dead = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    dead = dead.strip()
    other_host = "0" * 8 if HOST_TAG != "0" * 8 else "1" * 8
    theirs = home / f".new.partial-{dead}-abcd1234-{other_host}"
    (theirs / "negatives").mkdir(parents=True)
    theirs_elsewhere = home / f".old.partial-{dead}-abcd1234-{other_host}"
    theirs_elsewhere.mkdir()
    ours = home / f".new.partial-{dead}-abcd1234-{HOST_TAG}"
    ours.mkdir()
    legacy = home / f".new.partial-{dead}-abcd5678"
    legacy.mkdir()
    assert partial_name("x").endswith(f"-{HOST_TAG}")  # what writers name their partials
    with caplog.at_level(logging.WARNING, logger="jasper_mmap"):
        convert_pt(home / "ds", home / "new", progress=False)
    assert theirs.is_dir() and (theirs / "negatives").is_dir() and theirs_elsewhere.is_dir()
    assert not ours.exists() and not legacy.exists()
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_this_hosts_partial_of_another_destination_is_named_without_the_other_host_caveat(
    home, caplog
):
    from jasper_mmap._fs.partials import HOST_TAG

    code = "import os; print(os.getpid())"
    dead = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    left = home / f".old.partial-{dead.strip()}-abcd1234-{HOST_TAG}"
    left.mkdir()
    with caplog.at_level(logging.WARNING, logger="jasper_mmap"):
        convert_pt(home / "ds", home / "new", progress=False)
    assert left.is_dir()
    [warned] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned.startswith(f"{left}: a hidden partial directory (")
    assert "removes only its own destination's leftovers" in warned
    assert "another host" not in warned and f"rm -r {left}" in warned


def test_a_partial_from_another_pid_namespace_is_not_judged_by_its_pid(tmp_path):
    """Same host name, other PID namespace (a container with --uts=host): its PIDs mean
    nothing here, so a partial it writes is not removed for a PID that is gone here."""
    import shutil as _shutil

    from jasper_mmap._fs.partials import HOST_TAG
    from jasper_mmap.format.store_dirs import remove_stale_partials

    if _shutil.which("unshare") is None:
        pytest.skip("needs unshare(1)")
    code = "from jasper_mmap._fs.partials import HOST_TAG; print(HOST_TAG)"
    inner = subprocess.run(
        ["unshare", "--pid", "--fork", sys.executable, "-c", code], capture_output=True, text=True
    )
    if inner.returncode != 0:
        pytest.skip(f"unshare --pid is not permitted here: {inner.stderr[-300:]}")
    tag = inner.stdout.strip()
    assert tag and tag != HOST_TAG  # the tag tells the namespaces apart
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    theirs = tmp_path / f".store.partial-{dead.stdout.strip()}-abcd1234-{tag}"
    theirs.mkdir()
    remove_stale_partials(tmp_path / "store")
    assert theirs.is_dir()
