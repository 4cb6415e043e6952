"""convert_pt on broken inputs: one test per bad input of docs/dataset_format.md's refusals.

Every failing conversion must raise the specific error class with a message that names the
offending file and the problem, and must leave nothing behind: no destination store and no
hidden ``.partial`` directory beside it. Inputs that docs/dataset_format.md says are legitimate (float16 or
float64 embeddings, a missing test split, plain-pickle keyword ids) must convert and round-trip.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import pickletools
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from jasper_mmap import open_store
from jasper_mmap.converters import convert_pt
from jasper_mmap.errors import (
    ArtifactError,
    ArtifactMissingError,
    ConfigError,
    JasperError,
    StoreExistsError,
)
from jasper_mmap.synthetic import SyntheticSpec, make_pt_dataset

SPEC = SyntheticSpec().resolved()
N_P, N_Q, N_S, N_K, N_C, D, N_NEG = (
    SPEC.n_pairs,
    SPEC.n_questions,
    SPEC.n_sources,
    SPEC.n_keywords,
    SPEC.n_clusters,
    SPEC.dim,
    SPEC.n_neg,
)


# -- helpers ---------------------------------------------------------------------------------


def make_src(tmp_path: Path, **kw) -> Path:
    """Build a valid tiny dataset in ``tmp_path/src`` (tests then break one file)."""
    return make_pt_dataset(tmp_path / "src", SyntheticSpec(), **kw)


def pt(src: Path, name: str) -> Path:
    return src / f"{name}.pt"


def load(src: Path, name: str):
    return torch.load(pt(src, name), weights_only=True)


def save(src: Path, name: str, obj) -> None:
    torch.save(obj, pt(src, name))


def edit(src: Path, name: str, fn) -> torch.Tensor:
    """Load tensor ``name``, apply ``fn`` to a copy in place, save it back; return the copy."""
    t = load(src, name).clone()
    fn(t)
    save(src, name, t)
    return t


def edit_config(src: Path, **changes) -> None:
    path = src / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def convert(tmp_path: Path, **kw) -> Path:
    return convert_pt(tmp_path / "src", tmp_path / "store", progress=False, **kw)


def assert_nothing_left(tmp_path: Path) -> None:
    assert not (tmp_path / "store").exists()
    assert list(tmp_path.glob(".*partial*")) == []


def expect_error(tmp_path: Path, exc: type[Exception], path: Path, problem: str, **kw):
    """Convert ``tmp_path/src``; assert ``exc`` naming ``path`` then ``problem`` (a regex)."""
    pattern = "(?s)" + re.escape(str(path)) + ".*(?:" + problem + ")"
    with pytest.raises(exc, match=pattern) as info:
        convert(tmp_path, **kw)
    assert type(info.value) is exc, f"expected exactly {exc.__name__}, got {info.type.__name__}"
    assert_nothing_left(tmp_path)
    return info.value


def expect_notice(tmp_path: Path, path: Path, problem: str, caplog) -> dict:
    """Convert ``tmp_path/src``: it succeeds, and one warning naming ``path`` then ``problem``
    (a regex) is logged and recorded in the manifest (unusual input the in-RAM dataset took)."""
    pattern = re.compile("(?s)" + re.escape(str(path)) + ".*(?:" + problem + ")")
    with caplog.at_level(logging.WARNING):
        store = convert(tmp_path)
    recorded = open_store(store).manifest["warnings"]
    assert [w for w in recorded if pattern.search(w)], recorded
    assert pattern.search(caplog.text), caplog.text
    return open_store(store)


class Evil:
    """Unpickling this runs ``touch marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# -- error classes ---------------------------------------------------------------------------


def test_error_classes_subclass_builtins():
    assert issubclass(ArtifactMissingError, FileNotFoundError)
    assert issubclass(ArtifactError, ValueError)
    assert issubclass(ConfigError, ValueError)
    assert issubclass(StoreExistsError, FileExistsError)
    for cls in (ArtifactMissingError, ArtifactError, ConfigError, StoreExistsError):
        assert issubclass(cls, JasperError)
    assert not issubclass(ArtifactError, FileNotFoundError)
    # missing files are ValueErrors too: the in-RAM dataset raised ValueError for them
    assert issubclass(ArtifactMissingError, ValueError)


