"""create_loader(num_workers=N) as gather threads (NOTE [thread loading]): the same batches in
every mode, semantics of set_epoch/force_steering/reload mid-epoch, errors with their own
traceback, and nothing left behind after a break, an interrupt, garbage collection or exit."""

from __future__ import annotations

import gc
import itertools
import math
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from jasper_mmap import create_loader, publish_negatives, set_epoch
from jasper_mmap.loading.loader import JasperLoader
from jasper_mmap.stores import mapped

KEYS = ("question_emb", "negative_embs", "steering", "steering_variant", "negative_tiers")


def batches(loader) -> list[dict[str, torch.Tensor]]:
    return [{k: b[k].clone() for k in KEYS} for b in loader]


def loader_of(store, mode: str, workers: int, **kw) -> JasperLoader:
    gen = torch.Generator().manual_seed(5)  # the same shuffled order for every loader
    return create_loader(
        store, "train", 8, num_workers=workers, worker_mode=mode, generator=gen, **kw
    )


def gather_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("jasper-gather")]


def wait_until(cond, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


@pytest.fixture(scope="module")
def st_store(tmp_path_factory, pt_dataset):
    """A safetensors store, for the tests of thread lifetime (not backend-specific)."""
    from jasper_mmap.converters import convert_pt

    return convert_pt(pt_dataset, tmp_path_factory.mktemp("st") / "s", progress=False)


@pytest.fixture(scope="module")
def reference(store_path):
    return batches(loader_of(store_path, "thread", 0))


@pytest.mark.parametrize(
    "mode,workers,extra",
    [
        ("thread", 1, {}),
        ("thread", 2, {}),
        ("thread", 4, {"prefetch_factor": 1}),
        ("thread", 3, {"prefetch_factor": 5}),
        ("process", 2, {}),
        ("process", 2, {"persistent_workers": True}),
    ],
    ids=["t1", "t2", "t4-pf1", "t3-pf5", "p2", "p2-persistent"],
)
def test_batches_are_bit_identical_in_every_mode(store_path, reference, mode, workers, extra):
    loader = loader_of(store_path, mode, workers, **extra)
    assert isinstance(loader, DataLoader) and loader.num_workers == workers
    assert len(loader) == len(reference)
    got = batches(loader)
    assert len(got) == len(reference)
    for a, b in zip(got, reference, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in KEYS)


def test_the_epoch_order_is_the_samplers_as_a_plain_dataloader_draws_it(store_path, reference):
    from jasper_mmap import JASPERSteeringDataset

    ds = JASPERSteeringDataset(store_path, "train")
    gen = torch.Generator().manual_seed(5)
    plain = DataLoader(ds, 8, shuffle=True, drop_last=True, generator=gen)  # default collate
    for a, b in zip(batches(plain), reference, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in KEYS)


def test_loader_attributes_are_the_dataloaders(st_store):
    loader = create_loader(st_store, "train", 16, num_workers=4, pin_memory=True)
    assert isinstance(loader, DataLoader) and loader.dataset is loader.dataset_obj
    assert (loader.batch_size, loader.num_workers, loader.pin_memory) == (16, 4, True)
    assert loader.drop_last is True and loader.sampler_obj is None
    assert len(loader) == len(loader.dataset_obj) // 16
    assert loader.in_flight == 2 * loader.gather_threads  # prefetch_factor x threads: the bound
    with pytest.raises(ValueError, match="worker_mode should be one of"):
        create_loader(st_store, "train", 16, worker_mode="fibers")


def test_set_epoch_and_force_steering_between_epochs_reach_the_threads(st_store):
    loader = create_loader(st_store, "train", 8, num_workers=2, shuffle=False)
    ref = create_loader(st_store, "train", 8, num_workers=0, shuffle=False)
    for epoch in (0, 7):
        set_epoch(loader, epoch)
        set_epoch(ref, epoch)
        a = torch.cat([b["steering_variant"] for b in loader])
        assert torch.equal(a, torch.cat([b["steering_variant"] for b in ref]))
    loader.dataset_obj.force_steering("residual")
    assert all((b["steering_variant"] == 3).all() for b in loader)


def reload_mid_epoch(tmp_path, pt_dataset, workers: int, at: int, tuner) -> tuple[list, int]:
    """Serve an epoch, publish and reload after batch ``at``; each batch's negatives
    generation (every batch checked against the table it claims) and the loader's depth."""
    from dataset.test_negatives import check_batch, table

    from jasper_mmap import open_store
    from jasper_mmap.converters import convert_pt

    store = convert_pt(pt_dataset, tmp_path / "s", progress=False)
    s = open_store(store)
    sources, split = s.read("source_embs"), s.read("train_idx")
    publish_negatives(store, *table(1, 120, 6, 120))
    loader = create_loader(
        store, "train", 4, num_workers=workers, shuffle=False, drop_last=False,
        report_generation=True,
    )  # fmt: skip
    if tuner != "default":
        loader.gather_tuner = tuner
    loader.dataset_obj.reload_negatives()
    gens = []
    for k, batch in enumerate(loader):
        gens.append(check_batch(batch, sources, split[4 * k : 4 * k + 4], 6))
        if k == at:
            publish_negatives(store, *table(2, 120, 6, 120))
            loader.dataset_obj.reload_negatives()
    assert gens == sorted(gens)
    return gens, loader.in_flight


def test_reload_mid_epoch_never_mixes_generations_within_a_batch(tmp_path, pt_dataset):
    gens, in_flight = reload_mid_epoch(tmp_path, pt_dataset, 3, 2, "default")
    assert gens[: 3 + in_flight].count(1) >= 3 and set(gens[3 + in_flight :]) == {2}, gens


class Boom(RuntimeError):
    pass


def test_an_error_while_gathering_surfaces_with_its_own_traceback(st_store, monkeypatch):
    loader = create_loader(st_store, "train", 8, num_workers=2, shuffle=False)
    ds = loader.dataset_obj
    real = ds.get_batch

    def broken(indices, pin_memory=False):
        if 40 in list(indices):
            raise Boom("row 40 is cursed")
        return real(indices, pin_memory)

    monkeypatch.setattr(ds, "get_batch", broken)
    seen = 0
    with pytest.raises(Boom, match="row 40 is cursed") as info:
        for _ in loader:
            seen += 1
    assert seen == 5  # batches 0..4 came out in order, batch 5 (rows 40..47) raised
    frames = "".join(traceback.format_tb(info.value.__traceback__))
    assert "in broken" in frames, "the gather's own frames must be in the traceback"
    assert wait_until(lambda: not gather_threads()), gather_threads()


def test_breaking_out_and_garbage_collection_leave_no_threads(st_store):
    before = set(threading.enumerate())
    loader = create_loader(st_store, "train", 4, num_workers=4)
    for k, _ in enumerate(loader):
        if k == 2:
            assert loader.gather_threads == min(4, len(os.sched_getaffinity(0)))
            assert len(gather_threads()) == loader.gather_threads
            break
    gc.collect()
    assert wait_until(lambda: not gather_threads()), gather_threads()
    it = iter(loader)
    next(it)
    del it
    gc.collect()
    assert wait_until(lambda: not gather_threads())
    assert set(threading.enumerate()) <= before | {threading.current_thread()}


def test_an_epoch_run_to_the_end_joins_its_threads(st_store):
    loader = create_loader(st_store, "val", 4, num_workers=3)
    it = iter(loader)
    assert sum(1 for _ in it) == len(loader)
    assert not gather_threads()


_SCRIPT = """
import os, signal, sys, threading, time
import torch
from jasper_mmap import create_loader
loader = create_loader(sys.argv[1], "train", 4, num_workers=4, pin_memory=True)
mode = sys.argv[2]
it = iter(loader)
next(it)
del it  # dropped mid-epoch: its threads are joined
if mode == "interrupt":
    # a job started in the background of a non-interactive shell inherits SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            for batch in loader:
                time.sleep(0.01)
        print("no KeyboardInterrupt within 30 s", flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
elif mode == "exit-mid-epoch":
    alive = iter(loader)
    next(alive)
    print("exiting with an iterator alive", flush=True)
    sys.exit(0)
elif mode == "unguarded-script":
    print(sum(int(b["cluster_id"].sum()) for b in loader) >= 0, flush=True)
print("threads left:", sorted(t.name for t in threading.enumerate()
                             if t.name.startswith("jasper-gather") and t.is_alive()), flush=True)
"""


def _children() -> set[int]:
    me = os.getpid()
    out = set()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == me:
                out.add(int(p.name))
    return out


def _shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


@pytest.mark.parametrize("mode", ["interrupt", "exit-mid-epoch", "unguarded-script"])
def test_interrupt_and_interpreter_exit_leave_nothing_and_never_hang(st_store, tmp_path, mode):
    script = tmp_path / "train.py"
    script.write_text(_SCRIPT)
    shm_before, children_before = _shm(), _children()
    proc = subprocess.run(
        [sys.executable, str(script), str(st_store), mode],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "terminate called" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    if mode != "exit-mid-epoch":
        assert "threads left: []" in proc.stdout, proc.stdout
    if mode == "interrupt":
        assert "interrupted" in proc.stdout
    assert _shm() <= shm_before, "a shared-memory segment was left behind"
    assert _children() <= children_before, "a child process was left behind"


def test_a_sigint_while_waiting_for_a_batch_reaches_the_loop(st_store, tmp_path, monkeypatch):
    """KeyboardInterrupt raised in the main thread while next() waits: threads are joined."""
    loader = create_loader(st_store, "train", 4, num_workers=2, shuffle=False)
    ds = loader.dataset_obj
    real = ds.get_batch

    def slow(indices, pin_memory=False):
        time.sleep(0.2)
        return real(indices, pin_memory)

    monkeypatch.setattr(ds, "get_batch", slow)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # even if inherited ignored
    timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            for _ in loader:
                pass
    finally:
        timer.join()
        signal.signal(signal.SIGINT, previous)
    assert wait_until(lambda: not gather_threads(), 5), gather_threads()


def test_memory_is_bounded_by_the_batches_in_flight(st_store, monkeypatch):
    """The threads never run further ahead than prefetch_factor x threads batches."""
    loader = create_loader(st_store, "train", 4, num_workers=2, shuffle=False, prefetch_factor=2)
    ds = loader.dataset_obj
    real, started = ds.get_batch, []

    def counted(indices, pin_memory=False):
        started.append(int(indices[0]))
        return real(indices, pin_memory)

    monkeypatch.setattr(ds, "get_batch", counted)
    it = iter(loader)
    for k in range(5):
        next(it)
        time.sleep(0.05)  # time for the threads to run ahead as far as they may
        assert len(started) <= k + 1 + loader.in_flight, (k, len(started))
    it.close()
    assert np.all(np.diff(sorted(started)) > 0)


@pytest.mark.parametrize("cpus,want", [(1, 1), (3, 3), (16, 4)])
def test_gather_threads_are_at_most_the_cpus_and_batches_do_not_change(
    st_store, monkeypatch, cpus, want
):
    expected = batches(loader_of(st_store, "thread", 0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    loader = loader_of(st_store, "thread", 4, prefetch_factor=3)
    assert loader.gather_threads == want and loader.in_flight == 3 * want  # factor x threads
    seen = set()
    got = []
    for b in loader:
        seen.add(len(gather_threads()))
        got.append({k: b[k].clone() for k in KEYS})
    assert max(seen) <= want
    assert all(torch.equal(g[k], e[k]) for g, e in zip(got, expected, strict=True) for k in KEYS)
    assert loader.dataset_obj._pool.capacity >= loader.in_flight + 2  # buffers for the depth


# -- NOTE [gathering in the loop]: the tuner and the way each batch is gathered ----------------
from jasper_mmap.loading.tuner import GatherTuner  # noqa: E402


def always_switching() -> GatherTuner:
    """A tuner that changes the way as often as it can: windows of one timed batch, a probe
    after every window of the chosen way (so two of every three windows switch)."""
    return GatherTuner(window_batches=1, window_seconds=0.0, probe_every=1)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def drive(tuner: GatherTuner, clock: FakeClock, seconds: dict[str, float], n: int) -> list[str]:
    """Hand out ``n`` batches, each taking ``seconds[way]``; the way of each batch."""
    ways = []
    for _ in range(n):
        ways.append(tuner.mode)
        clock.now += seconds[tuner.mode]
        tuner.handed_out(depth=2)
    return ways


@pytest.mark.parametrize("faster", ["inline", "ahead"])
def test_the_tuner_keeps_the_faster_way_and_tries_the_other_again(faster):
    clock = FakeClock()
    tuner = GatherTuner(window_batches=10, window_seconds=0.0, probe_every=5, clock=clock)
    slower = "ahead" if faster == "inline" else "inline"
    ways = drive(tuner, clock, {faster: 1.0, slower: 1.2}, 2000)
    assert ways[0] == "ahead"  # starts ahead: threads win where the consumer leaves CPU idle
    assert tuner.rates[faster == "inline"] == pytest.approx(1.0)
    assert tuner.rates[faster != "inline"] == pytest.approx(1 / 1.2)
    late = ways[500:]
    assert late.count(faster) > 0.7 * len(late), "the faster way should be used most"
    assert late.count(slower) > 0, "the other way should be tried again now and then"


def test_the_tuner_follows_a_loop_that_changes():
    clock = FakeClock()
    tuner = GatherTuner(window_batches=10, window_seconds=0.0, probe_every=5, clock=clock)
    ways = drive(tuner, clock, {"inline": 1.0, "ahead": 2.0}, 1000)
    assert ways[-100:].count("inline") > 70
    ways = drive(tuner, clock, {"inline": 2.0, "ahead": 1.0}, 1000)  # the loop changed
    assert ways[-100:].count("ahead") > 70


def test_equal_ways_do_not_flap():
    """Within the margin the way chosen never changes; the other way is tried one window at a
    time, at growing intervals: no switch on noise."""
    clock = FakeClock()
    tuner = GatherTuner(window_batches=10, window_seconds=0.0, probe_every=1000, clock=clock)
    ways = drive(tuner, clock, {"inline": 1.0, "ahead": 1.01}, 2000)  # within the 3% margin
    windows = 2000 // (10 + 2)  # a window: 10 timed batches after the 2 of a switch (depth)
    assert tuner.changes == 0 and tuner.choice == "ahead"
    assert 2 <= tuner.probes <= 1 + math.log2(windows)
    assert tuner.switches in (2 * tuner.probes - 1, 2 * tuner.probes)  # there and back
    runs = [(way, len(list(g))) for way, g in itertools.groupby(ways)]
    # a probe is one window: the 2 batches of its switch, the batch that starts its clock, 10
    assert all(n == 2 + 1 + 10 for way, n in runs if way == "inline")
    stays = [n for way, n in runs if way == "ahead"]
    assert stays == sorted(stays[:-1]) + stays[-1:], "each stay at least as long as the one before"
    # after each probe, the window after it and then 4, 16, 64 windows before the next
    window = 2 + 1 + 10
    assert stays[1:4] == [window * (1 + 4), window * (1 + 16), window * (1 + 64)], stays


@pytest.mark.parametrize("faster", ["inline", "ahead"])
def test_a_loop_that_drifts_does_not_change_the_way(faster):
    """The loop slows down and speeds up by a third, over a few windows, for reasons of its own
    (other load on a shared machine), while one way stays 10% faster at every moment. A probe
    is judged against the windows on either side of it, so the drift never changes the way
    chosen after the first probe, and the slower way is used only for probes (measured: a
    tuner that compared a window with the other way's last window, minutes old, gathered ahead
    ~18% of a CPU training run on 2 cores, where ahead is ~10% slower)."""
    clock = FakeClock()
    tuner = GatherTuner(window_batches=10, window_seconds=0.0, probe_every=8, clock=clock)
    slower = "ahead" if faster == "inline" else "inline"
    ways = []
    for i in range(6000):
        ways.append(tuner.mode)
        drift = 1 + math.sin(i / 60) / 3  # a period of ~30 windows
        clock.now += drift * {faster: 1.0, slower: 1.1}[tuner.mode]
        tuner.handed_out(depth=2)
    late = ways[600:]
    assert tuner.choice == faster and tuner.changes <= 1
    runs = [len(list(g)) for way, g in itertools.groupby(late) if way == slower]
    assert runs and max(runs) <= 2 + 1 + 10, "the slower way only for one-window probes"
    window = 2 + 1 + 10
    assert len(runs) <= len(late) / (window * (8 + 1)) + 1, "a probe every 8 windows at most"


def test_a_cold_first_window_is_soon_measured_again():
    """The first window of a fresh loader pays its page faults: a way that lost only there
    is tried again after a few windows, not after ``probe_every``."""
    clock = FakeClock()
    tuner = GatherTuner(window_batches=10, window_seconds=0.0, probe_every=16, clock=clock)
    ways = []
    for i in range(600):
        ways.append(tuner.mode)
        cold = i < 12  # the first ahead window (and its start-up batch) is slow
        clock.now += {"ahead": 3.0 if cold else 1.0, "inline": 1.1}[tuner.mode]
        tuner.handed_out(depth=2)
    runs = [(way, len(list(g))) for way, g in itertools.groupby(ways)]
    # the cold window, the probe of inline, the window after it: the cold window lost
    assert [way for way, _ in runs[:4]] == ["ahead", "inline", "ahead", "inline"], runs
    window = 2 + 1 + 10  # a switch's 2 batches, the one that starts the clock, 10 timed
    assert runs[3][1] <= 4 * window, "ahead should be tried again after a few windows"
    assert ways[100:].count("ahead") > 0.8 * len(ways[100:])


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_batches_are_bit_identical_while_the_way_keeps_changing(store_path, reference, workers):
    loader = loader_of(store_path, "thread", workers)
    loader.gather_tuner = always_switching()
    ways = []
    got = []
    it = iter(loader)
    for b in it:
        ways.append(it.mode)
        got.append({k: b[k].clone() for k in KEYS})
    # a switch skips the depth's batches (the drain or fill) before the next window
    assert loader.gather_tuner.switches >= 2 and {"ahead", "inline"} <= set(ways), ways
    assert len(got) == len(reference)
    for a, b in zip(got, reference, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in KEYS)


def test_set_epoch_reaches_batches_gathered_in_the_loop(st_store):
    loader = create_loader(st_store, "train", 8, num_workers=2, shuffle=False)
    ref = create_loader(st_store, "train", 8, num_workers=0, shuffle=False)
    loader.gather_tuner.inline = True  # every batch of the epoch gathered in the loop
    for epoch in (0, 7):
        set_epoch(loader, epoch)
        set_epoch(ref, epoch)
        a = torch.cat([b["steering_variant"] for b in loader])
        assert torch.equal(a, torch.cat([b["steering_variant"] for b in ref]))
        assert loader.gather_tuner.mode == "inline"
    assert not gather_threads()  # no thread was started: nothing was gathered ahead


def test_reload_mid_epoch_while_the_way_changes_never_mixes_generations(tmp_path, pt_dataset):
    gens, in_flight = reload_mid_epoch(tmp_path, pt_dataset, 2, 5, always_switching())
    assert gens[:6] == [1] * 6 and set(gens[6 + in_flight :]) == {2}, gens


def test_an_error_while_gathering_in_the_loop_surfaces_and_leaves_no_threads(st_store, monkeypatch):
    loader = create_loader(st_store, "train", 8, num_workers=2, shuffle=False, prefetch_factor=1)
    loader.gather_tuner = always_switching()
    ds = loader.dataset_obj
    real = ds.get_batch
    where = []
    last = len(loader) - 1

    def broken(indices, pin_memory=False):
        where.append(threading.current_thread() is threading.main_thread())
        if 8 * last in list(indices):
            raise Boom("the last batch is cursed")
        return real(indices, pin_memory)

    monkeypatch.setattr(ds, "get_batch", broken)
    it = iter(loader)
    seen = 0
    with pytest.raises(Boom, match="the last batch is cursed") as info:
        for _ in it:
            seen += 1
    assert seen == last
    assert True in where and False in where, where  # batches were gathered both ways
    assert "in broken" in "".join(traceback.format_tb(info.value.__traceback__))
    assert wait_until(lambda: not gather_threads()), gather_threads()
    with pytest.raises(StopIteration):
        next(it)  # a failed iterator stays ended; it does not gather on in the loop


def test_breaking_out_of_a_loop_that_gathers_in_the_loop_leaves_no_threads(st_store):
    loader = create_loader(st_store, "train", 4, num_workers=4)
    loader.gather_tuner = always_switching()
    for k, _ in enumerate(loader):
        if k == 6:
            break
    gc.collect()
    assert wait_until(lambda: not gather_threads()), gather_threads()


def test_the_loop_gathers_on_torchs_threads_and_gather_threads_with_numpy(st_store, monkeypatch):
    """NOTE [intra-op gathers]: index_select in the loop's own thread, numpy.take in gather
    threads; the same bytes either way."""
    calls = []
    real = torch.index_select

    def spy(*args, **kwargs):
        calls.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "index_select", spy)
    # the fixture's rows are small: every 2-D gather reaches a threshold of 1 byte
    monkeypatch.setattr(mapped, "_INTRA_OP_BYTES", 1)
    inline = create_loader(st_store, "train", 8, num_workers=0, shuffle=False, drop_last=False)
    ahead = create_loader(st_store, "train", 8, num_workers=2, shuffle=False, drop_last=False)
    ahead.gather_tuner = None  # always ahead
    a = batches(inline)
    assert calls and set(calls) == {threading.main_thread().name}
    calls.clear()
    b = batches(ahead)
    # the gather threads keep numpy; the main thread's calls are the plans' small arrays
    assert not [name for name in calls if name.startswith("jasper-gather")], calls
    assert len(a) == len(b) and all(
        torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in KEYS
    )


def test_gathers_below_the_intra_op_bytes_stay_with_numpy(st_store, monkeypatch):
    """NOTE [intra-op gathers]: the threshold counts bytes, so narrow rows (the batch's
    negative tiers, say) keep numpy even where there are many of them."""
    from jasper_mmap.stores import open_store

    calls = []
    real = torch.index_select
    monkeypatch.setattr(torch, "index_select", lambda *a, **k: calls.append(1) or real(*a, **k))
    # a fresh rule on several intra-op threads: its first large gather is index_select
    monkeypatch.setattr(mapped, "_CHOOSER", mapped._GatherChooser())
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    store = open_store(st_store)
    rows = np.arange(store.shape("source_embs")[0], dtype=np.int64)
    row_bytes = store.raw("source_embs").strides[0]
    out = np.empty((rows.size, store.shape("source_embs")[1]), np.float32)
    monkeypatch.setattr(mapped, "_INTRA_OP_BYTES", rows.size * row_bytes + 1)
    np.testing.assert_array_equal(
        store.gather_unchecked("source_embs", rows, out), store.read("source_embs")
    )
    assert calls == []
    monkeypatch.setattr(mapped, "_INTRA_OP_BYTES", rows.size * row_bytes)
    out[:] = 0
    np.testing.assert_array_equal(
        store.gather_unchecked("source_embs", rows, out), store.read("source_embs")
    )
    assert calls == [1]


def test_a_store_larger_than_half_of_ram_always_gathers_ahead(st_store, monkeypatch):
    """NOTE [gathering in the loop]: no tuning where batches wait on the disk."""
    monkeypatch.setenv("JASPER_MMAP_MADVISE", "random")
    loader = create_loader(st_store, "train", 4, num_workers=2, shuffle=False)
    assert loader.dataset_obj.store.reads_ahead
    loader.gather_tuner = always_switching()
    modes = set()
    it = iter(loader)
    for _ in it:
        modes.add(it.mode)
    assert modes == {"ahead"} and loader.gather_tuner.switches == 0


def test_a_probe_cut_short_by_the_epochs_end_is_dropped():
    """A new epoch's iterator drops a probe still open: the chosen way again, no decision,
    and the next probe after the interval; so a probe is never judged across epochs."""
    clock = FakeClock()
    tuner = GatherTuner(window_batches=10, window_seconds=0.0, probe_every=4, clock=clock)
    drive(tuner, clock, {"inline": 1.0, "ahead": 2.0}, 300)
    assert tuner.choice == "inline"
    while tuner.mode == "inline":  # run until the next probe of ahead starts
        drive(tuner, clock, {"inline": 1.0, "ahead": 2.0}, 1)
    probes, changes = tuner.probes, tuner.changes
    drive(tuner, clock, {"inline": 1.0, "ahead": 0.1}, 5)  # a fast start, cut short
    tuner.start_epoch()
    assert tuner.mode == "inline" and tuner.choice == "inline"
    ways = drive(tuner, clock, {"inline": 1.0, "ahead": 2.0}, 200)
    assert tuner.changes == changes and tuner.choice == "inline"
    assert ways[: 1 + 4 * 11].count("ahead") == 0  # the interval runs again before a probe
    assert tuner.probes > probes
