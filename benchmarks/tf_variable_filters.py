"""The cost TensorFlow's oneDNN convolution adds for a filter that is a variable, not a ``Const``:
a stack of 8 3x3 256-channel Conv2D + ReLU on 14 x 14 (ResNet's third stage), filters as ``Const``,
as ref variables (``VariableV2``, what ``export_meta_graph`` writes) and as resource variables
(``VarHandleOp``, what Keras uses); each kind in its own process with equal threads, rounds in
shuffled order, paired ratios against ``Const``. TensorFlow as shipped (oneDNN and grappler on).

    python benchmarks/tf_variable_filters.py --batches 1,8 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
from collections.abc import Sequence

from timing import machine, median_seconds

KINDS = ("const", "ref", "resource")


def _worker(kind: str, batch: int, threads: int, repeats: int) -> float:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import tensorflow as tf

    v1 = tf.compat.v1
    rng = np.random.default_rng(0)
    graph = tf.Graph()
    with graph.as_default():
        x = v1.placeholder(tf.float32, (None, 14, 14, 256))
        h = x
        for i in range(8):
            w = (rng.standard_normal((3, 3, 256, 256)) * 0.03).astype(np.float32)
            f = tf.constant(w) if kind == "const" else v1.Variable(w, use_resource=kind == "resource",
                                                                   name=f"w{i}")
            h = tf.nn.relu(tf.nn.conv2d(h, f, 1, "SAME"))
        init = v1.global_variables_initializer()
    config = v1.ConfigProto(intra_op_parallelism_threads=threads, inter_op_parallelism_threads=1)
    session = v1.Session(graph=graph, config=config)
    session.run(init)
    feed = {x: rng.standard_normal((batch, 14, 14, 256)).astype(np.float32)}
    return median_seconds(lambda: session.run(h, feed), repeats, warmup=3)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--threads", default="1")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        seconds = _worker(args.worker, int(args.batches), int(args.threads), args.repeats)
        print(json.dumps({"seconds": seconds}))
        return 0
    print(f"CPU: {machine()['cpu']}, {os.cpu_count()} logical CPUs; load {os.getloadavg()}")
    results = []
    for threads in [int(t) for t in args.threads.split(",")]:
        for batch in [int(b) for b in args.batches.split(",")]:
            seconds: dict[str, list[float]] = {k: [] for k in KINDS}
            for _ in range(args.rounds):
                for kind in random.sample(KINDS, len(KINDS)):
                    command = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--batches",
                               str(batch), "--threads", str(threads), "--repeats", str(args.repeats)]
                    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "OMP_NUM_THREADS": str(threads)}
                    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
                    seconds[kind].append(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])
            ratios = {k: statistics.median(a / b for a, b in zip(seconds[k], seconds["const"], strict=True))
                      for k in KINDS}
            median = {k: statistics.median(v) for k, v in seconds.items()}
            results.append({"threads": threads, "batch": batch, "median_s": median,
                            "paired_vs_const": ratios})
            cells = ", ".join(f"{k} {median[k] * 1e3:.1f} ms ({ratios[k]:.2f})" for k in KINDS)
            print(f"batch {batch}, {threads} thread(s): {cells}; load {os.getloadavg()[0]:.1f}")
    print(json.dumps({"machine": machine(), "benchmark": "tf_variable_filters", "rounds": args.rounds,
                      "repeats": args.repeats, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