# -- missing files ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["source_embs", "question_embs", "pair_keyword_ids", "train_idx", "negative_tiers"],
)
def test_missing_required_file(tmp_path, name):
    src = make_src(tmp_path)
    pt(src, name).unlink()
    expect_error(tmp_path, ArtifactMissingError, pt(src, name), "required artifact is missing")


def test_every_missing_required_file_is_named_in_one_error(tmp_path):
    """Not one file a run: a directory with config.json and question_embs.pt only names all
    fourteen others at once (the optional val/test splits are not asked for)."""
    src = make_src(tmp_path)
    keep = {"config.json", "question_embs.pt"}
    for p in src.iterdir():
        if p.name not in keep:
            p.unlink()
    missing = [
        "source_embs.pt", "keyword_embs.pt", "centroid_embs.pt", "pair_index.pt",
        "pair_cluster_id.pt", "pair_relevance.pt", "centroid_distances.pt",
        "pair_keyword_ids.pt", "steering_centroid.pt", "steering_keyword_weighted.pt",
        "steering_residual.pt", "train_idx.pt", "hard_negatives.pt", "negative_tiers.pt",
    ]  # fmt: skip
    err = expect_error(tmp_path, ArtifactMissingError, src, "14 required artifacts are missing")
    message = str(err)
    assert all(name in message for name in missing), message
    assert "question_embs.pt" not in message and "val_idx" not in message
    assert "Re-run the dataset builder or copy the files" in message


@pytest.mark.parametrize("source", ["auto", "pt"])
def test_a_folder_of_foreign_pt_files_says_what_it_holds_and_what_is_expected(tmp_path, source):
    """``convert-pt ./unrelated x``: a .pt file IS there, so "expected *.pt files" misleads."""
    src = tmp_path / "src"
    src.mkdir()
    torch.save(torch.zeros(3, 4), src / "weights.pt")
    (src / "config.json").write_text('{"model_type": "bert"}')
    start = "No dataset files found in" if source == "auto" else "PT files not found in"
    err = expect_error(
        tmp_path, ArtifactMissingError, src, "it holds config.json, weights.pt", source=source
    )
    message = str(err)
    assert message.startswith(f"{start} {src}"), message  # the in-RAM dataset's words first
    assert "weights.pt is not among the dataset's files" in message
    assert "question_embs.pt" in message and "negative_tiers.pt" in message
    assert ("dataset.h5" in message) == (source == "auto")
    assert "Expected either dataset.h5 or *.pt files" not in message


def test_missing_optional_test_split_converts(tmp_path):
    src = make_src(tmp_path)
    pt(src, "test_idx").unlink()
    dst = convert(tmp_path)
    with open_store(dst) as store:
        assert not store.has("test_idx")
        assert "test_idx" not in store.names()
        assert store.has("train_idx") and store.has("val_idx")
        assert set(store.manifest["splits"]) == {"train", "val"}
        np.testing.assert_array_equal(store.read("val_idx"), load(src, "val_idx").numpy())
    assert list(tmp_path.glob(".*partial*")) == []


# -- config.json -----------------------------------------------------------------------------


def test_config_missing(tmp_path):
    src = make_src(tmp_path)
    (src / "config.json").unlink()
    expect_error(tmp_path, ArtifactMissingError, src / "config.json", "config.json is missing")


def test_config_invalid_json(tmp_path):
    src = make_src(tmp_path)
    (src / "config.json").write_text('{"embedding_dim": 16, "n_neg": ')
    expect_error(tmp_path, ConfigError, src / "config.json", "is not valid JSON")


