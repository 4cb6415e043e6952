"""Every file we open is a regular file, read without blocking, and our JSON files are of
bounded nesting (issue 24, items 2 and 12): a FIFO, socket or device in place of one of our
files, or a deeply nested JSON file, is refused with our error naming the file and the fix;
never a hang (tested in a subprocess with a timeout), never a raw RecursionError.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jasper_mmap import JASPERSteeringDataset, open_store
from jasper_mmap._fs.files import MAX_JSON_DEPTH, json_depth, open_regular, read_json
from jasper_mmap.cli import main as cli_main
from jasper_mmap.converters import convert_pt
from jasper_mmap.errors import ConfigError, JasperError, StoreCorruptError, StoreFormatError
from jasper_mmap.format.config import read_config
from jasper_mmap.stores.verify import verify_store

ROOT = Path(__file__).resolve().parents[2]
GEN = "negatives/gen-000000.json"
#: the files of a store opening and verify read as JSON
JSON_FILES = ("manifest.json", "config.json", "negatives/CURRENT.json", GEN)

# opens the store three ways (open_store, the dataset, `jasper-mmap info`) and verifies it;
# prints one line per way: OK, or the error's class names and message
_PROBE = textwrap.dedent(
    """
    import contextlib, io, sys
    from jasper_mmap import JASPERSteeringDataset, open_store
    from jasper_mmap.cli import main
    from jasper_mmap.errors import JasperError
    from jasper_mmap.stores.verify import verify_store
    store = sys.argv[1]
    ways = {
        "open": lambda: open_store(store),
        "dataset": lambda: JASPERSteeringDataset(store, check_sources=False),
        "info": lambda: main(["info", store]),
    }
    for way, fn in ways.items():
        err = io.StringIO()
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                rc = fn()
            if way == "info" and rc != 0:  # the CLI prints our error and exits 1
                print(way, "JasperError", err.getvalue().strip(), flush=True)
            else:
                print(way, "OK", flush=True)
        except JasperError as e:
            print(way, "JasperError", type(e).__name__, str(e), flush=True)
    report = verify_store(store, progress=False)
    print("verify", "problems" if report.problems else "OK", " | ".join(report.problems))
    """
)


def _probe(store: Path, timeout: float = 90) -> dict[str, str]:
    """Run _PROBE on ``store`` in a child; a hang becomes a test failure, not a stuck suite."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE, str(store)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"opening or verifying {store} hung for {timeout} s: {e.stdout!r}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)


def _run_or_fail(code: str, timeout: float, hung: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter; a hang past ``timeout`` fails the test."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        return subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired:
        pytest.fail(hung)


@pytest.fixture(scope="module")
def good(tmp_path_factory, pt_dataset):
    root = tmp_path_factory.mktemp("good")
    return {
        b: convert_pt(pt_dataset, root / b, format=b, progress=False)
        for b in ("safetensors", "zarr")
    }


def _replace_with_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _replace_with_socket(path: Path) -> socket.socket:
    path.unlink()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)
    return s


@pytest.mark.parametrize("rel", JSON_FILES)
def test_a_fifo_in_place_of_our_json_files_is_refused_not_waited_on(good, tmp_path, rel):
    store = shutil.copytree(good["safetensors"], tmp_path / "s")
    _replace_with_fifo(store / rel)
    got = _probe(store)
    for way in ("open", "dataset", "info"):
        assert got[way].startswith("JasperError"), (way, got)
        assert f"{rel}: " in got[way] and "FIFO (named pipe), not a regular file" in got[way]
    assert got["verify"].startswith("problems") and "FIFO" in got["verify"], got


