"""A tiny version of the README's main job: training through create_loader lowers the loss."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from jasper_mmap.converters import convert_pt
from jasper_mmap.synthetic import SyntheticSpec, make_pt_dataset

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "main_job.py"


def _main_job():
    spec = importlib.util.spec_from_file_location("main_job", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_through_the_loader_lowers_the_loss(tmp_path):
    job = _main_job()
    src = make_pt_dataset(
        tmp_path / "ds", SyntheticSpec(n_pairs=1200, dim=32, n_neg=6, n_clusters=4)
    )
    store = convert_pt(src, tmp_path / "store", progress=False)
    lines = []
    history = job.train(store, epochs=4, workers=2, batch_size=64, log=lines.append)
    assert len(history["train"]) == len(lines) == 4
    assert history["train"][-1] < 0.8 * history["train"][0]
    assert history["val"][-1] < history["val"][0]
    assert {"val_zero", "val_centroid"} <= set(history)
    job.plot(history, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
