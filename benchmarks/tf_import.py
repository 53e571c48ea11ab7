"""Is an imported TF graph as fast as TensorFlow? Forward pass of the same graph, batch and weights.

A CNN and an MLP are built with tf.compat.v1, saved (MetaGraph + TF checkpoint) and imported with
``import_meta_graph``. Timed, on CPU, per call (median of repeats):
``session.run`` (TF), ``graph.run`` (ours, numpy in and out, like session.run) and the
``to_module`` GraphModule under ``torch.no_grad`` (torch tensors in and out).
Ratios are ours / TF: below 1 means faster than TensorFlow. Both sides get the same number of
intra-op threads (``--threads``, default 1): on a shared, oversubscribed machine torch's OpenMP
barriers stall badly with more threads than free cores, which would measure the load, not the code.

    python benchmarks/tf_import.py            # batch 1 and 256
    python benchmarks/tf_import.py --quick    # tiny, for the smoke test

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from timing import machine, median_seconds

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _dense(tf: Any, x: Any, units: int, name: str) -> Any:
    v1 = tf.compat.v1
    w = v1.get_variable(f"{name}/kernel", [x.shape[-1], units], use_resource=False)
    b = v1.get_variable(f"{name}/bias", [units], initializer=v1.zeros_initializer(), use_resource=False)
    return tf.nn.bias_add(tf.matmul(x, w), b)


def build_mlp(tf: Any, size: int) -> None:
    x = tf.compat.v1.placeholder(tf.float32, [None, size], name="x")
    h = tf.nn.relu(_dense(tf, x, 4 * size, "fc1"))
    h = tf.nn.relu(_dense(tf, h, 4 * size, "fc2"))
    tf.nn.softmax(_dense(tf, h, 10, "out"), name="probs")


def build_cnn(tf: Any, size: int) -> None:
    v1 = tf.compat.v1
    x = v1.placeholder(tf.float32, [None, size, size, 3], name="x")
    h = x
    for i, channels in enumerate([16, 32]):
        k = v1.get_variable(f"conv{i}/kernel", [3, 3, h.shape[-1], channels], use_resource=False)
        h = tf.nn.conv2d(h, k, 1, "SAME")
        scale = v1.get_variable(f"bn{i}/gamma", [channels], initializer=v1.ones_initializer())
        offset = v1.get_variable(f"bn{i}/beta", [channels], initializer=v1.zeros_initializer())
        mean = v1.get_variable(f"bn{i}/mean", [channels], initializer=v1.zeros_initializer())
        var = v1.get_variable(f"bn{i}/variance", [channels], initializer=v1.ones_initializer())
        h, _, _ = v1.nn.fused_batch_norm(h, scale, offset, mean, var, is_training=False)
        h = tf.nn.max_pool2d(tf.nn.relu(h), 2, 2, "VALID")
    h = tf.reduce_mean(h, axis=[1, 2])
    tf.nn.softmax(_dense(tf, h, 10, "out"), name="probs")


def bench_model(tf: Any, name: str, build: Callable[[Any, int], None], size: int, shape: tuple[int, ...],
                batches: list[int], repeats: int, min_time: float, directory: str) -> list[dict[str, Any]]:
    from lightning_saver import import_meta_graph

    v1 = tf.compat.v1
    graph = tf.Graph()
    rows = []
    with graph.as_default():
        build(tf, size)
        v1.set_random_seed(0)
        saver = v1.train.Saver()
        config = v1.ConfigProto(intra_op_parallelism_threads=torch.get_num_threads(),
                                inter_op_parallelism_threads=1)
        sess = v1.Session(graph=graph, config=config)
        sess.run(v1.global_variables_initializer())
        prefix = saver.save(sess, os.path.join(directory, f"{name}.ckpt"), write_meta_graph=False)
        meta = os.path.join(directory, f"{name}.meta")
        v1.train.export_meta_graph(filename=meta, graph=graph, saver_def=saver.as_saver_def())
    ours = import_meta_graph(meta)
    ours.restore(prefix)
    module = ours.to_module(inputs="x:0", outputs="probs:0").eval()
    for batch in batches:
        x = np.random.default_rng(batch).normal(size=(batch, *shape)).astype(np.float32)
        expected = sess.run("probs:0", {"x:0": x})
        np.testing.assert_allclose(ours.run("probs:0", {"x:0": x}), expected, rtol=1e-4, atol=1e-5)
        xt = torch.from_numpy(x)

        def run_module(xt: torch.Tensor = xt) -> Any:
            with torch.no_grad():
                return module(xt)

        timing = {"min_time": min_time, "warmup": 2}
        t_tf = median_seconds(lambda x=x: sess.run("probs:0", {"x:0": x}), repeats, **timing)
        t_run = median_seconds(lambda x=x: ours.run("probs:0", {"x:0": x}), repeats, **timing)
        t_mod = median_seconds(run_module, repeats, **timing)
        rows.append({"model": name, "batch": batch, "tf_ms": t_tf * 1e3, "run_ms": t_run * 1e3,
                     "module_ms": t_mod * 1e3, "run_ratio": t_run / t_tf, "module_ratio": t_mod / t_tf})
    sess.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and few repeats (smoke test)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for both TF and torch")
    args = parser.parse_args(argv)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(previous_threads)


def _run(args: argparse.Namespace) -> int:
    import tensorflow as tf

    if args.quick:
        batches, repeats, min_time, mlp_size, cnn_size = [1, 4], 3, 0.0, 8, 8
    else:
        batches, repeats, min_time, mlp_size, cnn_size = [1, 256], 30, 1.0, 256, 32
    with tempfile.TemporaryDirectory() as directory:
        timing = (batches, repeats, min_time, directory)
        rows = bench_model(tf, "mlp", build_mlp, mlp_size, (mlp_size,), *timing)
        rows += bench_model(tf, "cnn", build_cnn, cnn_size, (cnn_size, cnn_size, 3), *timing)
    header = f"{'model':<6}{'batch':>6}{'TF ms':>10}{'run ms':>10}{'module ms':>11}{'run/TF':>9}"
    print(header + f"{'module/TF':>11}")
    for r in rows:
        print(f"{r['model']:<6}{r['batch']:>6}{r['tf_ms']:>10.3f}{r['run_ms']:>10.3f}{r['module_ms']:>11.3f}"
              f"{r['run_ratio']:>9.2f}{r['module_ratio']:>11.2f}")
    summary = {
        "benchmark": "tf_import", "quick": args.quick, "threads": args.threads,
        "rows": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
        "worst_run_ratio": round(max(r["run_ratio"] for r in rows), 3),
    }
    summary["machine"] = machine()
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
