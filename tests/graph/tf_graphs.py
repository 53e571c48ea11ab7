"""Build small graphs in real TensorFlow (tf.compat.v1), write them, and run them as the reference.

Shared by the TF import tests (E, F1, F2). TensorFlow is imported lazily, only by tests.

Example (a one-op test)::

    from tf_graphs import check_one_op   # tests/graph is on sys.path (no __init__.py)

    def test_relu6(tmp_path):
        x = np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)
        check_one_op(tmp_path, lambda tf, x: tf.nn.relu6(x), {"x": x})
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def tf_module() -> Any:
    """TensorFlow, quiet. A pinned test dependency: a missing or broken install fails, never skips."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow

    return tensorflow


@dataclass
class TFGraph:
    """What TensorFlow wrote and computed: the .meta path, the checkpoint prefix, session.run's values."""

    meta: str
    ckpt: str | None
    expected: list[Any]
    feed: dict[str, np.ndarray] = field(default_factory=dict)
    variables: dict[str, np.ndarray] = field(default_factory=dict)


def unremapped_config(tf: Any) -> Any:
    """A session config with grappler's remapper off, for references of arbitrary op patterns.

    TF 2.21's remapper rewrites ``Maximum(x, Mul(x, alpha))`` into a LeakyRelu for any scalar
    ``alpha``, which is only right for ``alpha <= 1``: with ``alpha = 2`` and ``x = -1`` session.run
    returns -2 where the graph means -1 (found by the random-graph test below). Every other test keeps
    TF's defaults, which is what users run.
    """
    from tensorflow.core.protobuf import rewriter_config_pb2

    config = tf.compat.v1.ConfigProto()
    config.graph_options.rewrite_options.remapping = rewriter_config_pb2.RewriterConfig.OFF
    return config


def build_tf_graph(
    directory: Any,
    build: Callable[[Any], Any],
    fetches: Sequence[str],
    feed: Mapping[str, np.ndarray] | None = None,
    *,
    train: Callable[[Any, Any], None] | None = None,
    saver_var_list: Callable[[Any], Any] | None = None,
    name: str = "model",
    save: bool = True,
    sharded: bool = False,
    config: Any | None = None,
) -> TFGraph:
    """Build a graph with ``build(tf)`` in a fresh ``tf.Graph``, initialise its variables, optionally
    ``train(tf, session)``, save a TF checkpoint with ``tf.compat.v1.train.Saver`` (its var_list from
    ``saver_var_list(tf)`` when given), export the MetaGraph, and record ``session.run(fetches, feed)``
    (in a session made with ``config``, a ``ConfigProto``, when given).
    """
    tf = tf_module()
    v1 = tf.compat.v1
    directory = os.fspath(directory)
    graph = tf.Graph()
    with graph.as_default():
        build(tf)
        variables = v1.global_variables() + v1.local_variables()
        init = v1.group(v1.global_variables_initializer(), v1.local_variables_initializer(), name="init")
        saver = None
        if save and variables:
            saver = v1.train.Saver(var_list=saver_var_list(tf) if saver_var_list else None, sharded=sharded)
        with v1.Session(graph=graph, config=config) as sess:
            sess.run(init)
            if train is not None:
                train(tf, sess)
            ckpt = None
            if saver is not None:
                ckpt = saver.save(sess, os.path.join(directory, f"{name}.ckpt"), write_meta_graph=False)
            meta = os.path.join(directory, f"{name}.meta")
            v1.train.export_meta_graph(filename=meta, graph=graph,
                                       saver_def=saver.as_saver_def() if saver else None)
            feed = dict(feed or {})
            expected = sess.run(list(fetches), feed_dict=feed)
            values = dict(zip([v.op.name for v in variables], sess.run(variables), strict=True))
    return TFGraph(meta, ckpt, expected, feed, values)


