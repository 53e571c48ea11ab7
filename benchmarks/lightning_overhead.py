"""What does checkpointing cost a Lightning training run? No checkpoints vs ModelCheckpoint vs the Saver.

One short ``Trainer.fit`` (an MLP on fixed synthetic data, Adam, CPU) is timed with and without
checkpointing, saving every ``--every`` optimizer steps. The set-ups (``--setups``; default the two
that issue #17's goal compares, ``--all`` for every one):

  none                 ``enable_checkpointing=False``
  ModelCheckpoint      ``ModelCheckpoint(every_n_train_steps=N, save_top_k=-1)`` (torch.save, pickle)
  Saver sync           ``Saver(every_n_train_steps=N)``: whole state, checksummed, fsynced, atomic
  Saver async          the same with ``async_save=True`` (default ``overlap_copy=True``: the snapshot
                       copy overlaps the next forward/backward, the next optimizer step waits for it)
  Saver async blocking ``async_save=True, overlap_copy=False``: the hook blocks for the whole copy
  Saver async idle     ``Saver async`` with its writer thread at ``SCHED_IDLE`` and idle I/O priority
                       (``thread_priority.USE_IDLE``) instead of nice 10
  Saver async buffered ``Saver async`` writing through the page cache (``direct_write.ENABLED = False``)
                       instead of with ``O_DIRECT``
  copy+CRC floor       not a checkpoint: the least work any checksummed snapshot does. At each save
                       point one copy of the bytes a save holds (the weights and the optimizer state)
                       into a buffer reused across saves and fits, with their CRC-32C in the same pass
                       (``memcopy.copy_crc32c``, streaming stores), in the hook, and nothing else: no
                       state dump, no encoding, no file, no fault of fresh pages. The 5% target is to be
                       read against it
  CRC floor            not a checkpoint either: the same, reading the bytes for their CRC-32C where they
                       are (``memcopy.crc32c``), with no copy: the least any checksummed
                       checkpoint reads, even one that the disk's DMA would write from live memory
  state dump floor     not a checkpoint either: at each save point only what the Saver gathers from
                       Lightning (``trainer._checkpoint_connector.dump_checkpoint``: loops, optimizer
                       and scheduler states, callbacks'; and ``rng_state.capture_all_ranks``), with no
                       tensor's bytes read, encoded or copied. A whole-state checkpoint pays it as well
                       as one of the two above
  write floor          not a checkpoint either: at each save point the async writer thread (the Saver's,
                       at its priority) writes as many bytes as the CRC floor reads, from one buffer in
                       huge pages, with ``O_DIRECT`` to a new file, and fsyncs it: no copy, no CRC, no
                       header, no state file
  Saver async two copies ``Saver async`` snapshotting into the dense arena, which the writer copies again
                       into its ``O_DIRECT`` buffer (``snapshot_image.ENABLED = False``), instead of
                       into the file's image that it writes as it is

**Design.** Everything runs in one process, after an untimed warm-up fit of every set-up. Each
repetition runs, for every checkpointing set-up in a shuffled order, a *pair*: that set-up and a
``none`` fit back to back, in a random order within the pair (``--seed``). Noise is cut where it can
be: torch's thread count fixed (``--threads``, default the logical CPUs), the garbage collector off
during a fit, the data loader in-process, the same batches in the same order in every fit.

**Two measures, both from outside the library** (a callback notes when each training step starts):

* *loop stall*: a fit's loop time (first step's start to last step's start) minus its paired
  ``none`` fit's. It counts everything that holds training back: time inside the hooks, and a
  background writer competing with training for the cores (the last async write, after the last
  step, is not counted: it does not hold the loop back).
* *window stall*: the same, summed over only the ``--window`` steps that start with each counted
  save (the step whose end saves, and the ones after it, while an async writer works), minus the
  median paired per-step difference outside the windows times the window steps (a drift between
  the two fits). It localises the stall and is far less noisy; it misses any cost that lasts longer
  than the window (the per-offset profile in the JSON shows whether the excess has died out).

Each measure's estimate is the median over the pairs with an order-statistic confidence interval
(``paired_stats.py``), and the issue's targets (the async stall at most 5% of ModelCheckpoint's, and
below 0.2% of the run) get a verdict per measure: *met* (the whole interval at or below the
threshold), *missed* (above), *unresolved* (it straddles the threshold: the noise exceeds the margin).
The table also shows the median wall time of ``fit`` (teardown included), the time spent inside
the save hooks (``Saver.blocked_seconds``; for ModelCheckpoint, its ``_save_checkpoint``), the time
the optimizer steps waited at the fence for an overlapped snapshot copy (the Saver's) and the CPU
time of the async writer's thread (``AsyncWriter.cpu_seconds``: what it may take from training).

Usage: python benchmarks/lightning_overhead.py [--quick] [--reps N] [--steps S] [--every N] [--all]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import mmap
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # timing.py, paired_stats.py

from paired_stats import median_ci, verdict  # noqa: E402
from timing import machine  # noqa: E402

from lightning_saver import Saver  # noqa: E402
from lightning_saver.formats import direct_write, memcopy  # noqa: E402
from lightning_saver.integration import rng_state  # noqa: E402
from lightning_saver.saving import async_writer, snapshot_image, thread_priority  # noqa: E402

SETUPS = ("none", "ModelCheckpoint", "Saver sync", "Saver async", "Saver async blocking", "Saver async idle",
          "Saver async buffered", "copy+CRC floor", "CRC floor", "state dump floor", "write floor",
          "Saver async two copies")
DEFAULT_SETUPS = ("ModelCheckpoint", "Saver async")
DIRECT_DEFAULT = direct_write.ENABLED
Run = dict[str, Any]


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


class Floor(pl.Callback):
    """At every ``every``-th optimizer step, only the ``work`` of a floor set-up (see the module
    docs), and nothing else: ``"copy+CRC"`` copies the weights and the optimizer state into one
    reused buffer with their CRC-32C (one pass); ``"CRC"`` reads them for their CRC-32C, in place;
    ``"state dump"`` gathers the trainer's state the way the Saver does (Lightning's
    ``dump_checkpoint``, the RNG states), touching no tensor's bytes; ``"write"`` has a background
    writer write as many bytes to a new file in ``directory`` and fsync it. ``blocked_seconds``
    adds up the time in the hook, like the Saver's."""

    _buffer = torch.empty(0, dtype=torch.uint8)  # shared by every fit: its pages are faulted once

    def __init__(self, every: int, work: str, directory: str) -> None:
        self.every, self.work, self.directory = every, work, directory
        self.blocked_seconds = 0.0
        self.crc = 0
        self._writer: async_writer.AsyncWriter | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every:
            return
        start = time.perf_counter()
        if self.work == "state dump":  # the two calls of SaverHooks.save_trainer that ask Lightning
            self.state = (trainer._checkpoint_connector.dump_checkpoint(weights_only=False),
                          rng_state.capture_all_ranks())
        elif self.work == "write":
            nbytes = sum(t.numel() * t.element_size() for t in _sources(pl_module, trainer))
            self._writer = self._writer or async_writer.AsyncWriter()  # the Saver's, at its priority
            self._writer.submit(partial(self._write, nbytes, os.path.join(self.directory, f"{step}.bin")))
        else:
            self.crc = self._checksum(pl_module, trainer)
        self.blocked_seconds += time.perf_counter() - start

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._writer is not None:
            self._writer.close()

    def _checksum(self, pl_module: pl.LightningModule, trainer: pl.Trainer) -> int:
        sources = _sources(pl_module, trainer)
        total = sum(t.numel() * t.element_size() for t in sources)
        if self.work == "copy+CRC" and Floor._buffer.numel() < total:
            Floor._buffer = torch.zeros(total, dtype=torch.uint8)  # zeros: faulted here, once
        dst, crc = Floor._buffer.data_ptr(), 0
        for t in sources:  # all contiguous CPU tensors in this model
            n = t.numel() * t.element_size()
            if self.work == "CRC":  # the bytes read where they are: no copy, no write
                crc = memcopy.crc32c(t.data_ptr(), n, crc=crc)
                continue
            # streaming stores: 4.3 ms of CPU for 38.7 MB against 7.0 ms through the cache (2 vCPUs,
            # 2026-12-06), and the training step's cache is left alone
            crc = memcopy.copy_crc32c(dst, t.data_ptr(), n, crc=crc, nontemporal=True)
            dst += n
        return crc

    @staticmethod
    def _write(nbytes: int, path: str) -> None:
        """``nbytes`` from a page-aligned buffer in huge pages (faulted once per process) to a new
        file, with ``O_DIRECT``, then fsync: no header, no checksum, no state file. Huge pages: the
        kernel pins 19 pages for 38.7 MB instead of 9,450, 0.6-0.7 ms of CPU instead of 1.7-1.8
        (2 vCPUs, 2026-12-06); the Saver's arenas do not use them (its first save's faults cost
        25-40 ms more with them, in this benchmark's 5-save fits)."""
        if Floor._image.numel() < nbytes:
            region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # page-aligned
            if hasattr(mmap, "MADV_HUGEPAGE"):
                region.madvise(mmap.MADV_HUGEPAGE)
            Floor._image = torch.frombuffer(region, dtype=torch.uint8).fill_(1)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            direct_write.write_image(fd, Floor._image.data_ptr(), nbytes)
            os.fsync(fd)
        finally:
            os.close(fd)

    _image = torch.empty(0, dtype=torch.uint8)


