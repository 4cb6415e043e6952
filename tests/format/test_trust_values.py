"""Values in config.json and the files that used to escape as raw exceptions (issue 24, item
12): a probability given as a string (TypeError), a number too large for a float
(OverflowError), embeddings of dimension 0 (an internal RuntimeError or ZeroDivisionError).
Each is our error naming the file and the fix, at conversion and at open."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from jasper_mmap import JASPERSteeringDataset
from jasper_mmap.converters import convert_pt
from jasper_mmap.errors import ArtifactError, ConfigError
from jasper_mmap.synthetic import SyntheticSpec, make_pt_dataset

BASE = {"zero": 0.25, "centroid": 0.25, "keyword": 0.25, "residual": 0.25}
HUGE = 10**400  # an integer JSON allows and no float holds

CASES = {
    "probability-string": ({**BASE, "zero": "0.25"}, None, r"steering_probabilities zero"),
    "probability-string-curriculum": (
        {**BASE, "keyword": "0.25"},
        {"epochs_total": 10},
        r"steering_probabilities keyword should be a number, but got keyword='0\.25'",
    ),
    "probability-null": ({**BASE, "residual": None}, None, r"residual should be a number"),
    "probability-huge": ({**BASE, "zero": HUGE}, None, r"an integer too large for a float"),
    "epochs_total-huge": (BASE, {"epochs_total": HUGE}, r"curriculum epochs_total .*too large"),
    "zero_prob_start-huge": (BASE, {"zero_prob_start": HUGE}, r"zero_prob_start=.*too large"),
}


def _edit_config(directory: Path, probs, curriculum) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config["steering_probabilities"] = probs
    if curriculum is None:
        config.pop("curriculum", None)
    else:
        config["curriculum"] = curriculum
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_steering_values_are_config_errors_at_conversion(pt_dataset, tmp_path, case):
    probs, curriculum, match = CASES[case]
    src = shutil.copytree(pt_dataset, tmp_path / "ds")
    _edit_config(src, probs, curriculum)
    with pytest.raises(ConfigError, match=match) as info:
        convert_pt(src, tmp_path / "out", progress=False)
    assert str(src / "config.json") in str(info.value) and "Fix" in str(info.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_steering_values_are_config_errors_at_open(store_path, tmp_path, case):
    probs, curriculum, match = CASES[case]
    store = shutil.copytree(store_path, tmp_path / "s")
    _edit_config(store, probs, curriculum)
    with pytest.raises(ConfigError, match=match) as info:
        JASPERSteeringDataset(store, check_sources=False)
    assert "config.json" in str(info.value)


def test_an_infinite_or_large_curriculum_still_opens(store_path, tmp_path):
    """Only integers no float can hold are refused: 1e400 (JSON's inf) and 10**300 open."""
    store = shutil.copytree(store_path, tmp_path / "s")
    for total in (float("inf"), 10**300):
        _edit_config(store, BASE, {"epochs_total": total})
        ds = JASPERSteeringDataset(store, check_sources=False, epoch=7)
        assert ds.steering_probs["zero"] == pytest.approx(0.5)  # stays at the start
        ds.close()


@pytest.mark.parametrize("backend", ["safetensors", "zarr"])
def test_embeddings_of_dimension_zero_are_refused_naming_the_file(tmp_path, backend):
    src = make_pt_dataset(tmp_path / "ds", SyntheticSpec(dim=0))
    with pytest.raises(ArtifactError, match=r"question_embs\.pt: embeddings have dimension 0"):
        convert_pt(src, tmp_path / "out", format=backend, progress=False)
    assert not (tmp_path / "out").exists()
