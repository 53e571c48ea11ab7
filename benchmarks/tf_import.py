"""Is an imported TF graph as fast as TensorFlow? Forward pass of the same graph, batch and weights.

Models: a Keras ResNet50 and MobileNetV2 (``weights=None``, built here and frozen the usual way,
``convert_variables_to_constants_v2``), a small NHWC CNN with fused batch norm and an MLP written
with tf.compat.v1 variables and restored from a TF checkpoint. Each is saved as a ``.meta``.

Each runtime runs in its own worker process with the same thread count (torch's
``set_num_threads``; TF's intra-op threads, one inter-op thread): TensorFlow ``session.run`` on
the ``.meta``, ours ``graph.run`` (numpy in and out, like session.run) and the ``to_module``
module under ``torch.no_grad``; with ``--compiled`` also that module through ``compile_module``
(inductor with freezing and the C++ wrapper; its first call per batch size traces and compiles,
reported as ``compile s``). The workers wait idle while another one is timed; for each case
they are timed in rounds, in a random order each round, and the ratio ours / TF is taken within a
round (paired) and reported as the median over rounds. Below 1 is faster than TensorFlow. A first,
uncounted round warms each side up; each counted round then times at least ``--reps`` calls per
side, more where that would last under ``--min-round-ms`` (so the 0.2 ms models time ~250).
Outputs are checked against TensorFlow's first.

    python benchmarks/tf_import.py                    # 1 and 2 threads, batch 1 and 8
    python benchmarks/tf_import.py --models resnet50 --threads 1 --batches 8
    python benchmarks/tf_import.py --quick            # tiny models, for the smoke test
    python benchmarks/tf_import.py --compiled --threads 1 --batches 1   # plus compile_module

Prints a table, then one JSON line (with the CPU model, kernel and load averages before and after).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from timing import machine

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
SIDES = ("tf", "run", "module")
COMPILED = "compiled"  # the extra side of --compiled
# the uncounted first round warms every side up past our convolutions' timed first calls
# (conv_kernels.py: up to 5 kernels x 4 calls per shape with the optional dnnl one, some of them slow)
FIRST_WARMUP = 21
# counted rounds of the small models used to be 9 calls of 0.2-0.5 ms: a few ms per side, so one
# stall of this shared VM moved a round's ratio by 50%, and whole runs of the same code gave the
# small CNN's module 0.97, 1.44 and 1.52 of TensorFlow's time (7 rounds each); 31 rounds of 50 calls
# gave 0.90 and 0.74
MIN_ROUND_MS = 50.0


# ---- building the models (in the parent process, with TensorFlow) ----

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
        uniform = v1.random_uniform_initializer
        scale = v1.get_variable(f"bn{i}/gamma", [channels], initializer=uniform(0.5, 1.5))
        offset = v1.get_variable(f"bn{i}/beta", [channels], initializer=uniform(-0.2, 0.2))
        mean = v1.get_variable(f"bn{i}/mean", [channels], initializer=uniform(-0.1, 0.1))
        var = v1.get_variable(f"bn{i}/variance", [channels], initializer=uniform(0.5, 2))
        h, _, _ = v1.nn.fused_batch_norm(h, scale, offset, mean, var, is_training=False)
        h = tf.nn.max_pool2d(tf.nn.relu(h), 2, 2, "VALID")
    h = tf.reduce_mean(h, axis=[1, 2])
    tf.nn.softmax(_dense(tf, h, 10, "out"), name="probs")


def save_tf1(tf: Any, build: Callable[[Any, int], None], size: int, directory: str,
             name: str) -> dict[str, Any]:
    """A tf.compat.v1 graph with variables: ``.meta`` plus a TF checkpoint."""
    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        v1.set_random_seed(0)
        build(tf, size)
        saver = v1.train.Saver()
        with v1.Session(graph=graph) as sess:
            sess.run(v1.global_variables_initializer())
            prefix = saver.save(sess, os.path.join(directory, f"{name}.ckpt"), write_meta_graph=False)
        meta = os.path.join(directory, f"{name}.meta")
        v1.train.export_meta_graph(filename=meta, graph=graph, saver_def=saver.as_saver_def())
    return {"meta": meta, "ckpt": prefix, "input": "x:0", "output": "probs:0"}


def save_keras(tf: Any, application: str, size: int, directory: str, name: str,
               **kwargs: Any) -> dict[str, Any]:
    """A Keras application with random weights, frozen to constants, as a ``.meta``."""
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    tf.keras.utils.set_random_seed(0)
    model = getattr(tf.keras.applications, application)(weights=None, input_shape=(size, size, 3), **kwargs)
    spec = tf.TensorSpec([None, size, size, 3], tf.float32)
    function = tf.function(lambda image: model(image)).get_concrete_function(spec)
    frozen = convert_variables_to_constants_v2(function)
    meta = os.path.join(directory, f"{name}.meta")
    with tf.Graph().as_default():
        tf.compat.v1.train.export_meta_graph(filename=meta, graph_def=frozen.graph.as_graph_def())
    return {"meta": meta, "ckpt": None, "input": frozen.inputs[0].name, "output": frozen.outputs[0].name}


def build_models(names: list[str], quick: bool, directory: str) -> dict[str, dict[str, Any]]:
    import tensorflow as tf

    image = 32 if quick else 224
    makers: dict[str, Callable[[], dict[str, Any]]] = {
        "mlp": lambda: save_tf1(tf, build_mlp, 8 if quick else 256, directory, "mlp"),
        "cnn": lambda: save_tf1(tf, build_cnn, 8 if quick else 32, directory, "cnn"),
        "resnet50": lambda: save_keras(tf, "ResNet50", image, directory, "resnet50"),
        "mobilenetv2": lambda: save_keras(tf, "MobileNetV2", image, directory, "mobilenetv2",
                                          alpha=0.35 if quick else 1.0),
    }
    models = {}
    for name in names:
        models[name] = makers[name]()
        models[name]["shape"] = {"mlp": [8 if quick else 256], "cnn": [8 if quick else 32] * 2 + [3]}.get(
            name, [image, image, 3])
    return models


# ---- the worker: one runtime, one thread count, commands on stdin, JSON answers on stdout ----

def _tf_runner(model: dict[str, Any], threads: int) -> Callable[[np.ndarray], Any]:
    import tensorflow as tf

    v1 = tf.compat.v1
    graph = tf.Graph()
    config = v1.ConfigProto(intra_op_parallelism_threads=threads, inter_op_parallelism_threads=1)
    sess = v1.Session(graph=graph, config=config)
    with graph.as_default():
        saver = v1.train.import_meta_graph(model["meta"])
        if model["ckpt"]:
            saver.restore(sess, model["ckpt"])
    return lambda x: sess.run(model["output"], {model["input"]: x})


def _torch_runner(model: dict[str, Any], side: str) -> Callable[[np.ndarray], Any]:
    import torch

    from lightning_saver import compile_module, import_meta_graph

    graph = import_meta_graph(model["meta"])
    if model["ckpt"]:
        graph.restore(model["ckpt"])
    if side == "run":
        return lambda x: graph.run(model["output"], {model["input"]: x})
    module = graph.to_module(inputs=[model["input"]], outputs=model["output"]).eval()
    call = compile_module(module) if side == COMPILED else module

    def run_module(x: np.ndarray) -> Any:
        with torch.no_grad():
            return call(torch.from_numpy(x)).numpy()

    run_module.eager_reasons = getattr(call, "eager_reasons", {})  # type: ignore[attr-defined]
    return run_module


def worker(side: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    runners: dict[str, Callable[[np.ndarray], Any]] = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        model = cmd["model"]
        if model["meta"] not in runners:
            start = time.perf_counter()
            runner = _tf_runner(model, threads) if side == "tf" else _torch_runner(model, side)
            runners[model["meta"]] = runner
            load_s = time.perf_counter() - start
        else:
            load_s = 0.0
        fn = runners[model["meta"]]
        rng = np.random.default_rng(cmd["batch"])
        x = rng.normal(size=(cmd["batch"], *model["shape"])).astype(np.float32)
        if cmd["op"] == "check":
            start = time.perf_counter()
            out = np.asarray(fn(x))
            first_s = time.perf_counter() - start
            np.save(cmd["path"], out)
            eager = [str(r) for r in getattr(fn, "eager_reasons", {}).values()]
            print(json.dumps({"load_s": load_s, "first_s": first_s, "eager_reasons": eager}), flush=True)
            continue
        for _ in range(cmd["warmup"]):
            fn(x)
        times = []
        for _ in range(cmd["reps"]):
            start = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - start)
        print(json.dumps({"ms": statistics.median(times) * 1e3}), flush=True)


class Worker:
    def __init__(self, side: str, threads: int, wait_policy: str | None = None) -> None:
        self.threads = threads
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        if wait_policy:
            env["OMP_WAIT_POLICY"] = wait_policy
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", side, "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker {self.proc.args} died (exit {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ---- the parent: pairs, rounds, table ----

def bench_case(workers: dict[str, Worker], name: str, model: dict[str, Any], batch: int,
               args: argparse.Namespace, directory: str) -> dict[str, Any]:
    sides = tuple(workers)
    outs, info = {}, {}
    for side in sides:
        path = os.path.join(directory, f"{name}-{batch}-{side}.npy")
        info[side] = workers[side].ask(op="check", model=model, batch=batch, path=path)
        outs[side] = np.load(path)
    err = {side: float(np.max(np.abs(outs[side] - outs["tf"]))) for side in sides if side != "tf"}
    if max(err.values()) > args.atol:
        raise AssertionError(f"{name} batch {batch}: ours differs from TensorFlow by {err}")
    heavy = name == "resnet50" and batch > 1 and not args.quick
    reps = max(2, args.reps // 3) if heavy else args.reps
    # an uncounted first round warms every side up and says how long a call takes; the counted
    # rounds then time enough calls to last --min-round-ms on the slowest side
    first = {side: workers[side].ask(op="time", model=model, batch=batch, warmup=FIRST_WARMUP,
                                     reps=reps)["ms"] for side in sides}
    reps = max(reps, math.ceil(args.min_round_ms / max(first.values())))
    rounds = []
    for _ in range(args.rounds):
        order = list(sides)
        random.shuffle(order)
        times = {side: workers[side].ask(op="time", model=model, batch=batch, warmup=1, reps=reps)["ms"]
                 for side in order}
        rounds.append(times)
    med = {side: statistics.median(r[side] for r in rounds) for side in sides}
    row = {"model": name, "batch": batch, "threads": workers["tf"].threads,
           "tf_ms": med["tf"], "run_ms": med["run"], "module_ms": med["module"],
           "run_ratio": statistics.median(r["run"] / r["tf"] for r in rounds),
           "module_ratio": statistics.median(r["module"] / r["tf"] for r in rounds),
           "max_abs_err": max(err.values()), "load_s": {s: round(info[s]["load_s"], 2) for s in sides}}
    if COMPILED in sides:  # compile_s: the first call, which traces and compiles for this batch size
        row.update(compiled_ms=med[COMPILED],
                   compiled_ratio=statistics.median(r[COMPILED] / r["tf"] for r in rounds),
                   compile_s=info[COMPILED]["first_s"], compiled_eager=info[COMPILED]["eager_reasons"])
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and few repeats (smoke test)")
    parser.add_argument("--threads", default=None, help="comma-separated thread counts, same for both sides "
                        "(default 1,2; 1 with --quick)")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--models", default=None, help="comma-separated: mlp,cnn,mobilenetv2,resnet50")
    parser.add_argument("--rounds", type=int, default=None, help="alternated rounds per case")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per side per round, at least")
    parser.add_argument("--min-round-ms", type=float, default=None,
                        help="more calls per round where a round would be shorter than this on the slowest "
                        f"side (default {MIN_ROUND_MS:g}; 0 with --quick)")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest output difference from TF allowed")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random side order")
    parser.add_argument("--omp-wait-policy", choices=["ACTIVE", "PASSIVE"], default=None,
                        help="OMP_WAIT_POLICY for every worker (default: the environment's); PASSIVE "
                        "stops OpenMP threads spinning at barriers, which stalls torch on a busy machine")
    parser.add_argument("--compiled", action="store_true", help="also time compile_module's module "
                        "(inductor; compiles once per model and batch size, which takes minutes)")
    parser.add_argument("--worker", choices=(*SIDES, COMPILED), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, int(args.threads or 1))
        return 0
    random.seed(args.seed)
    names = (args.models or ("mlp,cnn" if args.quick else "mlp,cnn,mobilenetv2,resnet50")).split(",")
    batches = [int(b) for b in (args.batches or ("1,4" if args.quick else "1,8")).split(",")]
    args.rounds = args.rounds or (2 if args.quick else 9)
    args.reps = args.reps or (2 if args.quick else 9)
    if args.min_round_ms is None:
        args.min_round_ms = 0.0 if args.quick else MIN_ROUND_MS
    load_before = os.getloadavg()
    sides = (*SIDES, COMPILED) if args.compiled else SIDES
    print(_HEADER + (_COMPILED_HEADER if args.compiled else ""), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        models = build_models(names, args.quick, directory)
        for threads in [int(t) for t in (args.threads or ("1" if args.quick else "1,2")).split(",")]:
            workers = {side: Worker(side, threads, args.omp_wait_policy) for side in sides}
            try:
                for name in names:
                    for batch in batches:
                        rows.append(bench_case(workers, name, models[name], batch, args, directory))
                        print(_row(rows[-1]), flush=True)
            finally:
                for w in workers.values():
                    w.close()
    _report(rows, args, load_before)
    return 0


_HEADER = (f"{'model':<12}{'thr':>4}{'batch':>6}{'TF ms':>10}{'run ms':>10}{'module ms':>11}{'run/TF':>9}"
           f"{'module/TF':>11}")
_COMPILED_HEADER = f"{'compiled ms':>13}{'compiled/TF':>13}{'compile s':>11}"


def _row(r: dict[str, Any]) -> str:
    return (f"{r['model']:<12}{r['threads']:>4}{r['batch']:>6}{r['tf_ms']:>10.2f}{r['run_ms']:>10.2f}"
            f"{r['module_ms']:>11.2f}{r['run_ratio']:>9.2f}{r['module_ratio']:>11.2f}") + (
        f"{r['compiled_ms']:>13.2f}{r['compiled_ratio']:>13.2f}{r['compile_s']:>11.1f}"
        + (" (eager: " + "; ".join(r["compiled_eager"]) + ")" if r["compiled_eager"] else "")
        if "compiled_ms" in r else "")


def _report(rows: list[dict[str, Any]], args: argparse.Namespace, load_before: tuple[float, ...]) -> None:
    import torch

    summary = {
        "benchmark": "tf_import", "quick": args.quick, "rounds": args.rounds, "reps": args.reps,
        "min_round_ms": args.min_round_ms,
        "machine": machine(), "torch": torch.__version__, "omp_wait_policy": args.omp_wait_policy,
        "loadavg_before": [round(v, 2) for v in load_before],
        "rows": [{k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
        "worst_run_ratio": round(max(r["run_ratio"] for r in rows), 3),
        "worst_module_ratio": round(max(r["module_ratio"] for r in rows), 3),
    }
    if args.compiled:
        summary["worst_compiled_ratio"] = round(max(r["compiled_ratio"] for r in rows), 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
