"""JASPERSteeringDataset and the loader helpers against tiny fixtures."""

from __future__ import annotations

import logging
import pickle
import shutil

import numpy as np
import pytest
import torch
from helpers import keyword_arrays, load_pt  # noqa: F401
from torch.utils.data import DataLoader

from jasper_mmap import (
    BATCH_KEYS,
    JASPERSteeringDataset,
    create_loader,
    set_epoch,
    validate_first_batch,
)
from jasper_mmap.errors import (
    ArtifactError,
    ArtifactMissingError,
    SampleIndexError,
    StoreNotFoundError,
)
from jasper_mmap.loading.loader import BatchValidationError, first_batch_summary
from jasper_mmap.steering import SteeringSchedule, draw_variants
from jasper_mmap.synthetic import SyntheticSpec, make_pt_dataset

STEER = {1: "steering_centroid", 2: "steering_keyword_weighted", 3: "steering_residual"}


def _expected(src, split, idx, epoch, seed=42, forced=-1):
    """The batch computed directly from the .pt files (the seed dataset's semantics)."""
    t = {p.stem: load_pt(p) for p in src.glob("*.pt") if p.stem != "pair_keyword_ids"}
    pairs = t[f"{split}_idx"][idx]
    q, s = t["pair_index"][pairs, 0], t["pair_index"][pairs, 1]
    import json

    sched = SteeringSchedule.from_config(json.loads((src / "config.json").read_text()))
    v = draw_variants(seed, epoch, pairs, sched.probs(epoch), forced)
    steering = np.zeros((len(idx), t["question_embs"].shape[1]), np.float32)
    for k, name in STEER.items():
        steering[v == k] = t[name][pairs[v == k]]
    return {
        "question_emb": t["question_embs"][q],
        "target_source_emb": t["source_embs"][s],
        "steering": steering,
        "negative_embs": t["source_embs"][t["hard_negatives"][pairs]],
        "cluster_id": t["pair_cluster_id"][pairs],
        "relevance": t["pair_relevance"][pairs],
        "centroid_distance": t["centroid_distances"][pairs],
        "steering_variant": v,
        "negative_tiers": t["negative_tiers"][pairs],
    }


@pytest.fixture()
def src(tmp_path, pt_dataset):
    """A private copy of the tiny .pt dataset (tests may change it)."""
    return shutil.copytree(pt_dataset, tmp_path / "ds")


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """5000 pairs, D=4: enough samples for frequency checks."""
    return make_pt_dataset(
        tmp_path_factory.mktemp("big") / "ds", SyntheticSpec(n_pairs=5000, dim=4, n_neg=2)
    )


@pytest.mark.parametrize("backend", ["safetensors", "zarr"])
def test_every_key_equals_a_direct_computation_from_the_pt_files(src, tmp_path, backend):
    ds = JASPERSteeringDataset(
        src, "val", epoch=3, cache_dir=tmp_path / "cache", store_format=backend
    )
    idx = np.array([4, 0, 4, len(ds) - 1])
    got = ds.get_batch(idx)
    want = _expected(src, "val", idx, epoch=3)
    assert tuple(got) == BATCH_KEYS
    for key in BATCH_KEYS:
        assert got[key].numpy().dtype == np.dtype(
            "int64" if want[key].dtype.kind == "i" else "float32"
        ), key
        np.testing.assert_array_equal(got[key].numpy(), want[key], err_msg=key)
    one = ds[2]
    assert one["question_emb"].shape == (ds.embedding_dim,)
    assert one["negative_embs"].shape == (ds.n_neg, ds.embedding_dim)
    np.testing.assert_array_equal(
        one["relevance"].numpy(), _expected(src, "val", [2], 3)["relevance"][0]
    )


