"""Run by test_ddp.py as a script: a 2-process DDP fit on CPU (gloo), or its resume.

Lightning's launcher starts rank 1 by re-running this script; each rank writes a small JSON report.
Usage: python ddp_run.py ROOT fit      (3 epochs uninterrupted into full/, then 2 epochs into ckpt/)
       python ddp_run.py ROOT resume   (from "last" of ckpt/ to 3 epochs, in new processes)
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl

from lightning_saver import Saver
from lightning_saver.demo import DigitsClassifier, DigitsDataModule

warnings.filterwarnings("ignore")


def main(root: Path, tag: str, max_epochs: int, ckpt_path: str | None, directory: str = "ckpt") -> None:
    pl.seed_everything(0, verbose=False)
    model = DigitsClassifier(hidden=32, lr_step=1)
    saver = Saver(dirpath=str(root / directory), max_to_keep=2)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=max_epochs, default_root_dir=str(root),
        callbacks=[saver], logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=2, num_sanity_val_steps=0,
    )
    trainer.fit(model, DigitsDataModule(batch_size=32, limit=400), ckpt_path=ckpt_path)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
    report = {
        "rank": trainer.global_rank, "global_step": trainer.global_step,
        "ckpt_path": str(trainer.ckpt_path) if trainer.ckpt_path else None,
        "weights": digest.hexdigest(), "saved_here": list(saver.last_checkpoints),
    }
    (root / f"{tag}_rank{trainer.global_rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    root = Path(sys.argv[1])
    if sys.argv[2] == "fit":
        # two Trainers in the same processes: Lightning launches rank 1 only once
        main(root, "full", 3, None, directory="full")
        main(root, "fit", 2, None)
    else:
        main(root, "resume", 3, "last")
