"""Convolutions fused with the per-channel ops after them (fuse.py), against real TensorFlow.

Inputs have image-like statistics (positive, mean far from zero) and the batch-norm statistics are
not the identity, so folding errors would show (STYLE rule 15).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from tf_graphs import assert_same, build_tf_graph, tf_module

from lightning_saver import Saver, import_meta_graph
from lightning_saver.graph.tf_import import conv_kernels

tf_module()
RNG = np.random.default_rng(16)
TOL = {"rtol": 1e-4, "atol": 1e-4}


def _images(*shape):
    return (RNG.uniform(0, 255, size=shape) / 127.5 - 0.3).astype(np.float32)


def _var(tf, name, shape, low=-0.5, high=0.5, resource=True, trainable=True):
    v1 = tf.compat.v1
    return v1.get_variable(name, shape, initializer=v1.random_uniform_initializer(low, high, seed=len(name)),
                           use_resource=resource, trainable=trainable)


def _keras3_bn(tf, h, name):
    """Batch norm as Keras 3 writes it: Mul by gamma * rsqrt(var + eps), then Sub (or AddV2)."""
    c = h.shape[-1]
    gamma, beta = _var(tf, f"{name}/gamma", [c], 0.5, 1.5), _var(tf, f"{name}/beta", [c])
    mean = _var(tf, f"{name}/moving_mean", [c], -1.0, 1.0, trainable=False)
    var = _var(tf, f"{name}/moving_variance", [c], 0.2, 3.0, trainable=False)
    a = gamma * tf.math.rsqrt(var + 1e-3)
    return h * a + (beta - mean * a)


def build_keras3_style(tf):
    v1 = tf.compat.v1
    x = v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")
    h = tf.nn.conv2d(x, _var(tf, "c1/kernel", [3, 3, 3, 8]), 1, "SAME")
    h = tf.nn.relu(_keras3_bn(tf, tf.nn.bias_add(h, _var(tf, "c1/bias", [8])), "bn1"))
    h = tf.nn.conv2d(h, _var(tf, "c2/kernel", [1, 1, 8, 16]), 1, "VALID")                 # 1x1
    h = tf.nn.relu6(_keras3_bn(tf, h, "bn2") - _var(tf, "c2/shift", [16]))
    r = tf.nn.depthwise_conv2d(h, _var(tf, "dw/kernel", [3, 3, 16, 1]), [1, 1, 1, 1], "SAME")
    h = tf.nn.relu(_keras3_bn(tf, r, "bn3") + h)                                          # residual
    h = tf.nn.depthwise_conv2d(h, _var(tf, "dw2/kernel", [3, 3, 16, 2]), [1, 2, 2, 1], "SAME")  # pads (0, 1)
    h = _keras3_bn(tf, h, "bn4")
    tf.identity(tf.reduce_mean(h, axis=[1, 2]), name="y")


def _unfused_calls(graph, fetch, feed="x"):
    """How often the fused steps of the plan fell back to the original ops."""
    steps = graph.plan([(fetch, 0)], frozenset({(feed, 0)})).fused_steps
    return sum(getattr(s.func, "unfused_calls", 0) for s in steps if "+" in s.op)


def test_keras3_style_conv_bias_and_batch_norm_fold_in_run_and_module(tmp_path):
    x = _images(3, 8, 8, 3)
    made = build_tf_graph(tmp_path, build_keras3_style, ["y:0"], {"x:0": x})
    graph = import_meta_graph(made.meta)
    graph.restore(made.ckpt, strict=True)
    assert_same(graph.run("y:0", {"x:0": x}), made.expected[0], **TOL)
    fused = [s.op for s in graph.plan([("y", 0)], frozenset({("x", 0)})).fused_steps if "+" in s.op]
    assert fused == ["Conv2D+BiasAdd+Mul+AddV2+Relu", "Conv2D+Mul+AddV2+Sub+Relu6",
                     "DepthwiseConv2dNative+Mul+AddV2+AddV2+Relu", "DepthwiseConv2dNative+Mul+AddV2"]
    module = graph.to_module(inputs="x:0", outputs="y:0")
    assert "conv2d_bias_add_mul_add_v2_relu_folded" in module.code
    with torch.no_grad():
        assert_same(module(torch.from_numpy(x)).numpy(), made.expected[0], **TOL)
    # with autograd recording, the fold runs inside forward with differentiable ops
    assert_same(module(torch.from_numpy(x)).detach().numpy(), made.expected[0], **TOL)
    # parameters keep the variables' names: the folded filter is never a parameter
    names = set(dict(module.named_parameters()))
    assert {"c1/kernel", "bn1/gamma", "c2/shift", "dw/kernel", "dw2/kernel"} <= names
    assert "bn3/moving_variance" in module.state_dict()
    # batch 1 and the second call (the cached folded filter) agree too
    assert_same(graph.run("y:0", {"x:0": x[:1]}), made.expected[0][:1], **TOL)
    assert _unfused_calls(graph, "y") == 0


def build_cnn_with_gradients(tf):
    v1 = tf.compat.v1
    x = v1.placeholder(tf.float32, [None, 6, 6, 2], name="x")
    kernel = _var(tf, "conv/kernel", [3, 3, 2, 4], resource=False)
    gamma, beta = _var(tf, "bn/gamma", [4], 0.5, 1.5, False), _var(tf, "bn/beta", [4], resource=False)
    mean = _var(tf, "bn/moving_mean", [4], -1.0, 1.0, resource=False, trainable=False)
    var = _var(tf, "bn/moving_variance", [4], 0.2, 3.0, resource=False, trainable=False)
    h = tf.nn.conv2d(x, kernel, [1, 2, 2, 1], "SAME")
    h = v1.nn.fused_batch_norm(h, gamma, beta, mean, var, epsilon=1e-3, is_training=False)[0]
    y = tf.identity(tf.nn.relu(h), name="y")
    weights = tf.constant(RNG.normal(size=(1, 3, 3, 4)).astype(np.float32))
    loss = tf.reduce_sum(y * weights, name="loss")
    for v, g in zip([kernel, gamma, beta], tf.gradients(loss, [kernel, gamma, beta]), strict=True):
        tf.identity(g, name="grad/" + v.op.name)
    return weights


GRADS = ["conv/kernel", "bn/gamma", "bn/beta"]


def test_module_trains_the_unfolded_variables_with_tf_gradients(tmp_path):
    x = _images(2, 6, 6, 2)
    weights = {}
    fetches = ["loss:0"] + [f"grad/{v}:0" for v in GRADS]
    made = build_tf_graph(tmp_path, lambda tf: weights.setdefault("w", build_cnn_with_gradients(tf)), fetches,
                          {"x:0": x})
    graph = import_meta_graph(made.meta)
    graph.restore(made.ckpt, strict=True)
    module = graph.to_module(inputs="x:0", outputs="loss:0")
    assert "conv2d_fused_batch_norm_v3_relu_folded" in module.code
    params = dict(module.named_parameters())
    assert set(params) == set(GRADS)
    assert {"bn/moving_mean", "bn/moving_variance"} <= set(module.state_dict())
    loss = module(torch.from_numpy(x))
    assert_same(loss.detach().numpy(), made.expected[0], **TOL)
    fused = [n.target for n in module.graph.nodes if hasattr(n.target, "unfused_calls")]
    assert len(fused) == 1 and fused[0].unfused_calls == 0
    loss.backward()
    for name, expected in zip(GRADS, made.expected[1:], strict=True):
        assert_same(params[name].grad.numpy(), expected, rtol=1e-4, atol=1e-4)
    # a step of SGD on the original parameters changes what run computes (the folded cache follows)
    before = graph.run("loss:0", {"x:0": x})
    with torch.no_grad():
        params["bn/gamma"].mul_(2.0)
        after_module = module(torch.from_numpy(x)).numpy()
    assert not np.allclose(graph.run("loss:0", {"x:0": x}), before)
    assert_same(graph.run("loss:0", {"x:0": x}), after_module, rtol=1e-5, atol=1e-5)
    # the Saver writes the variables under their TF names, and TF-named files restore into a graph
    path = Saver().save(module, str(tmp_path / "ckpt"), global_step=1)
    again = import_meta_graph(made.meta)
    assert set(again.restore(path)) >= set(GRADS)
    assert_same(again.run("loss:0", {"x:0": x}), after_module, rtol=1e-5, atol=1e-5)


def test_restored_checkpoint_replaces_the_cached_folded_filter(tmp_path):
    tf = tf_module()
    x = _images(2, 6, 6, 2)
    made = build_tf_graph(tmp_path, build_cnn_with_gradients, ["y:0"], {"x:0": x}, name="first")
    graph = import_meta_graph(made.meta)
    graph.restore(made.ckpt)
    assert_same(graph.run("y:0", {"x:0": x}), made.expected[0], **TOL)

    def shifted(tf, sess):
        v1 = tf.compat.v1
        for v in v1.global_variables():
            sess.run(v.assign(v * 1.5 + 0.1))

    other = build_tf_graph(tmp_path, build_cnn_with_gradients, ["y:0"], {"x:0": x}, train=shifted,
                           name="second")
    assert tf is not None and not np.allclose(other.expected[0], made.expected[0])
    graph.restore(other.ckpt)
    assert_same(graph.run("y:0", {"x:0": x}), other.expected[0], **TOL)


def build_not_per_channel(tf):
    v1 = tf.compat.v1
    x = v1.placeholder(tf.float32, [None, 5, 5, 2], name="x")
    h = tf.nn.conv2d(x, _var(tf, "k", [3, 3, 2, 3]), 1, "SAME")
    h = h * _var(tf, "spatial", [5, 1, 1])        # per row, not per channel: must not fold
    h = h + _var(tf, "bias", [3])
    tf.identity(h, name="y")


def test_a_vector_that_is_not_per_channel_runs_the_original_ops(tmp_path):
    x = _images(2, 5, 5, 2)
    made = build_tf_graph(tmp_path, build_not_per_channel, ["y:0"], {"x:0": x})
    graph = import_meta_graph(made.meta)
    graph.restore(made.ckpt, strict=True)
    assert_same(graph.run("y:0", {"x:0": x}), made.expected[0], **TOL)
    module = graph.to_module(inputs="x:0", outputs="y:0")
    with torch.no_grad():
        assert_same(module(torch.from_numpy(x)).numpy(), made.expected[0], **TOL)
    assert _unfused_calls(graph, "y") == 1  # the step ran the original ops


def build_residuals(tf):
    v1 = tf.compat.v1
    x = v1.placeholder(tf.float32, [None, 6, 6, 4], name="x")

    def conv(h, name):
        return tf.nn.conv2d(h, _var(tf, f"{name}/kernel", [3, 3, 4, 4]), 1, "SAME")

    a = tf.nn.relu(conv(x, "c1"))
    b = tf.nn.relu(conv(a, "c2"))
    c = tf.nn.relu(conv(b, "c3") + a)     # a dies here: the sum goes into a's buffer
    d = tf.nn.relu(conv(c, "c4") + x)     # the fed input: never written
    e = tf.nn.relu(conv(d, "c5") + c)     # c dies here
    f = tf.nn.relu(conv(e, "c6") + d)     # d is read again below: not written
    tf.identity(f * 2.0 + d, name="y")
    tf.identity(d, name="d")


def _overwrites(graph):
    steps = graph.plan([("y", 0)], frozenset({("x", 0)})).fused_steps
    return sum(getattr(s.func, "overwrites", 0) for s in steps if "+" in s.op)


def test_a_dying_residual_takes_the_sum_in_place_and_nothing_else_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(conv_kernels, "NATIVE_MAX_MACS", 0)  # oneDNN's kernel only, from the first call
    x = _images(2, 6, 6, 4)
    made = build_tf_graph(tmp_path, build_residuals, ["y:0", "d:0"], {"x:0": x})
    graph = import_meta_graph(made.meta)
    graph.restore(made.ckpt, strict=True)
    fed = x.copy()
    for calls in (1, 2, 3):  # the first calls prepare the kernels, the later ones run the prepared ones
        assert_same(graph.run("y:0", {"x:0": fed}), made.expected[0], **TOL)
        np.testing.assert_array_equal(fed, x)
        assert _overwrites(graph) == 2 * calls
    y, d = graph.run(["y:0", "d:0"], {"x:0": fed})  # d fetched: the step that reads it last keeps it
    assert_same(y, made.expected[0], **TOL)
    assert_same(d, made.expected[1], **TOL)
    module = graph.to_module(inputs="x:0", outputs="y:0")
    assert len(re.findall(r"_folded_into(_\d+)?\(", module.code)) == 2, module.code  # where a and c die
    given = torch.from_numpy(x.copy())
    with torch.no_grad():
        for _ in range(3):
            assert_same(module(given).numpy(), made.expected[0], **TOL)
    np.testing.assert_array_equal(given.numpy(), x)
    # with autograd recording nothing is written in place
    assert_same(module(given).detach().numpy(), made.expected[0], **TOL)


def _build_aliased_residual(alias):
    def build(tf):
        x = tf.compat.v1.placeholder(tf.float32, [None, 6, 6, 4], name="x")
        residual = tf.stop_gradient(x) if alias == "stop_gradient" else tf.reshape(x, [-1, 6, 6, 4])
        y = tf.nn.conv2d(x, _var(tf, "c/kernel", [3, 3, 4, 4]), 1, "SAME") + residual
        tf.identity(tf.nn.relu(y), name="y")

    return build


@pytest.mark.parametrize("alias", ["stop_gradient", "reshape"])
def test_a_dying_residual_that_aliases_the_fed_input_is_not_written(tmp_path, monkeypatch, alias):
    # the residual is a step's result that dies at the sum, so the step may sum into it, but it is
    # the fed array's memory (a detached tensor or a view of it): only the run-time check refuses
    monkeypatch.setattr(conv_kernels, "NATIVE_MAX_MACS", 0)  # oneDNN's kernel only, from the first call
    x = _images(2, 6, 6, 4)
    made = build_tf_graph(tmp_path, _build_aliased_residual(alias), ["y:0"], {"x:0": x})
    graph = import_meta_graph(made.meta)
    graph.restore(made.ckpt, strict=True)
    fed = x.copy()
    for _ in range(3):
        assert_same(graph.run("y:0", {"x:0": fed}), made.expected[0], **TOL)
        np.testing.assert_array_equal(fed, x)
    module = graph.to_module(inputs="x:0", outputs="y:0")
    assert "_folded_into(" in module.code, module.code  # the step that may write in place runs
    given = x.copy()
    with torch.no_grad():
        for _ in range(3):
            assert_same(module(torch.from_numpy(given)).numpy(), made.expected[0], **TOL)
            np.testing.assert_array_equal(given, x)
    assert _overwrites(graph) == 0


def build_relu6_residuals(tf):
    x = tf.compat.v1.placeholder(tf.float32, [None, 6, 6, 4], name="x")

    def conv(h, name):
        return tf.nn.conv2d(h, _var(tf, f"{name}/kernel", [3, 3, 4, 4]), 1, "SAME")

    a = tf.nn.relu(conv(x, "c1"))
    b = tf.nn.relu6(conv(a, "c2") + a)  # a is read below: oneDNN's sum into a fresh buffer
    c = tf.nn.relu6(conv(b, "c3") + a)  # a dies here: the sum into a's buffer
    tf.identity(c, name="y")


def test_relu6_after_a_residual_sum_runs_in_onednns_kernel(tmp_path, monkeypatch):
    # oneDNN's binary post-op takes only a ReLU after the sum; ReLU6 raised "Unary Fusion behavior undefined."
    monkeypatch.setattr(conv_kernels, "NATIVE_MAX_MACS", 0)  # oneDNN's kernel only, from the first call
    x = _images(2, 6, 6, 4)
    made = build_tf_graph(tmp_path, build_relu6_residuals, ["y:0"], {"x:0": x})
    graph = import_meta_graph(made.meta)
    graph.restore(made.ckpt, strict=True)
    for calls in (1, 2, 3):
        assert_same(graph.run("y:0", {"x:0": x}), made.expected[0], **TOL)
        assert _overwrites(graph) == calls
    steps = graph.plan([("y", 0)], frozenset({("x", 0)})).fused_steps
    assert sum(s.op.endswith("AddV2+Relu6") for s in steps) == 2


def _keep_memory_in_child(env_value):
    """Page faults of allocating, touching and freeing 24 blocks of 8-10 MiB twice, in a fresh process,
    and the bytes glibc then holds in fastbins (``mallinfo2().fsmblks``) after freeing 200 small blocks."""
    import os
    import subprocess
    import sys

    import lightning_saver.graph.tf_import.memory as memory

    # memory.py loaded on its own (no torch, no package import) keeps the child fast
    code = ("import ctypes, importlib.util, resource, sys\n"
            "spec = importlib.util.spec_from_file_location('memory', sys.argv[1])\n"
            "memory = importlib.util.module_from_spec(spec); spec.loader.exec_module(memory)\n"
            "ok = memory.keep_freed_memory()\n"
            "libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p\n"
            "sizes = [(8 << 20) + k * 4096 * 97 for k in range(24)]\n"
            "for _ in range(2):\n"
            "    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "    for n in sizes:\n"
            "        p = libc.malloc(ctypes.c_size_t(n))\n"
            "        ctypes.memset(p, 1, n)\n"
            "        libc.free(ctypes.c_void_p(p))\n"
            "faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start\n"
            "small = [libc.malloc(ctypes.c_size_t(40)) for _ in range(200)]\n"
            "for p in small:\n"
            "    libc.free(ctypes.c_void_p(p))\n"
            "class Info(ctypes.Structure):\n"
            "    _fields_ = [(n, ctypes.c_size_t) for n in ('arena ordblks smblks hblks hblkhd usmblks '\n"
            "                                              'fsmblks uordblks fordblks keepcost').split()]\n"
            "info = getattr(libc, 'mallinfo2', None)  # glibc 2.33+\n"
            "if info is not None: info.restype = Info\n"
            "print(ok, faults, -1 if info is None else info().fsmblks)\n")
    env = dict(os.environ, LIGHTNING_SAVER_KEEP_FREED_MEMORY=env_value)
    out = subprocess.run([sys.executable, "-c", code, memory.__file__], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    ok, faults, fastbin_bytes = out.stdout.split()
    return ok == "True", int(faults), int(fastbin_bytes)


def test_freed_activations_are_reused_instead_of_page_faulted_again():
    import sys

    if not sys.platform.startswith("linux"):
        return
    kept, faults, fastbin_bytes = _keep_memory_in_child("1")
    left, faults_default, fastbin_default = _keep_memory_in_child("0")
    assert kept and not left
    # 24 blocks of 8-10 MiB of ever-growing sizes: glibc maps and unmaps each one by default
    assert faults < faults_default / 4, (faults, faults_default)
    # 200 freed 40-byte blocks: past the per-thread cache's 7, glibc's default keeps them in fastbins
    # (which each large malloc/free then consolidates); with fastbins off, none
    if fastbin_default >= 0:
        assert fastbin_default > 0 and fastbin_bytes == 0, (fastbin_default, fastbin_bytes)