def test_out_of_range_and_negative_indices_raise_index_error(pt_dataset):
    ds = JASPERSteeringDataset(pt_dataset, "train")
    for bad in (len(ds), -1, 10**6):
        with pytest.raises(IndexError, match=r"out of range \[0, 96\)"):
            ds[bad]
    with pytest.raises(SampleIndexError):
        ds.get_batch([0, len(ds)])


def test_attributes_of_the_seed_api(pt_dataset):
    with JASPERSteeringDataset(pt_dataset, "train", epoch=100) as ds:
        assert (ds.embedding_dim, ds.n_neg, len(ds)) == (16, 6, 96)
        assert ds.config["random_seed"] == 42 and ds.device == torch.device("cpu")
        assert ds.steering_probs["zero"] == pytest.approx(0.1)
        assert sum(ds.steering_probs.values()) == pytest.approx(1.0)
        assert 0 < ds.memory_usage_mb < 0.01
    splits = JASPERSteeringDataset.create_combined_splits(pt_dataset, epoch=0)
    assert {k: len(v) for k, v in splits.items()} == {"train": 96, "val": 12, "test": 12}


def _variants(loader):
    return torch.cat([b["steering_variant"] for b in loader]).numpy()


def _loader(src, **kw):
    return create_loader(
        src, "train", batch_size=kw.pop("batch_size", 7), shuffle=False, drop_last=False, **kw
    )


@pytest.mark.parametrize(
    "layout",
    [
        dict(num_workers=2, worker_mode="process"),
        dict(num_workers=2, persistent_workers=True, worker_mode="process"),
        dict(num_workers=4, batch_size=5, worker_mode="process"),
        dict(num_workers=2, multiprocessing_context="spawn", worker_mode="process"),
        dict(num_workers=2),
        dict(num_workers=4, batch_size=5, prefetch_factor=1),
    ],
    ids=["fork2", "fork2-persistent", "fork4-b5", "spawn2", "threads2", "threads4-b5"],
)
def test_variants_identical_under_any_worker_layout(pt_dataset, layout):
    reference = _variants(_loader(pt_dataset, num_workers=0))
    got = _variants(_loader(pt_dataset, **layout))
    np.testing.assert_array_equal(got, reference)
    ds = JASPERSteeringDataset(pt_dataset, "train")
    perm = np.random.default_rng(1).permutation(len(ds))
    shuffled = ds.get_batch(perm)["steering_variant"].numpy()
    np.testing.assert_array_equal(shuffled, reference[perm])  # any batch composition or order


def test_draws_change_with_epoch_and_seed(big):
    ds = JASPERSteeringDataset(big, "train")
    idx = np.arange(len(ds))
    e0 = ds.get_batch(idx)["steering_variant"].numpy()
    ds.set_epoch(1)
    e1 = ds.get_batch(idx)["steering_variant"].numpy()
    other = JASPERSteeringDataset(big, "train", seed=7).get_batch(idx)["steering_variant"].numpy()
    assert (e0 != e1).mean() > 0.3 and (e0 != other).mean() > 0.3


@pytest.mark.parametrize("epoch", [0, 100, 250])
def test_variant_frequencies_follow_the_curriculum(big, epoch):
    ds = JASPERSteeringDataset(big, "train", epoch=epoch)
    v = ds.get_batch(np.arange(len(ds)))["steering_variant"].numpy()
    freq = np.bincount(v, minlength=4) / v.size
    zero = 0.5 if epoch == 0 else 0.1
    want = np.array([zero, *[(1 - zero) / 3] * 3])
    np.testing.assert_allclose(ds.schedule.probs(epoch), want)
    sigma = np.sqrt(want * (1 - want) / v.size)
    assert (np.abs(freq - want) < 5 * sigma).all(), (freq, want)


