"""How fast does the Saver save and restore, next to the disk's limit, torch.save, safetensors and Lightning?

Everything runs in one process on one model (about 1 GiB of fp32 weights; ``--quick``: 4 MiB),
interleaved: every repetition runs every method once, in an order shuffled anew for each repetition
(a method that frees a lot of memory slows the one after it; ``--seed`` fixes the shuffles), and the
table reports the median over repetitions, so drift of a shared machine hits every method alike.
Every write creates a new file (a name of its own per method and repetition): overwriting one file
in place measured 1.3-2.4x faster than a new file on some file systems, which would favour
whichever writer happened to do it. The Savers rotate as in training (``max_to_keep=2``): from the
third save on, each drops a checkpoint, so the sync row includes what the delete costs its caller.

Every writer gets the same input, the model's ``state_dict()`` taken once before the run (so no
row pays for ``state_dict()``: 1,000 modules took ~6 ms to walk, for any writer alike).

Saves (each fsyncs its file's bytes, so every row buys the same durability for the data; the Saver
also makes its file's name and its state file durable):
  raw write       the same tensor bytes written straight from memory to a new file, then one fsync
                  (the baseline of the paired column)
  raw write-behind  the same, starting the disk's writeback every 8 MiB (sync_file_range) as the
                  Saver's C writer does; the floor for the Saver's way of writing
  Saver sync      ``Saver(async_save=False).save`` (checksums, temp file, rename, state file): three
                  fsyncs, the file, the state file's temporary file, the directory (both renames)
  safetensors     ``safetensors.torch.save_file`` + fsync
  torch.save      ``torch.save`` into a newly created file + fsync
  Lightning       ``TorchCheckpointIO.save_checkpoint`` (torch.save into BytesIO, then a file) + fsync
  Saver async     time ``save()`` blocks the caller, and the time until ``wait()`` returns; the saver
                  is reused across repetitions, as in training (its first save, which allocates the
                  snapshot arena, is reported on its own row)
  memcpy floor    copying the weights into an already allocated CPU buffer, one memcpy per tensor on
                  one thread: the least a one-thread snapshot must block (the Saver's snapshot
                  shares the copy between both cores, so it can come in under this row)
Restores (page cache warm for all, the files were just written):
  Saver.restore (checksums verified, and with verify=False), torch.load(mmap=True) + load_state_dict,
  safetensors.torch.load_file + load_state_dict.

Peak memory: the resident-set high-water mark above the RSS just before the call, per call, in this
process: we reset the kernel's VmHWM by writing 5 to /proc/self/clear_refs, run the call, read VmHWM.
This sees torch's allocations (tracemalloc does not) and counts file pages mapped by mmap as resident.

Usage: python benchmarks/save_load.py [--quick] [--reps N] [--size-mib M] [--dir DIR]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # timing.py

from timing import machine  # noqa: E402

from lightning_saver.formats.durable import fsync_path  # noqa: E402
from lightning_saver.saving.saver import CheckpointSaver  # noqa: E402

# --- peak memory -------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(fn: Callable[[], object]) -> tuple[float, float | None]:
    """Seconds, and peak RSS above the starting RSS in MiB (None where Linux's counters are missing)."""
    ok = _reset_peak()
    base = _status_kib("VmRSS")
    start = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    if not ok or base is None or peak is None:
        return elapsed, None
    return elapsed, max(peak - base, 0) / 1024


# --- the model and the methods -----------------------------------------------------------------


def make_model(size_mib: float) -> nn.Module:
    width = 4096 if size_mib >= 256 else 256
    per_layer = (width * width + width) * 4
    layers = max(1, round(size_mib * 2**20 / per_layer))
    model = nn.Sequential(*[nn.Linear(width, width, device="meta") for _ in range(layers)])
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.1, 0.1)
    return model


