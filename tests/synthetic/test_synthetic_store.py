"""make_store: a synthetic store written block by block, consistent with the seeds' semantics."""

from __future__ import annotations

import numpy as np
import pytest

from jasper_mmap import create_loader, open_store, validate_first_batch
from jasper_mmap.errors import StoreExistsError
from jasper_mmap.loading.loader import first_batch_summary
from jasper_mmap.synthetic.large import _BLOCK, make_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    # more than two blocks, so block boundaries are exercised
    return make_store(
        tmp_path_factory.mktemp("ss") / "s",
        2 * _BLOCK + 1000,
        dim=8,
        n_neg=6,
        n_clusters=5,
        n_keywords=50,
    )


def test_store_is_consistent(store):
    s = open_store(store)
    c = s.counts
    P = c["n_pairs"]
    assert (P, c["n_questions"], c["n_sources"]) == (2 * _BLOCK + 1000, P // 2, P)
    pi = s.read("pair_index")
    np.testing.assert_array_equal(pi[:, 1], np.arange(P))
    np.testing.assert_array_equal(pi[:, 0], np.arange(P) // 2)
    cluster = s.read("pair_cluster_id")
    negs, tiers = s.read("hard_negatives"), s.read("negative_tiers")
    assert (negs != np.arange(P)[:, None]).all()  # never the target itself
    assert set(np.unique(tiers)) == {1, 2, 3, 4}
    same = cluster[negs] == cluster[:, None]
    assert same[tiers == 1].all() and not same[tiers == 4].any()
    np.testing.assert_array_equal(s.read("steering_centroid"), s.read("centroid_embs")[cluster])
    splits = [s.read(f"{n}_idx") for n in ("train", "val", "test")]
    assert sum(map(len, splits)) == P and len(np.unique(np.concatenate(splits))) == P
    off = s.read("pair_keyword_offsets")
    assert off[0] == 0 and off[-1] == c["n_keyword_values"] and (np.diff(off) >= 0).all()
    q, src = s.read("question_embs"), s.read("source_embs")
    cos = (q[pi[:, 0]] * src).sum(1)
    assert cos.mean() > 0.8  # a question sits near its target
    assert np.allclose(np.linalg.norm(src, axis=1), 1, atol=1e-5)


def test_loader_serves_it_and_it_is_deterministic(store, tmp_path):
    loader = create_loader(store, "train", 64)
    assert validate_first_batch(loader) is True
    assert first_batch_summary(loader)["batch_size"] == 64
    again = make_store(
        tmp_path / "again", 2 * _BLOCK + 1000, dim=8, n_neg=6, n_clusters=5, n_keywords=50
    )
    for f in ("embeddings.safetensors", "steering.safetensors", "pairs.safetensors"):
        assert (store / f).read_bytes() == (again / f).read_bytes()
    with pytest.raises(StoreExistsError, match="already exists"):
        make_store(again, 100, dim=8)
    sparse = make_store(
        tmp_path / "sparse", 1000, dim=8, n_neg=6, n_clusters=5, n_keywords=50, sparse_train=True
    )
    train = open_store(sparse).read("train_idx")
    assert len(train) == 100 and train.max() > 900  # a tenth of the pairs, spread over the store


def test_pt_dir_of_the_same_data_converts_to_the_same_store(tmp_path, store):
    import torch

    from jasper_mmap.converters import convert_pt
    from jasper_mmap.synthetic.large import make_pt_dir

    src = make_pt_dir(
        tmp_path / "pt", 2 * _BLOCK + 1000, dim=8, n_neg=6, n_clusters=5, n_keywords=50
    )
    t = torch.load(src / "source_embs.pt", weights_only=True)  # torch reads the streamed archive
    assert t.shape == (2 * _BLOCK + 1000, 8) and t.dtype == torch.float32
    converted = open_store(convert_pt(src, tmp_path / "converted", progress=False))
    direct = open_store(store)
    for name in direct.names():
        assert converted.read(name).tobytes() == direct.read(name).tobytes(), name


def test_every_file_of_a_pt_dir_is_read_by_torch_load(tmp_path):
    """make_pt_dir (make_synthetic.py's default) writes files the original dataset can load:
    torch.load(weights_only=True) reads each one, pair_keyword_ids.pt included, and the keyword
    lists it gives are the ones the converter stores."""
    import torch

    from jasper_mmap.converters import convert_pt
    from jasper_mmap.synthetic.large import make_pt_dir

    src = make_pt_dir(tmp_path / "pt", 2100, dim=8, n_neg=6, n_clusters=5, n_keywords=50)
    for f in sorted(src.glob("*.pt")):
        torch.load(f, weights_only=True)  # raises on a file torch cannot read
    lists = torch.load(src / "pair_keyword_ids.pt", weights_only=True)
    assert (
        isinstance(lists, list) and len(lists) == 2100 and all(isinstance(r, list) for r in lists)
    )
    store = open_store(convert_pt(src, tmp_path / "s", progress=False))
    offsets, values = store.read("pair_keyword_offsets"), store.read("pair_keyword_values")
    assert [len(r) for r in lists] == np.diff(offsets).tolist()
    assert [v for r in lists for v in r] == values.tolist()
