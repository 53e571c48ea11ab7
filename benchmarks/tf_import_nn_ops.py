"""Are the NN and shape converters as fast as TensorFlow's own kernels, op by op?

Each case runs one converter through ``table.call`` (torch tensors in, the converter's own layout
and padding work included) and the same op through ``tf.raw_ops`` run eagerly, on the same inputs
(NHWC float32, a ResNet-like 56x56x64 activation at full size). Both sides are checked to agree,
then timed (median of repeats) under ``torch.no_grad``. Ratios are ours / TF: below 1 means faster.
Both get the same intra-op thread count (``--threads``, default 1): on a shared, oversubscribed
machine torch's OpenMP barriers stall with more threads than free cores, which measures the load.

    python benchmarks/tf_import_nn_ops.py            # batch 8, 56x56x64
    python benchmarks/tf_import_nn_ops.py --quick    # tiny, for the smoke test

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timing import machine, median_seconds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from lightning_saver.graph.tf_import import table  # noqa: E402

Case = tuple[str, str, dict[str, Any], list[str], dict[str, Any]]


def _cases(n: int, size: int, channels: int) -> list[Case]:
    """(label, op, TF raw-op inputs by name, the names in NodeDef order, attrs)."""
    rng = np.random.default_rng(0)

    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    x = rand(n, size, size, channels)
    s1, s2 = [1, 1, 1, 1], [1, 2, 2, 1]
    bn = {"x": x, "scale": rand(channels), "offset": rand(channels), "mean": rand(channels),
          "variance": rng.random(channels).astype(np.float32) + 0.5}
    bn_names = ["x", "scale", "offset", "mean", "variance"]
    half = size // 2
    grad = rand(n, half, half, channels)
    return [
        ("Conv2D 3x3 SAME s1", "Conv2D", {"input": x, "filter": rand(3, 3, channels, channels)},
         ["input", "filter"], {"strides": s1, "padding": "SAME"}),
        ("Conv2D 3x3 SAME s2", "Conv2D", {"input": x, "filter": rand(3, 3, channels, channels)},
         ["input", "filter"], {"strides": s2, "padding": "SAME"}),
        ("Conv2D 1x1", "Conv2D", {"input": x, "filter": rand(1, 1, channels, channels)},
         ["input", "filter"], {"strides": s1, "padding": "VALID"}),
        ("DepthwiseConv2dNative 3x3", "DepthwiseConv2dNative",
         {"input": x, "filter": rand(3, 3, channels, 1)}, ["input", "filter"],
         {"strides": s1, "padding": "SAME"}),
        ("Conv2DBackpropInput s2", "Conv2DBackpropInput",
         {"input_sizes": np.array(x.shape, np.int32), "filter": rand(3, 3, channels, channels),
          "out_backprop": grad}, ["input_sizes", "filter", "out_backprop"],
         {"strides": s2, "padding": "SAME"}),
        ("MaxPool 3x3 s2 SAME", "MaxPool", {"input": x}, ["input"],
         {"ksize": [1, 3, 3, 1], "strides": s2, "padding": "SAME"}),
        ("AvgPool 3x3 s2 SAME", "AvgPool", {"value": x}, ["value"],
         {"ksize": [1, 3, 3, 1], "strides": s2, "padding": "SAME"}),
        ("FusedBatchNormV3 inference", "FusedBatchNormV3", bn, bn_names, {"is_training": False}),
        ("FusedBatchNormV3 training", "FusedBatchNormV3", bn, bn_names, {"is_training": True}),
        ("BiasAdd", "BiasAdd", {"value": x, "bias": bn["scale"]}, ["value", "bias"], {}),
        ("ResizeBilinear x2 half-pixel", "ResizeBilinear",
         {"images": x, "size": np.array([2 * size, 2 * size], np.int32)}, ["images", "size"],
         {"half_pixel_centers": True}),
        ("ResizeBilinear x2 legacy", "ResizeBilinear",
         {"images": x, "size": np.array([2 * size, 2 * size], np.int32)}, ["images", "size"], {}),
        ("StridedSlice [:, ::-1, 1:-1]", "StridedSlice",
         {"input": x, "begin": np.array([0, 0, 1], np.int32), "end": np.array([0, 0, -1], np.int32),
          "strides": np.array([1, -1, 1], np.int32)}, ["input", "begin", "end", "strides"],
         {"begin_mask": 3, "end_mask": 3}),
        ("ConcatV2 channels", "ConcatV2", {"values": [x, x], "axis": np.array(3, np.int32)},
         ["values", "axis"], {}),
        ("Pad SAME-like", "Pad",
         {"input": x, "paddings": np.array([[0, 0], [1, 1], [1, 1], [0, 0]], np.int32)},
         ["input", "paddings"], {}),
        ("MirrorPad REFLECT", "MirrorPad",
         {"input": x, "paddings": np.array([[0, 0], [2, 2], [2, 2], [0, 0]], np.int32)},
         ["input", "paddings"], {"mode": "REFLECT"}),
        ("Transpose NHWC->NCHW", "Transpose", {"x": x, "perm": np.array([0, 3, 1, 2], np.int32)},
         ["x", "perm"], {}),
    ]


def _ours(op: str, inputs: list[Any], attrs: dict[str, Any]) -> Callable[[], Any]:
    def run() -> Any:
        with torch.no_grad():
            out = table.call(op, inputs, attrs)
            first = out[0] if isinstance(out, tuple) else out
            # a view (Transpose) costs nothing until used; TF's result is materialised
            return first.contiguous()

    return run


def _bench(tf: Any, case: Case, repeats: int) -> dict[str, Any]:
    label, op, tf_inputs, names, attrs = case
    torch_inputs: list[Any] = []
    for name in names:
        value = tf_inputs[name]
        values = value if isinstance(value, list) else [value]
        torch_inputs += [torch.from_numpy(v) for v in values]
    tf_consts = {k: [tf.constant(a) for a in v] if isinstance(v, list) else tf.constant(v)
                 for k, v in tf_inputs.items()}

    def run_tf() -> Any:
        out = getattr(tf.raw_ops, op)(**tf_consts, **attrs)
        return out[0] if isinstance(out, (list, tuple)) else out

    ours = _ours(op, torch_inputs, attrs)
    np.testing.assert_allclose(ours().numpy(), run_tf().numpy(), rtol=1e-3, atol=1e-3)
    t_tf, t_ours = median_seconds(run_tf, repeats), median_seconds(ours, repeats)
    return {"case": label, "tf_ms": t_tf * 1e3, "ours_ms": t_ours * 1e3, "ratio": t_ours / t_tf}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny tensors and few repeats (smoke test)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for both TF and torch")
    args = parser.parse_args(argv)
    import tensorflow as tf

    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TF's runtime already started (another benchmark in this process)
        pass
    try:
        n, size, channels, repeats = (2, 8, 4, 3) if args.quick else (8, 56, 64, 15)
        rows = [_bench(tf, case, repeats) for case in _cases(n, size, channels)]
    finally:
        torch.set_num_threads(previous)
    print(f"{'case':<32}{'TF ms':>10}{'ours ms':>10}{'ours/TF':>9}")
    for r in rows:
        print(f"{r['case']:<32}{r['tf_ms']:>10.3f}{r['ours_ms']:>10.3f}{r['ratio']:>9.2f}")
    ratios = [r["ratio"] for r in rows]
    summary = {
        "benchmark": "tf_import_nn_ops", "quick": args.quick, "threads": args.threads,
        "shape": [n, size, size, channels],
        "rows": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
        "geomean_ratio": round(float(np.exp(np.mean(np.log(ratios)))), 3),
        "worst_ratio": round(max(ratios), 3),
    }
    summary["machine"] = machine()
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
