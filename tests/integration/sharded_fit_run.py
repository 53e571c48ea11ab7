"""Run by test_sharded_fit.py as a script: a 2-process ModelParallelStrategy (FSDP2) fit on CPU (gloo).

Lightning's launcher starts rank 1 by re-running this script; each rank writes a small JSON report.
Usage: python sharded_fit_run.py ROOT fit      (3 epochs uninterrupted into full/, then 2 epochs into ckpt/)
       python sharded_fit_run.py ROOT resume   (from "last" of ckpt/ to 3 epochs, in new processes)
       python sharded_fit_run.py ROOT reshard SET   (1 process restores SET, written by 2)
       python sharded_fit_run.py ROOT single        (1 process, 1 epoch into single/)
       python sharded_fit_run.py ROOT grow SET      (2 processes restore SET, written by 1)
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard

from lightning_saver import Saver
from lightning_saver.demo import DigitsClassifier, DigitsDataModule

warnings.filterwarnings("ignore")


class ShardedDigits(DigitsClassifier):
    batches_here = 0  # training steps run in this process (a resume runs only the remaining ones)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ShardedDigits.batches_here += 1  # fully_shard swaps the class of self for a subclass
        return super().training_step(batch, batch_idx)

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


def main(root: Path, tag: str, max_epochs: int, ckpt_path: str | None, directory: str = "ckpt",
         devices: int = 2) -> None:
    pl.seed_everything(0, verbose=False)
    ShardedDigits.batches_here = 0
    model = ShardedDigits(hidden=32, lr_step=1)
    # the run that writes the sets resumed from saves asynchronously (each rank in the background)
    saver = Saver(dirpath=str(root / directory), max_to_keep=2, async_save=tag == "fit")
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy=ModelParallelStrategy(), max_epochs=max_epochs,
        default_root_dir=str(root), callbacks=[saver], logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=2, num_sanity_val_steps=0,
    )
    trainer.fit(model, DigitsDataModule(batch_size=32, limit=400), ckpt_path=ckpt_path)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + tensor.full_tensor().detach().numpy().tobytes())
    optimizer = trainer.optimizers[0]
    for state in optimizer.state.values():
        for key, value in sorted(state.items()):
            if hasattr(value, "full_tensor"):
                digest.update(key.encode() + value.full_tensor().detach().numpy().tobytes())
    report = {
        "rank": trainer.global_rank, "global_step": trainer.global_step,
        "ckpt_path": str(trainer.ckpt_path) if trainer.ckpt_path else None,
        "digest": digest.hexdigest(), "batches_here": ShardedDigits.batches_here,
        "saved": list(saver.last_checkpoints),
    }
    (root / f"{tag}_rank{trainer.global_rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    root = Path(sys.argv[1])
    if sys.argv[2] == "fit":
        # two Trainers in the same processes: Lightning launches rank 1 only once
        main(root, "full", 3, None, directory="full")
        main(root, "fit", 2, None)
    elif sys.argv[2] == "resume":
        main(root, "resume", 3, "last")
    elif sys.argv[2] == "reshard":  # one process restores the 2-process set of epoch 2, nothing left to train
        main(root, "reshard", 2, sys.argv[3], devices=1)
    elif sys.argv[2] == "single":  # a 1-process ModelParallelStrategy run writes its checkpoint
        main(root, "single", 1, None, directory="single", devices=1)
    else:  # 2 processes restore the 1-process set of epoch 1 (resharding 1 -> 2), nothing left to train
        main(root, "grow", 1, sys.argv[3], directory="grow")
