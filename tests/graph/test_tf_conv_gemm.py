"""The ``gemm`` and ``linear`` kernels of 1x1 convolutions (conv_kernels.py), against real TensorFlow.

A small NHWC network (non-square images) holds each variant a MobileNet-style block runs: a 1x1
expansion with batch norm and ReLU6, a 1x1 projection with a Keras-style batch norm (``Mul``,
``AddV2``) and a residual sum, a 1x1 with a bias, a residual sum and ReLU, and a strided 1x1 (not a
matrix product of the input as it lies, so never a ``gemm``). Every call matches TensorFlow at
batch 4 and batch 1, while the kernels are timed and after one is kept, in ``graph.run`` and in
the ``to_module`` module; with the other kernels slowed down, the timed choice keeps ``gemm``
(or ``linear``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kernel_timing import handicap
from tf_graphs import assert_same, build_tf_graph, tf_module

from lightning_saver import import_meta_graph
from lightning_saver.graph.tf_import.conv_kernels import KERNELS, TRIALS, fastest

tf_module()
RNG = np.random.default_rng(1616)
TOL = {"rtol": 1e-5, "atol": 1e-5}
CALLS = len(KERNELS) * (TRIALS + 1) + 1  # every kernel's trial calls, then the kept one's
CHAINS = ["Conv2D+FusedBatchNormV3+Relu6", "Conv2D+Mul+AddV2+AddV2", "Conv2D+BiasAdd+AddV2+Relu"]


def _var(tf, name, shape, low=-0.5, high=0.5):
    v1 = tf.compat.v1
    return v1.get_variable(name, shape, initializer=v1.random_uniform_initializer(low, high, seed=len(name)),
                           use_resource=False)


def build_pointwise_net(tf):
    v1 = tf.compat.v1
    x = v1.placeholder(tf.float32, [None, 5, 6, 8], name="x")
    h = tf.nn.conv2d(x, _var(tf, "expand/kernel", [1, 1, 8, 24]), 1, "VALID")
    h = v1.nn.fused_batch_norm(h, _var(tf, "bn/gamma", [24], 0.5, 1.5), _var(tf, "bn/beta", [24], 1.0, 6.0),
                               _var(tf, "bn/mean", [24]), _var(tf, "bn/variance", [24], 0.2, 2.0),
                               epsilon=1e-3, is_training=False)[0]
    h = tf.nn.relu6(h)  # the shift (beta) is large enough that ReLU6 clips
    p = tf.nn.conv2d(h, _var(tf, "project/kernel", [1, 1, 24, 8]), 1, "SAME")
    p = p * _var(tf, "project/scale", [8], 0.5, 1.5) + _var(tf, "project/shift", [8])
    r = p + x                                                                   # residual, no activation
    q = tf.nn.conv2d(r, _var(tf, "mix/kernel", [1, 1, 8, 8]), 1, "VALID")
    q = tf.nn.relu(tf.nn.bias_add(q, _var(tf, "mix/bias", [8])) + r)           # bias, residual, ReLU
    s = tf.nn.conv2d(q, _var(tf, "down/kernel", [1, 1, 8, 4]), 2, "VALID")    # strided: no gemm
    tf.identity(q, name="q")
    tf.identity(s, name="s")


def _images(n):
    return RNG.uniform(-1.5, 1.5, size=(n, 5, 6, 8)).astype(np.float32)


def _imported(tmp_path, x):
    made = build_tf_graph(tmp_path, build_pointwise_net, ["q:0", "s:0"], {"x:0": x})
    graph = import_meta_graph(made.meta)
    graph.restore(made.ckpt, strict=True)
    return made, graph


def _prepared(steps):
    """{chain op: [Prepared, ...]} of the fused convolutions among ``steps``."""
    return {s.op: list(s.func.prepared.values()) for s in steps if hasattr(s.func, "prepared")}


def test_gemm_matches_tf_on_every_call_at_batch_4_and_1(tmp_path):
    x = _images(4)
    made, graph = _imported(tmp_path, x)
    q, s = made.expected
    for batch in (4, 1):
        for _ in range(CALLS):
            got = graph.run(["q:0", "s:0"], {"x:0": x[:batch]})
            assert_same(got[0], q[:batch], **TOL)
            assert_same(got[1], s[:batch], **TOL)
    steps = graph.plan([("q", 0), ("s", 0)], frozenset({("x", 0)})).fused_steps
    prepared = _prepared(steps)
    assert [op for op in prepared if op in CHAINS] == CHAINS
    for op in CHAINS:
        assert len(prepared[op]) == 2  # one per batch size
        for p in prepared[op]:
            assert all(len(times) == TRIALS + 1 for times in p.trials.values())  # all ran, gemm too
            assert {"gemm", "linear"} <= set(p.trials) and p.chosen in KERNELS
    strided = [p for op, ps in prepared.items() if op not in CHAINS for p in ps]
    assert all("gemm" not in p.kernels and "linear" not in p.kernels for p in strided)
    assert all(s.func.unfused_calls == 0 for s in steps if hasattr(s.func, "unfused_calls"))


@pytest.mark.parametrize("keep", ["gemm", "linear"])
def test_timed_choice_keeps_a_1x1_kernel_when_it_is_fastest(tmp_path, keep):
    x = _images(4)
    made, graph = _imported(tmp_path, x)
    assert_same(graph.run(["q:0", "s:0"], {"x:0": x})[0], made.expected[0], **TOL)  # prepares the kernels
    steps = graph.plan([("q", 0), ("s", 0)], frozenset({("x", 0)})).fused_steps
    gemms = [p for op, ps in _prepared(steps).items() if op in CHAINS for p in ps]
    handicap(gemms, keep)
    for _ in range(CALLS):
        got = graph.run(["q:0", "s:0"], {"x:0": x})
        assert_same(got[0], made.expected[0], **TOL)
        assert_same(got[1], made.expected[1], **TOL)
    assert [p.chosen for p in gemms] == [keep] * len(CHAINS), [p.trials for p in gemms]


@pytest.mark.parametrize("keep", ["gemm", "linear"])
def test_module_runs_a_1x1_kernel_and_matches_tf(tmp_path, keep):
    x = _images(4)
    made, graph = _imported(tmp_path, x)
    module = graph.to_module(inputs="x:0", outputs=["q:0", "s:0"]).eval()
    fused = {n.target.__name__: n.target for n in module.graph.nodes
             if n.op == "call_function" and hasattr(n.target, "prepared")}
    assert "conv2d_mul_add_v2_add_v2_folded" in fused
    pointwise = lambda: [p for f in fused.values() for p in f.prepared.values() if keep in p.kernels]  # noqa: E731
    with torch.no_grad():
        for batch in (4, 1):
            for i in range(CALLS):
                if i == 1 and batch == 4:  # after the first call prepared the kernels
                    handicap(pointwise(), keep)
                got = module(torch.from_numpy(x[:batch]))
                assert_same(got[0].numpy(), made.expected[0][:batch], **TOL)
                assert_same(got[1].numpy(), made.expected[1][:batch], **TOL)
    gemms = pointwise()
    assert len(gemms) == 2 * len(CHAINS)  # per batch size
    assert [p.chosen for p in gemms[::2]] == [keep] * len(CHAINS)  # the handicapped ones, batch 4


def test_fastest_ignores_each_kernels_first_call():
    assert fastest({"onednn": [9.0, 3.0, 3.5], "native": [1.0, 2.5, 2.6], "gemm": [7.0, 2.0, 2.4]}) == "gemm"
    assert fastest({"onednn": [0.1, 3.0], "gemm": [5.0, 2.9]}) == "gemm"  # 0.1: a warm-up, not counted


def build_dying_residual(tf):
    v1 = tf.compat.v1
    x = v1.placeholder(tf.float32, [None, 5, 6, 8], name="x")
    a = tf.nn.relu(tf.nn.conv2d(x, _var(tf, "a/kernel", [1, 1, 8, 8]), 1, "VALID"))
    b = tf.nn.relu6(tf.nn.conv2d(a, _var(tf, "b/kernel", [1, 1, 8, 16]), 1, "VALID") + 1.0)
    c = tf.nn.conv2d(b, _var(tf, "c/kernel", [1, 1, 16, 8]), 1, "VALID")
    d = tf.nn.relu(tf.nn.bias_add(c, _var(tf, "c/bias", [8])) + a)  # a dies here: the sum may go into a
    tf.identity(d + x, name="y")                                    # x is fed: never written


def test_a_dying_residual_takes_the_gemm_result_in_place(tmp_path):
    x = _images(4)
    made = build_tf_graph(tmp_path, build_dying_residual, ["y:0"], {"x:0": x})
    graph = import_meta_graph(made.meta)
    graph.restore(made.ckpt, strict=True)
    fed = x.copy()
    assert_same(graph.run("y:0", {"x:0": fed}), made.expected[0], **TOL)  # prepares the kernels
    steps = graph.plan([("y", 0)], frozenset({("x", 0)})).fused_steps
    step = next(s for s in steps if s.op == "Conv2D+BiasAdd+AddV2+Relu")
    prepared = next(iter(step.func.prepared.values()))
    assert "gemm" in prepared.into
    handicap([prepared], "gemm")
    for _ in range(CALLS):
        assert_same(graph.run("y:0", {"x:0": fed}), made.expected[0], **TOL)
        np.testing.assert_array_equal(fed, x)
    assert prepared.chosen == "gemm"
    before = step.func.overwrites
    for _ in range(3):
        assert_same(graph.run("y:0", {"x:0": fed}), made.expected[0], **TOL)
    assert step.func.overwrites == before + 3  # each call summed into a's buffer
    np.testing.assert_array_equal(fed, x)


def build_scalar_shifts(tf):
    v1 = tf.compat.v1
    x = v1.placeholder(tf.float32, [None, 5, 6, 8], name="x")
    h = tf.nn.relu6(tf.nn.conv2d(x, _var(tf, "k3/kernel", [3, 3, 8, 8]), 1, "SAME") + 1.0)  # a scalar
    h = tf.nn.conv2d(h, _var(tf, "k1/kernel", [1, 1, 8, 8]), 1, "VALID") * 2.0 + tf.constant([0.5])  # [1]
    tf.identity(h, name="y")


def test_scalar_shifts_fold_into_every_kernel(tmp_path):
    """A scalar (or [1]) shift folds into the bias as a whole vector: the kernels read it as memory."""
    x = _images(4)
    made = build_tf_graph(tmp_path, build_scalar_shifts, ["y:0"], {"x:0": x})
    graph = import_meta_graph(made.meta)
    graph.restore(made.ckpt, strict=True)
    for _ in range(CALLS):  # every kernel's trial calls, then the kept one's
        assert_same(graph.run("y:0", {"x:0": x}), made.expected[0], **TOL)
    steps = graph.plan([("y", 0)], frozenset({("x", 0)})).fused_steps
    assert [s.op for s in steps if "+" in s.op] == ["Conv2D+AddV2+Relu6", "Conv2D+Mul+AddV2"]