def test_the_builders_distance_curriculum_block_takes_the_default_schedule(src):
    """A curriculum block without zero_prob_* keys is not ignored: 0.5 -> 0.1 over 100 epochs."""
    import json

    cfg = json.loads((src / "config.json").read_text())
    cfg["curriculum"] = {"mode": "linear", "start_distance": 0.2, "warmup_epochs": 5}
    cfg["steering_probabilities"] = {"zero": 0.4, "centroid": 0.2, "keyword": 0.2, "residual": 0.2}
    (src / "config.json").write_text(json.dumps(cfg))
    ds = JASPERSteeringDataset(src, "train", epoch=50)
    assert ds.steering_probs["zero"] == pytest.approx(0.3)
    assert ds.steering_probs["centroid"] == pytest.approx(0.7 / 3)
    ds.set_epoch(0)
    assert ds.steering_probs["zero"] == pytest.approx(0.5)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_set_epoch_and_force_steering_reach_persistent_workers(big, context):
    loader = _loader(
        big,
        num_workers=2,
        persistent_workers=True,
        batch_size=256,
        multiprocessing_context=context,
        worker_mode="process",
    )
    ds = loader.dataset_obj
    first = _variants(loader)
    set_epoch(loader, 100)
    second = _variants(loader)
    assert (first != second).any()
    assert (
        loader._iterator is not None and loader._iterator._workers[0].pid
    )  # same workers throughout
    pids = [w.pid for w in loader._iterator._workers]
    want = _expected(big, "train", np.arange(len(ds)), epoch=100)["steering_variant"]
    np.testing.assert_array_equal(second, want)
    ds.force_steering("centroid")
    assert (_variants(loader) == 1).all()
    ds.force_steering(None)
    np.testing.assert_array_equal(_variants(loader), want)
    assert [w.pid for w in loader._iterator._workers] == pids
    with pytest.raises(ValueError, match="Invalid steering variant"):
        ds.force_steering("sideways")


def test_pickle_carries_paths_and_small_state_only(big):
    ds = JASPERSteeringDataset(big, "train")
    ds.get_batch(np.arange(100))  # maps opened
    blob = pickle.dumps(ds)
    assert len(blob) < 1_000_000
    assert len(blob) < 64 * 1024  # independent of the store's size: manifest + config
    clone = pickle.loads(blob)
    np.testing.assert_array_equal(
        clone.get_batch([3])["question_emb"], ds.get_batch([3])["question_emb"]
    )


def test_plain_dataloader_with_default_collate_gives_the_same_batches(pt_dataset):
    ds = JASPERSteeringDataset(pt_dataset, "train")
    plain = next(iter(DataLoader(ds, batch_size=8, shuffle=False)))
    fast = next(iter(_loader(pt_dataset, batch_size=8)))
    for key in BATCH_KEYS:
        assert torch.equal(plain[key], fast[key]), key


def test_create_loader_defaults_and_overrides(pt_dataset):
    train = create_loader(pt_dataset, "train", batch_size=10)
    assert train.drop_last and len(train) == 9 and train.sampler_obj is None
    assert isinstance(train.sampler, torch.utils.data.RandomSampler)
    val = create_loader(pt_dataset, "val", batch_size=5)
    assert not val.drop_last and len(val) == 3
    assert isinstance(val.sampler, torch.utils.data.SequentialSampler)
    fixed = create_loader(pt_dataset, "train", batch_size=10, shuffle=False, timeout=0)
    assert isinstance(fixed.sampler, torch.utils.data.SequentialSampler)
    assert validate_first_batch(fixed) is True
    assert first_batch_summary(fixed)["batch_size"] == 10


def _numpy_draw(_):
    return float(np.random.random())


def test_workers_get_distinct_numpy_seeds(pt_dataset):
    loader = create_loader(pt_dataset, "train", batch_size=1, num_workers=2, shuffle=False)
    from jasper_mmap.loading.loader import seed_worker

    seeded = DataLoader(
        range(4),
        batch_size=1,
        num_workers=2,
        worker_init_fn=seed_worker,
        collate_fn=lambda b: _numpy_draw(b),
        multiprocessing_context="fork",
    )
    draws = list(seeded)
    assert len(set(draws[:2])) == 2  # worker 0 and worker 1 differ
    assert loader.worker_init_fn is seed_worker