def _sources(pl_module: pl.LightningModule, trainer: pl.Trainer) -> list[torch.Tensor]:
    """The tensors a save holds the bytes of: the weights and the optimizer state."""
    return [*pl_module.state_dict().values(),
            *(v for opt in trainer.optimizers for state in opt.state.values() for v in state.values()
              if isinstance(v, torch.Tensor))]


class StepClock(pl.Callback):
    """Notes when each training step starts: the outside view of how long the loop took."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: object,
                             batch_idx: int) -> None:
        self.starts.append(time.perf_counter())


def callbacks_for(setup: str, directory: str, every: int) -> tuple[list[pl.Callback], bool]:
    thread_priority.USE_IDLE = setup == "Saver async idle"  # read by the writer thread at each job
    direct_write.ENABLED = setup != "Saver async buffered"  # read by each write
    snapshot_image.ENABLED = setup != "Saver async two copies"  # read by each save
    if setup == "none":
        return [], False
    if setup == "ModelCheckpoint":
        return [TimedModelCheckpoint(dirpath=directory, every_n_train_steps=every, save_top_k=-1)], True
    if setup.endswith(" floor"):
        return [Floor(every, setup.removesuffix(" floor"), directory)], False
    saver = Saver(dirpath=directory, every_n_train_steps=every, save_on_train_end=False,
                  async_save=setup.startswith("Saver async"), overlap_copy=not setup.endswith("blocking"))
    _time_fence(saver)
    return [saver], True


def _time_fence(saver: Any) -> None:
    """Add up in ``saver.fence_seconds`` the time its ``wait_snapshot`` blocks (the optimizer step
    waiting for an overlapped snapshot copy, which ``blocked_seconds`` does not count)."""
    saver.fence_seconds, wait = 0.0, saver.wait_snapshot

    def timed() -> None:
        start = time.perf_counter()
        wait()
        saver.fence_seconds += time.perf_counter() - start

    saver.wait_snapshot = timed


def fit_once(setup: str, args: argparse.Namespace, root: str, data: TensorDataset, steps: int) -> Run:
    """Wall seconds of fit, seconds from the first step's start to the last's, each step's duration
    (start to next start), seconds inside saves."""
    directory = os.path.join(root, setup.replace(" ", "_"))
    shutil.rmtree(directory, ignore_errors=True)
    callbacks, checkpointing = callbacks_for(setup, directory, args.every)
    clock = StepClock()
    torch.manual_seed(0)
    model = MLP(args.width, args.depth)
    loader = DataLoader(data, batch_size=args.batch, shuffle=False)  # same batches, same order
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=checkpointing, callbacks=[clock, *callbacks],
        default_root_dir=root,
    )
    gc.collect()
    gc.disable()  # a collection inside one fit and not its pair is noise
    try:
        start = time.perf_counter()
        trainer.fit(model, loader)
        elapsed = time.perf_counter() - start
    finally:
        gc.enable()
        thread_priority.USE_IDLE = False  # the defaults again (the writer is done after teardown)
        direct_write.ENABLED = DIRECT_DEFAULT
        snapshot_image.ENABLED = True
    shutil.rmtree(directory, ignore_errors=True)
    in_saves = sum(getattr(cb, "blocked_seconds", 0.0) for cb in callbacks)
    in_fence = sum(getattr(cb, "fence_seconds", 0.0) for cb in callbacks)
    writer_cpu = sum(getattr(getattr(cb, "_writer", None), "cpu_seconds", 0.0) for cb in callbacks)
    s = clock.starts
    return {"fit": elapsed, "loop": s[-1] - s[0], "in_saves": in_saves, "in_fence": in_fence,
            "writer_cpu": writer_cpu,
            "steps": [b - a for a, b in zip(s, s[1:], strict=False)]}


def run(args: argparse.Namespace, root: str) -> dict[str, list[tuple[Run, Run]]]:
    """Per checkpointing set-up, the (none, set-up) pairs of every repetition."""
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    n = args.steps * args.batch
    data = TensorDataset(torch.randn(n, 64, generator=gen), torch.randint(0, 10, (n,), generator=gen))
    for setup in ("none", *args.setups):  # warm-up: imports, allocator, code paths of every set-up
        fit_once(setup, args, root, data, min(args.steps, 2 * args.every))
    shuffler = random.Random(args.seed)
    pairs: dict[str, list[tuple[Run, Run]]] = {s: [] for s in args.setups}
    for _ in range(args.reps):
        for setup in shuffler.sample(args.setups, len(args.setups)):
            order = shuffler.sample(["none", setup], 2)
            got = {s: fit_once(s, args, root, data, args.steps) for s in order}
            pairs[setup].append((got["none"], got[setup]))
            loops = f"{got['none']['loop']:.3f} / {got[setup]['loop']:.3f} s"
            print(f"  {order[0]} then {order[1]}: loop {loops} "
                  f"(none / {setup}), {got[setup]['in_saves']:.3f} s in saves, "
                  f"{got[setup]['in_fence']:.3f} s at the fence, writer CPU "
                  f"{got[setup]['writer_cpu']:.3f} s, load {os.getloadavg()[0]:.2f}",
                  file=sys.stderr, flush=True)
    return pairs


def save_steps(steps: int, every: int, window: int) -> list[int]:
    """Indices of the step durations whose end saves (step b's end at global step b+1), for every
    save whose window lies inside the loop (the last step's duration is not measured)."""
    return [b for b in range(every - 1, steps - 1) if (b + 1) % every == 0 and b + window <= steps - 1]


def window_stall(none: Run, other: Run, starts: list[int], window: int) -> float:
    diff = [b - a for a, b in zip(none["steps"], other["steps"], strict=True)]
    inside = {b + k for b in starts for k in range(window)}
    outside = [d for i, d in enumerate(diff) if i not in inside]
    drift = statistics.median(outside) if outside else 0.0
    return sum(diff[i] - drift for i in inside)


def profile(pairs: list[tuple[Run, Run]], starts: list[int], window: int) -> list[float]:
    """Median paired excess of the k-th step of a save's window, over saves and pairs (seconds)."""
    return [statistics.median(o["steps"][b + k] - n["steps"][b + k] for n, o in pairs for b in starts)
            for k in range(window)]


def summarize(pairs: dict[str, list[tuple[Run, Run]]], args: argparse.Namespace) -> dict[str, Any]:
    nones = [n for runs in pairs.values() for n, _ in runs]
    base_loop = statistics.median(r["loop"] for r in nones)
    window = min(args.window, args.every)
    starts = save_steps(args.steps, args.every, window)
    loop = {s: median_ci([o["loop"] - n["loop"] for n, o in runs]) for s, runs in pairs.items()}
    win = {s: median_ci([window_stall(n, o, starts, window) for n, o in runs]) for s, runs in pairs.items()}
    runs_of = {"none": nones, **{s: [o for _, o in runs] for s, runs in pairs.items()}}

    def med(setup: str, key: str) -> float:
        return statistics.median(r[key] for r in runs_of[setup])

    def rnd(x: float) -> float:
        return round(x, 4)

    mc = loop["ModelCheckpoint"]["median"] if "ModelCheckpoint" in loop else None
    summary: dict[str, Any] = {
        "seconds": {s: rnd(med(s, "fit")) for s in runs_of},
        "ratio_to_none": {s: rnd(med(s, "fit") / med("none", "fit")) for s in runs_of},
        "loop_seconds": {s: rnd(med(s, "loop")) for s in runs_of},
        "stall_seconds": {"none": 0.0, **{s: rnd(v["median"]) for s, v in loop.items()}},
        "stall_ci": {s: {"ci": [rnd(x) for x in v["ci"]], "confidence": v["confidence"]}
                     for s, v in loop.items()},
        "stall_share_of_run": {"none": 0.0, **{s: round(v["median"] / base_loop, 5)
                                                for s, v in loop.items()}},
        "stall_over_model_checkpoint": {s: rnd(v["median"] / mc) if mc and mc > 0 else None
                                        for s, v in loop.items()},
        "window_steps": window, "window_saves": len(starts),
        "window_stall_seconds": {s: rnd(v["median"]) for s, v in win.items()},
        "window_stall_ci": {s: {"ci": [rnd(x) for x in v["ci"]], "confidence": v["confidence"]}
                            for s, v in win.items()},
        "after_save_excess_ms": {s: [round(1e3 * x, 2) for x in profile(runs, starts, window)]
                                 for s, runs in pairs.items()} if starts else {},
        "blocked_in_saves_seconds": {s: rnd(med(s, "in_saves")) for s in runs_of},
        "fence_seconds": {s: rnd(med(s, "in_fence")) for s in runs_of},
        "writer_cpu_seconds": {s: rnd(med(s, "writer_cpu")) for s in runs_of},
    }
    summary["targets"] = targets(loop, win, base_loop)
    return summary


def targets(loop: dict[str, Any], win: dict[str, Any], base_loop: float) -> dict[str, Any]:
    """Issue #17's two targets for the async Saver, a verdict per measure (``paired_stats.verdict``);
    the ModelCheckpoint threshold is 5% of its stall by the same measure."""
    if "Saver async" not in loop:
        return {}
    out: dict[str, Any] = {}
    for measure, est in (("loop", loop), ("window", win)):
        thresholds = {"async_stall_lt_0.2pct_of_run": 0.002 * base_loop}
        if "ModelCheckpoint" in est and est["ModelCheckpoint"]["median"] > 0:
            mc = est["ModelCheckpoint"]["median"]
            thresholds["async_stall_le_5pct_of_model_checkpoint"] = 0.05 * mc
        for name, t in thresholds.items():
            verdict_here = verdict(est["Saver async"], t)
            out.setdefault(name, {})[measure] = {"threshold_seconds": round(t, 4), "verdict": verdict_here}
    return out


def print_table(summary: dict[str, Any], args: argparse.Namespace, params: int) -> None:
    saves = args.steps // args.every
    print(f"{'set-up':<21} {'fit s':>7} {'x none':>7} {'loop s':>7} {'stall s':>8} {'stall CI':>17} "
          f"{'% of run':>9} {'x MC':>7} {'window s':>9} {'window CI':>17} {'in hooks s':>10} {'fence s':>8} "
          f"{'writer CPU s':>12}   "
          f"({args.steps} steps, a save every {args.every}: {saves} saves of a {params * 4 * 3 / 1e6:.1f} MB "
          f"state, {args.reps} pairs each, {args.threads} torch threads; medians, CIs of paired differences)")
    for setup in SETUPS:
        if setup not in summary["seconds"]:
            continue
        stall = summary["stall_seconds"][setup]
        ci = summary["stall_ci"].get(setup)
        wci = summary["window_stall_ci"].get(setup)
        over_mc = summary["stall_over_model_checkpoint"].get(setup)
        vs_mc = "" if over_mc is None else f"{over_mc:.3f}"
        print(f"{setup:<21} {summary['seconds'][setup]:>7.3f} {summary['ratio_to_none'][setup]:>7.3f} "
              f"{summary['loop_seconds'][setup]:>7.3f} {stall:>8.3f} "
              f"{'' if ci is None else '[{:.3f}, {:.3f}]'.format(*ci['ci']):>17} "
              f"{100 * summary['stall_share_of_run'][setup]:>8.2f}% {vs_mc:>7} "
              f"{summary['window_stall_seconds'].get(setup, 0.0):>9.4f} "
              f"{'' if wci is None else '[{:.4f}, {:.4f}]'.format(*wci['ci']):>17} "
              f"{summary['blocked_in_saves_seconds'][setup]:>10.3f} {summary['fence_seconds'][setup]:>8.3f} "
              f"{summary['writer_cpu_seconds'][setup]:>12.3f}")
    for name, t in summary["targets"].items():
        print(f"target {name}: " + ", ".join(f"{m} measure {v['verdict']} (<= {v['threshold_seconds']:.4f} s)"
                                             for m, v in t.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, every set-up, for the smoke test")
    parser.add_argument("--reps", type=int, default=10, help="pairs per checkpointing set-up")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=40)
    parser.add_argument("--window", type=int, default=10, help="steps per save in the window measure")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    parser.add_argument("--setups", nargs="+", choices=SETUPS[1:], default=list(DEFAULT_SETUPS))
    parser.add_argument("--all", action="store_true", help="every checkpointing set-up")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffles")
    parser.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.steps, args.every, args.width, args.depth, args.batch = 1, 12, 4, 32, 2, 16
    if args.quick or args.all:
        args.setups = list(SETUPS[1:])
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    root = tempfile.mkdtemp(prefix="lightning_overhead_", dir=args.dir)
    try:
        pairs = run(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    params = sum(p.numel() for p in MLP(args.width, args.depth).parameters())
    summary = summarize(pairs, args)
    print_table(summary, args, params)
    result = {"benchmark": "lightning_overhead", "quick": args.quick, "steps": args.steps,
              "every_n_steps": args.every, "saves": args.steps // args.every, "params": params,
              "reps": args.reps, "threads": args.threads, "seed": args.seed, **summary, "machine": machine()}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
