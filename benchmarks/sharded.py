"""Sharded saves: our sets against DCP's own writers, by 1 and by 2 processes (CPU, gloo).

The same state (``--mib`` MiB in all, default 1024: float32 matrices sharded by rows as FSDP2 does)
is saved by each method, in alternation with the order shuffled per repeat, into a new folder each
time (deleted after):

* ``ours``: ``CheckpointSaver.save`` of DTensors, one safetensors file per rank, index, state file;
* ``dcp_fs``: ``torch.distributed.checkpoint.save`` with its default ``FileSystemWriter`` (what
  Lightning's ``ModelParallelStrategy.save_checkpoint`` calls for its distributed checkpoints, plus
  a pickled ``meta.pt`` of the non-tensor state, omitted here);
* ``dcp_hf``: DCP with ``HuggingFaceStorageWriter(save_distributed=True)``, one file per rank.

Per save: wall time (slowest rank, between barriers), bytes on disk, and the peak resident memory
above the level before the save (per rank, sampled every 2 ms). Then a restore into a freshly
sharded state of the same world size, and the world-size-1 folder restored by 2 processes
(resharding). One table per run and one JSON line; ratios are ours / DCP's, paired per repeat.

Usage: python benchmarks/sharded.py [--mib 1024] [--repeats 3] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sharded_lightning  # noqa: E402
import timing  # noqa: E402

METHODS = ("ours", "dcp_fs", "dcp_hf")
COLS = 4096
TENSORS = 16


def _state(world: int, mib: int) -> dict[str, torch.Tensor]:
    mesh = init_device_mesh("cpu", (world,))
    rows = max(1, mib * (1 << 20) // (TENSORS * COLS * 4))
    torch.manual_seed(0)
    return {f"layer{i}.weight": distribute_tensor(torch.randn(rows, COLS), mesh, [Shard(0)])
            for i in range(TENSORS)}


def _empty_like(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: DTensor.from_local(torch.zeros_like(v.to_local()), v.device_mesh, v.placements,
                                  shape=v.shape, stride=v.stride()) for k, v in state.items()}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Peak:
    """Peak RSS above the starting level while the block runs (a 2 ms sampling thread)."""

    def __enter__(self) -> _Peak:
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def _save(method: str, state: dict[str, torch.Tensor], folder: str) -> None:
    if method == "ours":
        from lightning_saver.saving.saver import CheckpointSaver

        CheckpointSaver(max_to_keep=None).save(state, os.path.join(folder, "model"), global_step=1)
    elif method == "dcp_fs":
        dcp.save(state, storage_writer=dcp.FileSystemWriter(folder))
    else:
        dcp.save(state, storage_writer=dcp.HuggingFaceStorageWriter(folder, save_distributed=True))


def _load(method: str, target: dict[str, torch.Tensor], folder: str) -> None:
    if method == "ours":
        from lightning_saver.saving import sharded

        path = os.path.join(folder, "model_1.safetensors.index.json")
        sharded.load_into(path, sharded.read_index(path), dict(target), verify=True, collective=True)
    elif method == "dcp_fs":
        dcp.load(target, storage_reader=dcp.FileSystemReader(folder))
    else:
        dcp.load(target, storage_reader=dcp.HuggingFaceStorageReader(folder))


def _du(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def _timed(fn: Any) -> tuple[float, int]:
    dist.barrier()
    with _Peak() as peak:
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        seconds = time.perf_counter() - t0
    return seconds, peak.extra


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, base: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    state = _state(world, args.mib)
    rows: list[dict[str, Any]] = []
    rng = random.Random(1)
    for rep in range(args.repeats):
        order = list(METHODS)
        rng.shuffle(order)
        for method in order:
            folder = os.path.join(base, f"w{world}_{method}_{rep}")
            seconds, extra = _timed(lambda m=method, f=folder: _save(m, state, f))
            nbytes = _du(folder) if rank == 0 else 0
            target = _empty_like(state)
            load_s, load_extra = _timed(lambda m=method, t=target, f=folder: _load(m, t, f))
            ok = all(torch.equal(target[k].to_local(), state[k].to_local()) for k in state)
            row = {"world": world, "method": method, "rep": rep, "save_s": seconds, "bytes": nbytes,
                   "save_peak_extra": extra, "load_s": load_s, "load_peak_extra": load_extra, "ok": ok}
            resharded = os.path.join(base, f"w1_{method}_{rep}")
            if world > 1 and os.path.isdir(resharded):  # written by 1 process, read by `world`
                target = _empty_like(state)
                row["reshard_load_s"], _ = _timed(lambda m=method, t=target, f=resharded: _load(m, t, f))
                row["reshard_ok"] = all(torch.equal(target[k].to_local(), state[k].to_local()) for k in state)
            rows.append(row)
            dist.barrier()
            if rank == 0 and world > 1:
                shutil.rmtree(folder, ignore_errors=True)
            dist.barrier()
    with open(os.path.join(out, f"rank{rank}_w{world}.json"), "w") as f:
        json.dump(rows, f)
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for world in (1, 2):
        for method in METHODS:
            sel = [r for r in rows if r["world"] == world and r["method"] == method and r["rank"] == 0]
            peaks = [r["save_peak_extra"] for r in rows if r["world"] == world and r["method"] == method]
            if not sel:
                continue
            entry = {"world": world, "method": method,
                     "save_s": statistics.median(r["save_s"] for r in sel),
                     "load_s": statistics.median(r["load_s"] for r in sel),
                     "bytes": sel[0]["bytes"], "save_peak_extra_mib": max(peaks) / (1 << 20),
                     "ok": all(r["ok"] for r in sel)}
            if "reshard_load_s" in sel[0]:
                entry["reshard_1to2_load_s"] = statistics.median(r["reshard_load_s"] for r in sel)
                entry["reshard_ok"] = all(r["reshard_ok"] for r in sel)
            out.append(entry)
    return out


def _ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Median over repeats of ours / DCP's, paired within a repeat (rank 0's timings)."""
    ratios: dict[str, float] = {}
    for world in (1, 2):
        for other in ("dcp_fs", "dcp_hf"):
            for what in ("save_s", "load_s"):
                pairs = []
                for rep in {r["rep"] for r in rows}:
                    mine = [r[what] for r in rows if (r["world"], r["method"], r["rep"], r["rank"]) ==
                            (world, "ours", rep, 0)]
                    theirs = [r[what] for r in rows if (r["world"], r["method"], r["rep"], r["rank"]) ==
                              (world, other, rep, 0)]
                    if mine and theirs:
                        pairs.append(mine[0] / theirs[0])
                if pairs:
                    ratios[f"w{world}_{what}_ours_over_{other}"] = round(statistics.median(pairs), 3)
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp folder)")
    args = parser.parse_args()
    before = timing.machine()
    base = tempfile.mkdtemp(prefix="sharded_bench_", dir=args.dir)
    out = tempfile.mkdtemp(prefix="sharded_bench_out_")
    try:
        rows: list[dict[str, Any]] = []
        for world in (1, 2):
            mp.spawn(_worker, args=(world, _port(), args, base, out), nprocs=world)
            for rank in range(world):
                with open(os.path.join(out, f"rank{rank}_w{world}.json")) as f:
                    rows += [dict(r, rank=rank) for r in json.load(f)]
        pl_args = (2, _port(), args.mib, args.repeats, COLS, TENSORS, base, out)
        mp.spawn(sharded_lightning.worker, args=pl_args, nprocs=2)
        pl_rows: list[dict[str, Any]] = []
        for rank in range(2):
            with open(os.path.join(out, f"pl_rank{rank}_w2.json")) as f:
                pl_rows += [dict(r, rank=rank) for r in json.load(f)]
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    summary = _summary(rows)
    head = ("world", "method", "save s", "load s", "1->2 s", "MiB", "peak+MiB")
    print(f"{head[0]:>5} {head[1]:<7} " + " ".join(f"{h:>8}" for h in head[2:]) + " ok")
    for e in summary:
        reshard = f"{e['reshard_1to2_load_s']:8.3f}" if "reshard_1to2_load_s" in e else f"{'':>8}"
        print(f"{e['world']:>5} {e['method']:<7} {e['save_s']:8.3f} {e['load_s']:8.3f} {reshard} "
              f"{e['bytes'] / (1 << 20):8.1f} {e['save_peak_extra_mib']:9.1f} {e['ok']}")
    ratios = _ratios(rows)
    for key, value in ratios.items():
        print(f"{key}: {value}")
    lightning = sharded_lightning.summary(pl_rows)
    print(f"Lightning, 2 processes: Saver {lightning['saver_save_s']:.3f} s, "
          f"ModelCheckpoint's save_checkpoint {lightning['lightning_save_s']:.3f} s, "
          f"ratio (paired) {lightning['saver_over_lightning']}")
    print(json.dumps({"benchmark": "sharded", "mib": args.mib, "repeats": args.repeats, "summary": summary,
                      "ratios": ratios, "lightning_w2": lightning,
                      "machine_before": before, "machine_after": timing.machine()}))


if __name__ == "__main__":
    main()
