"""Math, reduction, activation and array ops end to end: a tf.compat.v1 graph written by TensorFlow,
read back with ``import_meta_graph`` (so attrs come decoded from real NodeDefs), run beside
``session.run``. The op-by-op value checks live in the test_tf_ops_*.py files next to this one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from tf_graphs import build_tf_graph, check_one_op

from lightning_saver import import_meta_graph

RNG = np.random.default_rng(40)
X = RNG.standard_normal((3, 4)).astype(np.float32)
INTS = RNG.integers(-9, 9, (3, 4)).astype(np.int32)
DIVISORS = np.array([3, -3, 5, -2], np.int32)


def _gather_batch(tf: Any, a: Any) -> Any:
    return tf.gather(a, tf.constant([[1, 0], [3, 3], [2, 1]]), axis=1, batch_dims=1)


def _batch_matmul(tf: Any, a: Any) -> Any:
    return tf.matmul(tf.reshape(a, [3, 2, 2]), tf.reshape(a, [3, 2, 2]), adjoint_a=True)


def _sparse_xent(tf: Any, a: Any) -> Any:
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.constant([0, 3, 1]), logits=a)


def _softmax_xent(tf: Any, a: Any) -> Any:
    return tf.nn.softmax_cross_entropy_with_logits(labels=tf.nn.softmax(a * 2), logits=a)


def _range_fill(tf: Any, a: Any) -> Any:
    return tf.cast(tf.range(2, 14, 3), tf.float32) + tf.fill([4], tf.reduce_max(a))


CASES: dict[str, tuple[Callable[..., Any], dict[str, np.ndarray]]] = {
    "floor_mod_int": (lambda tf, a, b: tf.math.floormod(a, b), {"a": INTS, "b": DIVISORS}),
    "floordiv_float": (lambda tf, a: a // 0.7, {"a": X}),
    "cast_truncate": (lambda tf, a: tf.cast(a * 1000, tf.int32), {"a": X}),
    "cast_bool": (lambda tf, a: tf.cast(a, tf.bool), {"a": INTS}),
    "mean_keepdims": (lambda tf, a: tf.reduce_mean(a, axis=[0, -1], keepdims=True), {"a": X}),
    "int_sum": (lambda tf, a: tf.reduce_sum(a, axis=1), {"a": INTS}),
    "argmax_int32": (lambda tf, a: tf.argmax(a, axis=1, output_type=tf.int32), {"a": X}),
    "all_any": (lambda tf, a: [tf.reduce_all(a > 0, axis=0), tf.reduce_any(a > 0)], {"a": X}),
    "matmul_t": (lambda tf, a, b: tf.matmul(a, b, transpose_b=True), {"a": X, "b": X}),
    "batch_matmul": (_batch_matmul, {"a": X}),
    "einsum": (lambda tf, a, b: tf.einsum("ij,kj->ik", a, b), {"a": X, "b": X}),
    "gelu_tanh": (lambda tf, a: tf.nn.gelu(a, approximate=True), {"a": X}),
    "leaky_relu": (lambda tf, a: tf.nn.leaky_relu(a, alpha=0.3), {"a": X}),
    "log_softmax": (lambda tf, a: tf.nn.log_softmax(a), {"a": X}),
    "sparse_xent": (_sparse_xent, {"a": X}),
    "softmax_xent": (_softmax_xent, {"a": X}),
    "one_hot_axis0": (lambda tf, i: tf.one_hot(i, 5, on_value=2.0, off_value=-1.0, axis=0),
                      {"i": np.array([0, 4, 7, -1], np.int32)}),
    "gather_batch": (_gather_batch, {"a": X}),
    "gather_nd": (lambda tf, a: tf.gather_nd(a, tf.constant([[2, 1], [0, 3]])), {"a": X}),
    "where_v2": (lambda tf, a: tf.where(a > 0, a, tf.zeros_like(a)), {"a": X}),
    "range_fill": (_range_fill, {"a": X}),
    "equal_select": (lambda tf, a, b: tf.where(tf.equal(a, b), tf.ones_like(a), a - b),
                     {"a": INTS, "b": np.where(INTS > 0, INTS, 0).astype(np.int32)}),
    "rsqrt_squared_difference": (lambda tf, a: tf.math.rsqrt(tf.math.squared_difference(a, 0.5) + 1.0),
                                 {"a": X}),
    "div_no_nan": (lambda tf, a: tf.math.divide_no_nan(a, tf.nn.relu(a)), {"a": X}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_graph_matches_session_run(case: str, tmp_path: Any) -> None:
    op, inputs = CASES[case]
    check_one_op(tmp_path, op, inputs, rtol=1e-5, atol=1e-6)


def test_truncated_normal_initializer_runs_through_the_importer(tmp_path: Any) -> None:
    def build(tf: Any) -> None:
        v1 = tf.compat.v1
        x = v1.placeholder(tf.float32, [None, 4], name="x")
        w = v1.get_variable("w", [4, 300], initializer=v1.truncated_normal_initializer(stddev=0.5, seed=3))
        tf.identity(tf.matmul(x, w), name="y")

    made = build_tf_graph(tmp_path, build, ["y:0"], {"x:0": X}, save=False)
    graph = import_meta_graph(made.meta)  # no checkpoint: w comes from its initializer subgraph
    w = np.asarray(graph.run("w:0"))
    assert w.shape == (4, 300) and w.dtype == np.float32
    assert np.abs(w).max() <= 1.0 + 1e-6  # 2 standard deviations
    assert abs(w.std() - np.asarray(made.variables["w"]).std()) < 0.05


def test_to_module_gradients_match_tf_gradients(tmp_path: Any) -> None:
    """Autograd through the imported converters equals TF's own tf.gradients of the same loss."""
    labels = np.array([0, 3, 1], np.int32)

    def build(tf: Any) -> None:
        v1 = tf.compat.v1
        x = v1.placeholder(tf.float32, [None, 4], name="x")
        w = v1.get_variable("dense/kernel", [4, 5], initializer=v1.random_normal_initializer(seed=1))
        b = v1.get_variable("dense/bias", [5], initializer=v1.random_uniform_initializer(-1, 1, seed=2))
        h = tf.nn.elu(tf.matmul(x, w) + b)
        logits = tf.maximum(h, 0.1 * h) - tf.reduce_mean(h, axis=-1, keepdims=True)
        xent = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.constant(labels), logits=logits)
        loss = tf.add(tf.reduce_mean(xent), 0.01 * tf.nn.l2_loss(w), name="loss")
        for var, grad in zip((w, b), tf.gradients(loss, [w, b]), strict=True):
            tf.identity(grad, name="grad_" + var.op.name.split("/")[-1])

    made = build_tf_graph(tmp_path, build, ["loss:0", "grad_kernel:0", "grad_bias:0"], {"x:0": X})
    graph = import_meta_graph(made.meta)
    graph.restore(made.ckpt)
    module = graph.to_module(inputs=["x:0"], outputs="loss:0")
    loss = module(torch.from_numpy(X))
    loss.backward()
    params = dict(module.named_parameters())
    np.testing.assert_allclose(loss.item(), made.expected[0], rtol=1e-5)
    np.testing.assert_allclose(params["dense/kernel"].grad.numpy(), made.expected[1], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(params["dense/bias"].grad.numpy(), made.expected[2], rtol=1e-4, atol=1e-6)
