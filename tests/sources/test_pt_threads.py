"""`.pt` inputs: no child processes (a thread, not spawn); the keyword thread stops on cancel."""

from __future__ import annotations

import multiprocessing
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from pt_cases import expect_refused, save_kw

from jasper_mmap import open_store
from jasper_mmap.converters import convert_pt
from jasper_mmap.converters import keywords as keywords_mod
from jasper_mmap.converters.keywords import KeywordJob
from jasper_mmap.errors import ArtifactError
from jasper_mmap.synthetic import SyntheticSpec, make_pt_dataset

# -- no child processes: thread, not spawn ---------------------------------------------------


def run_script(tmp_path: Path, body: str, timeout: float = 180) -> str:
    """Run ``body`` as a user script in its own session; a hang fails the test (killed)."""
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(body))
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        pytest.fail(f"the script hung for {timeout} s (a spawned child waiting on its parent?)")
    assert proc.returncode == 0, out
    return out


def test_unguarded_script_converts_at_top_level(tmp_path, pt_dataset):
    out = run_script(
        tmp_path,
        f"""
        from jasper_mmap.converters import convert_pt
        convert_pt({str(pt_dataset)!r}, {str(tmp_path / "store")!r}, progress=False)
        print("converted")
        """,
    )
    assert "converted" in out
    with open_store(tmp_path / "store") as store:
        assert store.counts["n_pairs"] == SyntheticSpec().resolved().n_pairs


def test_unguarded_script_opens_pt_directory(tmp_path, pt_dataset):
    out = run_script(
        tmp_path,
        f"""
        import jasper_mmap
        ds = jasper_mmap.JASPERSteeringDataset({str(pt_dataset)!r}, "train",
                                               cache_dir={str(tmp_path / "cache")!r})
        print("samples", len(ds), sorted(ds[0])[0])
        """,
    )
    assert re.search(r"samples [1-9]\d* \w+", out), out


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_conversion_inside_pool_worker(tmp_path, pt_dataset, method):
    out = run_script(
        tmp_path,
        f"""
        import multiprocessing
        from jasper_mmap.converters import convert_pt

        def work(dst):
            return str(convert_pt({str(pt_dataset)!r}, dst, progress=False))

        if __name__ == "__main__":
            with multiprocessing.get_context({method!r}).Pool(1) as pool:
                print("stores", pool.map(work, [{str(tmp_path / "a")!r}, {str(tmp_path / "b")!r}]))
        """,
    )
    assert "stores" in out
    for name in ("a", "b"):
        with open_store(tmp_path / name) as store:
            assert store.has("pair_keyword_values")


def test_conversion_inside_dataloader_worker(tmp_path, pt_dataset):
    out = run_script(
        tmp_path,
        f"""
        import torch
        from jasper_mmap.converters import convert_pt

        class Converting(torch.utils.data.Dataset):
            def __len__(self):
                return 2

            def __getitem__(self, i):
                convert_pt({str(pt_dataset)!r}, {str(tmp_path)!r} + f"/store{{i}}", progress=False)
                return i

        if __name__ == "__main__":
            loader = torch.utils.data.DataLoader(Converting(), num_workers=1, batch_size=None)
            print("items", list(loader))
        """,
    )
    assert "items [0, 1]" in out
    for i in range(2):
        with open_store(tmp_path / f"store{i}") as store:
            assert store.counts["n_pairs"] == SyntheticSpec().resolved().n_pairs


def test_conversion_starts_no_process(tmp_path, pt_dataset, monkeypatch):
    def refuse(self):
        raise AssertionError(f"convert_pt started a process ({self.name})")

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)
    convert_pt(pt_dataset, tmp_path / "store", progress=False)
    assert multiprocessing.active_children() == []


def _big_keyword_file(tmp_path: Path) -> Path:
    """Two million memo references: seconds of decoding, a few MB of pickle."""
    return save_kw(tmp_path / "kw.pt", [[1, 2, 3]] * 2_000_000, ("pickle", 4))


def test_cancel_stops_the_keyword_thread_promptly(tmp_path):
    job = KeywordJob(str(_big_keyword_file(tmp_path)), str(tmp_path), 2_000_000, 10)
    time.sleep(0.2)
    assert job._thread.is_alive(), "decoding should still run (the input takes seconds)"
    t0 = time.perf_counter()
    job.cancel()
    assert time.perf_counter() - t0 < 1.0
    assert not job._thread.is_alive()
    assert not [t for t in threading.enumerate() if t.name == "convert-pt-keywords"]
    with pytest.raises(RuntimeError, match="cancelled"):
        job.result()


def test_keyword_thread_error_keeps_its_type_and_message(tmp_path, pt_dataset):
    path = save_kw(tmp_path / "kw.pt", [[1, "x"]], ("torch", 2))
    job = KeywordJob(str(path), str(tmp_path), 1, 10)
    expect_refused(path, job.result, "list of lists of int.*a string.*BINUNICODE")
    job.cancel()
    assert not job._thread.is_alive()


def test_keyword_check_raises_a_finished_failure_without_waiting(tmp_path):
    bad = save_kw(tmp_path / "bad.pt", {"not": "a list"}, ("torch", 2))
    job = KeywordJob(str(bad), str(tmp_path), 1, 10)
    job._thread.join()
    expect_refused(bad, job.check, "its pickle holds a dict")
    job.cancel()
    running = KeywordJob(str(_big_keyword_file(tmp_path)), str(tmp_path), 2_000_000, 10)
    t0 = time.perf_counter()
    running.check()  # still decoding: returns at once
    assert time.perf_counter() - t0 < 0.1 and running._thread.is_alive()
    running.cancel()


def test_keyword_thread_unexpected_error_surfaces_unchanged(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyError("decoder bug 1234")

    monkeypatch.setattr(keywords_mod, "decode_keyword_rows", boom)
    path = save_kw(tmp_path / "kw.pt", [[1]], ("torch", 2))
    job = KeywordJob(str(path), str(tmp_path), 1, 10)
    with pytest.raises(KeyError, match="decoder bug 1234"):
        job.result()
    job.cancel()


_THREAD_START = threading.Thread.start


def test_failed_conversion_cancels_the_thread(tmp_path, pt_dataset, monkeypatch):
    """A tensor error while keywords decode: the error surfaces, no thread is left."""
    src = tmp_path / "src"
    make_pt_dataset(src, SyntheticSpec())
    save_kw(src / "pair_keyword_ids.pt", [[1, 2, 3]] * 2_000_000, ("pickle", 4))
    emb = torch.load(src / "source_embs.pt", weights_only=True)
    emb[3, 0] = float("nan")
    torch.save(emb, src / "source_embs.pt")
    started = []
    monkeypatch.setattr(
        keywords_mod.threading.Thread,
        "start",
        lambda self: (started.append(1), _THREAD_START(self)),
    )
    with pytest.raises(ArtifactError, match=r"source_embs.*NaN"):
        convert_pt(src, tmp_path / "store", progress=False)
    assert started, "the keyword thread should have been running"
    assert not [t for t in threading.enumerate() if t.name == "convert-pt-keywords"]
    assert not (tmp_path / "store").exists()
