"""What does an async save cost in CPU, and how long does it run in the background?

One ``CheckpointSaver(async_save=True)`` saves the same state ``--saves`` times into new files (the
first save, which allocates the snapshot memory, is not counted). Per save it reports:

* ``writer_cpu_ms``: CPU time of the writer thread's job (``time.thread_time`` in the thread,
  ``AsyncWriter.cpu_seconds``): what the writer takes from training while it runs beside it.
  With ``--defer`` (as the Lightning callback saves) the job also makes the snapshot copy, unless
  a training thread reaches the optimizer's fence first (never here: nothing calls the fence).
* ``caller_ms``: wall time of ``save()`` (the snapshot copy that is not deferred, and the set-up);
* ``background_ms``: from the return of ``save()`` to the return of ``wait()``.

The state is an MLP's parameters and Adam's two moments (``--width``, ``--depth``; default 38.7 MB
as ``lightning_overhead.py``'s model) or ``--size-mib`` of 4 MiB tensors. Run it with one
``PYTHONPATH`` and then another to compare two trees, in alternation, under the bench lock.

Usage: python benchmarks/async_save_cpu.py [--saves N] [--defer] [--size-mib M] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # timing.py

from timing import machine  # noqa: E402

import lightning_saver  # noqa: E402
from lightning_saver.saving.saver import CheckpointSaver  # noqa: E402


def state(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if args.size_mib:
        shapes = [(1024, 1024)] * max(1, int(args.size_mib) // 4)
    else:
        shapes = [(args.width, 64), (args.width,)]
        shapes += [(args.width, args.width), (args.width,)] * (args.depth - 1)
        shapes += [(10, args.width), (10,)]
    out: dict[str, torch.Tensor] = {}
    for i, shape in enumerate(shapes):
        for kind in ("param", "exp_avg", "exp_avg_sq"):
            out[f"{kind}/{i}"] = torch.randn(shape, generator=g)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--saves", type=int, default=15)
    parser.add_argument("--defer", action="store_true", help="defer_copy=True: the writer copies")
    parser.add_argument("--size-mib", type=float, default=None)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args(argv)
    tensors = state(args)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    root = tempfile.mkdtemp(prefix="async_save_cpu_", dir=args.dir or os.getcwd())
    saver = CheckpointSaver(max_to_keep=2, async_save=True)
    rows = []
    try:
        for step in range(args.saves + 1):
            writer = saver._writer
            cpu0 = writer.cpu_seconds if writer is not None else 0.0
            t0 = time.perf_counter()
            saver.save(tensors, os.path.join(root, "m"), global_step=step, defer_copy=args.defer)
            t1 = time.perf_counter()
            saver.wait()
            t2 = time.perf_counter()
            if step:
                rows.append(((saver._writer.cpu_seconds - cpu0) * 1e3, (t1 - t0) * 1e3, (t2 - t1) * 1e3))
            time.sleep(0.05)  # let the deleter of the rotated file finish outside the next save
    finally:
        saver.close()
        shutil.rmtree(root, ignore_errors=True)
    med = [statistics.median(col) for col in zip(*rows, strict=True)]
    tree = Path(lightning_saver.__file__).resolve().parents[1]  # PYTHONPATH may name another tree
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=tree).stdout.strip()
    print(json.dumps({"benchmark": "async_save_cpu", "machine": machine(), "tree": str(tree),
                      "commit": commit, "mb": round(nbytes / 1e6, 1),
                      "defer": args.defer, "saves": len(rows), "writer_cpu_ms": round(med[0], 2),
                      "caller_ms": round(med[1], 2), "background_ms": round(med[2], 2),
                      "writer_cpu_ms_all": [round(r[0], 2) for r in rows]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