def test_config_not_an_object(tmp_path):
    src = make_src(tmp_path)
    (src / "config.json").write_text("[16, 6]")
    expect_error(tmp_path, ConfigError, src / "config.json", "should be a JSON object.*list")


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("embedding_dim", "16", r"embedding_dim should be a non-negative integer.*'16'"),
        ("n_neg", 6.0, r"n_neg should be a non-negative integer.*6\.0"),
        ("n_pairs", -1, r"n_pairs should be a non-negative integer.*-1"),
        ("random_seed", True, r"random_seed should be a non-negative integer.*True"),
        ("steering_probabilities", [0.25] * 4, "steering_probabilities should be a JSON object"),
        ("curriculum", "linear", "curriculum should be a JSON object"),
    ],
)
def test_config_wrong_types(tmp_path, key, value, problem):
    src = make_src(tmp_path)
    edit_config(src, **{key: value})
    expect_error(tmp_path, ConfigError, src / "config.json", problem)


@pytest.mark.parametrize(
    ("probs", "curriculum", "epoch"),
    [
        ({"zero": 1.0, "centroid": 1.0, "keyword": 0.0, "residual": 0.0}, None, 0),
        ({"zero": -0.5, "centroid": 1.5, "keyword": 0.0, "residual": 0.0}, None, 0),
        # fine at epoch 0, not at the curriculum's end, where a run stays
        (
            {"zero": 0.5, "centroid": 0.5, "keyword": 0.0, "residual": 0.0},
            {"zero_prob_start": 0.5, "zero_prob_end": 1.5, "epochs_total": 10},
            10,
        ),
        # the formula's end: epochs_total 0 counts as 1; 10.5 is reached at epoch 11
        (
            {"zero": 0.5, "centroid": 0.5, "keyword": 0.0, "residual": 0.0},
            {"zero_prob_end": 1.5, "epochs_total": 0},
            1,
        ),
        (
            {"zero": 0.5, "centroid": 0.5, "keyword": 0.0, "residual": 0.0},
            {"zero_prob_end": 1.01, "epochs_total": 10.5},
            11,
        ),
    ],
    ids=["sum-2", "negative", "bad-at-the-curriculum-end", "epochs_total-0", "fractional-end"],
)
def test_probabilities_the_draw_cannot_use_are_refused(tmp_path, probs, curriculum, epoch):
    """A store made from them would not open (the dataset checks them at construction)."""
    src = make_src(tmp_path)
    edit_config(src, steering_probabilities=probs, curriculum=curriculum)
    err = expect_error(
        tmp_path, ConfigError, src / "config.json", f"at epoch {epoch}: steering probabilities"
    )
    assert "Fix steering_probabilities/curriculum in that config.json" in str(err)
    assert "assign" not in str(err)  # nothing can be assigned before the dataset exists


def test_missing_steering_probabilities_are_refused(tmp_path):
    src = make_src(tmp_path)
    config = json.loads((src / "config.json").read_text())
    config.pop("steering_probabilities")
    (src / "config.json").write_text(json.dumps(config))
    expect_error(tmp_path, ConfigError, src / "config.json", "steering_probabilities should be")


def test_an_endless_curriculum_converts(tmp_path):
    """epochs_total: Infinity (JSON as Python reads it) stays at its start; no OverflowError."""
    src = make_src(tmp_path)
    edit_config(src, curriculum={"zero_prob_start": 0.5, "epochs_total": float("inf")})
    assert (convert(tmp_path) / "manifest.json").is_file()


@pytest.mark.parametrize(
    ("key", "file", "rows"),
    [
        ("n_questions", "question_embs.pt", N_Q),
        ("n_sources", "source_embs.pt", N_S),
        ("n_keywords", "keyword_embs.pt", N_K),
        ("n_clusters", "centroid_embs.pt", N_C),
        ("n_pairs", "pair_index.pt", N_P),
    ],
)
def test_config_count_disagrees_with_file(tmp_path, key, file, rows, caplog):
    """The in-RAM dataset never read these counts: a notice, and the files are the truth."""
    src = make_src(tmp_path)
    edit_config(src, **{key: rows + 1})
    store = expect_notice(
        tmp_path,
        src / "config.json",
        rf"{key}={rows + 1}.*{re.escape(file)} has {rows} rows",
        caplog,
    )
    assert store.counts[key] == rows