def raw_write(state: dict[str, torch.Tensor], path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for t in state.values():
            view = memoryview(t.contiguous().numpy()).cast("B")
            while view:
                view = view[os.write(fd, view[: 64 << 20]) :]
        os.fsync(fd)
    finally:
        os.close(fd)


_LIBC = ctypes.CDLL(None, use_errno=True)
_WRITE_BEHIND = 8 << 20


def raw_write_behind(state: dict[str, torch.Tensor], path: str) -> None:
    """``raw_write`` plus what the Saver's C writer does to the disk: every 8 MiB, start writeback
    of what is written so far (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, Linux), then one fsync.
    The fair floor for the Saver's data writes, which no longer leave all the disk work to fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        done = flushed = 0
        for t in state.values():
            view = memoryview(t.contiguous().numpy()).cast("B")
            while view:
                n = os.write(fd, view[: 64 << 20])
                view, done = view[n:], done + n
                if done - flushed >= _WRITE_BEHIND:
                    _LIBC.sync_file_range(fd, ctypes.c_int64(flushed), ctypes.c_int64(done - flushed), 2)
                    flushed = done
        os.fsync(fd)
    finally:
        os.close(fd)


def safetensors_save(state: dict[str, torch.Tensor], path: str) -> None:
    import safetensors.torch

    safetensors.torch.save_file(state, path)
    fsync_path(path)


def torch_save(state: dict[str, torch.Tensor], path: str) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def lightning_save(state: dict[str, torch.Tensor], path: str) -> None:
    from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

    TorchCheckpointIO().save_checkpoint({"state_dict": state}, path)
    fsync_path(path)


def torch_restore(model: nn.Module, path: str) -> None:
    model.load_state_dict(torch.load(path, mmap=True, weights_only=True))


def safetensors_restore(model: nn.Module, path: str) -> None:
    import safetensors.torch

    model.load_state_dict(safetensors.torch.load_file(path))


Method = tuple[str, Callable[[], object]]
ROWS = [  # table order
    "raw write + fsync", "raw write + write-behind + fsync",
    "Saver.save (sync)", "safetensors save_file + fsync", "torch.save + fsync",
    "Lightning TorchCheckpointIO + fsync", "memcpy into a reused buffer (async floor)",
    "Saver.save (async) blocking", "Saver.save (async) total", "Saver.save (async) first blocking",
    "Saver.save (async) first total", "Saver.restore (verify)", "Saver.restore (no verify)",
    "torch.load(mmap) + load_state_dict", "safetensors load_file + load_state_dict",
]

# --- the run -----------------------------------------------------------------------------------


class Runner:
    def __init__(self, work: Path, model: nn.Module, seed: int) -> None:
        self.work = work
        self.model = model
        self.state = model.state_dict()
        # rotation on, as in training: from the third save on, each save drops a checkpoint
        self.sync = CheckpointSaver(max_to_keep=2)
        self.buffer = {k: torch.empty_like(v) for k, v in self.state.items()}
        self.async_ = CheckpointSaver(max_to_keep=2, async_save=True)
        self.shuffler = random.Random(seed)
        import lightning_fabric.plugins.io.torch_io  # noqa: F401  imported here, untimed (seconds)
        import safetensors.torch  # noqa: F401
        self.times: dict[str, list[float]] = {}
        self.by_rep: dict[str, dict[int, float]] = {}  # name -> rep -> seconds, for paired ratios
        self.peaks: dict[str, list[float]] = {}
        self.rep = 0

    def record(self, name: str, seconds: float, peak: float | None) -> None:
        self.times.setdefault(name, []).append(seconds)
        self.by_rep.setdefault(name, {})[self.rep] = seconds
        if peak is not None:
            self.peaks.setdefault(name, []).append(peak)

    def timed(self, name: str, fn: Callable[[], object]) -> None:
        self.record(name, *measure(fn))

    def paired_ratio(self, name: str, base: str) -> float | None:
        """Median over repetitions of this method's time over ``base``'s time in the same repetition.

        Each repetition runs every method within a few seconds, so a slow spell of the shared disk
        or memory hits both sides of a pair; the median of the pairs is steadier than the ratio
        of the two medians when the machine's speed swings by several times between repetitions.
        """
        mine, theirs = self.by_rep.get(name, {}), self.by_rep.get(base, {})
        pairs = [mine[k] / theirs[k] for k in mine if k in theirs and theirs[k] > 0]
        return statistics.median(pairs) if pairs else None

    def clean(self) -> None:
        """Remove what the other writers wrote (untimed); the Savers' files are theirs to rotate."""
        for p in self.work.iterdir():
            if p.is_file() and not p.name.startswith(("sync_", "async_", "lightning_saver_state", ".")):
                p.unlink()

    def save_round(self, rep: int) -> None:
        self.rep = rep
        w, s = self.work, self.state
        methods: list[Method] = [
            ("raw write + fsync", lambda: raw_write(s, str(w / f"raw_{rep}.bin"))),
            ("raw write + write-behind + fsync", lambda: raw_write_behind(s, str(w / f"rwb_{rep}.bin"))),
            ("Saver.save (sync)", lambda: self.sync.save(s, str(w / "sync"), global_step=rep)),
            ("safetensors save_file + fsync", lambda: safetensors_save(s, str(w / f"st_{rep}.safetensors"))),
            ("torch.save + fsync", lambda: torch_save(s, str(w / f"t_{rep}.pt"))),
            ("Lightning TorchCheckpointIO + fsync", lambda: lightning_save(s, str(w / f"l_{rep}.ckpt"))),
            ("async", lambda: self.async_round(rep)),
            ("memcpy into a reused buffer (async floor)", self.copy_to_buffer),
        ]
        for name, fn in self.shuffled(methods):
            if name == "async":
                fn()
            else:
                self.timed(name, fn)
        self.clean()

    def copy_to_buffer(self) -> None:
        for name, t in self.state.items():
            ctypes.memmove(self.buffer[name].data_ptr(), t.data_ptr(), t.numel() * t.element_size())

    def async_round(self, rep: int) -> None:
        ok = _reset_peak()
        base = _status_kib("VmRSS")
        start = time.perf_counter()
        self.async_.save(self.state, str(self.work / "async"), global_step=rep)
        blocked = time.perf_counter() - start
        self.async_.wait()
        total = time.perf_counter() - start
        hwm = _status_kib("VmHWM")
        peak = (hwm - base) / 1024 if ok and base is not None and hwm is not None else None
        name = "Saver.save (async) first" if rep == 0 else "Saver.save (async)"
        self.record(name + " blocking", blocked, peak)
        self.record(name + " total", total, peak)

    def restore_round(self, paths: dict[str, str], rep: int) -> None:
        self.rep = rep
        m = self.model
        methods: list[Method] = [
            ("Saver.restore (verify)", lambda: self.sync.restore(m, paths["ours"])),
            ("Saver.restore (no verify)", lambda: self.sync.restore(m, paths["ours"], verify=False)),
            ("torch.load(mmap) + load_state_dict", lambda: torch_restore(m, paths["torch"])),
            ("safetensors load_file + load_state_dict", lambda: safetensors_restore(m, paths["st"])),
        ]
        for name, fn in self.shuffled(methods):
            self.timed(name, fn)

    def shuffled(self, methods: list[Method]) -> list[Method]:
        # a new order in every repetition: what a heavy method leaves behind (freed memory,
        # writeback) slows whatever follows it, and must not always hit the same method
        order = list(methods)
        self.shuffler.shuffle(order)
        return order


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


RAW, TORCH_MMAP = "raw write + fsync", "torch.load(mmap) + load_state_dict"
RESTORE_ROWS = ROWS[ROWS.index("Saver.restore (verify)"):]


def _pair_base(name: str) -> str:
    """What a row is paired with, per repetition: the disk for saves, torch.load(mmap) for restores."""
    return TORCH_MMAP if name in RESTORE_ROWS else RAW


def report(r: Runner, size_gib: float, reps: int) -> dict[str, object]:
    times = {k: _median(r.times[k]) for k in ROWS if k in r.times}
    fastest = {k: min(r.times[k]) for k in times}
    peaks = {k: _median(v) for k, v in r.peaks.items()}
    paired = {k: r.paired_ratio(k, _pair_base(k)) for k in times}
    raw = times[RAW]
    print(f"\nsave/load benchmark: {size_gib:.3f} GiB fp32, median of {reps} interleaved reps "
          f"({datetime.date.today().isoformat()}, torch {torch.__version__}, {os.cpu_count()} CPUs)")
    print("paired: median over reps of (this row / raw write) in the same rep; restores: / torch.load(mmap)")
    print(f"{'method':44s} {'median s':>9s} {'x raw':>7s} {'paired':>7s} {'GiB/s':>7s} {'min s':>8s} "
          f"{'peak MiB':>9s}")
    for name, sec in times.items():
        peak = f"{peaks[name]:9.0f}" if name in peaks else f"{'n/a':>9s}"
        pair = f"{paired[name]:7.2f}" if paired[name] is not None else f"{'':>7s}"
        speed = size_gib / sec
        print(f"{name:44s} {sec:9.3f} {sec / raw:7.2f} {pair} {speed:7.2f} {fastest[name]:8.3f} {peak}")
    sync = times["Saver.save (sync)"]
    blocking_row = "Saver.save (async) blocking"
    if blocking_row not in times:
        blocking_row = "Saver.save (async) first blocking"
    blocking = times[blocking_row]
    restore = times["Saver.restore (verify)"]
    peer = times[TORCH_MMAP]
    sync_paired = paired["Saver.save (sync)"] or float("inf")
    blocking_paired = r.paired_ratio(blocking_row, "Saver.save (sync)") or float("inf")
    restore_paired = paired["Saver.restore (verify)"] or float("inf")
    result: dict[str, object] = {
        "benchmark": "save_load",
        "size_gib": round(size_gib, 4),
        "reps": reps,
        "machine": machine(),
        "median_s": {k: round(v, 4) for k, v in times.items()},
        "min_s": {k: round(v, 4) for k, v in fastest.items()},
        "ratio_vs_raw_write": {k: round(v / raw, 3) for k, v in times.items()},
        "paired_ratio": {k: round(v, 3) for k, v in paired.items() if v is not None},
        "peak_extra_mib": {k: round(v, 1) for k, v in peaks.items()},
        "targets": {  # on the medians, as the issue asks; then on the paired ratios
            "sync_save_le_1.15x_raw": sync <= 1.15 * raw,
            "sync_save_le_1.05x_raw": sync <= 1.05 * raw,  # issue #17's goal (2026-12-06)
            "async_blocking_le_10pct_sync": blocking <= 0.10 * sync,
            "verified_restore_le_torch_mmap": restore <= peer,
            "paired_sync_save_le_1.15x_raw": sync_paired <= 1.15,
            "paired_sync_save_le_1.05x_raw": sync_paired <= 1.05,
            "paired_async_blocking_le_10pct_sync": blocking_paired <= 0.10,
            "paired_verified_restore_le_torch_mmap": restore_paired <= 1.0,
        },
        # the Saver's whole save (checksums, temp file, rename, state file, three fsyncs) over a raw
        # writer that starts writeback the same way: what the Saver adds to its own way of writing
        "sync_over_raw_write_behind_paired": round(
            r.paired_ratio("Saver.save (sync)", "raw write + write-behind + fsync") or float("inf"), 3),
        "async_blocking_over_sync": round(blocking / sync, 3),
        "async_blocking_over_sync_paired": round(blocking_paired, 3),
        "verified_restore_over_torch_mmap": round(restore / peer, 3),
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    parser.add_argument("--size-mib", type=float, default=None, help="weights to save (default 1024)")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 5)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir in the cwd)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-repetition shuffles")
    args = parser.parse_args(argv)
    size = args.size_mib if args.size_mib is not None else (4 if args.quick else 1024)
    reps = args.reps if args.reps is not None else (3 if args.quick else 5)
    model = make_model(size)
    size_gib = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**30
    # default: next to the repo, on the same disk users save to (not a tmpfs /tmp)
    work = Path(tempfile.mkdtemp(prefix=".bench_save_load_", dir=args.dir or os.getcwd()))
    try:
        runner = Runner(work, model, args.seed)
        for rep in range(reps):
            runner.save_round(rep)
        paths = {"ours": runner.sync.save(model, str(work / "restore"), global_step=0),
                 "torch": str(work / "t.pt"), "st": str(work / "st.safetensors")}
        torch_save(runner.state, paths["torch"])
        safetensors_save(runner.state, paths["st"])
        for rep in range(reps):
            runner.restore_round(paths, rep)
        runner.async_.wait()
        print(json.dumps(report(runner, size_gib, reps)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
