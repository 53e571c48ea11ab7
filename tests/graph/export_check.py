"""Run our exports in the real peers (TensorFlow through the TF1 API, ONNX Runtime) next to torch.

Shared by the export tests (tests/graph is on sys.path; there is no __init__.py).

Example::

    from export_check import check_tf

    def test_relu(tmp_path):
        check_tf(tmp_path, nn.ReLU(), (torch.randn(2, 3),), atol=1e-6)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_saver.graph.onnx_export import export_onnx
from lightning_saver.graph.tf_export import checkpoint_prefix, export_meta_graph


class Fn(torch.nn.Module):
    """A module around a function of one or two tensors (names x, y), with optional submodules."""

    def __init__(self, fn: Callable[..., Any], **modules: torch.nn.Module) -> None:
        super().__init__()
        self.fn = fn
        self.mods = torch.nn.ModuleDict(modules)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> Any:
        args = (x,) if y is None else (x, y)
        return self.fn(self, *args)


def tf_module() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow

    return tensorflow


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
    return run_tf_many(meta_path, [feeds], n_outputs, restore=restore)[0]


def run_tf_many(meta_path: str | Path, feed_sets: Sequence[dict[str, np.ndarray]], n_outputs: int, *,
                restore: bool = True, optimize: bool = True, groups: Sequence[int] = (),
                fused: set[str] | None = None) -> list[list[np.ndarray]]:
    """One session, one run per feed set. ``optimize=False`` turns grappler off for this session (the
    oneDNN rewrites are off only when TF_ENABLE_ONEDNN_OPTS=0 was set before TensorFlow was imported:
    ``run_tf_plain`` runs in such a process).

    ``groups``: output counts of independent parts (test cases side by side in one model), fetched by
    separate ``session.run`` calls. TensorFlow optimises the subgraph each run needs, and its rewrites
    give up on a whole graph when one part defeats their shape inference: a run per part sees the
    rewrites that part alone would get. ``fused``, when given, collects the ops TensorFlow actually ran
    (its partition graphs, after every rewrite), as ``"op"`` and ``"op:fused_op"`` for fused kernels.
    """
    tf = tf_module()
    graph = tf.Graph()
    config = tf.compat.v1.ConfigProto()
    if not optimize:
        config.graph_options.rewrite_options.disable_meta_optimizer = True
    with graph.as_default():
        saver = tf.compat.v1.train.import_meta_graph(str(meta_path))
        with tf.compat.v1.Session(graph=graph, config=config) as session:
            prefix = checkpoint_prefix(str(meta_path))
            if restore and os.path.exists(prefix + ".index"):
                assert saver is not None, "import_meta_graph returned no Saver"
                saver.restore(session, prefix)
            bounds = np.cumsum([0, *(groups or [n_outputs])])
            parts = [[f"output_{i}:0" for i in range(a, b)]
                     for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
            results = []
            for feeds in feed_sets:
                named = {f"{k}:0": v for k, v in feeds.items()}
                results.append([out for fetches in parts for out in _run(tf, session, fetches, named, fused)])
                fused = None  # the graphs are the same for every feed set
            return results


def _run(tf: Any, session: Any, fetches: list[str], feeds: dict[str, Any], ran: set[str] | None) -> list[Any]:
    if ran is None:
        return session.run(fetches, feeds)
    meta = tf.compat.v1.RunMetadata()
    options = tf.compat.v1.RunOptions(output_partition_graphs=True)
    out = session.run(fetches, feeds, options=options, run_metadata=meta)
    for graph in meta.partition_graphs:
        for node in graph.node:
            ran.add(node.op)
            ran.update(f"{node.op}:{op.decode()}" for op in node.attr["fused_ops"].list.s)
    return out


def run_tf_plain(meta_path: str | Path, feed_sets: Sequence[dict[str, np.ndarray]], n_outputs: int, *,
                 restore: bool = True, groups: Sequence[int] = ()) -> list[list[np.ndarray]]:
    """``run_tf_many`` with TensorFlow's optimisations off: a child process that sets
    TF_ENABLE_ONEDNN_OPTS=0 before importing TensorFlow, and disables grappler in its session."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        inputs = Path(folder) / "feeds.npz"
        np.savez(inputs, **{f"{i}/{k}": v for i, feeds in enumerate(feed_sets) for k, v in feeds.items()})
        env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "3"}
        args = [sys.executable, __file__, str(meta_path), str(inputs), str(n_outputs), str(int(restore)),
                ",".join(map(str, groups))]
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        with np.load(Path(folder) / "outputs.npz") as out:
            return [[out[f"{i}/{k}"] for k in range(n_outputs)] for i in range(len(feed_sets))]


