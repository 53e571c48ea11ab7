"""compile_module (inductor on CPU, compiled.py) against real TensorFlow, and its eager fallbacks.

Compiling is slow (about 10 s for the small CNN here), so one model is compiled, once, for the
whole file.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tf_graphs import assert_same, build_tf_graph, tf_module

from lightning_saver import compile_module, import_meta_graph

tf_module()
RNG = np.random.default_rng(160)


def _images(*shape):
    return (RNG.uniform(0, 255, size=shape) / 127.5 - 0.3).astype(np.float32)


def _var(tf, name, shape, low=-0.5, high=0.5, trainable=True):
    v1 = tf.compat.v1
    return v1.get_variable(name, shape, initializer=v1.random_uniform_initializer(low, high, seed=len(name)),
                           trainable=trainable)


def build_cnn(tf):
    """Conv + bias + fused batch norm + ReLU6, a depthwise conv with a residual, a strided conv
    (TF's asymmetric SAME padding), max pool, mean and a dense softmax."""
    v1 = tf.compat.v1
    x = v1.placeholder(tf.float32, [None, 16, 16, 3], name="x")
    h = tf.nn.conv2d(x, _var(tf, "c1/kernel", [3, 3, 3, 8]), 1, "SAME")
    h = tf.nn.bias_add(h, _var(tf, "c1/bias", [8]))
    stats = [_var(tf, f"bn/{n}", [8], lo, hi, trainable=t) for n, lo, hi, t in [
        ("gamma", 0.5, 1.5, True), ("beta", -0.5, 0.5, True), ("mean", -1, 1, False), ("var", 0.2, 3, False)]]
    h, _, _ = v1.nn.fused_batch_norm(h, *stats, is_training=False)
    h = tf.nn.relu6(h)
    r = tf.nn.depthwise_conv2d(h, _var(tf, "dw/kernel", [3, 3, 8, 1]), [1, 1, 1, 1], "SAME")
    h = tf.nn.relu(r + h)
    h = tf.nn.conv2d(h, _var(tf, "c2/kernel", [3, 3, 8, 16]), 2, "SAME")
    h = tf.nn.max_pool2d(h, 2, 2, "VALID")
    h = tf.reduce_mean(h, axis=[1, 2])
    tf.nn.softmax(tf.matmul(h, _var(tf, "fc/kernel", [16, 10])), name="probs")


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    feed = {"x:0": _images(1, 16, 16, 3)}
    made = build_tf_graph(tmp_path_factory.mktemp("cnn"), build_cnn, ["probs:0"], feed)
    graph = import_meta_graph(made.meta)
    graph.restore(made.ckpt)
    module = graph.to_module(inputs=["x:0"], outputs="probs:0")
    return made, module


def test_compiled_cnn_matches_session_run_and_leaves_the_module_trainable(cnn, recwarn):
    made, module = cnn
    fast = compile_module(module)
    with torch.no_grad():
        got = fast(torch.from_numpy(made.feed["x:0"]))
    assert fast.eager_reasons == {} and [w for w in recwarn if "compile_module" in str(w.message)] == []
    assert list(fast.compile_seconds.values())[0] > 0  # it did compile
    assert_same(got.numpy(), made.expected[0], rtol=1e-5, atol=1e-6)

    # the module itself still trains: with autograd on, the compiled module runs it, gradients flow
    x = torch.from_numpy(made.feed["x:0"])
    loss = fast(x)[0, 3]
    loss.backward()
    grads = {name: p.grad for name, p in module.named_parameters()}
    assert grads and all(g is not None and torch.count_nonzero(g) > 0 for g in grads.values())
    module.zero_grad()
    assert len(fast.compile_seconds) == 1  # no second signature compiled for the training call


def test_no_cpp_compiler_warns_and_runs_eagerly(cnn):
    import torch._inductor.config as inductor_config

    made, module = cnn
    fast = compile_module(module)
    # inductor's own setting of where to look (monkeypatch would delete it on undo: a config attribute)
    with inductor_config.patch({"cpp.cxx": ("no-such-compiler-16",)}), torch.no_grad(), pytest.warns(
            UserWarning, match=r"compile_module: .* run eagerly: no C\+\+ compiler"):
        got = fast(torch.from_numpy(made.feed["x:0"]))
    assert_same(got.numpy(), made.expected[0], rtol=1e-5, atol=1e-6)
    assert list(fast.compile_seconds.values()) == [None]


def test_shapes_from_input_values_warn_and_run_eagerly(tmp_path):
    """tf.where with one argument: its output shape depends on the values, so no fixed-shape trace."""
    def build(tf):
        x = tf.compat.v1.placeholder(tf.float32, [None, 4], name="x")
        tf.identity(tf.reduce_sum(tf.gather_nd(x, tf.where(x > 0))), name="y")

    feeds = [{"x:0": RNG.normal(size=(3, 4)).astype(np.float32)} for _ in range(2)]
    made = [build_tf_graph(tmp_path / str(i), build, ["y:0"], feed, save=False)
            for i, feed in enumerate(feeds)]
    fast = compile_module(import_meta_graph(made[0].meta).to_module(inputs=["x:0"], outputs="y:0"))
    reason = "run eagerly: the graph (reads values of|computes shapes from) its input"
    with pytest.warns(UserWarning, match=reason):
        first = fast(torch.from_numpy(feeds[0]["x:0"]))
    second = fast(torch.from_numpy(feeds[1]["x:0"]))  # same shape, other values: no stale trace
    for got, m in zip([first, second], made, strict=True):
        assert_same(got.numpy(), m.expected[0], rtol=1e-5, atol=1e-5)
