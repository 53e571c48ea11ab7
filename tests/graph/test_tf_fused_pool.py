"""A zero Pad feeding only a VALID MaxPool runs as one step (fuse.py, fused_pool.py), against real
TensorFlow: mostly negative data, so the windows that reach into the zero padding take TF's 0."""

from __future__ import annotations

import numpy as np
import torch
from tf_graphs import assert_same, build_tf_graph, tf_module

from lightning_saver import import_meta_graph

tf_module()
RNG = np.random.default_rng(1616)
TOL = {"rtol": 1e-5, "atol": 1e-5}
FETCHES = ["a:0", "b:0", "loss:0"]
GRADS = ["grad/x:0", "grad/conv/kernel:0"]


def build(tf):
    v1 = tf.compat.v1
    x = v1.placeholder(tf.float32, [None, 9, 8, 3], name="x")
    init = v1.random_uniform_initializer(-0.5, 0.5, seed=3)
    kernel = v1.get_variable("conv/kernel", [3, 3, 3, 4], initializer=init)
    # ResNet's pool1_pad + pool1: symmetric pads, 3x3 stride 2, odd and even sizes
    a = tf.nn.max_pool2d(tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]]), 3, 2, "VALID")
    # asymmetric pads (PadV2 with a zero value) after a convolution, non-square window
    h = tf.nn.conv2d(x, kernel, 1, "SAME")
    h = tf.raw_ops.PadV2(input=h, paddings=[[0, 0], [2, 1], [0, 1], [0, 0]], constant_values=0.0)
    b = tf.nn.max_pool2d(h, [5, 3], [2, 1], "VALID")
    a, b = tf.identity(a, name="a"), tf.identity(b, name="b")
    weights = tf.constant(RNG.normal(size=(1, *b.shape[1:])).astype(np.float32))
    loss = tf.add(tf.reduce_sum(a * a), tf.reduce_sum(b * weights), name="loss")
    for name, g in zip(["x", "conv/kernel"], tf.gradients(loss, [x, kernel]), strict=True):
        tf.identity(g, name=f"grad/{name}")
    kernel.assign(kernel * -1.5, name="update")


def _tf_after_update(made, x):
    """TF's outputs after its own ``update`` op scaled the kernel by -1.5."""
    tf = tf_module()
    v1 = tf.compat.v1
    with tf.Graph().as_default() as graph, v1.Session(graph=graph) as sess:
        v1.train.import_meta_graph(made.meta).restore(sess, made.ckpt)
        sess.run("update")
        return sess.run(FETCHES, {"x:0": x})


def test_pad_then_max_pool_is_one_step_matching_tf(tmp_path):
    x = (RNG.normal(size=(2, 9, 8, 3)) - 1.5).astype(np.float32)
    made = build_tf_graph(tmp_path, build, FETCHES + GRADS, {"x:0": x})
    assert (made.expected[0] == 0).any() and (made.expected[0] < 0).any()  # the padding did win somewhere
    graph = import_meta_graph(made.meta)
    graph.restore(made.ckpt, strict=True)
    ops = [s.op for s in graph.plan([("a", 0), ("b", 0)], frozenset({("x", 0)})).fused_steps]
    assert "Pad+MaxPool" in ops and "PadV2+MaxPool" in ops and "Pad" not in ops and "PadV2" not in ops
    for got, expected in zip(graph.run(FETCHES, {"x:0": x}), made.expected, strict=False):
        assert_same(got, expected, **TOL)
    module = graph.to_module(inputs="x:0", outputs=FETCHES)
    assert "pad_max_pool_folded" in module.code
    with torch.no_grad():
        for got, expected in zip(module(torch.from_numpy(x)), made.expected, strict=False):
            assert_same(got.numpy(), expected, **TOL)
    # with autograd recording, the original ops run: TF's gradients for the input and the kernel
    xt = torch.from_numpy(x).requires_grad_()
    outs = module(xt)
    for got, expected in zip(outs, made.expected, strict=False):
        assert_same(got.detach().numpy(), expected, **TOL)
    outs[2].backward()
    assert_same(xt.grad.numpy(), made.expected[3], rtol=1e-4, atol=1e-4)
    kernel = dict(module.named_parameters())["conv/kernel"]
    assert_same(kernel.grad.numpy(), made.expected[4], rtol=1e-4, atol=1e-4)
    # a parameter update between calls: the module and run follow it as TF does
    with torch.no_grad():
        kernel.mul_(-1.5)
        after = _tf_after_update(made, x)
        for got, expected in zip(module(torch.from_numpy(x)), after, strict=True):
            assert_same(got.numpy(), expected, **TOL)
    for got, expected in zip(graph.run(FETCHES, {"x:0": x}), after, strict=True):
        assert_same(got, expected, **TOL)
    # batch 1 (another shape through the same steps)
    assert_same(graph.run("a:0", {"x:0": x[:1]}), after[0][:1], **TOL)


NONNEG = ["relu_pool:0", "relu6_pool:0", "raw_pool:0", "five_pool:0", "same_pool:0", "leaky_pool:0"]


