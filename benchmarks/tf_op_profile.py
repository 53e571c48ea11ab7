"""Where the exported ResNet-18's TensorFlow time goes, variable graph next to the frozen one: per op
type (``RunOptions(trace_level=FULL_TRACE)`` step stats, after grappler and the oneDNN rewrite) and
per oneDNN primitive (``ONEDNN_VERBOSE=1``: convolution time, the per-run weight reorders, the
filter layout each convolution runs on). Each graph and batch in its own process, TensorFlow as
shipped, 1 thread by default; times are per run, medians of the traced runs (ops) and means of the
verbose runs (primitives).

    python benchmarks/tf_op_profile.py                      # batch 1 and 8, 1 thread
    python benchmarks/tf_op_profile.py --batches 8 --runs 5
    python benchmarks/tf_op_profile.py --quick              # tiny ResNet, for the smoke test
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from timing import machine

GRAPHS = ("model", "frozen")  # the variable graph's files, the frozen graph's
MARK = "=== timed runs ==="


def _worker(folder: str, graph: str, batch: int, threads: int, runs: int) -> dict[str, Any]:
    import tensorflow as tf

    v1 = tf.compat.v1
    meta = os.path.join(folder, f"{graph}.meta")
    g = tf.Graph()
    config = v1.ConfigProto(intra_op_parallelism_threads=threads, inter_op_parallelism_threads=1)
    with g.as_default():
        saver = v1.train.import_meta_graph(meta)
        session = v1.Session(graph=g, config=config)
        if graph == "model":
            saver.restore(session, meta[: -len(".meta")])
    feeds = {f"{k}:0": v for k, v in np.load(os.path.join(folder, f"inputs_{batch}.npz")).items()}
    for _ in range(3):
        session.run("output_0:0", feeds)
    per_op: dict[str, list[float]] = collections.defaultdict(list)
    options = v1.RunOptions(trace_level=v1.RunOptions.FULL_TRACE)
    for _ in range(runs):
        metadata = v1.RunMetadata()
        session.run("output_0:0", feeds, options=options, run_metadata=metadata)
        totals: dict[str, float] = collections.Counter()
        for device in metadata.step_stats.dev_stats:
            for node in device.node_stats:
                label = node.timeline_label
                op = label.split(" = ", 1)[1].split("(", 1)[0] if " = " in label else label
                totals[op] += node.all_end_rel_micros / 1e3
        for op, ms in totals.items():
            per_op[op].append(ms)
    sys.stdout.flush()
    os.write(1, f"{MARK}\n".encode())  # oneDNN writes its verbose lines to fd 1 directly
    for _ in range(runs):
        session.run("output_0:0", feeds)
    return {op: statistics.median(v) for op, v in per_op.items()}


def _primitives(lines: list[str], runs: int) -> dict[str, float]:
    """oneDNN's ``exec`` lines after the marker -> ms per run by kind (weight reorders apart)."""
    totals: dict[str, float] = collections.Counter()
    for line in lines:
        fields = line.split(",")
        if len(fields) < 6 or fields[3] != "exec":
            continue
        kind, desc = fields[5], ",".join(fields[8:10])
        if kind == "reorder":
            kind = "reorder (weights)" if "src:f32::blocked:cdba" in desc else "reorder (data)"
        elif kind == "convolution":
            plain = "wei:f32::blocked:cdba" in desc
            kind = f"convolution, {'plain HWIO' if plain else 'blocked'} filter"
        totals[kind] += float(fields[-1]) / runs
    return dict(totals)


def _spawn(folder: str, graph: str, batch: int, threads: int, runs: int) -> dict[str, Any]:
    command = [sys.executable, os.path.abspath(__file__), "--worker", graph, "--folder", folder,
               "--batches", str(batch), "--threads", str(threads), "--runs", str(runs)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "OMP_NUM_THREADS": str(threads), "ONEDNN_VERBOSE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{graph} worker failed:\n{done.stderr[-3000:]}")
    after = done.stdout.partition(MARK)[2]
    ops = json.loads(next(line for line in reversed(after.splitlines()) if line.startswith("{")))
    return {"ops_ms": ops, "primitives_ms": _primitives(after.splitlines(), runs)}


def _export(folder: str, quick: bool, batches: Sequence[int]) -> None:
    from export import _model

    from lightning_saver.graph.tf_export import export_meta_graph

    for batch in batches:
        timed = _model("resnet18", quick, batch)[2]
        np.savez(os.path.join(folder, f"inputs_{batch}.npz"), **{k: v.numpy() for k, v in timed.items()})
    model, example, _ = _model("resnet18", quick)
    export_meta_graph(model, (), os.path.join(folder, "model.meta"), kwargs=example)
    export_meta_graph(model, (), os.path.join(folder, "frozen.meta"), kwargs=example, freeze=True)


def _print(batch: int, threads: int, result: dict[str, dict[str, Any]]) -> None:
    print(f"\nResNet-18, batch {batch}, {threads} thread(s); load {os.getloadavg()[0]:.1f}; ms per run")
    for section in ("ops_ms", "primitives_ms"):
        names = sorted({k for g in GRAPHS for k in result[g][section]},
                       key=lambda k: -max(result[g][section].get(k, 0.0) for g in GRAPHS))
        title = "op type (step stats)" if section == "ops_ms" else "oneDNN primitive"
        print(f"{title:<48}{'variables':>10}{'frozen':>10}")
        for name in names[:12]:
            cells = "".join(f"{result[g][section].get(name, 0.0):>10.2f}" for g in GRAPHS)
            print(f"  {name:<46}{cells}")
        totals = "".join(f"{sum(result[g][section].values()):>10.2f}" for g in GRAPHS)
        print(f"  {'total':<46}{totals}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--threads", default="1")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--worker", choices=GRAPHS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    runs = args.runs or (2 if args.quick else 10)
    if args.worker:
        ops = _worker(args.folder, args.worker, int(args.batches), int(args.threads), runs)
        print(json.dumps(ops))
        return 0
    batches = [2] if args.quick else [int(b) for b in args.batches.split(",")]
    print(f"CPU: {machine()['cpu']}, {os.cpu_count()} logical CPUs; load average {os.getloadavg()}")
    results = []
    folder = tempfile.mkdtemp(prefix="tf_op_profile_")
    _export(folder, args.quick, batches)
    for batch in batches:
        for threads in [int(t) for t in args.threads.split(",")]:
            result = {g: _spawn(folder, g, batch, threads, runs) for g in GRAPHS}
            _print(batch, threads, result)
            results.append({"batch": batch, "threads": threads, **result})
    print(json.dumps({"machine": machine(), "benchmark": "tf_op_profile", "quick": args.quick, "runs": runs,
                      "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
