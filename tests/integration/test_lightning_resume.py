"""Lightning saves the loader's state in its checkpoint (the fit loop's combined loader) and
restores it: a run resumed from a mid-epoch checkpoint sees the batches the uninterrupted run
saw after that step, epoch and batch index included. Skipped where Lightning is not
installed (it is not a dependency)."""

from __future__ import annotations

import json

import pytest
from helpers import run_script

pytest.importorskip("lightning")

SCRIPT = r"""
import hashlib, json, sys
import torch, lightning as L
from jasper_mmap import create_loader

store, ckpts, out = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
seen = []

class M(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)
    def training_step(self, batch, i):
        rows = batch["question_emb"].numpy().tobytes() + batch["steering"].numpy().tobytes()
        seen.append([self.current_epoch, i, hashlib.md5(rows).hexdigest()])
        return self.lin(batch["question_emb"]).pow(2).mean()
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)
    def train_dataloader(self):
        return create_loader(store, "train", 8, num_workers=2)

for k, ckpt in enumerate(ckpts):  # each a fresh trainer and model, one interpreter
    seen.clear()
    every = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=out + ("/ck-full" if ckpt == "-" else f"/ck-resumed{k}"), every_n_train_steps=5,
        save_top_k=-1, filename="{step}",
    )
    trainer = L.Trainer(max_epochs=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[every], num_sanity_val_steps=0)
    trainer.fit(M(), ckpt_path=None if ckpt == "-" else ckpt)
    json.dump(seen, open(out + ("/full.json" if ckpt == "-" else f"/resumed{k}.json"), "w"))
"""


def test_a_lightning_run_resumes_mid_epoch_exactly(store_path, tmp_path):
    run_script(tmp_path, SCRIPT, str(store_path), "-", str(tmp_path), timeout=300)
    full = json.loads((tmp_path / "full.json").read_text())
    assert len(full) == 2 * 12  # 96 train samples, batches of 8
    steps = (5, 15)  # in the first epoch, and in the second
    ckpts = ",".join(str(tmp_path / f"ck-full/step={step}.ckpt") for step in steps)
    run_script(tmp_path, SCRIPT, str(store_path), ckpts, str(tmp_path), timeout=300)
    for k, step in enumerate(steps):
        resumed = json.loads((tmp_path / f"resumed{k}.json").read_text())
        assert resumed == full[step:], step
