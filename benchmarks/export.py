"""Export time, and the exports' forward time next to torch: TF with variables, TF frozen, ONNX Runtime.

Per model (a ResNet-18 defined here, and a BERT encoder built from a ``transformers`` config; random
weights, no download): exports a TF MetaGraph with variables (stored in TensorFlow's layouts), a
frozen one and an ONNX file, then times one batch's forward pass per runtime, **each in its own
process** (a fresh interpreter that rebuilds the model or imports the export) with the same thread
count, at 1 thread and at the machine's, at batch 1 and 8, in rounds whose runtime order is shuffled;
reported as medians and as paired ratios (same round) against torch, and variables against frozen.
Outputs are compared with torch's. Prints the CPU, a table per model, batch and thread count, then
one JSON line. The ResNet's batch norms get random statistics and affine parameters: at their
initial values (shift 0, scale ~1) grappler drops the frozen graph's additions, which a trained
model never allows.

    python benchmarks/export.py            # ResNet-18 (N x 3 x 224 x 224), BERT (N x 128 tokens), N = 1, 8
    python benchmarks/export.py --models resnet18 --batches 8 --threads 1
    python benchmarks/export.py --quick    # tiny widths and inputs, for the smoke test
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
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from timing import machine, median_seconds
from torch import nn

RUNTIMES = ("torch", "tensorflow", "tensorflow_frozen", "onnxruntime")


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    def __init__(self, width: int = 64, classes: int = 1000, blocks: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        stage: list[nn.Module] = []
        cin = width
        for i, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
            stage += [BasicBlock(cin, cout, 1 if i == 0 else 2)]
            stage += [BasicBlock(cout, cout, 1) for _ in range(blocks - 1)]
            cin = cout
        self.layers = nn.Sequential(*stage)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(images)))


def _bert(quick: bool) -> nn.Module:
    import transformers

    size, layers, heads = (16, 1, 2) if quick else (256, 4, 4)
    config = transformers.BertConfig(vocab_size=1000, hidden_size=size, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=4 * size,
                                     max_position_embeddings=512)
    return transformers.BertModel(config, add_pooling_layer=False)


def _trained_statistics(model: nn.Module) -> None:
    """Batch-norm running statistics and affine parameters away from their initial values."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.75, 1.25)
                m.weight.uniform_(0.75, 1.25)
                m.bias.uniform_(-0.1, 0.1)