def test_stale_pt_files_are_picked_up(src, caplog):
    ds = JASPERSteeringDataset(src, "train")
    rel = load_pt(src / "pair_relevance.pt")
    new = np.clip(rel[::-1].copy() * 0.5, 0, 1)
    torch.save(torch.from_numpy(new), src / "pair_relevance.pt")
    with caplog.at_level(logging.INFO):
        again = JASPERSteeringDataset(src, "train")
    assert "pair_relevance.pt changed" in caplog.text
    pairs = load_pt(src / "train_idx.pt")[:5]
    np.testing.assert_array_equal(again.get_batch(np.arange(5))["relevance"].numpy(), new[pairs])
    assert ds.store_path == again.store_path
    caplog.clear()
    with caplog.at_level(logging.INFO):
        JASPERSteeringDataset(src, "train")
    assert "converting" not in caplog.text and "rebuilding" not in caplog.text


def test_clear_errors_for_missing_dir_config_split_and_corrupt_indices(tmp_path, src):
    # each is also a ValueError, as the in-RAM dataset raised (and its users catch)
    for cls in (StoreNotFoundError, FileNotFoundError, ValueError):
        with pytest.raises(cls, match="Dataset directory not found: .*missing.*does not exist"):
            JASPERSteeringDataset(tmp_path / "missing", "train")
    (tmp_path / "empty").mkdir()
    for cls in (ArtifactMissingError, FileNotFoundError, ValueError):
        with pytest.raises(
            cls, match="Config file not found: .*empty/config.json.*neither a store"
        ):
            JASPERSteeringDataset(tmp_path / "empty", "train")
    (src / "test_idx.pt").unlink()
    for cls in (ArtifactMissingError, ValueError):
        with pytest.raises(cls, match="Split file not found: .*test_idx.pt.*has splits"):
            JASPERSteeringDataset(src, "test")
    with pytest.raises(ValueError, match="Split file not found: .*dev_idx.pt.*Valid splits"):
        JASPERSteeringDataset(src, "dev")
    negs = load_pt(src / "hard_negatives.pt")
    negs[3, 1] = 10**6
    torch.save(torch.from_numpy(negs), src / "hard_negatives.pt")
    with pytest.raises(
        ArtifactError, match=r"hard_negatives.pt: negative source rows should be in \[0, 120\)"
    ):
        JASPERSteeringDataset(src, "train")


def test_validate_first_batch_names_key_and_rows(pt_dataset):
    loader = _loader(pt_dataset, batch_size=4)

    def broken(data):
        batch = dict(data.batch)
        batch["relevance"] = batch["relevance"].clone()
        batch["relevance"][2] = 3.0
        return batch

    loader.collate_fn = broken
    for cls in (BatchValidationError, AssertionError):  # the in-RAM dataset's users catch this
        with pytest.raises(cls, match=r"relevance should be in \[0.0, 1.0\], but batch rows \[2\]"):
            validate_first_batch(loader)


@pytest.mark.parametrize("advice", ["random", "normal"])
def test_read_ahead_advice_and_prefetch_do_not_change_batches(src, tmp_path, monkeypatch, advice):
    from jasper_mmap.stores.readahead import choose_advice

    monkeypatch.setenv("JASPER_MMAP_MADVISE", advice)
    assert choose_advice(10**15) == advice
    ds = JASPERSteeringDataset(src, "train", epoch=2)
    assert ds.store.reads_ahead == (advice == "random")
    idx = np.array([0, 95, 3, 3, 50])
    got = ds.get_batch(idx)
    want = _expected(src, "train", idx, epoch=2)
    for key in BATCH_KEYS:
        np.testing.assert_array_equal(got[key].numpy(), want[key], err_msg=key)
    monkeypatch.delenv("JASPER_MMAP_MADVISE")
    assert choose_advice(1) == "normal" and choose_advice(10**15) == "random"


