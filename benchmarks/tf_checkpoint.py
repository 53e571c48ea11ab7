"""How fast do we read and write TF V2 checkpoints, next to TensorFlow's own reader and savers?

One process, one set of float32 tensors (about 1 GiB in 16 tensors; ``--quick``: 8 MiB), interleaved:
every repetition runs every write method once, then every read method once, each group in an order
shuffled anew per repetition (position in the sequence mattered on a shared machine: whoever follows
a big write pays for its writeback), and the table reports the median per method. Every write makes
new files (both libraries write temporary files and rename them into place). For reads, each in a
process of its own as a user's load runs, see ``benchmarks/tf_read.py``.

Writes (the rows marked "+ fsync" buy the same durability: our writer always fsyncs; for TF's savers
we fsync their files right after they return):
  ours write_checkpoint         numpy arrays -> prefix.index + data (crc, temp files, fsync, rename)
  TF tf.train.Checkpoint.write  tf.Variables -> files (and again + fsync)
  TF1 Saver.save                graph-mode Saver over the same variables (and again + fsync)
Reads (all of the same file, the one TF1 Saver.save just wrote, so the page cache is alike for all;
every reader checks every crc):
  ours read_checkpoint          every tensor as numpy, read into fresh memory
  ours read_checkpoint mmap     every tensor as numpy, mapped copy-on-write (mmap=True)
  TF tf.train.load_checkpoint   get_tensor for every name
  one tensor (lazy)             ours vs TF, reading one 1/16 of the checkpoint

Usage: python benchmarks/tf_checkpoint.py [--quick] [--reps N] [--size-mib M] [--dir DIR]
"""

from __future__ import annotations

import argparse
import glob
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # timing.py

from timing import machine  # noqa: E402

from lightning_saver.formats.durable import fsync_path  # noqa: E402
from lightning_saver.tf import read_checkpoint, write_checkpoint  # noqa: E402

N_TENSORS = 16


def _fsync_prefix(prefix: str) -> None:
    for path in glob.glob(prefix + ".*"):
        fsync_path(path)


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class _TF:
    """TensorFlow's side: eager variables for tf.train.Checkpoint, a graph + session for the TF1 Saver."""

    def __init__(self, tensors: dict[str, np.ndarray]) -> None:
        import tensorflow as tf

        self.tf = tf
        v1 = tf.compat.v1
        self.ckpt = tf.train.Checkpoint(**{f"v{i}": tf.Variable(t) for i, t in enumerate(tensors.values())})
        self.graph = tf.Graph()
        with self.graph.as_default():
            feeds = {}
            variables = []
            for name, value in tensors.items():
                ph = v1.placeholder(tf.float32, value.shape)
                var = v1.Variable(ph, name=name)
                feeds[ph] = value
                variables.append(var)
            self.saver = v1.train.Saver(variables)
            init = v1.global_variables_initializer()
        self.sess = v1.Session(graph=self.graph)
        self.sess.run(init, feeds)

    def checkpoint_write(self, prefix: str, sync: bool) -> None:
        self.ckpt.write(prefix)
        if sync:
            _fsync_prefix(prefix)

    def saver_save(self, prefix: str, sync: bool) -> None:
        with self.graph.as_default():
            self.saver.save(self.sess, prefix, write_meta_graph=False, write_state=False)
        if sync:
            _fsync_prefix(prefix)

    def read_all(self, prefix: str) -> dict[str, np.ndarray]:
        # keep every tensor, as read_checkpoint does, so both hold the whole checkpoint at the end
        reader = self.tf.train.load_checkpoint(prefix)
        return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}

    def read_one(self, prefix: str, name: str) -> np.ndarray:
        return self.tf.train.load_checkpoint(prefix).get_tensor(name)