def test_config_wrong_n_neg(tmp_path):
    src = make_src(tmp_path)
    edit_config(src, n_neg=N_NEG + 2)
    expect_error(
        tmp_path,
        ConfigError,
        src / "config.json",
        rf"n_neg={N_NEG + 2}.*hard_negatives\.pt has {N_NEG} negatives per pair",
    )


def test_counts_may_be_missing_from_config(tmp_path):
    """docs/dataset_format.md: n_* counts are informative and may be missing; the files are the truth."""
    src = make_src(tmp_path)
    config = json.loads((src / "config.json").read_text())
    for key in ("n_pairs", "n_questions", "n_sources", "n_keywords", "n_clusters", "n_neg"):
        del config[key]
    (src / "config.json").write_text(json.dumps(config))
    with open_store(convert(tmp_path)) as store:
        assert store.counts["n_pairs"] == N_P and store.counts["n_neg"] == N_NEG


# -- embeddings: dtypes, dimensions, non-finite rows -----------------------------------------


def test_embedding_dim_of_one_file_disagrees(tmp_path):
    src = make_src(tmp_path)
    save(src, "keyword_embs", load(src, "keyword_embs")[:, : D // 2].contiguous())
    expect_error(
        tmp_path,
        ArtifactError,
        src,
        rf"embedding dimensions disagree.*embedding_dim={D}.*'keyword_embs\.pt': {D // 2}",
    )


def test_config_embedding_dim_disagrees_with_files(tmp_path):
    src = make_src(tmp_path)
    edit_config(src, embedding_dim=D * 2)
    expect_error(tmp_path, ConfigError, src / "config.json", rf"embedding_dim={D * 2}.*{D}")


def test_float16_embeddings_convert(tmp_path):
    src = make_src(tmp_path)
    half = load(src, "source_embs").half()
    save(src, "source_embs", half)
    with open_store(convert(tmp_path)) as store:
        got = store.gather("source_embs", np.arange(N_S))
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, half.float().numpy())
        other = store.gather("question_embs", np.arange(N_Q))
        np.testing.assert_array_equal(other, load(src, "question_embs").numpy())


def test_float64_embeddings_cast_with_warning(tmp_path, caplog):
    src = make_src(tmp_path)
    wide = load(src, "question_embs").double() + 1e-12  # bits below float32 precision
    save(src, "question_embs", wide)
    with caplog.at_level(logging.WARNING):
        dst = convert(tmp_path)
    warned = [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and str(pt(src, "question_embs")) in r.getMessage()
    ]
    assert len(warned) == 1, caplog.text
    assert re.search("float64.*float32", warned[0].getMessage())
    with open_store(dst) as store:
        got = store.gather("question_embs", np.arange(N_Q))
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, wide.numpy().astype(np.float32))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", ["source_embs", "steering_residual"])
def test_nonfinite_rows_refused(tmp_path, name, bad):
    src = make_src(tmp_path)

    def poison(t):
        t[4, 3] = bad
        t[9, 0] = bad

    edit(src, name, poison)
    expect_error(
        tmp_path, ArtifactError, pt(src, name), r"rows \[4, 9\] hold NaN or Inf.*allow.nonfinite"
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_rows_convert_when_allowed(tmp_path, bad):
    src = make_src(tmp_path)

    def poison(t):
        t[4, 3] = bad

    want = edit(src, "source_embs", poison).numpy()
    with open_store(convert(tmp_path, allow_nonfinite=True)) as store:
        got = store.gather("source_embs", np.arange(N_S))
        np.testing.assert_array_equal(got, want)  # NaN == NaN position-wise here
        assert not np.isfinite(got[4, 3]) and np.isfinite(np.delete(got, 4, axis=0)).all()
        assert store.entry("source_embs")["stats"]["nonfinite_rows"] == 1
    assert list(tmp_path.glob(".*partial*")) == []


def test_integer_embeddings_refused(tmp_path):
    src = make_src(tmp_path)
    save(src, "centroid_embs", torch.ones(N_C, D, dtype=torch.int64))
    expect_error(
        tmp_path, ArtifactError, pt(src, "centroid_embs"), "should hold a float dtype.*int64"
    )


# -- unreadable, unsafe and legacy files -----------------------------------------------------


@pytest.mark.parametrize("name", ["question_embs", "pair_keyword_ids"])
@pytest.mark.parametrize("saver", ["torch", "pickle"])
def test_malicious_pickle_not_executed(tmp_path, name, saver):
    src = make_src(tmp_path)
    marker = tmp_path / "pwned"
    # the payload is live: unpickling it for real would create its marker
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Evil(control)))
    assert control.exists()

    if saver == "torch":
        torch.save(Evil(marker), pt(src, name))
    else:
        with open(pt(src, name), "wb") as f:
            pickle.dump(Evil(marker), f, protocol=4)
    if name == "pair_keyword_ids":
        problem = "should be a list of lists of int.*nothing was executed"
    elif saver == "torch":
        problem = "refused to load.*was not executed"
    else:
        problem = r"is a plain pickle, not a torch archive \(it was not unpickled\)"
    expect_error(tmp_path, ArtifactError, pt(src, name), problem)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["source_embs", "pair_keyword_ids"])
