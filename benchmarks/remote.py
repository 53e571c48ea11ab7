"""Checkpoints on an S3 server: our Saver next to s3fs's own put/get of the same bytes (the limit),
Lightning's checkpoint writer (what ModelCheckpoint calls) with an s3:// path, and torch.save into an
fsspec file; plus reading one tensor. The server is moto's S3 in its own process on this machine.

    python benchmarks/remote.py --size 256 --reps 3

Prints a table and one JSON line (median seconds, paired ratios per repetition, machine and load).
Each repetition runs the methods in a shuffled order; every ratio is taken within one repetition.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from timing import machine  # noqa: E402

from lightning_saver.saving.saver import CheckpointSaver, load  # noqa: E402

_SERVER = (
    "import logging, sys\n"
    "logging.getLogger('werkzeug').setLevel(logging.ERROR)\n"
    "from moto.server import ThreadedMotoServer\n"
    "s = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False); s.start()\n"
    "print(s.get_host_and_port()[1], flush=True)\n"
    "sys.stdin.read()\n"
)


def start_server() -> tuple[subprocess.Popen[str], str]:
    """moto's S3 in a child process (its own GIL), stopped when our stdin to it closes."""
    proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    return proc, f"http://127.0.0.1:{port}"


def make_state(size_mib: float) -> dict[str, torch.Tensor]:
    """Float32 tensors of 16 MiB (the last one smaller) plus a few small ones, like a model's state."""
    torch.manual_seed(0)
    total = int(size_mib * (1 << 20)) // 4
    state, i = {}, 0
    while total > 0:
        n = min(total, 4 << 20)
        state[f"layer{i}.weight"] = torch.randn(n)
        total -= n
        i += 1
    state["head.bias"] = torch.randn(10)
    return state


class Bench:
    def __init__(self, endpoint: str, size_mib: float, work: str) -> None:
        import s3fs

        self.options = {"endpoint_url": endpoint, "key": "bench", "secret": "bench",
                        "client_kwargs": {"region_name": "us-east-1"},
                        # moto joins a big multipart upload slowly on a busy machine
                        "config_kwargs": {"read_timeout": 600}}
        self.fs = s3fs.S3FileSystem(**self.options)
        self.fs.call_s3("create_bucket", Bucket="bench")
        self.state = make_state(size_mib)
        self.nbytes = sum(t.numel() * 4 for t in self.state.values())
        self.work = work
        self.local = os.path.join(work, "same_bytes.safetensors")
        CheckpointSaver(max_to_keep=None).save(self.state, self.local)
        self.saver = CheckpointSaver(max_to_keep=2, storage_options=self.options)
        self.times: dict[str, list[float]] = {}
        self.ratios: dict[str, list[float]] = {}
        self.step = 0

    def timed(self, name: str, fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
        self.times.setdefault(name, []).append(seconds)
        return seconds

    # -- writes
    def put(self) -> None:
        self.fs.put_file(self.local, "bench/raw/same_bytes.safetensors")

    def saver_save(self) -> None:
        self.step += 1
        self.saver.save(self.state, "s3://bench/ours/model", global_step=self.step)

    def lightning_io(self) -> None:
        from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

        # it takes no storage_options: the endpoint and keys come from the environment (set in main)
        TorchCheckpointIO().save_checkpoint({"state_dict": self.state}, "s3://bench/pl/model.ckpt")

    def torch_fsspec(self) -> None:
        import fsspec

        with fsspec.open("s3://bench/torch/model.pt", "wb", **self.options) as f:
            torch.save(self.state, f)

    # -- reads
    def get(self) -> None:
        self.fs.get_file("bench/raw/same_bytes.safetensors", os.path.join(self.work, "got"))

    def saver_load(self) -> None:
        load(f"s3://bench/ours/model_{self.step}.safetensors", storage_options=self.options)

    def torch_load(self) -> None:
        import fsspec

        with fsspec.open("s3://bench/torch/model.pt", "rb", **self.options) as f:
            torch.load(f, weights_only=True)

    def one_tensor(self) -> None:
        url = f"s3://bench/ours/model_{self.step}.safetensors"
        load(url, keys=["head.bias"], storage_options=self.options)

    def rep(self) -> None:
        writes = [("s3fs put (same bytes)", self.put), ("Saver.save -> s3://", self.saver_save),
                  ("Lightning TorchCheckpointIO -> s3://", self.lightning_io),
                  ("torch.save -> fsspec file", self.torch_fsspec)]
        random.shuffle(writes)
        got = {name: self.timed(name, fn) for name, fn in writes}
        reads = [("s3fs get (same bytes)", self.get), ("load <- s3:// (verified)", self.saver_load),
                 ("torch.load <- fsspec file", self.torch_load),
                 ("load one tensor <- s3://", self.one_tensor)]
        random.shuffle(reads)
        got.update({name: self.timed(name, fn) for name, fn in reads})
        for name, seconds in got.items():
            base = "s3fs put (same bytes)" if "->" in name or "put" in name else "s3fs get (same bytes)"
            self.ratios.setdefault(name, []).append(seconds / got[base])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=float, default=256, help="MiB of tensors (default 256)")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    server, endpoint = start_server()
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")
    try:
        with tempfile.TemporaryDirectory() as work:
            bench = Bench(endpoint, args.size, work)
            bench.rep()  # warm-up: connections, first-touch of the server's memory
            bench.times.clear()
            bench.ratios.clear()
            for _ in range(args.reps):
                bench.rep()
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(timeout=30)
    medians = {k: statistics.median(v) for k, v in bench.times.items()}
    paired = {k: round(statistics.median(v), 3) for k, v in bench.ratios.items()}
    print(f"{args.size:g} MiB on moto S3 at {endpoint}, {args.reps} reps (median s, paired ratio vs s3fs)")
    for name, seconds in medians.items():
        print(f"  {name:40s} {seconds:8.3f} s   x{paired[name]:.2f}")
    result = {"benchmark": "remote", "size_mib": args.size, "reps": args.reps, "nbytes": bench.nbytes,
              "median_s": {k: round(v, 4) for k, v in medians.items()}, "paired_ratio": paired,
              "targets": {"save_within_10pct_of_put": paired["Saver.save -> s3://"] <= 1.10,
                          "save_faster_than_lightning": medians["Saver.save -> s3://"]
                          < medians["Lightning TorchCheckpointIO -> s3://"],
                          "one_tensor_under_5pct_of_load": medians["load one tensor <- s3://"]
                          < 0.05 * medians["load <- s3:// (verified)"]},
              "machine": machine()}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
