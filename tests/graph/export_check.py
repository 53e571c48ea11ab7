"""Run our exports in the real peers (TensorFlow through the TF1 API, ONNX Runtime) next to torch.

Shared by the export tests (tests/graph is on sys.path; there is no __init__.py).

Example::

    from export_check import check_tf

    def test_relu(tmp_path):
        check_tf(tmp_path, nn.ReLU(), (torch.randn(2, 3),), atol=1e-6)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lightning_saver.graph.onnx_export import export_onnx
from lightning_saver.graph.tf_export import checkpoint_prefix, export_meta_graph


def tf_module() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return pytest.importorskip("tensorflow")


def torch_outputs(model: torch.nn.Module, args: Sequence[Any]) -> list[np.ndarray]:
    training = model.training
    model.eval()
    with torch.no_grad():
        out = model(*args)
    model.train(training)
    return [t.detach().numpy() for t in torch.utils._pytree.tree_leaves(out)]


def run_tf(meta_path: str | Path, feeds: dict[str, np.ndarray], n_outputs: int, *,
           restore: bool = True) -> list[np.ndarray]:
    """import_meta_graph + Saver.restore + session.run of output_0..n-1, in a fresh tf.Graph."""
    tf = tf_module()
    graph = tf.Graph()
    with graph.as_default():
        saver = tf.compat.v1.train.import_meta_graph(str(meta_path))
        with tf.compat.v1.Session(graph=graph) as session:
            prefix = checkpoint_prefix(str(meta_path))
            if restore and os.path.exists(prefix + ".index"):
                assert saver is not None, "import_meta_graph returned no Saver"
                saver.restore(session, prefix)
            fetches = [f"output_{i}:0" for i in range(n_outputs)]
            return session.run(fetches, {f"{k}:0": v for k, v in feeds.items()})


def run_onnx(path: str | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


def feeds_for(model: torch.nn.Module, args: Sequence[Any],
              names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    import inspect

    if names is None:
        names = [p for p in inspect.signature(model.forward).parameters][: len(args)]
    return {name: a.numpy() for name, a in zip(names, args, strict=False) if isinstance(a, torch.Tensor)}


def assert_close(ours: Sequence[np.ndarray], expected: Sequence[np.ndarray], *, atol: float,
                 rtol: float = 0.0,
                 what: str = "") -> None:
    assert len(ours) == len(expected), f"{what}: {len(ours)} outputs, torch has {len(expected)}"
    for i, (a, b) in enumerate(zip(ours, expected, strict=True)):
        assert tuple(a.shape) == tuple(b.shape), f"{what} output_{i}: shape {a.shape}, torch {b.shape}"
        np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64),
                                   atol=atol, rtol=rtol, err_msg=f"{what} output_{i}")


def check_tf(tmp_path: Path, model: torch.nn.Module, args: Sequence[Any], *, atol: float, rtol: float = 0.0,
             run_args: Sequence[Any] | None = None, freeze: bool = False, name: str = "model") -> str:
    """Export to a MetaGraph, run it in TensorFlow on ``run_args`` (default ``args``), compare with torch."""
    meta = export_meta_graph(model, args, tmp_path / f"{name}.meta", freeze=freeze)
    run_args = args if run_args is None else run_args
    expected = torch_outputs(model, run_args)
    got = run_tf(meta, feeds_for(model, run_args), len(expected), restore=not freeze)
    assert_close(got, expected, atol=atol, rtol=rtol, what="TensorFlow")
    return str(meta)


def check_onnx(tmp_path: Path, model: torch.nn.Module, args: Sequence[Any], *, atol: float, rtol: float = 0.0,
               run_args: Sequence[Any] | None = None, name: str = "model", **options: Any) -> str:
    """Export to ONNX (checked by onnx.checker), run it in ONNX Runtime, compare with torch."""
    path = export_onnx(model, args, tmp_path / f"{name}.onnx", **options)
    run_args = args if run_args is None else run_args
    expected = torch_outputs(model, run_args)
    got = run_onnx(path, feeds_for(model, run_args))
    assert_close(got, expected, atol=atol, rtol=rtol, what="ONNX Runtime")
    return path


def other_batch(args: Sequence[Any], batch: int = 3, seed: int = 1) -> tuple[Any, ...]:
    """The same inputs with another batch size (checks the dynamic batch dimension)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            out.append(torch.randn((batch, *a.shape[1:]), generator=gen, dtype=a.dtype))
        elif isinstance(a, torch.Tensor) and a.dim():
            high = int(a.max()) + 1
            out.append(torch.randint(0, high, (batch, *a.shape[1:]), generator=gen, dtype=a.dtype))
        else:
            out.append(a)
    return tuple(out)


def assert_attrs_tf_knows_and_not_default(graph_def: Any) -> None:
    """Every attr on every node is in TF's OpDef for that op, and none equals its default."""
    tf_module()
    from tensorflow.python.framework import op_def_registry

    for node in graph_def.node:
        registered = {a.name: a for a in op_def_registry.get(node.op).attr}
        for name, value in node.attr.items():
            assert name in registered, f"{node.name}: {node.op} has no attr {name}"
            default = registered[name]
            theirs = type(value).FromString(default.default_value.SerializeToString())
            assert not (default.HasField("default_value") and theirs == value), \
                f"{node.name}: attr {name} written at its default"
