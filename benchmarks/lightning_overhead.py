"""What does checkpointing cost a Lightning training run? No checkpoints vs ModelCheckpoint vs the Saver.

One short ``Trainer.fit`` (an MLP on synthetic data, Adam, CPU) is timed in four set-ups, saving
every ``--every`` optimizer steps:

  none             ``enable_checkpointing=False``
  ModelCheckpoint  ``ModelCheckpoint(every_n_train_steps=N, save_top_k=-1)`` (torch.save, pickle)
  Saver sync       ``Saver(every_n_train_steps=N)``: whole state, checksummed, fsynced, atomic
  Saver async      the same with ``async_save=True``: the step blocks only for a CPU snapshot

Everything runs in one process, interleaved: each repetition runs every set-up once, in the same
order, after one untimed warm-up fit; the table reports the median wall time of ``fit`` (teardown,
and so the wait for pending async writes, included) and its ratio to ``none``. The target is
async <= 1.02 x none. On a busy machine the wall times of repetitions scatter by more than the cost
of checkpointing, so the table also reports the time the training loop spent blocked inside the
saves (``Saver.blocked_seconds``; for ModelCheckpoint, its ``_save_checkpoint``), as a share of
the ``none`` fit: a direct measure of the overhead that noise affects much less.

Usage: python benchmarks/lightning_overhead.py [--quick] [--reps N] [--steps S] [--every N] [--width W]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # timing.py

from timing import machine  # noqa: E402

from lightning_saver import Saver  # noqa: E402

SETUPS = ("none", "ModelCheckpoint", "Saver sync", "Saver async")


class MLP(pl.LightningModule):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(64, width), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, 10))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class TimedModelCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that adds up the time its saves block training, like ``Saver.blocked_seconds``."""

    blocked_seconds = 0.0

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        start = time.perf_counter()
        super()._save_checkpoint(trainer, filepath)
        self.blocked_seconds += time.perf_counter() - start


def callbacks_for(setup: str, directory: str, every: int) -> tuple[list[pl.Callback], bool]:
    if setup == "none":
        return [], False
    if setup == "ModelCheckpoint":
        return [TimedModelCheckpoint(dirpath=directory, every_n_train_steps=every, save_top_k=-1)], True
    saver = Saver(dirpath=directory, every_n_train_steps=every, save_on_train_end=False,
                  async_save=setup == "Saver async")
    return [saver], True


def fit_once(setup: str, args: argparse.Namespace, root: str) -> tuple[float, float]:
    """(wall seconds of fit, seconds the training loop was blocked by saves)."""
    directory = os.path.join(root, setup.replace(" ", "_"))
    shutil.rmtree(directory, ignore_errors=True)
    callbacks, checkpointing = callbacks_for(setup, directory, args.every)
    torch.manual_seed(0)
    model = MLP(args.width, args.depth)
    x, y = torch.randn(args.steps * args.batch, 64), torch.randint(0, 10, (args.steps * args.batch,))
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch, shuffle=True)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=args.steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=checkpointing, callbacks=callbacks,
        default_root_dir=root,
    )
    start = time.perf_counter()
    trainer.fit(model, loader)
    elapsed = time.perf_counter() - start
    shutil.rmtree(directory, ignore_errors=True)
    return elapsed, sum(getattr(cb, "blocked_seconds", 0.0) for cb in callbacks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=40)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.steps, args.every, args.width, args.depth, args.batch = 1, 12, 4, 32, 2, 16
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    root = tempfile.mkdtemp(prefix="lightning_overhead_", dir=args.dir)
    try:
        fit_once("Saver async", args, root)  # warm-up: imports, allocator, first snapshot arena
        times: dict[str, list[float]] = {s: [] for s in SETUPS}
        blocked: dict[str, list[float]] = {s: [] for s in SETUPS}
        for _ in range(args.reps):
            for setup in SETUPS:
                wall, in_saves = fit_once(setup, args, root)
                times[setup].append(wall)
                blocked[setup].append(in_saves)
                print(f"  {setup}: {wall:.2f} s, {in_saves:.3f} s in saves", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    params = sum(p.numel() for p in MLP(args.width, args.depth).parameters())
    medians = {s: statistics.median(v) for s, v in times.items()}
    in_saves = {s: statistics.median(v) for s, v in blocked.items()}
    base = medians["none"]
    saves = args.steps // args.every
    header = (f"{'set-up':<16} {'fit s (median)':>14} {'x none':>8} {'blocked in saves s':>19} "
              f"{'% of none':>10}")
    print(f"{header}   "
          f"({args.steps} steps, a save every {args.every}: {saves} saves of a "
          f"{params * 4 * 3 / 1e6:.1f} MB state, {args.reps} reps)")
    for setup in SETUPS:
        print(f"{setup:<16} {medians[setup]:>14.3f} {medians[setup] / base:>8.3f} {in_saves[setup]:>19.3f} "
              f"{100 * in_saves[setup] / base:>9.2f}%")
    summary = {
        "benchmark": "lightning_overhead", "quick": args.quick, "steps": args.steps,
        "every_n_steps": args.every, "saves": saves, "params": params, "reps": args.reps,
        "seconds": {s: round(m, 4) for s, m in medians.items()},
        "ratio_to_none": {s: round(m / base, 4) for s, m in medians.items()},
        "blocked_in_saves_seconds": {s: round(b, 4) for s, b in in_saves.items()},
        "blocked_share_of_none": {s: round(b / base, 5) for s, b in in_saves.items()},
        "target_async_ratio": 1.02, "async_within_target": medians["Saver async"] / base <= 1.02,
    }
    summary["machine"] = machine()
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