def test_a_store_whose_sources_changed_is_refused_at_open(src, tmp_path):
    from jasper_mmap.converters import convert_pt
    from jasper_mmap.errors import StoreStaleError

    store = convert_pt(src, tmp_path / "store", progress=False)
    JASPERSteeringDataset(store, "train")
    negs = load_pt(src / "hard_negatives.pt")
    torch.save(
        torch.from_numpy(negs[::-1].copy()), src / "hard_negatives.pt"
    )  # negatives: hot reload's job
    JASPERSteeringDataset(store, "train")
    rel = load_pt(src / "pair_relevance.pt")
    torch.save(torch.from_numpy(rel * 0.5), src / "pair_relevance.pt")
    with pytest.raises(
        StoreStaleError,
        match=r"source files pair_relevance.pt in .* changed since it was converted",
    ):
        JASPERSteeringDataset(store, "train")
    ds = JASPERSteeringDataset(store, "train", check_sources=False)
    assert len(ds) == 96
    shutil.rmtree(src)  # sources gone: nothing to compare with
    JASPERSteeringDataset(store, "train")


def test_batch_prefetch_advises_pages_inside_the_maps(src, monkeypatch):
    """NOTE [batch prefetch]: every MADV_WILLNEED lands on mapped pages (madvise returns 0)."""
    import ctypes

    from jasper_mmap.stores import readahead as safetensors_store

    if safetensors_store._MADVISE is None:
        pytest.skip("no libc madvise here")
    calls = []

    def recorded(addr, length, advice):
        ret = safetensors_store._libc_madvise()(addr, length, advice)
        calls.append((ret, ctypes.get_errno()))
        return ret

    monkeypatch.setenv("JASPER_MMAP_MADVISE", "random")
    monkeypatch.setattr(safetensors_store, "_MADVISE", recorded)
    ds = JASPERSteeringDataset(src, "train", epoch=2)
    idx = np.array([0, 95, 3, 50])
    got = ds.get_batch(idx)
    want = _expected(src, "train", idx, epoch=2)
    np.testing.assert_array_equal(got["negative_embs"].numpy(), want["negative_embs"])
    assert len(calls) >= 5 and all(ret == 0 for ret, _ in calls), calls[:5]


def _madvise_recorder(monkeypatch):
    from jasper_mmap.stores import readahead as safetensors_store

    calls: list[tuple[int, int]] = []
    monkeypatch.setenv("JASPER_MMAP_MADVISE", "random")  # as for a store larger than RAM/2
    monkeypatch.setattr(
        safetensors_store, "_MADVISE", lambda addr, n, advice: calls.append((addr, n)) or 0
    )
    return calls


def _in(calls, store, name: str) -> list[tuple[int, int]]:
    """The calls that start inside array ``name``'s bytes of its map, or in the aligned window
    before them that holds its first row (never before the map: another map may lie there)."""
    from jasper_mmap.stores.readahead import DENSE_WINDOW, map_address

    arr = store.raw(name)
    lo = arr.__array_interface__["data"][0]
    start = map_address(store._maps[store.entry(name)["file"]].map)
    return [(a, n) for a, n in calls if max(start, lo - DENSE_WINDOW) <= a < lo + arr.nbytes]