def test_a_socket_or_a_device_in_place_of_our_files_is_refused(good, tmp_path):
    store = shutil.copytree(good["safetensors"], tmp_path / "s")
    sock = _replace_with_socket(store / "manifest.json")
    try:
        got = _probe(store)
    finally:
        sock.close()
    assert "manifest.json: manifest.json is a socket, not a regular file" in got["open"], got
    store2 = shutil.copytree(good["safetensors"], tmp_path / "s2")
    (store2 / "config.json").unlink()
    (store2 / "config.json").symlink_to("/dev/zero")
    got = _probe(store2)
    assert "config.json is a character device, not a regular file" in got["open"], got
    assert got["verify"].startswith("problems"), got


@pytest.mark.parametrize("backend", ["safetensors", "zarr"])
def test_a_fifo_in_place_of_a_data_or_metadata_file_is_refused(good, tmp_path, backend):
    store = shutil.copytree(good[backend], tmp_path / "s")
    rel = "pairs.safetensors" if backend == "safetensors" else "pair_index/zarr.json"
    _replace_with_fifo(store / rel)
    got = _probe(store)
    assert "not a regular file" in got["open"] and rel in got["open"], got
    assert got["verify"].startswith("problems"), got


def test_a_fifo_in_place_of_a_generation_leased_later_is_refused(good, tmp_path):
    """The lease of a generation other than the one open_store checked opens its
    description too (Store._leased): a FIFO there is refused, not waited on."""
    store = shutil.copytree(good["safetensors"], tmp_path / "s")
    code = textwrap.dedent(
        f"""
        import os, shutil
        from pathlib import Path
        from jasper_mmap import open_store
        from jasper_mmap.errors import JasperError
        s = open_store({str(store)!r})
        p = Path({str(store)!r}) / "negatives" / "gen-000000.json"
        p.unlink(); os.mkfifo(p)
        s.close()  # the next lease opens the description again
        try:
            s.generation
            print("OK")
        except JasperError as e:
            print(type(e).__name__, e)
        """
    )
    done = _run_or_fail(code, 60, "leasing a generation whose description is a FIFO hung")
    assert "gen-000000.json" in done.stdout and "FIFO" in done.stdout, done.stdout + done.stderr


