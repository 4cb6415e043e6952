"""The in-loop gather's rule (NOTE [intra-op gathers]): index_select on the intra-op
threads while it is the cheaper per byte, numpy.take when the cores are busy and torch's
threads collapse; the bytes are the same either way."""

from __future__ import annotations

import numpy as np
import torch

import jasper_mmap.stores.mapped as sst
from jasper_mmap import open_store
from jasper_mmap.converters import convert_pt


def _feed(chooser, cost: dict[str, float], calls: int, threads: int = 4) -> list[str]:
    taken = []
    for _ in range(calls):
        path = chooser.choose(threads)
        taken.append(path)
        if threads > 1:
            chooser.record(path, cost[path] * 1e6, 10**6)
    return taken


def test_torch_stays_while_it_is_the_cheaper_and_numpy_is_probed_rarely():
    c = sst._GatherChooser()
    taken = _feed(c, {"torch": 1.0, "numpy": 2.0}, 1000)
    assert taken.count("numpy") <= 10  # probes, their interval doubling to PROBE_MAX
    assert taken[-200:].count("numpy") <= 1


def test_a_collapsed_torch_falls_back_to_numpy_and_comes_back_when_the_cores_free():
    c = sst._GatherChooser()
    _feed(c, {"torch": 1.0, "numpy": 2.0}, 300)
    busy = _feed(c, {"torch": 10.0, "numpy": 3.0}, 1000)  # a busy loop per core
    assert busy[:4].count("numpy") >= 1 and c.current == "numpy"
    assert busy.count("torch") <= 12  # probes only
    idle = _feed(c, {"torch": 1.0, "numpy": 2.0}, 300)
    assert c.current == "torch" and idle[-100:].count("numpy") <= 1


def test_one_intra_op_thread_takes_numpy_untimed():
    c = sst._GatherChooser()
    assert set(_feed(c, {"torch": 1.0, "numpy": 2.0}, 50, threads=1)) == {"numpy"}
    assert c.cost == {"torch": None, "numpy": None}


def test_a_slow_index_select_makes_the_store_gather_with_numpy(tmp_path, pt_dataset, monkeypatch):
    """index_select made slow (a fake clock charges it 50 ms): the store's in-loop gathers
    move to numpy.take after a few, and return the same rows throughout."""
    store = convert_pt(pt_dataset, tmp_path / "store", progress=False)
    s = open_store(store)
    monkeypatch.setattr(sst, "_CHOOSER", sst._GatherChooser())
    monkeypatch.setattr(sst, "_INTRA_OP_BYTES", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    now = [0.0]
    monkeypatch.setattr(sst, "_clock", lambda: now[0])
    real_select, real_take = torch.index_select, np.take
    calls = {"torch": 0, "numpy": 0}

    def slow_select(*a, **k):
        calls["torch"] += 1
        now[0] += 0.05
        return real_select(*a, **k)

    def take(*a, **k):
        calls["numpy"] += 1
        now[0] += 0.001
        return real_take(*a, **k)

    monkeypatch.setattr(torch, "index_select", slow_select)
    monkeypatch.setattr(sst.np, "take", take)
    src = s.raw("source_embs")
    rng = np.random.default_rng(0)
    for _ in range(100):
        idx = rng.integers(0, src.shape[0], 64)
        out = np.empty((64, src.shape[1]), src.dtype)
        s._gather_raw("source_embs", idx, out)
        assert np.array_equal(out, real_take(src, idx, axis=0))
    assert calls["torch"] <= 8, calls  # without the rule: all 100
    assert calls["numpy"] >= 92, calls