def one_op_graph(directory: Any, op: Callable[..., Any], inputs: Mapping[str, np.ndarray],
                 name: str = "out") -> TFGraph:
    """A graph of placeholders named after ``inputs`` feeding ``op(tf, *placeholders)``, output ``name``."""

    def build(tf: Any) -> None:
        v1 = tf.compat.v1
        holders = [v1.placeholder(tf.as_dtype(v.dtype), shape=v.shape, name=k) for k, v in inputs.items()]
        out = op(tf, *holders)
        outs = out if isinstance(out, (list, tuple)) else [out]
        for i, o in enumerate(outs):
            tf.identity(o, name=name if len(outs) == 1 else f"{name}_{i}")

    fetched = [f"{name}:0"]
    count = _count_outputs(op, inputs)
    if count > 1:
        fetched = [f"{name}_{i}:0" for i in range(count)]
    return build_tf_graph(directory, build, fetched, {f"{k}:0": v for k, v in inputs.items()}, save=False)


def _count_outputs(op: Callable[..., Any], inputs: Mapping[str, np.ndarray]) -> int:
    tf = tf_module()
    with tf.Graph().as_default():
        holders = [tf.compat.v1.placeholder(tf.as_dtype(v.dtype), shape=v.shape) for v in inputs.values()]
        out = op(tf, *holders)
    return len(out) if isinstance(out, (list, tuple)) else 1


def check_one_op(directory: Any, op: Callable[..., Any], inputs: Mapping[str, np.ndarray], *,
                 rtol: float = 1e-5, atol: float = 1e-6) -> list[Any]:
    """Run ``op`` in TensorFlow and through ``import_meta_graph``; assert equal dtypes, shapes, values."""
    from lightning_saver import import_meta_graph

    made = one_op_graph(directory, op, inputs)
    graph = import_meta_graph(made.meta)
    fetches = ["out:0"] if len(made.expected) == 1 else [f"out_{i}:0" for i in range(len(made.expected))]
    got = graph.run(fetches, feed_dict=made.feed)
    for g, e in zip(got, made.expected, strict=True):
        assert_same(g, e, rtol=rtol, atol=atol)
    return got


def assert_same(got: Any, expected: Any, *, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Same dtype, shape and values (``np.testing.assert_allclose``; exact for ints and bools)."""
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.dtype == expected.dtype, f"dtype {got.dtype} != TensorFlow's {expected.dtype}"
    assert got.shape == expected.shape, f"shape {got.shape} != TensorFlow's {expected.shape}"
    if got.dtype.kind in "biu":
        np.testing.assert_array_equal(got, expected)
    else:
        np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol)


def control_flow(v2: bool) -> Any:
    """A context that builds loops and conds as TF1 frames (v2=False) or functional While/If (v2=True)."""
    from tensorflow.python.ops import control_flow_util

    class Switch:
        def __enter__(self):
            self.old = control_flow_util.ENABLE_CONTROL_FLOW_V2
            control_flow_util.ENABLE_CONTROL_FLOW_V2 = v2

        def __exit__(self, *exc):
            control_flow_util.ENABLE_CONTROL_FLOW_V2 = self.old

    return Switch()


def session_values(directory: Any, name: str, build: Callable[[Any], Any], feeds: list[dict[str, Any]],
                   fetches: list[str], grads: list[tuple[str, list[str]]] | None = None,
                   v2: bool = True) -> tuple[str, str | None, list[Any], list[Any] | None]:
    """Build ``build(tf)``, save (TF Saver) and export it; TF's values (and gradients) per feed.

    ``grads`` holds (target, [wrt, ...]): ``tf.gradients(reduce_sum(target), wrt)`` per feed.
    """
    tf = tf_module()
    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        grad_tensors = []
        with control_flow(v2):  # tf.gradients must see the control flow the loops were built with
            build(tf)
            for target, wrt in (grads or []):
                grad_tensors += v1.gradients(tf.reduce_sum(graph.get_tensor_by_name(target)),
                                             [graph.get_tensor_by_name(w) for w in wrt])
        saver = v1.train.Saver() if v1.global_variables() else None
        with v1.Session(graph=graph) as sess:
            sess.run(v1.global_variables_initializer())
            ckpt = saver.save(sess, os.path.join(directory, f"{name}.ckpt"), write_meta_graph=False) \
                if saver else None
            meta = os.path.join(directory, f"{name}.meta")
            v1.train.export_meta_graph(filename=meta, graph=graph,
                                       saver_def=saver.as_saver_def() if saver else None)
            values = [sess.run(fetches, feed) for feed in feeds]
            grad_values = [sess.run(grad_tensors, feed) for feed in feeds] if grads else None
    return meta, ckpt, values, grad_values
