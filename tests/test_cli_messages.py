"""What a newcomer meets at the command line: one success line, no progress frames in logs,
helpful words for a wrong SRC, and no traceback when the output pipe closes early."""

from __future__ import annotations

import subprocess
import sys

import pytest

from jasper_mmap.converters import convert_pt
from jasper_mmap.synthetic import SyntheticSpec, make_pt_dataset

CLI = [sys.executable, "-m", "jasper_mmap.converters.cli"]


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make_pt_dataset(tmp_path_factory.mktemp("cli") / "ds", SyntheticSpec(n_pairs=60))


def test_success_is_reported_once_and_logs_hold_no_progress_frames(ds, tmp_path):
    proc = subprocess.run([*CLI, str(ds), str(tmp_path / "s")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("wrote") == 1 and str(tmp_path / "s") in proc.stdout
    assert "converted" not in proc.stderr and "wrote" not in proc.stderr
    assert "\r" not in proc.stderr, "a progress bar wrote terminal frames into a log file"


@pytest.mark.parametrize(
    "case,needle",
    [
        ("a .pt file", "Did you mean its directory"),
        ("a store", "is already a jasper_mmap store"),
        ("missing", "does not exist"),
        ("no config", "config.json is missing"),
    ],
)
def test_a_wrong_src_gets_what_was_probably_meant(ds, tmp_path, case, needle):
    src = {
        "a .pt file": ds / "question_embs.pt",
        "a store": convert_pt(ds, tmp_path / "store", progress=False)
        if case == "a store"
        else None,
        "missing": tmp_path / "nope",
        "no config": tmp_path,
    }[case]
    proc = subprocess.run([*CLI, str(src), str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert needle in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_closed_output_pipe_is_not_a_traceback(ds, tmp_path):
    cmd = f"{sys.executable} -m jasper_mmap.converters.cli {ds} {tmp_path / 's'} | true"
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
