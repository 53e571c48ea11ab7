"""A MatMul whose only reader is a BiasAdd runs as one step, ``torch.addmm`` (fuse.py,
fused_dense.py), against real TensorFlow: a Keras-style dense head with variables restored from a
TF checkpoint, a transposed operand, both operands transposed (neither square), a MatMul that is
also fetched (not fused), and TF's gradients through the module."""

from __future__ import annotations

import numpy as np
import torch
from tf_graphs import assert_same, build_tf_graph, tf_module

from lightning_saver import import_meta_graph

tf_module()
RNG = np.random.default_rng(1818)
TOL = {"rtol": 1e-5, "atol": 1e-5}
OUTS = ["probs:0", "transposed:0", "shared:0", "product:0", "both:0"]
GRADS = ["grad/x:0", "grad/dense/kernel:0", "grad/dense/bias:0"]


def build(tf):
    v1 = tf.compat.v1
    x = v1.placeholder(tf.float32, [None, 12], name="x")
    init = v1.random_uniform_initializer(-0.5, 0.5, seed=5)
    kernel = v1.get_variable("dense/kernel", [12, 7], initializer=init)
    bias = v1.get_variable("dense/bias", [7], initializer=init)
    logits = tf.nn.bias_add(tf.matmul(x, kernel), bias)
    probs = tf.nn.softmax(logits, name="probs")
    wt = tf.constant(RNG.normal(size=(5, 12)).astype(np.float32))
    tf.nn.bias_add(tf.matmul(x, wt, transpose_b=True), tf.constant(RNG.normal(size=5).astype(np.float32)),
                   name="transposed")
    # both operands transposed, neither square: (12, n)^T @ (5, 12)^T
    tf.nn.bias_add(tf.matmul(tf.transpose(x), wt, transpose_a=True, transpose_b=True),
                   tf.constant(RNG.normal(size=5).astype(np.float32)), name="both")
    product = tf.matmul(x, kernel, name="product")  # read twice: stays a MatMul
    tf.nn.bias_add(product, bias, name="shared")
    loss = tf.reduce_sum(probs * tf.constant(RNG.normal(size=(1, 7)).astype(np.float32)), name="loss")
    grads = tf.gradients(loss, [x, kernel, bias])
    for name, g in zip(["x", "dense/kernel", "dense/bias"], grads, strict=True):
        tf.identity(g, name=f"grad/{name}")


def test_mat_mul_then_bias_add_is_one_step_matching_tf(tmp_path):
    x = RNG.normal(size=(3, 12)).astype(np.float32)
    made = build_tf_graph(tmp_path, build, OUTS + GRADS, {"x:0": x})
    graph = import_meta_graph(made.meta)
    graph.restore(made.ckpt, strict=True)
    plan = graph.plan([(n.split(":")[0], 0) for n in OUTS], frozenset({("x", 0)}))
    ops = sorted(s.op for s in plan.fused_steps if "MatMul" in s.op)
    assert ops == ["MatMul", "MatMul+BiasAdd", "MatMul+BiasAdd", "MatMul+BiasAdd"]
    for got, expected in zip(graph.run(OUTS, {"x:0": x}), made.expected[:5], strict=True):
        assert_same(got, expected, **TOL)
    assert_same(graph.run("probs:0", {"x:0": x[:1]}), made.expected[0][:1], **TOL)  # batch 1
    module = graph.to_module(inputs="x:0", outputs=[*OUTS, "loss:0"])
    assert "mat_mul_bias_add_folded" in module.code
    with torch.no_grad():
        for got, expected in zip(module(torch.from_numpy(x))[:5], made.expected[:5], strict=True):
            assert_same(got.numpy(), expected, **TOL)
    # the module trains through the fused step: TF's gradients for the input, kernel and bias
    xt = torch.from_numpy(x).requires_grad_()
    module(xt)[-1].backward()
    params = dict(module.named_parameters())
    assert_same(xt.grad.numpy(), made.expected[5], **TOL)
    assert_same(params["dense/kernel"].grad.numpy(), made.expected[6], **TOL)
    assert_same(params["dense/bias"].grad.numpy(), made.expected[7], **TOL)