def test_dense_arrays_are_prefetched_in_windows_once_and_sparse_ones_by_page(src, monkeypatch):
    """NOTE [dense arrays]: on a store larger than RAM/2, the arrays a pass reads mostly whole
    (source and question tables, per-pair arrays) are asked for in aligned windows, each once
    per process; the steering tables page by page at every batch; batches are unchanged."""
    import mmap

    from jasper_mmap.stores.readahead import DENSE_WINDOW, dense_arrays

    calls = _madvise_recorder(monkeypatch)
    ds = JASPERSteeringDataset(src, "train", epoch=2)
    dense = dense_arrays(ds.store, len(ds))
    assert {"source_embs", "question_embs", "pair_index", "hard_negatives"} <= dense
    assert not dense & {"steering_centroid", "steering_keyword_weighted", "steering_residual"}
    ds.force_steering("centroid")
    idx = np.array([0, 95, 3, 50, 7])
    got = ds.get_batch(idx)
    want = _expected(src, "train", idx, epoch=2, forced=1)
    for key in BATCH_KEYS:
        np.testing.assert_array_equal(got[key].numpy(), want[key], err_msg=key)
    source = ds.store.raw("source_embs")
    base = source.__array_interface__["data"][0]
    first_source = _in(calls, ds.store, "source_embs")
    assert first_source and all((a - base) % DENSE_WINDOW == 0 or a < base for a, _ in first_source)
    assert _in(calls, ds.store, "steering_centroid")
    page = mmap.PAGESIZE + -(-source.strides[0] // mmap.PAGESIZE) * mmap.PAGESIZE
    assert max(n for _, n in first_source) > page, first_source  # a window
    calls.clear()
    ds.get_batch(idx)  # the same rows again: the windows were asked for already
    assert not _in(calls, ds.store, "source_embs") and _in(calls, ds.store, "steering_centroid")
    ds.set_epoch(3)  # a new epoch asks for them again (in case they were evicted meanwhile)
    ds.force_steering("centroid")
    calls.clear()
    ds.get_batch(idx)
    assert max(n for _, n in _in(calls, ds.store, "source_embs")) > page


def test_dense_windows_can_be_turned_off_and_respect_half_of_ram(src, monkeypatch):
    import os

    from jasper_mmap.format.dtypes import entry_nbytes
    from jasper_mmap.stores import readahead as dataset_module
    from jasper_mmap.stores.readahead import dense_arrays

    _madvise_recorder(monkeypatch)
    ds = JASPERSteeringDataset(src, "train")
    monkeypatch.setenv("JASPER_MMAP_DENSE", "off")
    assert dense_arrays(ds.store, len(ds)) == frozenset()
    monkeypatch.delenv("JASPER_MMAP_DENSE")
    everything = dense_arrays(ds.store, len(ds))
    sizes = {n: entry_nbytes(ds.store.entry(n)) for n in everything}
    ram = sizes["source_embs"]  # half of it: the source table does not fit
    real = os.sysconf
    monkeypatch.setattr(
        dataset_module.os,
        "sysconf",
        lambda k: {"SC_PAGE_SIZE": 1, "SC_PHYS_PAGES": ram}.get(k) or real(k),
    )
    some = dense_arrays(ds.store, len(ds))
    assert some and "source_embs" not in some and some < everything
    assert sum(sizes[n] for n in some) <= ram // 2
    monkeypatch.setattr(dataset_module, "DENSE_REFS_PER_WINDOW", 10**9)  # a very slow disk
    assert dense_arrays(ds.store, len(ds)) == frozenset()
    monkeypatch.setenv("JASPER_MMAP_MADVISE", "normal")  # a store that fits: no prefetch at all
    monkeypatch.setattr(dataset_module, "DENSE_REFS_PER_WINDOW", 50)
    monkeypatch.setattr(dataset_module.os, "sysconf", real)
    cached = JASPERSteeringDataset(src, "train")  # the advice is chosen once per store
    assert not cached.store.reads_ahead and dense_arrays(cached.store, len(cached)) == frozenset()


def test_prefetch_advises_the_batchs_generation_not_the_one_served_meanwhile(
    src, tmp_path, monkeypatch
):
    """A batch pins its negatives generation; a reload may switch the served one while it
    runs. Its prefetch must advise that generation's map (mixing one generation's array with
    another's map once indexed a window bitmap out of bounds under a racing publisher)."""
    from jasper_mmap import open_store, publish_negatives
    from jasper_mmap.converters import convert_pt

    calls = _madvise_recorder(monkeypatch)
    store_dir = convert_pt(src, tmp_path / "store", progress=False)
    store = open_store(store_dir)
    negs, tiers = store.read("hard_negatives"), store.read("negative_tiers")
    publish_negatives(store_dir, negs[:, ::-1].copy(), tiers[:, ::-1].copy())
    rows = {"hard_negatives": np.array([0, 5, 9])}
    with store.pinned(0) as pinned:
        store.use_generation(1)  # served from now on; generation 0 stays mapped: pinned
        old, new = _map_range(store, 0), _map_range(store, 1)
        for dense in (frozenset(), frozenset({"hard_negatives"})):
            calls.clear()
            store.prefetch(rows, dense, 0, pinned)
            assert calls and all(old[0] <= a < old[1] for a, _ in calls), dense
            calls.clear()
            store.prefetch(rows, dense, 1)  # default: the served generation
            assert calls and all(new[0] <= a < new[1] for a, _ in calls), dense


def _map_range(store, generation: int) -> tuple[int, int]:
    """Addresses of the map holding generation ``generation``'s hard_negatives."""
    from jasper_mmap.stores.readahead import map_address

    store.raw("hard_negatives", generation)
    m = store._maps[store.entry("hard_negatives", generation)["file"]].map
    return map_address(m), map_address(m) + len(m)


def test_prefetch_leaves_rows_outside_an_array_to_the_gather(src, monkeypatch):
    """Rows outside an array (indices its caller did not check; the dataset checks them
    first) are skipped by the prefetch, for dense and sparse arrays alike."""
    calls = _madvise_recorder(monkeypatch)
    ds = JASPERSteeringDataset(src, "train")
    bad = np.array([0, 10**9, -(10**9)])
    for dense in (frozenset(), frozenset({"source_embs"})):
        calls.clear()
        ds.store.prefetch({"source_embs": bad}, dense, 0)
        assert calls and _in(calls, ds.store, "source_embs") == calls


@pytest.mark.parametrize(
    ("array", "at", "bad", "named"),
    [  # ``at``: the flat position of the damaged value in the rows read
        ("train_idx", -1, lambda s: s.shape("pair_index")[0], "pair_index"),
        ("pair_index", -2, lambda s: s.shape("question_embs")[0], "question_embs"),
        ("pair_index", -1, lambda s: s.shape("source_embs")[0], "source_embs"),
        ("hard_negatives", -1, lambda s: s.shape("source_embs")[0], "source_embs"),
        ("hard_negatives", 0, lambda s: -1, "source_embs"),
    ],
)
def test_a_batch_names_rows_a_damaged_index_points_past(src, monkeypatch, array, at, bad, named):
    """Each index array of a batch is range-checked once (``check_rows``) before the arrays
    it addresses are read without checks (``gather_unchecked``): a store whose index arrays point past
    the rows they address still fails with SampleIndexError naming the array."""
    ds = JASPERSteeringDataset(src, "train")
    store = ds.store
    real = store.gather_unchecked

    def damaged(name, idx, out=None, generation=None):
        rows = real(name, idx, out, generation)
        if name == array:
            rows = rows.copy()
            rows.reshape(-1)[at] = bad(store)
        return rows

    monkeypatch.setattr(store, "gather_unchecked", damaged)
    with pytest.raises(SampleIndexError, match=rf"rows of '{named}' should be in"):
        ds.get_batch([0, 1, 2])


def test_a_failed_control_write_leaves_the_block_readable(src):
    ds = JASPERSteeringDataset(src, "train")
    with pytest.raises(OverflowError):
        ds._control.set(epoch=2**64)
    assert ds._control.snapshot().epoch == 0  # no endless wait on an odd version
