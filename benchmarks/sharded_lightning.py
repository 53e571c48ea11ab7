"""The Lightning row of ``sharded.py``: ``ModelCheckpoint``'s save against the ``Saver``'s, same Trainer.

Each of ``world`` processes (started by ``torch.multiprocessing``, with ``LOCAL_RANK`` set so that
Lightning does not launch its own) builds one ``Trainer(strategy=ModelParallelStrategy())`` around a
module of 16 row-sharded float32 matrices (``fully_shard`` in ``configure_model``; plain SGD, so no
optimizer state) and sets it up with ``fit(max_steps=0)``. Then, per repeat, in a shuffled order and
into a new folder each time:

* ``lightning``: ``trainer.save_checkpoint(folder)``, exactly what ``ModelCheckpoint`` calls (a DCP
  folder through ``FileSystemWriter``, plus a pickled ``meta.pt``);
* ``saver``: ``Saver.save_trainer(trainer)``, what the ``Saver`` callback calls (one safetensors
  shard per rank, an index, the state file).

Both dump the same trainer checkpoint. Time: slowest rank, between barriers; ratios paired per repeat.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import statistics
import time
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard

from lightning_saver import Saver

METHODS = ("saver", "lightning")


class Matrices(pl.LightningModule):
    def __init__(self, rows: int, cols: int, count: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.weights = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(rows, cols)) for _ in range(count))

    def configure_model(self) -> None:
        fully_shard(self, mesh=self.device_mesh["data_parallel"])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:  # never run: max_steps=0
        return sum(w.sum() for w in self.weights) * batch.sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def worker(rank: int, world: int, port: int, mib: int, repeats: int, cols: int, count: int, base: str,
           out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), RANK=str(rank),
                      NODE_RANK="0", WORLD_SIZE=str(world), PL_DISABLE_FORK="1")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_saver"):
        logging.getLogger(name).setLevel(logging.ERROR)
    rows = max(world, mib * (1 << 20) // (count * cols * 4))
    saver = Saver(dirpath=os.path.join(base, "unused"), max_to_keep=None)
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=ModelParallelStrategy(), max_steps=0,
                         callbacks=[saver], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=base)
    trainer.fit(Matrices(rows, cols, count), torch.utils.data.DataLoader(torch.ones(4, 1)))
    results: list[dict[str, Any]] = []
    rng = random.Random(2)
    for rep in range(repeats):
        order = list(METHODS)
        rng.shuffle(order)
        for method in order:
            folder = os.path.join(base, f"pl_w{world}_{method}_{rep}")
            dist.barrier()
            t0 = time.perf_counter()
            if method == "saver":
                saver.dirpath = folder
                saver.save_trainer(trainer, at_epoch_end=True)
            else:
                trainer.save_checkpoint(folder)
            dist.barrier()
            seconds = time.perf_counter() - t0
            nbytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)
            results.append({"world": world, "method": method, "rep": rep, "save_s": seconds, "bytes": nbytes})
            dist.barrier()
            if rank == 0:
                shutil.rmtree(folder, ignore_errors=True)
    with open(os.path.join(out, f"pl_rank{rank}_w{world}.json"), "w") as f:
        json.dump(results, f)


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of rank 0's save times per method, and the paired ratio saver / lightning."""
    mine = [r for r in rows if r["rank"] == 0]
    out: dict[str, Any] = {}
    for method in METHODS:
        sel = [r for r in mine if r["method"] == method]
        out[f"{method}_save_s"] = round(statistics.median(r["save_s"] for r in sel), 3)
        out[f"{method}_bytes"] = sel[0]["bytes"]
    pairs = []
    for rep in {r["rep"] for r in mine}:
        by = {r["method"]: r["save_s"] for r in mine if r["rep"] == rep}
        pairs.append(by["saver"] / by["lightning"])
    out["saver_over_lightning"] = round(statistics.median(pairs), 3)
    return out
