"""Joined rows (NOTE [joined rows] in jasper_mmap/dataset/batches.py): where the store keeps the question and source
rows back to back in one file, and the three steering tables too, a batch reads its embedding
rows with two gathers into one block. The bytes are those of one gather per array, for every
variant, in the loop's thread (torch) and in a gather thread (numpy); a kept output is never
overwritten; stores that do not join (zarr, float16) read one array at a time."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from test_batch_plans import BATCHES, same

from jasper_mmap import JASPERSteeringDataset, open_store
from jasper_mmap.converters import convert_pt
from jasper_mmap.dataset.batches import _EMBEDDINGS
from jasper_mmap.format.spec import STEERING_NAMES
from jasper_mmap.stores import base, mapped

FLOAT_KEYS = ("question_emb", "target_source_emb", "steering", "negative_embs")


def per_array(store_path) -> JASPERSteeringDataset:
    """The dataset reading one gather per array (as a store that joins nothing)."""
    ds = JASPERSteeringDataset(store_path, "train")
    ds._joined_rows = None
    return ds


@pytest.mark.parametrize("names", [_EMBEDDINGS, _EMBEDDINGS[::-1], STEERING_NAMES])
def test_joined_rows_are_each_arrays_rows(store_path, names):
    """Row ``offsets[k] + i`` of the joined rows is row ``i`` of ``names[k]``, with numpy (a
    gather thread) and with torch (the loop's thread); both backends join them (zarr: their
    shards side by side in one range, NOTE [zarr shards as rows])."""
    store = open_store(store_path)
    offsets = store.joined(names)
    assert offsets is not None and len(offsets) == len(names)
    rng = np.random.default_rng(0)
    rows, want = [], []
    for name, at in zip(names, offsets, strict=True):
        idx = rng.integers(0, store.shape(name)[0], 40)
        rows.append(idx + at)
        want.append(store.gather(name, idx))
    rows, want = np.concatenate(rows), np.concatenate(want)
    got = [store.gather_joined_unchecked(names, rows, np.empty_like(want))]
    old = mapped._INTRA_OP_BYTES
    try:
        mapped._INTRA_OP_BYTES = 1  # the loop's thread: torch.index_select
        got.append(store.gather_joined_unchecked(names, rows, np.empty_like(want)))
    finally:
        mapped._INTRA_OP_BYTES = old
    result = []

    def in_a_gather_thread():
        base.mark_gather_thread()
        result.append(store.gather_joined_unchecked(names, rows, np.empty_like(want)))

    thread = threading.Thread(target=in_a_gather_thread)
    thread.start()
    thread.join()
    for out in got + result:
        np.testing.assert_array_equal(out, want)


def test_only_arrays_back_to_back_in_one_file_are_joined(tmp_path, pt_dataset):
    store = open_store(convert_pt(pt_dataset, tmp_path / "s", progress=False))
    assert store.joined(("steering_centroid",)) == (0,)
    assert store.joined(STEERING_NAMES[::2]) is None  # the keyword table lies between them
    assert store.joined(("question_embs", "steering_centroid")) is None  # two files
    assert store.joined(("pair_cluster_id", "pair_relevance")) is None  # not 2-D, two dtypes
    assert store.joined(("hard_negatives",)) is None  # a generation's: replaced by reloads
    f16 = open_store(convert_pt(pt_dataset, tmp_path / "h", dtype="float16", progress=False))
    assert f16.joined(_EMBEDDINGS) is not None  # joined, but float16: a batch widens per array
    ds = JASPERSteeringDataset(f16.path, "train")
    assert ds._joined(ds.store) is None


@pytest.mark.parametrize("variant", [None, "zero", "centroid", "keyword", "residual"])
def test_a_batch_from_joined_rows_is_one_gather_per_array(store_path, variant):
    """get_batch and planned batches, every variant forced and the draw (zero rows where the
    variant is 0): the bytes of the per-array reads."""
    ds, ref = JASPERSteeringDataset(store_path, "train"), per_array(store_path)
    joined = ds._joined(ds.store) is not None
    assert joined  # both backends (zarr: NOTE [zarr shards as rows])
    for d in (ds, ref):
        d.set_epoch(3)
        d.force_steering(variant)
    plan = ds.plan_batches(BATCHES)
    for j, indices in enumerate(BATCHES):
        want = ref.get_batch(indices)
        assert same(ds.get_batch(indices), want), j
        assert same(ds.planned_batch(plan, j), want), j
    variants = torch.cat([ref.get_batch(b)["steering_variant"] for b in BATCHES])
    if variant is None:
        assert {0, 1} <= set(variants.tolist())  # zero rows next to table rows
    steering = torch.cat([ds.get_batch(b)["steering"] for b in BATCHES])
    assert (steering[variants == 0] == 0).all()
    assert (steering[variants != 0] != 0).any() == (variant != "zero")


def test_the_embedding_outputs_share_one_block_and_a_kept_one_stays(tmp_path, pt_dataset):
    """Four outputs, one recycled block: a kept output (a view of it) keeps the block from
    being reused, so later batches never write it."""
    ds = JASPERSteeringDataset(convert_pt(pt_dataset, tmp_path / "s", progress=False), "train")
    batch = ds.get_batch(BATCHES[1])
    b, k, d = batch["negative_embs"].shape
    # targets, negatives, questions, steering: consecutive rows of one block
    keys = ("target_source_emb", "negative_embs", "question_emb", "steering")
    starts = [batch[key].data_ptr() for key in keys]
    rows = [0, b, b * (1 + k), b * (2 + k)]
    assert starts == [starts[0] + r * d * 4 for r in rows]
    kept, part = batch["steering"], batch["negative_embs"][3]  # an output, a view of one
    want, want_part = kept.clone(), part.clone()
    del batch
    other = [i for i in range(len(ds)) if i not in set(BATCHES[1])][: len(BATCHES[1])]
    for _ in range(4):
        for indices in [*BATCHES, other]:  # other: a block of the same shape, other rows
            ds.get_batch(indices)
    assert torch.equal(kept, want)
    assert torch.equal(part, want_part)
    ref = per_array(ds.store_path).get_batch(BATCHES[1])
    assert len({ref[k].untyped_storage().data_ptr() for k in FLOAT_KEYS}) == 3


def test_variant_zero_rows_read_the_first_row_not_their_pairs(tmp_path, pt_dataset):
    """A variant-0 row is zeroed after the gather, so the gather reads the tables' first row
    (a page read every batch) rather than the pair's row: on a store read from disk that row
    would be a read of its own, one nothing asked the kernel for ahead."""
    ds = JASPERSteeringDataset(convert_pt(pt_dataset, tmp_path / "s", progress=False), "train")
    store, seen = ds.store, []
    take = store.gather_joined_unchecked

    def spy(names, idx, out):
        if names == STEERING_NAMES:
            seen.append(idx.copy())
        return take(names, idx, out)

    store.gather_joined_unchecked = spy
    ds.set_epoch(3)
    batch = ds.get_batch(BATCHES[1])
    variants = batch["steering_variant"].numpy()
    assert 0 in variants and (variants > 0).any()
    assert (seen[0][variants == 0] == 0).all()
    pairs = store.gather_unchecked("train_idx", np.asarray(BATCHES[1]))
    offsets, chosen = np.asarray(store.joined(STEERING_NAMES)), variants > 0
    want = offsets[variants[chosen] - 1] + pairs[chosen]
    np.testing.assert_array_equal(seen[0][chosen], want)


def test_a_close_while_the_joined_view_is_made_leaves_batches_right(tmp_path, pt_dataset):
    """A close (another thread's ``ds.close()``) landing between the maps the joined view is
    made of: the view is made again from maps of one opening, never cached as "not joined"
    (which failed every later batch of a dataset that had found the store joined)."""
    path = convert_pt(pt_dataset, tmp_path / "s", progress=False)
    ds, ref = JASPERSteeringDataset(path, "train"), per_array(path)
    want = ref.get_batch(BATCHES[1])
    assert same(ds.get_batch(BATCHES[1]), want)
    store = ds.store
    store.close()
    raw, opened = store.raw, []

    def closing_raw(name, generation=None):
        handle = raw(name, generation)
        opened.append(name)
        if name == "question_embs" and opened.count(name) == 1:
            store.close()  # lands after the first map of the joined view was opened
        return handle

    store.raw = closing_raw
    try:
        assert same(ds.get_batch(BATCHES[1]), want)
    finally:
        store.raw = raw
    for _ in range(2):
        assert same(ds.get_batch(BATCHES[1]), want)
    assert store.joined(_EMBEDDINGS) is not None
