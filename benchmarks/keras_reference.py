"""What TensorFlow itself achieves with variables: a Keras ResNet-18 (the layers of ``export.py``'s,
NHWC, random weights and batch-norm statistics) timed in a ``tf.function`` with its variables, and
frozen (``convert_variables_to_constants_v2``), each in its own process with equal threads, in rounds
whose order is shuffled; paired ratio variables / frozen. The reference point for the exported
variable graph's ratio to the frozen one (``export.py``): the same oneDNN kernels run on filters
that are variables in both.

    python benchmarks/keras_reference.py --batch 1 --threads 1
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
from typing import Any

from timing import machine, median_seconds

MODES = ("variables", "frozen")


def _resnet18(tf: Any, size: int) -> Any:
    layers = tf.keras.layers

    def bn(h: Any) -> Any:
        return layers.BatchNormalization(epsilon=1e-5)(h)

    def block(x: Any, cout: int, stride: int) -> Any:
        y = layers.ReLU()(bn(layers.Conv2D(cout, 3, stride, "same", use_bias=False)(x)))
        y = bn(layers.Conv2D(cout, 3, 1, "same", use_bias=False)(y))
        if stride != 1 or x.shape[-1] != cout:
            x = bn(layers.Conv2D(cout, 1, stride, use_bias=False)(x))
        return layers.ReLU()(layers.Add()([x, y]))

    images = layers.Input((size, size, 3))
    h = layers.ReLU()(bn(layers.Conv2D(64, 7, 2, "same", use_bias=False)(images)))
    h = layers.MaxPool2D(3, 2, "same")(h)
    for i, cout in enumerate([64, 128, 256, 512]):
        h = block(block(h, cout, 1 if i == 0 else 2), cout, 1)
    out = layers.Dense(1000)(layers.GlobalAveragePooling2D()(h))
    model = tf.keras.Model(images, out)
    rng = random.Random(0)
    for layer in model.layers:  # realistic statistics: grappler cannot drop a zero shift or unit scale
        if isinstance(layer, layers.BatchNormalization):
            c = layer.gamma.shape[0]
            for var, low, high in ((layer.gamma, 0.75, 1.25), (layer.beta, -0.1, 0.1),
                                   (layer.moving_mean, -0.1, 0.1), (layer.moving_variance, 0.75, 1.25)):
                var.assign([rng.uniform(low, high) for _ in range(c)])
    return model


def _worker(mode: str, batch: int, threads: int, repeats: int) -> float:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.random.set_seed(0)
    model = _resnet18(tf, 224)
    fn = tf.function(lambda x: model(x, training=False))
    x = np.random.default_rng(0).standard_normal((batch, 224, 224, 3)).astype(np.float32)
    concrete = fn.get_concrete_function(tf.TensorSpec((None, 224, 224, 3), tf.float32))
    if mode == "frozen":
        from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

        concrete = convert_variables_to_constants_v2(concrete)
    tensor = tf.constant(x)
    def run() -> Any:
        out = concrete(tensor)
        return (out[0] if isinstance(out, list | tuple) else out).numpy()
    return median_seconds(run, repeats)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", default=None, help="comma-separated (default: 1 and all cores)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps({"seconds": _worker(args.worker, args.batch, int(args.threads), args.repeats)}))
        return 0
    cores = os.cpu_count() or 1
    counts = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, cores})
    print(f"CPU: {machine()['cpu']}, {cores} logical CPUs; load {os.getloadavg()}")
    results = []
    for threads in counts:
        seconds: dict[str, list[float]] = {m: [] for m in MODES}
        for _ in range(args.rounds):
            for mode in random.sample(MODES, len(MODES)):
                command = [sys.executable, os.path.abspath(__file__), "--worker", mode,
                           "--batch", str(args.batch), "--threads", str(threads),
                           "--repeats", str(args.repeats)]
                env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "OMP_NUM_THREADS": str(threads)}
                done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
                seconds[mode].append(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])
        ratio = statistics.median(a / b for a, b in zip(seconds["variables"], seconds["frozen"], strict=True))
        result = {"threads": threads, "batch": args.batch, "ratio_variables_vs_frozen": ratio,
                  "median_s": {m: statistics.median(v) for m, v in seconds.items()}}
        results.append(result)
        median = result["median_s"]
        print(f"Keras ResNet-18, batch {args.batch}, {threads} thread(s): variables "
              f"{median['variables'] * 1e3:.1f} ms, frozen {median['frozen'] * 1e3:.1f} ms, "
              f"variables / frozen (paired) {ratio:.2f}; load {os.getloadavg()[0]:.1f}")
    print(json.dumps({"machine": machine(), "benchmark": "keras_reference", "rounds": args.rounds,
                      "repeats": args.repeats, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
