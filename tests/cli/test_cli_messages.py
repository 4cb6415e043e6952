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


# -- jasper-mmap info|verify on what is not a store; --help; --source hdf5 (issue 24, item 15) --


@pytest.fixture(scope="module")
def opened(tmp_path_factory):
    """A dataset directory that was opened once, so its store sits inside it."""
    from jasper_mmap import JASPERSteeringDataset

    ds = make_pt_dataset(tmp_path_factory.mktemp("opened") / "ds", SyntheticSpec(n_pairs=60))
    JASPERSteeringDataset(ds, "train").close()
    assert (ds / ".jasper_mmap_store" / "manifest.json").is_file()
    return ds


def _jasper_mmap(capsys, *argv) -> tuple[int, str]:
    from jasper_mmap.cli import main

    status = main([str(a) for a in argv])
    out = capsys.readouterr()
    return status, out.out + out.err


@pytest.mark.parametrize("command", ["info", "verify"])
def test_info_and_verify_name_the_store_of_a_dataset_directory(opened, capsys, command):
    store = opened / ".jasper_mmap_store"
    for given in (opened, opened / "question_embs.pt"):
        status, said = _jasper_mmap(capsys, command, given)
        assert status == 1 and f"jasper-mmap {command} {store}`" in said, said
    status, said = _jasper_mmap(capsys, command, store / "manifest.json")
    assert status == 1 and f"jasper-mmap {command} {store}`" in said, said
    status, said = _jasper_mmap(capsys, command, store)  # and the store itself works
    assert status == 0, said


@pytest.mark.parametrize("command", ["info", "verify"])
def test_info_and_verify_on_a_file_never_advise_converting_into_it(tmp_path, capsys, command):
    f = tmp_path / "notes.txt"
    f.write_text("x")
    status, said = _jasper_mmap(capsys, command, f)
    assert status == 1 and "is not a directory" in said, said
    assert f"convert-pt SRC {f}" not in said, f"convert-pt refuses a file as STORE: {said}"


def test_open_store_on_a_file_never_advises_converting_into_it(tmp_path):
    from jasper_mmap import open_store
    from jasper_mmap.errors import StoreNotFoundError

    f = tmp_path / "f.pt"
    f.write_text("x")
    with pytest.raises(StoreNotFoundError) as info:
        open_store(f)
    assert str(info.value).startswith(f"{f}: ") and f"convert-pt SRC {f}" not in str(info.value)


def test_source_hdf5_without_dataset_h5_names_the_fix(ds, tmp_path):
    pytest.importorskip("h5py")
    proc = subprocess.run(
        [*CLI, str(ds), str(tmp_path / "out"), "--source", "hdf5"], capture_output=True, text=True
    )
    assert proc.returncode == 1 and "HDF5 file not found" in proc.stderr, proc.stderr
    assert "storage_format='pt'" in proc.stderr and "--source pt" in proc.stderr, proc.stderr
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text((ds / "config.json").read_text())
    from jasper_mmap import JASPERSteeringDataset

    with pytest.raises(
        ValueError, match=r"HDF5 file not found: .*\. Point at the dataset directory"
    ):
        JASPERSteeringDataset(tmp_path / "cfg", storage_format="hdf5")


def _parsers(monkeypatch, main) -> list:
    """Every argparse parser ``main`` builds (itself and its subcommands'), without running it."""
    import argparse

    seen = []

    def capture(self, *args, **kwargs):
        seen.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        main()
    parsers, i = list(seen), 0
    while i < len(parsers):
        for action in parsers[i]._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += list(action.choices.values())
        i += 1
    return parsers


def test_every_argument_of_every_command_line_has_help(monkeypatch):
    import importlib.util
    from pathlib import Path

    from jasper_mmap.cli import main as jasper_main
    from jasper_mmap.converters.cli import main as convert_main

    scripts = []
    for name in ("make_synthetic", "main_job"):
        path = Path(__file__).parents[2] / "scripts" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        scripts.append(module.main)
    missing = []
    for main in (jasper_main, convert_main, *scripts):
        for parser in _parsers(monkeypatch, main):
            for action in parser._actions:
                if not action.help and action.dest != "command":
                    missing.append(
                        f"{parser.prog}: {'/'.join(action.option_strings) or action.dest}"
                    )
    assert not missing, f"arguments without --help text: {missing}"