def build_after_activations(tf):
    v1 = tf.compat.v1
    x = v1.placeholder(tf.float32, [None, 10, 9, 3], name="x")
    kernel = tf.constant(RNG.normal(size=(3, 3, 3, 4)).astype(np.float32))
    h = tf.nn.conv2d(x, kernel, 1, "SAME")
    pads = [[0, 0], [1, 1], [1, 1], [0, 0]]
    outs = [
        tf.nn.max_pool2d(tf.pad(tf.nn.relu(h), pads), 3, 2, "VALID"),  # ResNet's conv1_relu -> pool1
        tf.nn.max_pool2d(tf.pad(tf.nn.relu6(h), [[0, 0], [0, 2], [1, 0], [0, 0]]), 3, 2, "VALID"),
        tf.nn.max_pool2d(tf.pad(h, pads), 3, 2, "VALID"),  # signed data: the zero padding wins
        # a non-zero pad value is not a zero pad: the 5 wins, and no fusion
        tf.nn.max_pool2d(tf.pad(tf.nn.relu(h), pads, constant_values=5.0), 3, 2, "VALID"),
        tf.nn.max_pool2d(h, 3, 2, "SAME"),  # TF's own padding never wins, even over negatives
        # a LeakyRelu (a "Relu" in its name) keeps negatives: the zero padding still wins
        tf.nn.max_pool2d(tf.pad(tf.nn.leaky_relu(h, 0.2), pads), 3, 2, "VALID"),
    ]
    for name, out in zip(NONNEG, outs, strict=True):
        tf.identity(out, name=name.split(":")[0])


def test_a_pad_after_relu_pools_without_border_clamps_matching_tf(tmp_path):
    x = (RNG.normal(size=(2, 10, 9, 3)) - 1.0).astype(np.float32)
    made = build_tf_graph(tmp_path, build_after_activations, NONNEG, {"x:0": x}, save=False)
    assert (made.expected[2] == 0).any() and (made.expected[4] < 0).any()  # both padding values show
    assert (made.expected[3] == 5).any() and (made.expected[5] == 0).any()
    graph = import_meta_graph(made.meta)
    plan = graph.plan([(n.split(":")[0], 0) for n in NONNEG], frozenset({("x", 0)}))
    pools = {s.name: s.func for s in plan.fused_steps if s.op.endswith("+MaxPool")}
    # the Relu/Relu6 one (a plain step or the end of a fused convolution) skips max(value, 0)
    assert sorted(f.nonnegative for f in pools.values()) == [False, False, True, True]
    assert sum(s.op == "MaxPool" for s in plan.fused_steps) == 2  # the 5-padded and the SAME pools
    for got, expected in zip(graph.run(NONNEG, {"x:0": x}), made.expected, strict=True):
        assert_same(got, expected, **TOL)
    module = graph.to_module(inputs="x:0", outputs=NONNEG)
    with torch.no_grad():
        outs = module(torch.from_numpy(x))
    for got, expected in zip(outs, made.expected, strict=True):
        assert_same(got.numpy(), expected, **TOL)
    # batch 1: another geometry, cached by the same steps
    assert_same(graph.run(NONNEG[0], {"x:0": x[:1]}), made.expected[0][:1], **TOL)


PLAIN = ["tiles:0", "same:0", "strided:0", "wide:0", "pool_loss:0", "grad/px:0"]


def build_plain_pools(tf):
    v1 = tf.compat.v1
    x = v1.placeholder(tf.float32, [None, 32, 32, 16], name="px")
    outs = [
        tf.nn.max_pool2d(x, 2, 2, "VALID"),  # the small CNN's pools: strided views from 32768 elements
        tf.nn.max_pool2d(x[:, :31, :29], 3, 2, "SAME"),  # odd sizes: TF's extra pixel after, -inf
        tf.nn.max_pool2d(x, [3, 2], [1, 2], "VALID"),  # overlapping rows: torch's pooling
        tf.nn.max_pool2d(x, [2, 4], [2, 4], "VALID"),  # non-square tiles: rows and columns differ
    ]
    for name, out in zip(PLAIN, outs, strict=False):
        tf.identity(out, name=name.split(":")[0])
    loss = tf.add_n([tf.reduce_sum(o * o) for o in outs], name="pool_loss")
    tf.identity(tf.gradients(loss, [x])[0], name="grad/px")


def test_plain_max_pools_decide_once_per_shape_matching_tf(tmp_path):
    x = (RNG.normal(size=(8, 32, 32, 16)) - 1.0).astype(np.float32)
    made = build_tf_graph(tmp_path, build_plain_pools, PLAIN, {"px:0": x}, save=False)
    one = build_tf_graph(tmp_path / "one", build_plain_pools, PLAIN[:4], {"px:0": x[:1]}, save=False)
    assert (made.expected[1] < 0).any()  # negative maxima: a zero padding would show
    graph = import_meta_graph(made.meta)
    plan = graph.plan([(n.split(":")[0], 0) for n in PLAIN[:4]], frozenset({("px", 0)}))
    pools = [s.func for s in plan.fused_steps if s.op == "MaxPool"]
    assert [f.__name__ for f in pools] == ["max_pool_prepared"] * 4
    # batch 8 takes the strided views for the 2x2 and 2x4 pools, batch 1 (16384 elements) torch's pooling
    for batch, expected in ((x, made.expected), (x[:1], one.expected)):
        for got, want in zip(graph.run(PLAIN[:4], {"px:0": batch}), expected, strict=False):
            assert_same(got, want, **TOL)
    for tiled in (pools[0], pools[3]):
        assert {shape: how[0] for shape, how in tiled.decided.items()} == {
            (8, 32, 32, 16): "tiles", (1, 32, 32, 16): "torch"}
    assert {how[0] for f in pools[1:3] for how in f.decided.values()} == {"torch"}
    module = graph.to_module(inputs="px:0", outputs=PLAIN[:5])
    assert "max_pool_prepared" in module.code
    with torch.no_grad():
        for got, want in zip(module(torch.from_numpy(x)), made.expected, strict=False):
            assert_same(got.numpy(), want, **TOL)
    xt = torch.from_numpy(x).requires_grad_()
    outs = module(xt)
    assert_same(outs[4].detach().numpy(), made.expected[4], rtol=1e-5, atol=1e-3)
    outs[4].backward()
    assert_same(xt.grad.numpy(), made.expected[5], **TOL)