def test_zip_that_is_not_a_torch_archive(tmp_path, name):
    src = make_src(tmp_path)
    with zipfile.ZipFile(pt(src, name), "w") as z:
        z.writestr("notes/readme.txt", "not a tensor")
    expect_error(tmp_path, ArtifactError, pt(src, name), "zip file but not a torch archive")


@pytest.mark.parametrize("name", ["source_embs", "hard_negatives", "val_idx", "pair_keyword_ids"])
def test_truncated_torch_archive(tmp_path, name):
    src = make_src(tmp_path)
    data = pt(src, name).read_bytes()
    pt(src, name).write_bytes(data[: len(data) // 2])
    expect_error(tmp_path, ArtifactError, pt(src, name), "truncated")


def _plain_pickle_cut(data: bytes, where: str) -> int:
    """A cut point past the middle of a (trusted) pickle: before an opcode, or inside the
    one-byte argument of a BININT1 opcode."""
    for op, _, pos in pickletools.genops(data):
        if pos >= len(data) // 2 and op.name == "BININT1":
            return pos if where == "between_opcodes" else pos + 1
    raise AssertionError("no BININT1 opcode in the second half of the pickle")


@pytest.mark.parametrize("where", ["between_opcodes", "inside_argument"])
def test_truncated_plain_pickle_keyword_ids(tmp_path, where):
    src = make_src(tmp_path, keyword_pickle=True)
    path = pt(src, "pair_keyword_ids")
    data = path.read_bytes()
    path.write_bytes(data[: _plain_pickle_cut(data, where)])
    expect_error(tmp_path, ArtifactError, path, "truncated")


@pytest.mark.parametrize("name", ["source_embs", "pair_index", "pair_keyword_ids"])
def test_random_bytes(tmp_path, name):
    src = make_src(tmp_path)
    junk = b"\x00JUNK" + np.random.default_rng(0).bytes(4096)
    pt(src, name).write_bytes(junk)
    expect_error(tmp_path, ArtifactError, pt(src, name), "(not|neither) a torch archive")


def test_empty_file(tmp_path):
    src = make_src(tmp_path)
    pt(src, "centroid_embs").write_bytes(b"")
    expect_error(tmp_path, ArtifactError, pt(src, "centroid_embs"), r"is empty \(0 bytes\)")


@pytest.mark.parametrize("name", ["source_embs", "train_idx", "pair_keyword_ids"])
def test_legacy_format_file(tmp_path, name):
    src = make_src(tmp_path)
    torch.save(load(src, name), pt(src, name), _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(pt(src, name))
    expect_error(tmp_path, ArtifactError, pt(src, name), r"legacy format.*torch\.save")


def test_file_holding_a_dict_not_a_tensor(tmp_path):
    src = make_src(tmp_path)
    save(src, "pair_relevance", {"relevance": load(src, "pair_relevance")})
    expect_error(tmp_path, ArtifactError, pt(src, "pair_relevance"), "should hold one tensor.*dict")


# -- keyword ids -----------------------------------------------------------------------------


def keyword_lists(store) -> list[list[int]]:
    offsets = store.read("pair_keyword_offsets")
    values = store.read("pair_keyword_values")
    return [values[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


def test_plain_pickle_keyword_ids_convert_and_round_trip(tmp_path):
    src = make_src(tmp_path, keyword_pickle=True)
    assert not zipfile.is_zipfile(pt(src, "pair_keyword_ids"))
    with open(pt(src, "pair_keyword_ids"), "rb") as f:
        want = pickle.load(f)  # written by make_pt_dataset just above: trusted
    assert len(want) == N_P and any(want) and not all(want)
    with open_store(convert(tmp_path)) as store:
        assert keyword_lists(store) == want
        assert store.counts["n_keyword_values"] == sum(map(len, want))


def _first_nonempty(lists: list[list[int]], after: int) -> int:
    return next(i for i in range(after, len(lists)) if lists[i])


@pytest.mark.parametrize(
    "bad",
    [
        N_K,
        -1,
        2**63,
        -(2**63) - 1,
    ],
)
def test_keyword_id_out_of_range(tmp_path, bad):
    src = make_src(tmp_path)
    lists = load(src, "pair_keyword_ids")
    lists[_first_nonempty(lists, 50)][0] = bad
    save(src, "pair_keyword_ids", lists)
    problem = rf"keyword.*\[0, {N_K}\).*hold \[{bad}\]"
    if not -(2**63) <= bad < 2**63:
        problem += "|integer too large for int64"
    expect_error(tmp_path, ArtifactError, pt(src, "pair_keyword_ids"), problem)


def test_keyword_id_out_of_range_names_the_pair(tmp_path):
    src = make_src(tmp_path)
    lists = load(src, "pair_keyword_ids")
    row = _first_nonempty(lists, 100)
    flat = sum(map(len, lists[:row]))
    assert flat != row
    lists[row][0] = N_K
    save(src, "pair_keyword_ids", lists)
    err = expect_error(tmp_path, ArtifactError, pt(src, "pair_keyword_ids"), rf"pairs? \[?{row}\b")
    assert not re.search(rf"\b{flat}\b", str(err))


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ("inner", r"list of lists of int.*opcode"),
        ("outer", r"list of lists of int.*opcode"),
        ("floats", r"list of lists of int.*opcode"),
    ],
)
def test_keyword_ids_not_ints(tmp_path, payload, problem):
    src = make_src(tmp_path)
    lists = load(src, "pair_keyword_ids")
    if payload == "inner":
        lists[7] = [str(v) for v in lists[7]] or ["kw"]
    elif payload == "outer":
        lists[7] = "7"
    else:
        lists[7] = [1.0]
    save(src, "pair_keyword_ids", lists)
    expect_error(tmp_path, ArtifactError, pt(src, "pair_keyword_ids"), problem)


def test_keyword_ids_saved_as_tensor(tmp_path):
    src = make_src(tmp_path)
    save(src, "pair_keyword_ids", torch.zeros(N_P, 3, dtype=torch.int64))
    expect_error(
        tmp_path,
        ArtifactError,
        pt(src, "pair_keyword_ids"),
        "list of lists of int.*holds tensor data",
    )


def test_keyword_ids_wrong_number_of_lists(tmp_path):
    src = make_src(tmp_path)
    save(src, "pair_keyword_ids", load(src, "pair_keyword_ids")[:-1])
    expect_error(
        tmp_path,
        ArtifactError,
        pt(src, "pair_keyword_ids"),
        rf"one list per pair \({N_P}.*holds {N_P - 1}",
    )


# -- index ranges ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "where", "problem"),
    [
        ("pair_index", (3, 0), r"question rows \(column 0\) should be in \[0, {N_Q}\)"),
        ("pair_index", (3, 1), r"source rows \(column 1\) should be in \[0, {N_S}\)"),
        ("hard_negatives", (3, 2), r"negative source rows should be in \[0, {N_S}\)"),
        ("pair_cluster_id", (3,), r"cluster ids should be in \[0, {N_C}\)"),
        ("val_idx", (3,), r"pair indices should be in \[0, {N_P}\)"),
    ],
)
def test_negative_index(tmp_path, name, where, problem):
    src = make_src(tmp_path)

    def put(t):
        t[where] = -1

    edit(src, name, put)
    problem = problem.format(N_Q=N_Q, N_S=N_S, N_C=N_C, N_P=N_P)
    expect_error(tmp_path, ArtifactError, pt(src, name), rf"{problem}.*rows \[3\] hold")


def test_pair_question_past_n_questions(tmp_path):
    src = make_src(tmp_path)
    edit(src, "pair_index", lambda t: t.__setitem__((7, 0), N_Q))
    expect_error(
        tmp_path,
        ArtifactError,
        pt(src, "pair_index"),
        rf"question rows \(column 0\) should be in \[0, {N_Q}\).*rows \[7\] hold \[{N_Q}\]",
    )


def test_pair_target_past_n_sources(tmp_path):
    src = make_src(tmp_path)
    edit(src, "pair_index", lambda t: t.__setitem__((7, 1), N_S + 5))
    expect_error(
        tmp_path,
        ArtifactError,
        pt(src, "pair_index"),
        rf"source rows \(column 1\) should be in \[0, {N_S}\).*rows \[7\] hold \[{N_S + 5}\]",
    )


def test_negative_past_n_sources(tmp_path):
    src = make_src(tmp_path)
    edit(src, "hard_negatives", lambda t: t.__setitem__((11, 2), N_S))
    expect_error(
        tmp_path,
        ArtifactError,
        pt(src, "hard_negatives"),
        rf"negative source rows should be in \[0, {N_S}\).*rows \[11\] hold",
    )


def test_split_index_past_n_pairs(tmp_path):
    src = make_src(tmp_path)
    edit(src, "train_idx", lambda t: t.__setitem__(5, N_P))
    expect_error(
        tmp_path,
        ArtifactError,
        pt(src, "train_idx"),
        rf"pair indices should be in \[0, {N_P}\).*rows \[5\] hold \[{N_P}\]",
    )


def test_cluster_id_past_n_clusters(tmp_path):
    src = make_src(tmp_path)
    edit(src, "pair_cluster_id", lambda t: t.__setitem__(2, N_C))
    expect_error(
        tmp_path,
        ArtifactError,
        pt(src, "pair_cluster_id"),
        rf"cluster ids should be in \[0, {N_C}\).*rows \[2\] hold \[{N_C}\]",
    )


@pytest.mark.parametrize("tier", [0, 5, -1])
def test_tier_outside_1_to_4(tmp_path, tier, caplog):
    """Tiers are labels the in-RAM dataset passed through: kept as they are, with a notice."""
    src = make_src(tmp_path)
    edit(src, "negative_tiers", lambda t: t.__setitem__((6, 1), tier))
    store = expect_notice(
        tmp_path, pt(src, "negative_tiers"), r"tiers outside \[1, 4\].*rows \[6\]", caplog
    )
    assert store.read("negative_tiers")[6, 1] == tier


@pytest.mark.parametrize("value", [1.5, -0.25])
def test_relevance_outside_0_1(tmp_path, value, caplog):
    src = make_src(tmp_path)
    edit(src, "pair_relevance", lambda t: t.__setitem__(8, value))
    store = expect_notice(
        tmp_path,
        pt(src, "pair_relevance"),
        rf"relevance values outside \[0\.0, 1\.0\].*rows \[8\] hold \[{value}\]",
        caplog,
    )
    assert store.read("pair_relevance")[8] == pytest.approx(value)


def test_centroid_distance_outside_0_2(tmp_path, caplog):
    src = make_src(tmp_path)
    edit(src, "centroid_distances", lambda t: t.__setitem__(8, 2.5))
    expect_notice(
        tmp_path,
        pt(src, "centroid_distances"),
        r"centroid distances outside \[0\.0, 2\.0\].*rows \[8\] hold \[2\.5\]",
        caplog,
    )


# -- splits ----------------------------------------------------------------------------------


def test_empty_split(tmp_path):
    src = make_src(tmp_path)
    save(src, "val_idx", torch.empty(0, dtype=torch.int64))
    expect_error(tmp_path, ArtifactError, pt(src, "val_idx"), "split is empty")


def test_split_repeating_pairs(tmp_path, caplog):
    """The in-RAM dataset served a repeated pair twice per epoch; so does the store."""
    src = make_src(tmp_path)
    t = load(src, "train_idx").clone()
    t[10] = t[3]
    save(src, "train_idx", t)
    store = expect_notice(
        tmp_path, pt(src, "train_idx"), rf"split repeats pairs.*pairs \[{int(t[3])}\]", caplog
    )
    assert store.read("train_idx")[10] == store.read("train_idx")[3]


# -- shapes ----------------------------------------------------------------------------------


def test_pair_level_file_with_wrong_row_count(tmp_path):
    src = make_src(tmp_path)
    save(src, "steering_residual", load(src, "steering_residual")[:-1].contiguous())
    expect_error(
        tmp_path,
        ArtifactError,
        pt(src, "steering_residual"),
        rf"should have {N_P} rows.*has {N_P - 1}",
    )


def test_negative_tiers_shape_differs_from_negatives(tmp_path):
    src = make_src(tmp_path)
    save(src, "negative_tiers", load(src, "negative_tiers")[:, :-1].contiguous())
    expect_error(
        tmp_path,
        ArtifactError,
        pt(src, "negative_tiers"),
        rf"shape \[{N_P}, {N_NEG - 1}\] should equal hard_negatives' \[{N_P}, {N_NEG}\]",
    )


# -- a failed conversion never harms an existing store ---------------------------------------


def test_failed_overwrite_keeps_existing_store(tmp_path):
    src = make_src(tmp_path)
    dst = convert(tmp_path)
    manifest = (dst / "manifest.json").read_bytes()
    with open_store(dst) as store:
        before = store.gather("source_embs", np.arange(N_S))
    edit(src, "hard_negatives", lambda t: t.__setitem__((0, 0), N_S))
    with pytest.raises(ArtifactError, match=re.escape(str(pt(src, "hard_negatives")))):
        convert(tmp_path, overwrite=True)
    assert (dst / "manifest.json").read_bytes() == manifest
    with open_store(dst) as store:
        np.testing.assert_array_equal(store.gather("source_embs", np.arange(N_S)), before)
    assert list(tmp_path.glob(".*partial*")) == []
    with pytest.raises(StoreExistsError, match=re.escape(str(dst))):
        convert(tmp_path)


def test_uint64_index_above_int64_is_named_not_shown_negative(tmp_path):
    src = make_src(tmp_path)
    arr = load(src, "hard_negatives").numpy().astype(np.uint64)
    arr[4, 2] = 2**63 + 5
    save(src, "hard_negatives", torch.from_numpy(arr))
    err = expect_error(
        tmp_path, ArtifactError, pt(src, "hard_negatives"), r"rows \[4\] hold uint64"
    )
    assert "-" not in str(err).split("hold")[0][-12:]


def test_a_bad_keyword_file_fails_before_the_tables_are_streamed(tmp_path, monkeypatch):
    """The keyword thread's error is raised at the next block, not after every table."""
    import jasper_mmap.converters.convert as conv

    src = make_src(tmp_path)
    torch.save([[0, 1], "not a list"] + [[1]] * (N_P - 2), pt(src, "pair_keyword_ids"))
    streamed, real = [], conv._stream_tensor

    def counting(p, run):
        streamed.append(p.spec.name)
        import time

        time.sleep(0.05)  # give the keyword thread time to fail
        return real(p, run)

    monkeypatch.setattr(conv, "_stream_tensor", counting)
    expect_error(tmp_path, ArtifactError, pt(src, "pair_keyword_ids"), "list of lists of int")
    assert len(streamed) <= 3, streamed  # the embeddings unit alone has 4 tables
