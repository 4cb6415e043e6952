"""A drop-in for the in-RAM dataset: constructor, HDF5 source, attributes, curriculum,
exceptions, logging, installed names (issue 11). Expectations come from UPSTREAM_API.md."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import keyword_arrays, load_pt

from jasper_mmap import JASPERSteeringDataset, create_loader, open_store
from jasper_mmap.converters import convert_pt
from jasper_mmap.errors import ConfigError
from jasper_mmap.steering import compute_steering_probs
from jasper_mmap.synthetic import SyntheticSpec, make_pt_dataset

REPO = Path(__file__).resolve().parents[2]
PT_FILES = [
    "question_embs",
    "source_embs",
    "keyword_embs",
    "centroid_embs",
    "pair_index",
    "pair_cluster_id",
    "pair_relevance",
    "steering_centroid",
    "steering_keyword_weighted",
    "steering_residual",
    "centroid_distances",
    "hard_negatives",
    "negative_tiers",
]


@pytest.fixture
def src(tmp_path, pt_dataset):
    return shutil.copytree(pt_dataset, tmp_path / "ds")


@pytest.fixture
def h5_only(tmp_path, pt_dataset):
    """A directory holding config.json and dataset.h5 only (the .pt files removed)."""
    d = shutil.copytree(pt_dataset, tmp_path / "h5ds")
    JASPERSteeringDataset.convert_pt_to_hdf5(d)
    for p in d.glob("*.pt"):
        p.unlink()
    return d


# -- 1. constructor and factory ------------------------------------------------------------------


def test_storage_format_and_use_mmap_by_position_and_keyword(src):
    ds = JASPERSteeringDataset(src, "train", 0, None, "pt", False)
    assert ds.storage_format == "pt" and ds.use_mmap is False and ds.preload
    kw = JASPERSteeringDataset(src, split="val", storage_format="auto", use_mmap=True)
    assert kw.storage_format == "pt" and kw.use_mmap is True
    assert JASPERSteeringDataset(src, "train").use_mmap is True  # mapped by default
    same = [ds.get_batch(np.arange(8))[k] for k in ("question_emb", "negative_embs")]
    mapped = JASPERSteeringDataset(src, "train").get_batch(np.arange(8))
    assert torch.equal(same[0], mapped["question_emb"])
    assert torch.equal(same[1], mapped["negative_embs"])
    splits = JASPERSteeringDataset.create_combined_splits(src, 0, None, "pt", False)
    assert set(splits) == {"train", "val", "test"}
    assert all(s.storage_format == "pt" and not s.use_mmap for s in splits.values())


@pytest.mark.parametrize(
    "fmt,setup,pattern",
    [
        ("parquet", None, "Invalid storage_format: 'parquet'"),
        ("hdf5", None, "HDF5 file not found"),
        ("auto", "config only", "No dataset files found"),
        ("pt", "config only", "PT files not found"),
    ],
)
def test_storage_format_errors_are_value_errors(src, tmp_path, fmt, setup, pattern):
    where = src
    if setup == "config only":
        where = tmp_path / "cfg"
        where.mkdir()
        shutil.copy(src / "config.json", where)
    with pytest.raises(ValueError, match=pattern):
        JASPERSteeringDataset(where, "train", storage_format=fmt)
    with pytest.raises(ValueError, match=pattern):
        JASPERSteeringDataset.create_combined_splits(where, storage_format=fmt)


def test_a_store_reports_its_source_format_and_refuses_another(src, tmp_path):
    store = convert_pt(src, tmp_path / "store", progress=False)
    assert JASPERSteeringDataset(store, "train").storage_format == "pt"
    with pytest.raises(ValueError, match="converted from pt files"):
        JASPERSteeringDataset(store, "train", storage_format="hdf5")


# -- 2. HDF5 as a source -------------------------------------------------------------------------


def _all_arrays(store_path: Path) -> dict[str, bytes]:
    s = open_store(store_path)
    return {n: s.read(n).tobytes() for n in s.names()}


def test_pt_to_h5_to_store_equals_pt_to_store_bit_for_bit(src, tmp_path):
    direct = convert_pt(src, tmp_path / "direct", progress=False, source="pt")
    JASPERSteeringDataset.convert_pt_to_hdf5(src)
    via_h5 = convert_pt(src, tmp_path / "via_h5", progress=False, source="hdf5")
    assert open_store(via_h5).manifest["source"]["format"] == "hdf5"
    a, b = _all_arrays(direct), _all_arrays(via_h5)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]


def test_an_h5_only_directory_opens_and_serves_the_same_batches(h5_only, pt_dataset):
    ds = JASPERSteeringDataset(h5_only, "train")
    assert ds.storage_format == "hdf5"
    ref = JASPERSteeringDataset(pt_dataset, "train")
    idx = np.arange(len(ds))
    got, want = ds.get_batch(idx), ref.get_batch(idx)
    assert all(torch.equal(got[k], want[k]) for k in want)
    offsets, values = keyword_arrays(pt_dataset / "pair_keyword_ids.pt")
    assert [list(x) for x in ds.pair_keyword_ids] == [
        values[offsets[i] : offsets[i + 1]].tolist() for i in range(len(offsets) - 1)
    ]


def _rewrite_h5_negatives(directory: Path, negs: np.ndarray, tiers: np.ndarray) -> None:
    """A miner that rewrites the negatives inside dataset.h5 (upstream's layout)."""
    import time

    import h5py

    time.sleep(0.02)
    with h5py.File(directory / "dataset.h5", "r+") as f:
        f["negatives/hardnegatives"][...] = negs
        f["negatives/tiers"][...] = tiers


def test_an_h5_only_directory_reopens_and_reloads_negatives_from_dataset_h5(h5_only, pt_dataset):
    """Every open after the first crashed; a reload ignored negatives rewritten in the file."""
    first = JASPERSteeringDataset(h5_only, "train")
    for split in ("val", "train"):  # the second and third opens reuse the store
        assert JASPERSteeringDataset(h5_only, split).storage_format == "hdf5"
    assert first.reload_negatives() == 0  # nothing changed: nothing published
    negs = (load_pt(pt_dataset / "hard_negatives.pt") + 7) % 120
    tiers = np.full_like(negs, 2)
    _rewrite_h5_negatives(h5_only, negs, tiers)
    assert first.reload_negatives() == 1
    np.testing.assert_array_equal(first.hard_negatives.numpy(), negs)
    assert (first.get_batch(np.arange(8))["negative_tiers"] == 2).all()
    assert first.reload_negatives() == 1  # taken in once
    again = JASPERSteeringDataset(h5_only, "train")  # dataset.h5 changed: a rebuilt store
    np.testing.assert_array_equal(again.hard_negatives.numpy(), negs)


def test_negatives_rewritten_in_the_middle_of_a_large_dataset_h5_are_reloaded(tmp_path):
    """The trainer's HDF5 flow on a file larger than the fingerprint's head and tail: the
    rewritten negatives sit in the middle, where the head/tail hash cannot see them."""
    from jasper_mmap.sources.fingerprints import _EDGE

    d = make_pt_dataset(tmp_path / "big", SyntheticSpec(n_pairs=3000, dim=32, n_neg=6))
    JASPERSteeringDataset.convert_pt_to_hdf5(d)
    for p in d.glob("*.pt"):
        p.unlink()
    assert (d / "dataset.h5").stat().st_size > 8 * _EDGE
    ds = JASPERSteeringDataset(d, "train")
    old = ds.hard_negatives.numpy().copy()
    negs, tiers = (old + 11) % 3000, np.full_like(old, 3)
    with open(d / "dataset.h5", "rb") as f:
        head = f.read(_EDGE)
    _rewrite_h5_negatives(d, negs, tiers)
    with open(d / "dataset.h5", "rb") as f:
        assert f.read(_EDGE) == head  # the change is invisible to the head/tail hash
    assert ds.reload_negatives() == 1
    np.testing.assert_array_equal(ds.hard_negatives.numpy(), negs)
    assert (ds.get_batch(np.arange(8))["negative_tiers"] == 3).all()
    assert ds.reload_negatives() == 1  # taken in once
    os.utime(d / "dataset.h5")  # touched, same negatives: not republished
    assert ds.reload_negatives() == 1
    _rewrite_h5_negatives(d, old, tiers)
    assert ds.reload_negatives() == 2
    np.testing.assert_array_equal(ds.hard_negatives.numpy(), old)


def test_in_hdf5_mode_pt_negatives_beside_the_file_are_ignored(src):
    JASPERSteeringDataset.convert_pt_to_hdf5(src)
    ds = JASPERSteeringDataset(src, "train")
    assert ds.storage_format == "hdf5"
    before = ds.hard_negatives.clone()
    torch.save(torch.from_numpy((before.numpy() + 1) % 120), src / "hard_negatives.pt")
    assert ds.reload_negatives() == 0 and torch.equal(ds.hard_negatives, before)


def test_auto_prefers_dataset_h5_as_the_in_ram_dataset_does(src):
    JASPERSteeringDataset.convert_pt_to_hdf5(src)
    assert JASPERSteeringDataset(src, "train").storage_format == "hdf5"
    assert JASPERSteeringDataset(src, "train", storage_format="pt").storage_format == "pt"


def test_without_h5py_auto_uses_pt_and_hdf5_asks_for_it(src):
    code = f"""
import sys; sys.modules["h5py"] = None
from jasper_mmap import JASPERSteeringDataset as D
print(D({str(src)!r}, "train").storage_format)
try:
    D({str(src)!r}, "train", storage_format="hdf5")
except ValueError as e:
    print("ValueError", e)
try:
    D.convert_pt_to_hdf5({str(src)!r})
except ImportError as e:
    print("ImportError", e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "pt"
    assert lines[1].startswith("ValueError HDF5 format requested but h5py is not installed")
    assert lines[2].startswith("ImportError h5py is required")


# -- 3. attributes -------------------------------------------------------------------------------


def test_tables_are_zero_copy_views_of_the_maps_made_on_first_access(src, monkeypatch):
    import jasper_mmap.dataset.tables as tables

    # the fixture's tables are all small, hence copies (NOTE [writable table memory]); a
    # large table is a zero-copy private map of the bytes the store maps
    monkeypatch.setattr(tables, "SMALL_TABLE_BYTES", 0)
    ds = JASPERSteeringDataset(src, "train")
    assert ds._tables == {}, "opening must not touch the tables (O(1))"
    for name in PT_FILES:
        t = getattr(ds, name)
        assert isinstance(t, torch.Tensor) and t.device == torch.device("cpu")
        np.testing.assert_array_equal(t.numpy(), load_pt(src / f"{name}.pt"))
        raw = ds.store.raw(name, ds.negatives_generation) if "neg" in name else ds.store.raw(name)
        start, offset, *file = tables._mapping_of(t.data_ptr())
        raw_start, raw_offset, *raw_file = tables._mapping_of(raw.__array_interface__["data"][0])
        assert file == raw_file, f"{name} is not a map of the store's file: it was copied"
        at, raw_at = offset + t.data_ptr() - start, raw_offset + raw.ctypes.data - raw_start
        assert at == raw_at, f"{name} maps other bytes of the file"
    np.testing.assert_array_equal(ds.split_indices.numpy(), load_pt(src / "train_idx.pt"))
    offsets, values = keyword_arrays(src / "pair_keyword_ids.pt")
    assert len(ds.pair_keyword_ids) == len(offsets) - 1
    assert ds.pair_keyword_ids[3] == values[offsets[3] : offsets[4]].tolist()
    assert ds.pair_keyword_ids == [
        values[offsets[i] : offsets[i + 1]].tolist() for i in range(len(offsets) - 1)
    ]
    for attr in ("config", "embedding_dim", "n_neg", "device", "dataset_dir", "split"):
        assert getattr(ds, attr) is not None
    assert ds.current_epoch == 0 and set(ds.steering_probs) == {
        "zero",
        "centroid",
        "keyword",
        "residual",
    }


def _rss_anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon")


def test_reading_whole_tables_does_not_grow_anonymous_memory(tmp_path):
    from jasper_mmap.synthetic.large import make_store

    store = make_store(tmp_path / "s", 120_000, dim=64, n_keywords=500, n_clusters=16)
    ds = JASPERSteeringDataset(store, "train")
    before = _rss_anon_mb()
    total = sum(float(getattr(ds, n).float().sum()) for n in ("source_embs", "steering_residual"))
    grown = _rss_anon_mb() - before
    assert np.isfinite(total)
    # source_embs alone is 30 MB; a copy would show; .float() of a float32 table is a no-op
    assert grown < 8, f"RssAnon grew by {grown:.1f} MB reading two tables of 60 MB"


def test_negative_tables_follow_reload_and_tables_are_gone_after_close(src):
    ds = JASPERSteeringDataset(src, "train")
    old = ds.hard_negatives.clone()
    new = (load_pt(src / "hard_negatives.pt") + 1) % 120
    torch.save(torch.from_numpy(new), src / "hard_negatives.pt")
    torch.save(torch.from_numpy(load_pt(src / "negative_tiers.pt")), src / "negative_tiers.pt")
    ds.reload_negatives()
    np.testing.assert_array_equal(ds.hard_negatives.numpy(), new)
    assert not torch.equal(ds.hard_negatives, old)
    with ds:
        pass
    with pytest.raises(AttributeError, match="released by close"):
        _ = ds.question_embs
    assert getattr(ds, "centroid_embs", None) is None
    assert ds.get_batch([0])["question_emb"].shape == (1, 16)  # a batch reopens the maps


def test_a_preloaded_dataset_gives_tensors_on_its_device(src):
    ds = JASPERSteeringDataset(src, "train", use_mmap=False)
    assert ds.centroid_embs.device == ds.device == torch.device("cpu")
    assert ds.memory_usage_mb > JASPERSteeringDataset(src, "train").memory_usage_mb


@pytest.mark.gpu
def test_a_cuda_preloaded_dataset_gives_cuda_tables(src):
    ds = JASPERSteeringDataset(src, "train", device="cuda")
    assert ds.centroid_embs.is_cuda and ds.question_embs.is_cuda and ds.use_mmap is False


# -- 4. curriculum: the in-RAM dataset's formula, edge cases included ----------------------------


def reference_probs(config: dict, epoch: int) -> dict:
    """UPSTREAM_API.md's formula, written out from its text."""
    c = config.get("curriculum", {})
    base = config["steering_probabilities"]
    if not c:
        return dict(base)
    zs, ze, et = (
        c.get("zero_prob_start", 0.5),
        c.get("zero_prob_end", 0.1),
        c.get("epochs_total", 100),
    )
    zero = zs + (ze - zs) * min(epoch / max(et, 1), 1)
    rest = 1 - zero
    if base.get("zero", 0.0) == 1:
        return {"zero": zero, "centroid": rest, "keyword": 0.0, "residual": 0.0}
    share = rest / (1 - base.get("zero", 0.0))
    return {
        "zero": zero,
        **{v: base.get(v, 0.3) * share for v in ("centroid", "keyword", "residual")},
    }


UNIFORM = {"zero": 0.25, "centroid": 0.25, "keyword": 0.25, "residual": 0.25}
CONFIGS = {
    "no curriculum": {"steering_probabilities": UNIFORM},
    "empty curriculum": {"steering_probabilities": UNIFORM, "curriculum": {}},
    "seed's block": {
        "steering_probabilities": UNIFORM,
        "curriculum": {"zero_prob_start": 0.5, "zero_prob_end": 0.1, "epochs_total": 100},
    },
    "builder's default block": {
        "steering_probabilities": {"zero": 0.1, "centroid": 0.4, "keyword": 0.3, "residual": 0.2},
        "curriculum": {
            "mode": "linear",
            "start_distance": 0.3,
            "end_distance": 0.7,
            "warmup_epochs": 10,
        },
    },
    "partial keys": {"steering_probabilities": UNIFORM, "curriculum": {"zero_prob_end": 0.2}},
    "epochs_total 0": {
        "steering_probabilities": UNIFORM,
        "curriculum": {"zero_prob_start": 0.9, "zero_prob_end": 0.3, "epochs_total": 0},
    },
    "base zero 1.0": {
        "steering_probabilities": {"zero": 1.0, "centroid": 0.0, "keyword": 0.0, "residual": 0.0},
        "curriculum": {"zero_prob_start": 0.6, "zero_prob_end": 0.2, "epochs_total": 10},
    },
    "missing base keys": {
        "steering_probabilities": {"zero": 0.1, "centroid": 0.9},
        "curriculum": {"epochs_total": 20},
    },
    "missing base keys, no curriculum": {"steering_probabilities": {"zero": 0.3, "centroid": 0.7}},
}
EPOCHS = [0, 1, 5, 10, 50, 99, 100, 101, 250]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_steering_probs_equal_the_in_ram_formula_on_a_grid(name):
    config = CONFIGS[name]
    for epoch in EPOCHS:
        got, want = compute_steering_probs(config, epoch), reference_probs(config, epoch)
        assert got.keys() == want.keys() and got == pytest.approx(want, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_dataset_reports_and_draws_that_formula(src, name):
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("curriculum", None)
    cfg.update(CONFIGS[name])
    (src / "config.json").write_text(json.dumps(cfg))
    want = reference_probs(CONFIGS[name], 0)
    if abs(sum(want.values()) - 1) > 1e-6:  # the in-RAM dataset could not draw either
        with pytest.raises(ConfigError, match="summing to 1"):
            JASPERSteeringDataset(src, "train")
        return
    ds = JASPERSteeringDataset(src, "train")
    for epoch in (0, 5, 150):
        ds.set_epoch(epoch)
        assert ds.steering_probs == pytest.approx(reference_probs(CONFIGS[name], epoch))
    never = [
        i for i, v in enumerate(("zero", "centroid", "keyword", "residual")) if not want.get(v)
    ]
    ds.set_epoch(0)
    drawn = ds.get_batch(np.arange(len(ds)))["steering_variant"].numpy()
    assert not np.isin(drawn, never).any(), "a variant of probability 0 was drawn"


def test_assigned_steering_probs_override_until_set_epoch_and_reach_workers(src):
    loader = create_loader(src, "train", 32, num_workers=2, shuffle=False, drop_last=False)
    ds = loader.dataset_obj
    ds.steering_probs = {"zero": 0.0, "centroid": 0.0, "keyword": 1.0, "residual": 0.0}
    assert ds.steering_probs["keyword"] == 1.0
    assert all((b["steering_variant"] == 2).all() for b in loader)
    ds.set_epoch(3)
    assert ds.steering_probs == pytest.approx(
        reference_probs(json.loads((src / "config.json").read_text()), 3)
    )
    with pytest.raises(ValueError, match="summing to 1"):
        ds.steering_probs = {"zero": 0.5, "centroid": 0.1}


@pytest.mark.parametrize(
    "probs",
    [
        {"zero": float("nan"), "centroid": 0.5, "keyword": 0.25, "residual": 0.25},
        {"zero": float("inf"), "centroid": 0.0, "keyword": 0.0, "residual": 0.0},
        {"zero": -0.5, "centroid": 1.0, "keyword": 0.25, "residual": 0.25},
        {"zero": "a lot"},
        {"zero": 0.5, "centroid": 0.5, "sideways": 0.0},
    ],
)
def test_nonfinite_or_odd_steering_probabilities_are_a_clear_config_error(src, probs):
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("curriculum")
    cfg["steering_probabilities"] = probs
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="steering probabilities should map") as e:
        JASPERSteeringDataset(src, "train")
    # the user's own file, not the store's copy of it (a fix there would not last)
    assert str(e.value).startswith(f"{src / 'config.json'} at epoch 0:"), str(e.value)


# -- 5. exceptions and helpers -------------------------------------------------------------------


def test_getitem_accepts_numpy_integers_and_0d_tensors(src):
    ds = JASPERSteeringDataset(src, "train")
    want = ds[5]
    for idx in (np.int64(5), np.int32(5), torch.tensor(5), torch.tensor(5, dtype=torch.int32)):
        got = ds[idx]
        assert all(torch.equal(got[k], want[k]) for k in want)
    for bad in (len(ds), -1, np.int64(-3), torch.tensor(len(ds))):
        with pytest.raises(IndexError, match=r"Index .* out of range"):
            ds[bad]
    with pytest.raises(TypeError):
        ds[torch.tensor(1.5)]


def test_getitems_answers_keys_and_samples(src):
    ds = JASPERSteeringDataset(src, "train")
    batch = ds.__getitems__([1, 2, 3])
    assert batch["question_emb"].shape == (3, 16)
    assert torch.equal(batch[1]["question_emb"], batch["question_emb"][1])
    assert set(batch.keys()) == set(ds.get_batch([1]))


def test_info_logging_as_the_in_ram_dataset(src, caplog):
    with caplog.at_level(logging.INFO, logger="jasper_mmap.dataset"):
        ds = JASPERSteeringDataset(src, "train")
        init = caplog.text
        ds.set_epoch(4)
        ds.force_steering("zero")
        ds.force_steering(None)
        ds.reload_negatives()
        ds.close()
    assert "memory=" in init and "Dataset initialized: 96 samples" in init
    assert "Set epoch" not in init  # the in-RAM dataset logs no epoch line at construction
    for needle in (
        "Set epoch 4, steering probs: zero=",
        "Forced steering variant: zero",
        "Restored stochastic steering selection",
        "Reloading hard negatives",
        "Dataset closed. Split: train",
    ):
        assert needle in caplog.text, needle


def test_messages_and_repr_name_the_directory_the_user_passed(src):
    """Not the hidden store made inside it (``.jasper_mmap_store``)."""
    ds = JASPERSteeringDataset(src, "train")
    assert str(src) in repr(ds) and ".jasper_mmap_store" not in repr(ds)
    for bad in ([10**6], np.array([0.5])):
        with pytest.raises((IndexError, TypeError)) as e:
            ds.get_batch(bad)
        assert str(src) in str(e.value) and ".jasper_mmap_store" not in str(e.value)


def test_a_pt_directory_takes_the_converters_options(src):
    emb = load_pt(src / "question_embs.pt")
    emb[2, 0] = np.nan
    torch.save(torch.from_numpy(emb), src / "question_embs.pt")
    with pytest.raises(ValueError, match="NaN or Inf.*allow_nonfinite"):
        JASPERSteeringDataset(src, "train")
    ds = JASPERSteeringDataset(src, "train", allow_nonfinite=True)
    assert torch.isnan(ds.question_embs[2, 0])


def test_create_loader_passes_the_constructor_options(src):
    loader = create_loader(src, "val", 8, storage_format="pt", use_mmap=False)
    assert loader.dataset_obj.use_mmap is False and loader.pin_memory is True


# -- 7. installed names and the import layering --------------------------------------------------


def test_the_converter_installs_under_the_projects_namespace(tmp_path):
    code = (
        "import importlib.util as u, jasper_mmap.converters as c; "
        "print(u.find_spec('converters') is None, c.convert_pt.__module__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert out.stdout.split() == ["True", "jasper_mmap.converters.convert"], out.stderr


def test_library_calls_start_no_child_process(src, tmp_path, monkeypatch):
    """Opening, converting (.pt and HDF5), publishing and loading with threads never fork,
    spawn or exec (a child would re-run unguarded scripts or fail in daemonic workers)."""
    import multiprocessing
    import os as _os

    import h5py  # noqa: F401 - its first import runs `uname -p` (platform); not ours

    def refuse(*a, **k):
        raise AssertionError("library code started a child process")

    for mod, name in (
        (subprocess, "Popen"),
        (_os, "fork"),
        (_os, "posix_spawn"),
        (multiprocessing.Process, "start"),
    ):
        monkeypatch.setattr(mod, name, refuse)
    store = convert_pt(src, tmp_path / "store", progress=False)
    JASPERSteeringDataset.convert_pt_to_hdf5(src)
    ds = JASPERSteeringDataset(src, "train")  # converts dataset.h5 into a store
    from jasper_mmap import publish_negatives

    publish_negatives(store, load_pt(src / "hard_negatives.pt"), load_pt(src / "negative_tiers.pt"))
    assert sum(len(b["relevance"]) for b in create_loader(store, "train", 8, num_workers=3)) > 0
    assert len(ds.get_batch([0, 1])["relevance"]) == 2


def test_a_symlink_loop_among_the_source_files_counts_as_changed(tmp_path):
    from jasper_mmap.sources.fingerprints import changed

    loop = tmp_path / "pair_index.pt"
    loop.symlink_to(loop)
    assert changed(loop, {"size": 1, "mtime_ns": 1, "head_tail_blake2b": "x"})
    assert changed(str(tmp_path / "a\0b"), {"size": 1})