def trained_bn(layer: torch.nn.Module) -> torch.nn.Module:
    """A batch norm with non-trivial running statistics and affine parameters (drawn in place)."""
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
        if layer.affine:
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-0.5, 0.5)
    return layer


def small_variance(args: Sequence[Any], scale: float = 1e-2) -> tuple[Any, ...]:
    """Floating inputs scaled down (variance 1e-4): where an epsilon or a fused rewrite shows."""
    return tuple(a * scale if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


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


class SideBySide(torch.nn.Module):
    """Several one-op models as one (a ModuleDict keyed by case name, so an export error names the case's
    module ``cases.<name>``): inputs concatenated in case order, outputs flattened in case order."""

    def __init__(self, cases: dict[str, tuple[torch.nn.Module, tuple[Any, ...]]]) -> None:
        super().__init__()
        self.counts = [len(args) for _, args in cases.values()]
        self.cases = torch.nn.ModuleDict({name: model for name, (model, _) in cases.items()})

    def forward(self, *inputs: torch.Tensor) -> tuple[Any, ...]:
        outs, k = [], 0
        for model, count in zip(self.cases.values(), self.counts, strict=True):
            outs.append(model(*inputs[k:k + count]))
            k += count
        return tuple(outs)


def run_side_by_side(cases: dict[str, tuple[torch.nn.Module, tuple[Any, ...]]], folder: Path
                     ) -> dict[str, Any]:
    """Export ``cases`` once per format (captured on their args, run at ``other_batch`` of them) and run
    them on unit-variance inputs and small-variance ones (x 1e-2) in TensorFlow as shipped (oneDNN and
    grappler rewrites on; a session.run per case, so each is optimised as if alone), TensorFlow with
    both off (a child process) and ONNX Runtime. Returns ``{peer: {case: outputs}}``, peers named
    ``"TensorFlow"``, ``"TensorFlow plain"``, ``"ONNX Runtime"``, each also with a ``" small"`` suffix,
    and ``"meta"`` (the ``.meta`` path) and ``"feeds"`` (the unit-variance feeds by placeholder name)."""
    model = SideBySide(cases).eval()
    args = tuple(a for _, xs in cases.values() for a in xs)
    run_args = tuple(a for _, xs in cases.values() for a in other_batch(xs))
    small_args = small_variance(run_args)
    meta = export_meta_graph(model, args, folder / "all.meta")
    groups = [len(torch_outputs(m, xs)) for m, xs in cases.values()]
    from tensorboard.compat.proto import meta_graph_pb2

    with open(meta, "rb") as f:
        graph = meta_graph_pb2.MetaGraphDef.FromString(f.read()).graph_def
    names = [n.name for n in graph.node if n.op == "Placeholder"]
    feed_sets = [dict(zip(names, (a.numpy() for a in xs), strict=True)) for xs in (run_args, small_args)]
    tf_unit, tf_small = run_tf_many(meta, feed_sets, sum(groups), groups=groups)
    plain_unit, plain_small = run_tf_plain(meta, feed_sets, sum(groups))
    path = export_onnx(model, args, folder / "all.onnx")
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    ort = [session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), xs, strict=True)})
           for xs in (run_args, small_args)]

    def split(flat: list[np.ndarray]) -> dict[str, list[np.ndarray]]:
        bounds = np.cumsum([0, *groups])
        return {name: list(flat[a:b]) for name, a, b in zip(cases, bounds[:-1], bounds[1:], strict=True)}

    return {"TensorFlow": split(tf_unit), "TensorFlow small": split(tf_small),
            "TensorFlow plain": split(plain_unit), "TensorFlow plain small": split(plain_small),
            "ONNX Runtime": split(ort[0]), "ONNX Runtime small": split(ort[1]),
            "meta": meta, "feeds": feed_sets[0]}


def _main(meta: str, inputs: str, n_outputs: str, restore: str, groups: str) -> None:
    """Child side of ``run_tf_plain``: feeds ``<set>/<name>`` in, ``<set>/<output>`` out."""
    with np.load(inputs) as data:
        sets: dict[int, dict[str, np.ndarray]] = {}
        for key in data.files:
            index, name = key.split("/", 1)
            sets.setdefault(int(index), {})[name] = data[key]
    feed_sets = [sets[i] for i in sorted(sets)]
    results = run_tf_many(meta, feed_sets, int(n_outputs), restore=bool(int(restore)), optimize=False,
                          groups=[int(n) for n in groups.split(",") if n])
    np.savez(Path(inputs).with_name("outputs.npz"),
             **{f"{i}/{k}": np.asarray(v) for i, outs in enumerate(results) for k, v in enumerate(outs)})


if __name__ == "__main__":
    import sys

    assert os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "0", "run through run_tf_plain"
    _main(*sys.argv[1:6])