def build(name: str, quick: bool, batch: int = 8
          ) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(model in eval mode, example inputs for the capture, the batch to time), all from seed 0."""
    torch.manual_seed(0)
    batch = 2 if quick else batch
    if name == "resnet18":
        width, size = (8, 32) if quick else (64, 224)
        model: nn.Module = ResNet18(width=width, classes=10 if quick else 1000, blocks=1 if quick else 2)
        _trained_statistics(model)
        example = {"images": torch.randn(2, 3, size, size)}
        timed = {"images": torch.randn(batch, 3, size, size)}
    else:
        length = 8 if quick else 128
        model = _bert(quick)
        example = {"input_ids": torch.randint(0, 1000, (2, length))}
        timed = {"input_ids": torch.randint(0, 1000, (batch, length))}
    return model.eval(), example, timed


class _Wrap(nn.Module):  # the BERT output is a ModelOutput: time and compare last_hidden_state
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).last_hidden_state


def _model(name: str, quick: bool, batch: int = 8
           ) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model, example, timed = build(name, quick, batch)
    return (model if name == "resnet18" else _Wrap(model).eval()), example, timed


# --- workers: one runtime, one process -----------------------------------------------------------


def _worker(runtime: str, name: str, folder: str, threads: int, repeats: int, quick: bool,
            batch: int) -> dict[str, Any]:
    feeds = dict(np.load(os.path.join(folder, f"inputs_{batch}.npz")))
    if runtime == "torch":
        torch.set_num_threads(threads)
        model, _, _ = _model(name, quick)
        tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
        with torch.no_grad():
            def run() -> Any:
                return model(**tensors).numpy()
            out = run()
            seconds = median_seconds(run, repeats)
    elif runtime == "onnxruntime":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = onnxruntime.InferenceSession(os.path.join(folder, "model.onnx"), options,
                                               providers=["CPUExecutionProvider"])
        def run() -> Any:
            return session.run(None, feeds)[0]
        out = run()
        seconds = median_seconds(run, repeats)
    else:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import tensorflow as tf

        meta = os.path.join(folder, "frozen.meta" if runtime == "tensorflow_frozen" else "model.meta")
        graph = tf.Graph()
        config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=threads,
                                          inter_op_parallelism_threads=1)
        with graph.as_default():
            saver = tf.compat.v1.train.import_meta_graph(meta)
            session = tf.compat.v1.Session(graph=graph, config=config)
            if runtime == "tensorflow":
                saver.restore(session, meta[: -len(".meta")])
        named = {f"{k}:0": v for k, v in feeds.items()}
        def run() -> Any:
            return session.run("output_0:0", named)
        out = run()
        seconds = median_seconds(run, repeats)
    np.save(os.path.join(folder, f"out_{runtime}_{batch}.npy"), out)
    return {"seconds": seconds}


def _spawn(runtime: str, name: str, folder: str, threads: int, repeats: int, quick: bool,
           batch: int) -> float:
    command = [sys.executable, os.path.abspath(__file__), "--worker", runtime, "--model", name,
               "--folder", folder, "--threads", str(threads), "--repeats", str(repeats),
               "--batches", str(batch)]
    command += ["--quick"] if quick else []
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{runtime} worker failed:\n{done.stderr[-3000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])


# --- the driver ------------------------------------------------------------------------------------


def _export(name: str, folder: str, quick: bool, batches: Sequence[int]) -> dict[str, float]:
    from lightning_saver.graph.onnx_export import export_onnx
    from lightning_saver.graph.tf_export import export_meta_graph

    for batch in batches:
        timed = _model(name, quick, batch)[2]
        np.savez(os.path.join(folder, f"inputs_{batch}.npz"), **{k: v.numpy() for k, v in timed.items()})
    model, example, _ = _model(name, quick)
    times = {}
    start = time.perf_counter()
    export_meta_graph(model, (), os.path.join(folder, "model.meta"), kwargs=example)
    times["export_tf_s"] = time.perf_counter() - start
    export_meta_graph(model, (), os.path.join(folder, "frozen.meta"), kwargs=example, freeze=True)
    start = time.perf_counter()
    export_onnx(model, (), os.path.join(folder, "model.onnx"), kwargs=example)
    times["export_onnx_s"] = time.perf_counter() - start
    return times


def _bench(name: str, threads: int, rounds: int, repeats: int, quick: bool, folder: str, batch: int
           ) -> dict[str, Any]:
    seconds: dict[str, list[float]] = {r: [] for r in RUNTIMES}
    for _ in range(rounds):
        order = list(RUNTIMES)
        random.shuffle(order)
        for runtime in order:
            seconds[runtime].append(_spawn(runtime, name, folder, threads, repeats, quick, batch))
    expected = np.load(os.path.join(folder, f"out_torch_{batch}.npy"))
    diffs = {r: float(np.abs(np.load(os.path.join(folder, f"out_{r}_{batch}.npy")) - expected).max())
             for r in RUNTIMES if r != "torch"}
    ratios = {f"{r}_vs_torch": statistics.median(a / b for a, b in zip(seconds[r], seconds["torch"],
                                                                        strict=True))
              for r in RUNTIMES if r != "torch"}
    ratios["variables_vs_frozen"] = statistics.median(
        a / b for a, b in zip(seconds["tensorflow"], seconds["tensorflow_frozen"], strict=True))
    return {"threads": threads, "batch": 2 if quick else batch,
            "median_s": {r: statistics.median(v) for r, v in seconds.items()},
            "paired_ratios": ratios, "max_abs_diff": diffs}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--models", default="resnet18,bert")
    parser.add_argument("--threads", default=None, help="comma-separated (default: 1 and all cores)")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes to time")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--worker", choices=RUNTIMES, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    repeats = args.repeats or (3 if args.quick else 10)
    if args.worker:
        threads = int(args.threads or 1)
        print(json.dumps(_worker(args.worker, args.model, args.folder, threads, repeats, args.quick,
                                 int(args.batches))))
        return 0
    cores = os.cpu_count() or 1
    thread_counts = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, cores})
    rounds = args.rounds or (1 if args.quick else 3)
    batches = [2] if args.quick else [int(b) for b in args.batches.split(",")]
    print(f"CPU: {machine()['cpu']}, {cores} logical CPUs; load average {os.getloadavg()}")
    results = []
    for name in args.models.split(","):
        folder = tempfile.mkdtemp(prefix=f"bench_export_{name}_")
        exported = _export(name, folder, args.quick, batches)
        for batch in batches:
            for threads in thread_counts:
                result = {"model": name, **{k: round(v, 3) for k, v in exported.items()},
                          **_bench(name, threads, rounds, repeats, args.quick, folder, batch)}
                results.append(result)
                _print(result)
    print(json.dumps({"machine": machine(), "benchmark": "export", "quick": args.quick, "rounds": rounds,
                      "repeats": repeats, "load_average": os.getloadavg(), "results": results}))
    return 0


def _print(result: dict[str, Any]) -> None:
    print(f"\n{result['model']}, batch {result['batch']}, {result['threads']} thread(s); "
          f"export TF {result['export_tf_s']} s, "
          f"ONNX {result['export_onnx_s']} s; load {os.getloadavg()[0]:.1f}")
    print(f"{'runtime':<20}{'median s':>10}{'paired vs torch':>17}{'max |diff|':>12}")
    for runtime in RUNTIMES:
        ratio = result["paired_ratios"].get(f"{runtime}_vs_torch", 1.0)
        diff = result["max_abs_diff"].get(runtime, 0.0)
        print(f"{runtime:<20}{result['median_s'][runtime]:>10.4f}{ratio:>17.2f}{diff:>12.2e}")
    print(f"{'variables / frozen (paired)':<37}{result['paired_ratios']['variables_vs_frozen']:>10.2f}")


if __name__ == "__main__":
    sys.exit(main())