def test_open_regular_does_not_block_and_names_what_it_found(tmp_path):
    fifo = tmp_path / "f.json"
    os.mkfifo(fifo)
    with pytest.raises(
        StoreFormatError, match=r"f\.json: thing is a FIFO .*not a regular file\. Do X"
    ):
        open_regular(fifo, what="thing", fix="Do X.")
    with pytest.raises(ConfigError, match="is a directory, not a regular file"):
        open_regular(tmp_path, error=ConfigError)
    (tmp_path / "ok.json").write_text('{"a": 1}')
    with open_regular(tmp_path / "ok.json") as f:
        assert f.read() == b'{"a": 1}'  # blocking mode again: a normal file object


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def _deep_object(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


@pytest.mark.parametrize("backend", ["safetensors", "zarr"])
@pytest.mark.parametrize("rel", JSON_FILES)
def test_deeply_nested_json_in_our_files_is_our_error_not_recursion(good, tmp_path, rel, backend):
    store = shutil.copytree(good[backend], tmp_path / "s")
    (store / rel).write_text(_deep(200_000))
    with pytest.raises(StoreFormatError) as info:
        open_store(store)
    assert f"{rel}: " in str(info.value) and "nested deeper than" in str(info.value)
    with pytest.raises(JasperError):
        JASPERSteeringDataset(store, check_sources=False)
    report = verify_store(store, progress=False)  # reports, never dies
    assert any("nested deeper than" in p for p in report.problems), report.problems
    assert cli_main(["info", str(store)]) == 1


def test_nested_within_the_recursion_limit_but_too_deep_for_us_is_refused(good, tmp_path):
    """Depth 900 parses, but printing or walking it would exhaust the stack later."""
    store = shutil.copytree(good["safetensors"], tmp_path / "s")
    m = json.loads((store / "manifest.json").read_text())
    (store / "manifest.json").write_text(
        json.dumps(m)[:-1] + ', "extra": ' + _deep_object(900) + "}"
    )
    with pytest.raises(StoreFormatError, match=f"nested deeper than {MAX_JSON_DEPTH} levels"):
        open_store(store)


def _rerecord(store: Path, rel: str) -> None:
    """Record ``rel``'s new size in the manifest (so the size check lets it through)."""
    m = json.loads((store / "manifest.json").read_text())
    m["files"][rel] = (store / rel).stat().st_size
    (store / "manifest.json").write_text(json.dumps(m))


def test_deeply_nested_zarr_metadata_and_safetensors_header_are_refused(good, tmp_path):
    store = shutil.copytree(good["zarr"], tmp_path / "z")
    meta = store / "pair_index" / "zarr.json"
    meta.write_text(_deep(200_000))
    _rerecord(store, "pair_index/zarr.json")
    with pytest.raises(StoreCorruptError, match=r"pair_index/zarr\.json: .*nested deeper"):
        open_store(store)
    st = shutil.copytree(good["safetensors"], tmp_path / "st")
    f = st / "pairs.safetensors"
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    head = _deep(100_000).encode()
    f.write_bytes(len(head).to_bytes(8, "little") + head + data[8 + n :])
    _rerecord(st, "pairs.safetensors")
    with pytest.raises(JasperError, match=r"pairs\.safetensors: .*(nested deeper|not valid JSON)"):
        open_store(st)


def test_deeply_nested_config_of_a_dataset_directory_is_a_config_error(pt_dataset, tmp_path):
    src = shutil.copytree(pt_dataset, tmp_path / "ds")
    (src / "config.json").write_text(_deep_object(100_000))
    with pytest.raises(ConfigError, match=r"config\.json: config\.json is not valid JSON"):
        read_config(src)
    with pytest.raises(ConfigError, match="nested deeper than"):
        convert_pt(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_json_depth_is_iterative_and_read_json_accepts_ours(tmp_path):
    nested: list = []
    for _ in range(100_000):
        nested = [nested]
    assert json_depth(nested) > MAX_JSON_DEPTH  # no recursion
    assert json_depth({"a": [1, {"b": 2}]}) == 3 and json_depth(7) == 0
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"a": {"b": {"c": [1, 2]}}}))
    assert read_json(p, what="x", fix="") == {"a": {"b": {"c": [1, 2]}}}


def test_a_huge_json_file_is_refused_without_reading_it(good, tmp_path):
    from jasper_mmap._fs.files import MAX_JSON_BYTES

    store = shutil.copytree(good["safetensors"], tmp_path / "s")
    with open(store / "negatives" / "CURRENT.json", "r+b") as f:
        f.truncate(MAX_JSON_BYTES + 1)  # sparse: no disk used; refused from its size
    with pytest.raises(StoreFormatError, match=rf"CURRENT\.json: .* is {MAX_JSON_BYTES + 1} bytes"):
        open_store(store)


def test_a_fifo_config_in_a_dataset_directory_is_named_as_such(pt_dataset, tmp_path):
    """convert-pt and the dataset say what config.json is (it used to be called missing)."""
    src = shutil.copytree(pt_dataset, tmp_path / "ds")
    _replace_with_fifo(src / "config.json")
    code = textwrap.dedent(
        f"""
        from jasper_mmap import JASPERSteeringDataset
        from jasper_mmap.converters import convert_pt
        from jasper_mmap.errors import JasperError
        for fn in (lambda: convert_pt({str(src)!r}, {str(tmp_path / "out")!r}, progress=False),
                   lambda: JASPERSteeringDataset({str(src)!r})):
            try:
                fn()
                print("OK")
            except JasperError as e:
                print(type(e).__name__, e)
        """
    )
    done = _run_or_fail(code, 90, "converting a dataset directory whose config.json is a FIFO hung")
    lines = done.stdout.splitlines()
    assert len(lines) == 2, done.stdout + done.stderr
    for line in lines:
        assert line.startswith("ConfigError") and "config.json is a FIFO" in line, line
