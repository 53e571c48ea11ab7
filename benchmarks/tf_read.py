"""Reading a whole TF V2 checkpoint: ours vs TensorFlow's, each in a process of its own, alternated.

TensorFlow writes one checkpoint (``--size-mib``, default 1024, in 16 float32 tensors) and the page
cache is warmed by one untimed read. Then every repetition starts one fresh process per method, in
an order shuffled anew per repetition (``--seed``); each process imports its library, then times
one read of every tensor (all checksums checked), keeping every array, as a user's load would:

  ours              ``read_checkpoint(prefix)``: numpy arrays in fresh memory (the default)
  ours mmap         ``read_checkpoint(prefix, mmap=True)``: copy-on-write mappings of the file
  TF                ``tf.train.load_checkpoint(prefix)`` + ``get_tensor`` for every name

Both libraries run with their default threads on every core. The table shows the median wall time
and CPU time (user + system of the read, from ``getrusage``) per method, and the paired ratio: per
repetition, ours over TF's, median over repetitions (a busy machine's slow spells hit both sides).
On a loaded machine the CPU time is the steadier measure: the wall time also counts waiting for a
core. The JSON line names the machine (CPU model, kernel, load).

Usage: python benchmarks/tf_read.py [--quick] [--reps N] [--size-mib M] [--seed S] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # timing.py

from timing import machine  # noqa: E402

METHODS = ("ours", "ours mmap", "TF")
N_TENSORS = 16


def _worker(method: str, prefix: str) -> None:
    """Runs in its own process: import, then time one whole read; print one JSON line."""
    if method == "TF":
        import tensorflow as tf

        def read() -> object:
            reader = tf.train.load_checkpoint(prefix)
            return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}
    else:
        from lightning_saver.tf import read_checkpoint

        def read() -> object:
            return read_checkpoint(prefix, mmap=method == "ours mmap")

    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    tensors = read()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(json.dumps({"wall": wall, "cpu": cpu, "sys": after.ru_stime - before.ru_stime,
                      "tensors": len(tensors)}))  # type: ignore[arg-type]


def _write(prefix: str, size_mib: int) -> int:
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    per = size_mib * 2**20 // N_TENSORS // 4
    names = [f"layer_{i:02d}/kernel" for i in range(N_TENSORS)]
    tensors = [tf.constant(rng.standard_normal(per, dtype=np.float32)) for _ in names]
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names), tensors=tensors)
    return per * 4 * N_TENSORS


def _run_worker(method: str, prefix: str) -> dict[str, float]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, __file__, "--worker", method, prefix], capture_output=True,
                          text=True, env=env, timeout=600, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{method} worker failed:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["tensors"] != N_TENSORS:
        raise SystemExit(f"{method} read {result['tensors']} tensors, expected {N_TENSORS}")
    return result


def run(size_mib: int, reps: int, seed: int, directory: str) -> dict[str, object]:
    prefix = os.path.join(directory, "model.ckpt")
    # written in a child, so this process never holds TensorFlow's threads or memory
    subprocess.run([sys.executable, __file__, "--write", prefix, str(size_mib)], check=True,
                   env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), capture_output=True, timeout=600)
    nbytes = os.path.getsize(prefix + ".data-00000-of-00001")
    _run_worker("ours", prefix)  # warm the page cache, untimed
    shuffler = random.Random(seed)
    samples: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
    for rep in range(reps):
        order = list(METHODS)
        shuffler.shuffle(order)
        for method in order:
            samples[method].append(_run_worker(method, prefix))
        print(f"  rep {rep}: " + ", ".join(f"{m} {samples[m][-1]['wall']:.3f} s" for m in METHODS)
              + f" (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)

    def median(method: str, key: str) -> float:
        return statistics.median(s[key] for s in samples[method])

    def paired(method: str, key: str) -> float:
        return statistics.median(a[key] / b[key] for a, b in zip(samples[method], samples["TF"], strict=True))

    print(f"{nbytes / 2**20:.0f} MiB in {N_TENSORS} float32 tensors, {reps} reps, one process per read")
    print(f"{'method':12s} {'wall s':>8s} {'cpu s':>8s} {'sys s':>8s} {'GiB/s':>7s} {'paired wall/TF':>15s} "
          f"{'paired cpu/TF':>14s}")
    for m in METHODS:
        wall = median(m, "wall")
        print(f"{m:12s} {wall:8.3f} {median(m, 'cpu'):8.3f} {median(m, 'sys'):8.3f} "
              f"{nbytes / 2**30 / wall:7.2f} {paired(m, 'wall'):15.3f} {paired(m, 'cpu'):14.3f}")
    return {
        "benchmark": "tf_read", "bytes": nbytes, "reps": reps, "seed": seed,
        "wall_s": {m: round(median(m, "wall"), 4) for m in METHODS},
        "cpu_s": {m: round(median(m, "cpu"), 4) for m in METHODS},
        "paired_wall_over_tf": {m: round(paired(m, "wall"), 3) for m in METHODS},
        "paired_cpu_over_tf": {m: round(paired(m, "cpu"), 3) for m in METHODS},
        "ours_at_least_as_fast_as_tf": paired("ours", "wall") <= 1.0,
        "machine": machine(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 MiB, 1 repetition (smoke test)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "PREFIX"), help=argparse.SUPPRESS)
    parser.add_argument("--write", nargs=2, metavar=("PREFIX", "MIB"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(*args.worker)
        return 0
    if args.write:
        _write(args.write[0], int(args.write[1]))
        return 0
    size, reps = (8, 1) if args.quick else (args.size_mib, args.reps)
    directory = tempfile.mkdtemp(prefix="tf_read_bench_", dir=args.dir)
    try:
        result = run(size, reps, args.seed, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
