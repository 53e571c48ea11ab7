"""How long does exporting a ResNet-18-sized model take, and how fast do the exports run?

Exports a ResNet-18 (defined here, random weights, no download) to a TF MetaGraph (with variables,
and frozen) and to ONNX, then times one batch's forward pass in torch, in TensorFlow
(import_meta_graph + Saver.restore, then session.run) and in ONNX Runtime, with the same thread
count everywhere (torch timed first, before the others start their thread pools), and checks the
outputs agree.
Prints a table, then one JSON line.

    python benchmarks/export.py            # 8 x 3 x 224 x 224
    python benchmarks/export.py --quick    # tiny widths and images, for the smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from typing import Any

import numpy as np
import torch
from timing import machine, median_seconds
from torch import nn

from lightning_saver.graph.onnx_export import export_onnx
from lightning_saver.graph.tf_export import export_meta_graph


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


def _tf_runner(meta: str, threads: int, restore: bool = True) -> tuple[Any, Any]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    graph = tf.Graph()
    config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=threads, inter_op_parallelism_threads=1)
    with graph.as_default():
        saver = tf.compat.v1.train.import_meta_graph(meta)
        session = tf.compat.v1.Session(graph=graph, config=config)
        if restore:
            saver.restore(session, meta[: -len(".meta")])
    return session, lambda batch: session.run("output_0:0", {"images:0": batch})


def _ort_runner(path: str, threads: int) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    # idle ORT threads would otherwise spin and slow the runtimes timed after it on the same cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return lambda batch: session.run(None, {"images": batch})[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    args = parser.parse_args()
    width, size, batch, repeats = (8, 32, 2, 3) if args.quick else (64, 224, 8, 10)
    batch = args.batch or batch
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = ResNet18(width=width, classes=10 if args.quick else 1000, blocks=1 if args.quick else 2)
    model.eval()
    example = torch.randn(2, 3, size, size)
    images = torch.randn(batch, 3, size, size)
    folder = tempfile.mkdtemp(prefix="bench_export_")

    start = time.perf_counter()
    meta = export_meta_graph(model, (example,), os.path.join(folder, "resnet.meta"))
    tf_export_s = time.perf_counter() - start
    frozen = export_meta_graph(model, (example,), os.path.join(folder, "frozen.meta"), freeze=True)
    start = time.perf_counter()
    onnx_path = export_onnx(model, (example,), os.path.join(folder, "resnet.onnx"))
    onnx_export_s = time.perf_counter() - start

    # torch first, before TF and ORT start their thread pools: their idle threads would slow it
    with torch.no_grad():
        expected = model(images).numpy()
        torch_s = median_seconds(lambda: model(images), repeats)
    batch_np = images.numpy()
    session, tf_run = _tf_runner(meta, args.threads)
    frozen_session, frozen_run = _tf_runner(frozen, args.threads, restore=False)
    ort_run = _ort_runner(onnx_path, args.threads)
    runners = {"tensorflow": tf_run, "tensorflow_frozen": frozen_run, "onnxruntime": ort_run}
    diffs = {name: float(np.abs(run(batch_np) - expected).max()) for name, run in runners.items()}
    tf_s, frozen_s, ort_s = (median_seconds(lambda r=run: r(batch_np), repeats) for run in runners.values())
    session.close()
    frozen_session.close()

    params = sum(p.numel() for p in model.parameters())
    name = "ResNet-10 (quick)" if args.quick else "ResNet-18"
    print(f"{name} width {width}, {params / 1e6:.2f} M parameters, batch {batch} x 3 x {size} x {size}, "
          f"{args.threads} threads")
    print(f"{'step':<28}{'seconds':>10}{'vs torch':>10}{'max |diff|':>12}")
    print(f"{'export TF MetaGraph':<28}{tf_export_s:>10.3f}")
    print(f"{'export ONNX (dynamo)':<28}{onnx_export_s:>10.3f}")
    print(f"{'forward torch':<28}{torch_s:>10.4f}{1.0:>10.2f}")
    print(f"{'forward TensorFlow':<28}{tf_s:>10.4f}{tf_s / torch_s:>10.2f}{diffs['tensorflow']:>12.2e}")
    print(f"{'forward TensorFlow frozen':<28}{frozen_s:>10.4f}{frozen_s / torch_s:>10.2f}"
          f"{diffs['tensorflow_frozen']:>12.2e}")
    print(f"{'forward ONNX Runtime':<28}{ort_s:>10.4f}{ort_s / torch_s:>10.2f}{diffs['onnxruntime']:>12.2e}")
    print(json.dumps({
        "machine": machine(),
        "benchmark": "export", "quick": args.quick, "params": params, "batch": batch, "image": size,
        "threads": args.threads, "export_tf_s": round(tf_export_s, 3),
        "export_onnx_s": round(onnx_export_s, 3), "forward_torch_s": round(torch_s, 5),
        "forward_tf_s": round(tf_s, 5), "forward_tf_frozen_s": round(frozen_s, 5),
        "forward_ort_s": round(ort_s, 5), "tf_frozen_vs_torch": round(frozen_s / torch_s, 3),
        "tf_vs_torch": round(tf_s / torch_s, 3), "ort_vs_torch": round(ort_s / torch_s, 3),
        "max_abs_diff": diffs,
    }))


if __name__ == "__main__":
    main()
