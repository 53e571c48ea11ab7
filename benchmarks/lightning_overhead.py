"""What does checkpointing cost a Lightning training run? No checkpoints vs ModelCheckpoint vs the Saver.

One short ``Trainer.fit`` (an MLP on synthetic data, Adam, CPU) is timed in five set-ups, saving
every ``--every`` optimizer steps:

  none                 ``enable_checkpointing=False``
  ModelCheckpoint      ``ModelCheckpoint(every_n_train_steps=N, save_top_k=-1)`` (torch.save, pickle)
  Saver sync           ``Saver(every_n_train_steps=N)``: whole state, checksummed, fsynced, atomic
  Saver async          the same with ``async_save=True`` (default ``overlap_copy=True``: the snapshot
                       copy of parameters and optimizer state overlaps the next forward/backward, the
                       next optimizer step waits for it)
  Saver async blocking ``async_save=True, overlap_copy=False``: the hook blocks for the whole copy

Everything runs in one process, after one untimed warm-up fit; each repetition runs every set-up
once, in an order shuffled anew per repetition (``--seed``). The stall is measured from outside the
library: a callback notes the time each training step starts; the loop time of a fit is the time
from its first step's start to its last step's start, and a set-up's **stall** is its loop time
minus the ``none`` fit's loop time in the same repetition (paired), median over repetitions. So it
counts everything that holds training back: time inside the hooks, and a background writer
competing with training for the cores; the last async write, which finishes after the last step,
is not counted (it does not hold the loop back). The table also shows the median wall time of
``fit`` (teardown included), the time spent inside the save hooks (``Saver.blocked_seconds``; for
ModelCheckpoint, its ``_save_checkpoint``), and the targets of issue #17: the async stall at most
5% of ModelCheckpoint's, and below 0.2% of the run.

Usage: python benchmarks/lightning_overhead.py [--quick] [--reps N] [--steps S] [--every N] [--width W]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # timing.py

from timing import machine  # noqa: E402

from lightning_saver import Saver  # noqa: E402

SETUPS = ("none", "ModelCheckpoint", "Saver sync", "Saver async", "Saver async blocking")


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


class StepClock(pl.Callback):
    """Notes when each training step starts: the outside view of how long the loop took."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: object,
                             batch_idx: int) -> None:
        self.starts.append(time.perf_counter())

    @property
    def loop_seconds(self) -> float:
        return self.starts[-1] - self.starts[0]


def callbacks_for(setup: str, directory: str, every: int) -> tuple[list[pl.Callback], bool]:
    if setup == "none":
        return [], False
    if setup == "ModelCheckpoint":
        return [TimedModelCheckpoint(dirpath=directory, every_n_train_steps=every, save_top_k=-1)], True
    saver = Saver(dirpath=directory, every_n_train_steps=every, save_on_train_end=False,
                  async_save=setup.startswith("Saver async"), overlap_copy=not setup.endswith("blocking"))
    return [saver], True


def fit_once(setup: str, args: argparse.Namespace, root: str) -> dict[str, float]:
    """Wall seconds of fit, seconds from the first step's start to the last's, seconds inside saves."""
    directory = os.path.join(root, setup.replace(" ", "_"))
    shutil.rmtree(directory, ignore_errors=True)
    callbacks, checkpointing = callbacks_for(setup, directory, args.every)
    clock = StepClock()
    torch.manual_seed(0)
    model = MLP(args.width, args.depth)
    x, y = torch.randn(args.steps * args.batch, 64), torch.randint(0, 10, (args.steps * args.batch,))
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch, shuffle=True)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=args.steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=checkpointing, callbacks=[clock, *callbacks],
        default_root_dir=root,
    )
    start = time.perf_counter()
    trainer.fit(model, loader)
    elapsed = time.perf_counter() - start
    shutil.rmtree(directory, ignore_errors=True)
    in_saves = sum(getattr(cb, "blocked_seconds", 0.0) for cb in callbacks)
    return {"fit": elapsed, "loop": clock.loop_seconds, "in_saves": in_saves}


def run(args: argparse.Namespace, root: str) -> dict[str, list[dict[str, float]]]:
    fit_once("Saver async", args, root)  # warm-up: imports, allocator, first snapshot arena
    shuffler = random.Random(args.seed)
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in SETUPS}
    for _ in range(args.reps):
        order = list(SETUPS)
        shuffler.shuffle(order)
        for setup in order:
            result = fit_once(setup, args, root)
            runs[setup].append(result)
            print(f"  {setup}: fit {result['fit']:.2f} s, loop {result['loop']:.2f} s, "
                  f"{result['in_saves']:.3f} s in saves, load {os.getloadavg()[0]:.1f}", file=sys.stderr,
                  flush=True)
    return runs


def summarize(runs: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    def median(setup: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[setup])

    base_loop = median("none", "loop")
    stall = {s: statistics.median(r["loop"] - b["loop"] for r, b in zip(runs[s], runs["none"], strict=True))
             for s in SETUPS}
    mc = stall["ModelCheckpoint"]
    return {
        "seconds": {s: round(median(s, "fit"), 4) for s in SETUPS},
        "ratio_to_none": {s: round(median(s, "fit") / median("none", "fit"), 4) for s in SETUPS},
        "loop_seconds": {s: round(median(s, "loop"), 4) for s in SETUPS},
        "stall_seconds": {s: round(v, 4) for s, v in stall.items()},
        "stall_share_of_run": {s: round(v / base_loop, 5) for s, v in stall.items()},
        "stall_over_model_checkpoint": {s: round(v / mc, 4) if mc > 0 else None for s, v in stall.items()},
        "blocked_in_saves_seconds": {s: round(median(s, "in_saves"), 4) for s in SETUPS},
        "targets": {
            "async_stall_le_5pct_of_model_checkpoint": mc > 0 and stall["Saver async"] <= 0.05 * mc,
            "async_stall_lt_0.2pct_of_run": stall["Saver async"] < 0.002 * base_loop,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=40)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-repetition shuffles")
    parser.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.steps, args.every, args.width, args.depth, args.batch = 1, 12, 4, 32, 2, 16
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    root = tempfile.mkdtemp(prefix="lightning_overhead_", dir=args.dir)
    try:
        runs = run(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    params = sum(p.numel() for p in MLP(args.width, args.depth).parameters())
    summary = summarize(runs)
    saves = args.steps // args.every
    print(f"{'set-up':<21} {'fit s':>7} {'x none':>7} {'loop s':>7} {'stall s':>8} {'% of run':>9} "
          f"{'x MC stall':>10} {'in hooks s':>10}   ({args.steps} steps, a save every {args.every}: "
          f"{saves} saves of a {params * 4 * 3 / 1e6:.1f} MB state, {args.reps} reps, medians; stall paired)")
    for setup in SETUPS:
        row = {key: summary[key][setup] for key in summary if key != "targets"}
        over_mc = row["stall_over_model_checkpoint"]
        vs_mc = "" if over_mc is None else f"{over_mc:.3f}"
        print(f"{setup:<21} {row['seconds']:>7.3f} {row['ratio_to_none']:>7.3f} {row['loop_seconds']:>7.3f} "
              f"{row['stall_seconds']:>8.3f} {100 * row['stall_share_of_run']:>8.2f}% {vs_mc:>10} "
              f"{row['blocked_in_saves_seconds']:>10.3f}")
    result = {"benchmark": "lightning_overhead", "quick": args.quick, "steps": args.steps,
              "every_n_steps": args.every, "saves": saves, "params": params, "reps": args.reps,
              "seed": args.seed, **summary, "machine": machine()}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