def run(size_mib: int, reps: int, directory: str) -> dict[str, float]:
    rng = np.random.default_rng(0)
    per = size_mib * 2**20 // N_TENSORS // 4
    tensors = {f"layer_{i:02d}/kernel": rng.standard_normal(per, dtype=np.float32) for i in range(N_TENSORS)}
    nbytes = sum(t.nbytes for t in tensors.values())
    tf_side = _TF(tensors)
    ours, theirs = os.path.join(directory, "ours"), os.path.join(directory, "tf1")
    one = "layer_07/kernel"
    methods: dict[str, Callable[[], object]] = {
        "write: ours write_checkpoint (+ fsync)": lambda: write_checkpoint(ours, tensors),
        "write: TF tf.train.Checkpoint.write": lambda: tf_side.checkpoint_write(
            os.path.join(directory, "t2"), False
        ),
        "write: TF tf.train.Checkpoint.write + fsync": lambda: tf_side.checkpoint_write(
            os.path.join(directory, "t2"), True
        ),
        "write: TF1 Saver.save": lambda: tf_side.saver_save(theirs, False),
        "write: TF1 Saver.save + fsync": lambda: tf_side.saver_save(theirs, True),
        "read: ours read_checkpoint (all)": lambda: read_checkpoint(theirs),
        "read: ours read_checkpoint mmap=True (all)": lambda: read_checkpoint(theirs, mmap=True),
        "read: TF load_checkpoint (all)": lambda: tf_side.read_all(theirs),
        "read one tensor: ours": lambda: read_checkpoint(theirs, names=[one]),
        "read one tensor: ours mmap=True": lambda: read_checkpoint(theirs, names=[one], mmap=True),
        "read one tensor: TF": lambda: tf_side.read_one(theirs, one),
    }
    samples: dict[str, list[float]] = {name: [] for name in methods}
    writes = [name for name in methods if name.startswith("write")]
    reads = [name for name in methods if not name.startswith("write")]
    shuffler = random.Random(0)
    for _rep in range(reps):
        for group in (writes, reads):
            for name in shuffler.sample(group, len(group)):  # a new order every repetition
                samples[name].append(_timed(methods[name]))
    for prefix in (ours, theirs):
        if read_checkpoint(prefix, names=[one])[one].tobytes() != tensors[one].tobytes():
            raise SystemExit(f"{prefix} did not read back bit-exact")
    medians = {name: statistics.median(v) for name, v in samples.items()}
    print(f"{nbytes / 2**20:.0f} MiB in {N_TENSORS} float32 tensors, median of {reps} interleaved runs")
    print(f"{'method':48s} {'seconds':>9s} {'GiB/s':>7s}  (same-run ratios are in the JSON line)")
    for name, sec in medians.items():
        size = nbytes / N_TENSORS if name.startswith("read one") else nbytes
        print(f"{name:48s} {sec:9.3f} {size / 2**30 / sec:7.2f}")
    result = {
        "benchmark": "tf_checkpoint",
        "bytes": nbytes,
        "reps": reps,
        "ours_write_s": medians["write: ours write_checkpoint (+ fsync)"],
        "tf_checkpoint_write_s": medians["write: TF tf.train.Checkpoint.write"],
        "tf_checkpoint_write_fsync_s": medians["write: TF tf.train.Checkpoint.write + fsync"],
        "tf1_saver_save_s": medians["write: TF1 Saver.save"],
        "tf1_saver_save_fsync_s": medians["write: TF1 Saver.save + fsync"],
        "ours_read_s": medians["read: ours read_checkpoint (all)"],
        "tf_read_s": medians["read: TF load_checkpoint (all)"],
        "ours_read_mmap_s": medians["read: ours read_checkpoint mmap=True (all)"],
        "ours_read_one_s": medians["read one tensor: ours"],
        "ours_read_one_mmap_s": medians["read one tensor: ours mmap=True"],
        "tf_read_one_s": medians["read one tensor: TF"],
    }
    result["read_speedup_vs_tf"] = result["tf_read_s"] / result["ours_read_s"]
    result["read_mmap_speedup_vs_tf"] = result["tf_read_s"] / result["ours_read_mmap_s"]
    result["write_speedup_vs_tf1_saver_fsync"] = result["tf1_saver_save_fsync_s"] / result["ours_write_s"]
    result["write_speedup_vs_tf_checkpoint_fsync"] = (
        result["tf_checkpoint_write_fsync_s"] / result["ours_write_s"]
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 MiB, 1 repetition (smoke test)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args(argv)
    size, reps = (8, 1) if args.quick else (args.size_mib, args.reps)
    directory = tempfile.mkdtemp(prefix="tf_ckpt_bench_", dir=args.dir)
    try:
        result = run(size, reps, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    result["machine"] = machine()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
