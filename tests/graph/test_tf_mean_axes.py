"""A ``Mean`` whose axes are constants reads them once (fuse.py's rewrite,
ops_reduce.mean_over_constant_axes), in ``run`` and in ``to_module`` alike, against real
TensorFlow: the global average pool of NHWC data, kept dims, negative axes, float64, integer
means (truncated, as TF does), an empty axis list, and TF's gradient through the module."""

from __future__ import annotations

import numpy as np
import torch
from tf_graphs import assert_same, build_tf_graph, tf_module

from lightning_saver import import_meta_graph

tf_module()
RNG = np.random.default_rng(1717)
TOL = {"rtol": 1e-5, "atol": 1e-5}
OUTS = ["hw:0", "kept:0", "negative:0", "channels:0", "wide:0", "ints:0", "none:0"]
FETCHES = [*OUTS, "loss:0", "grad/x:0"]


def build(tf):
    v1 = tf.compat.v1
    x = v1.placeholder(tf.float32, [None, 7, 5, 6], name="x")
    i = v1.placeholder(tf.int32, [None, 4, 3], name="i")
    outs = [
        tf.reduce_mean(x, [1, 2]),  # Keras' GlobalAveragePooling2D
        tf.reduce_mean(x, [1, 2], keepdims=True),
        tf.reduce_mean(x, [-3, -2]),
        tf.reduce_mean(x, -1),  # a scalar axis
        tf.reduce_mean(tf.cast(x, tf.float64), [2, 0]),  # unsorted axes, float64
        tf.reduce_mean(i, [1, 2]),  # integer mean: the sum divided by the count, truncated
        tf.reduce_mean(x, tf.constant([], tf.int32)),  # no axis: the input unchanged
    ]
    for name, out in zip(OUTS, outs, strict=True):
        tf.identity(out, name=name.split(":")[0])
    loss = tf.reduce_sum(outs[0] * outs[0], name="loss")
    tf.identity(tf.gradients(loss, [x])[0], name="grad/x")


def test_constant_axis_means_match_tf_in_run_and_module(tmp_path):
    x = RNG.normal(size=(3, 7, 5, 6)).astype(np.float32)
    i = RNG.integers(-50, 50, size=(3, 4, 3)).astype(np.int32)
    feed = {"x:0": x, "i:0": i}
    made = build_tf_graph(tmp_path, build, FETCHES, feed, save=False)
    assert (made.expected[5] < 0).any()  # a negative integer mean: truncation toward zero is tested
    graph = import_meta_graph(made.meta)
    plan = graph.plan([(n.split(":")[0], 0) for n in OUTS], frozenset({("x", 0), ("i", 0)}))
    means = [s for s in plan.fused_steps if s.op == "Mean"]
    assert len(means) == len(OUTS) and all(s.func.__name__ == "mean_constant_axes" for s in means)
    for got, expected in zip(graph.run(OUTS, feed), made.expected[:len(OUTS)], strict=True):
        assert_same(got, expected, **TOL)
    # another batch size through the same (cached) axes, and rank-dependent negative axes
    assert_same(graph.run("negative:0", {"x:0": x[:1]}), made.expected[2][:1], **TOL)
    module = graph.to_module(inputs=["x:0", "i:0"], outputs=FETCHES[:-1])
    assert "mean_constant_axes" in module.code
    with torch.no_grad():
        outs = module(torch.from_numpy(x), torch.from_numpy(i))
    for got, expected in zip(outs, made.expected[:-1], strict=True):
        assert_same(got.numpy(), expected, **TOL)
    xt = torch.from_numpy(x).requires_grad_()
    module(xt, torch.from_numpy(i))[-1].backward()
    assert_same(xt.grad.numpy(), made.expected[-1], **TOL)
