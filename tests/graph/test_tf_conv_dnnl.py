"""The ``dnnl`` convolution kernel (conv_kernels.py over the optional ``_dnnl_conv.cpp`` extension),
against real TensorFlow.

One small network, built NHWC and NCHW, holds each case the kernel handles: a plain ``SAME``
convolution with ReLU6 and no bias, TF's asymmetric ``SAME`` at stride 2 on even sizes with a bias
and ReLU, Keras' ``ZeroPadding2D`` before a strided depthwise convolution (ReLU6), a ``Pad`` before
a dilated convolution, and two residual sums of one tensor: the first reads it while it is live
(summed into a copy), the second where it dies (summed into its buffer). ``dnnl`` is forced (the
other kernels slowed down) and every call compared with TensorFlow at 1e-5, at batch 1 and 3, in
``graph.run`` and in the ``to_module`` module, whose autograd path must not call it.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from kernel_timing import handicap
from tf_graphs import assert_same, build_tf_graph, session_values, tf_module

from lightning_saver import import_meta_graph
from lightning_saver.graph.tf_import import conv_kernels
from lightning_saver.graph.tf_import.conv_kernels import KERNELS, TRIALS

pytestmark = pytest.mark.skipif(
    conv_kernels._dnnl_conv is None,
    reason="libdnnl (oneDNN's headers, Debian's libdnnl-dev) is not installed here, so the optional "
           "_dnnl_conv extension was not built (`make test` installs it where apt-get runs as root)")

tf_module()
RNG = np.random.default_rng(2412)
TOL = {"rtol": 1e-5, "atol": 1e-5}
CALLS = len(KERNELS) * (TRIALS + 1) + 1  # every kernel's trial calls, then the kept one's
VARIABLES = ["plain/kernel", "k3/kernel", "k3/bias", "dw/kernel", "dw/bias", "live/kernel", "dying/kernel",
             "dil/kernel"]
OUTPUTS = ["p:0", "r:0", "s:0", "q:0"]
FUSED = 6  # convolutions, each one fused step


def _var(tf, name, shape):
    v1 = tf.compat.v1
    init = v1.random_uniform_initializer(-0.5, 0.5, seed=sum(map(ord, name)))
    return v1.get_variable(name, shape, initializer=init, use_resource=False)


def build_net(data_format):
    nchw = data_format == "NCHW"

    def spatial(h, w):  # a per-dimension attr in data_format's order
        return [1, 1, h, w] if nchw else [1, h, w, 1]

    def pads(before, after):
        rows = [[before, after], [before, after]]
        return [[0, 0], [0, 0], *rows] if nchw else [[0, 0], *rows, [0, 0]]

    def build(tf):
        v1 = tf.compat.v1
        x = v1.placeholder(tf.float32, [None, 3, 12, 12] if nchw else [None, 12, 12, 3], name="x")
        conv = lambda h, k, s, p, **kw: tf.nn.conv2d(h, k, spatial(s, s), p, data_format=data_format, **kw)  # noqa: E731
        bias = lambda h, name, n=8: tf.nn.bias_add(h, _var(tf, name, [n]), data_format=data_format)  # noqa: E731
        p = tf.nn.relu6(conv(x, _var(tf, "plain/kernel", [3, 3, 3, 8]), 1, "SAME"))         # symmetric
        a = tf.nn.relu(bias(conv(x, _var(tf, "k3/kernel", [3, 3, 3, 8]), 2, "SAME"), "k3/bias"))  # (0, 1)
        d = tf.nn.depthwise_conv2d(tf.pad(a, pads(0, 1)), _var(tf, "dw/kernel", [3, 3, 8, 1]), spatial(2, 2),
                                   "VALID", data_format=data_format)                     # ZeroPadding2D
        d = tf.nn.relu6(bias(d, "dw/bias"))
        r = tf.nn.relu(conv(a, _var(tf, "live/kernel", [3, 3, 8, 8]), 2, "SAME") + d)  # d read again below
        s = conv(r, _var(tf, "dying/kernel", [1, 1, 8, 8]), 1, "VALID") + d           # d dies here
        q = conv(tf.pad(x, pads(1, 1)), _var(tf, "dil/kernel", [3, 3, 3, 8]), 1, "VALID",
                 dilations=spatial(2, 2))
        for name, t in (("p", p), ("r", r), ("s", s), ("q", q)):
            tf.identity(t, name=name)
        loss = tf.reduce_sum(s * s) + tf.reduce_sum(r) + (tf.reduce_sum(p * p) + tf.reduce_sum(q * q)) * 0.01
        loss = tf.identity(loss, name="loss")
        variables = {v.op.name: v for v in v1.trainable_variables()}
        for name, g in zip(VARIABLES, tf.gradients(loss, [variables[k] for k in VARIABLES]), strict=True):
            tf.identity(g, name="grad/" + name)

    return build


def _images(n, data_format):
    x = RNG.uniform(-1.5, 1.5, size=(n, 12, 12, 3)).astype(np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if data_format == "NCHW" else x


def _made(tmp_path, data_format, x):
    fetches = [*OUTPUTS, "loss:0"] + [f"grad/{k}:0" for k in VARIABLES]
    made = build_tf_graph(tmp_path, build_net(data_format), fetches, {"x:0": x})
    graph = import_meta_graph(made.meta)
    graph.restore(made.ckpt, strict=True)
    return made, graph


def _prepared(funcs):
    return [p for func in funcs for p in func.prepared.values()]


def _graph_funcs(graph):
    steps = graph.plan([(o[:-2], 0) for o in OUTPUTS], frozenset({("x", 0)})).fused_steps
    return [s.func for s in steps if hasattr(s.func, "prepared")]


def _counted(kernel, calls, name):
    def counted(x, other):
        calls[name] = calls.get(name, 0) + 1
        return kernel(x, other)

    return counted


def _force_dnnl(prepared, calls):
    """Slow every kernel but ``dnnl`` down (restarting the timing), count its calls (and its ``into``'s)."""
    handicap(prepared, "dnnl")
    for p in prepared:
        p.kernels["dnnl"] = _counted(p.kernels["dnnl"], calls, "dnnl")
        if "dnnl" in p.into:
            p.into["dnnl"] = _counted(p.into["dnnl"], calls, "into")


def _check(got, made):
    for g, e in zip(got, made.expected[:len(OUTPUTS)], strict=True):
        assert_same(np.asarray(g), e, **TOL)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
def test_forced_dnnl_matches_tf_on_every_call(tmp_path, data_format, batch):
    x = _images(batch, data_format)
    made, graph = _made(tmp_path, data_format, x)
    _check(graph.run(OUTPUTS, {"x:0": x}), made)  # prepares the kernels
    funcs = _graph_funcs(graph)
    prepared = _prepared(funcs)
    assert len(prepared) == FUSED
    assert all("dnnl" in p.kernels for p in prepared), [list(p.kernels) for p in prepared]
    calls: dict[str, int] = {}
    _force_dnnl(prepared, calls)
    for _ in range(CALLS):
        _check(graph.run(OUTPUTS, {"x:0": x}), made)
    assert [p.chosen for p in prepared] == ["dnnl"] * FUSED, [p.trials for p in prepared]
    assert all(f.unfused_calls == 0 for f in funcs)
    before = dict(calls)
    _check(graph.run(OUTPUTS, {"x:0": x}), made)
    # every convolution but the dying residual's through dnnl; that one into the residual's buffer
    assert calls["dnnl"] - before["dnnl"] == FUSED - 1 and calls["into"] - before.get("into", 0) == 1
    dying = [f for f in funcs if f.overwrites]
    assert len(dying) == 1


@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
def test_module_runs_forced_dnnl_without_grad_and_never_with_it(tmp_path, data_format):
    x = _images(3, data_format)
    made, graph = _made(tmp_path, data_format, x)
    module = graph.to_module(inputs="x:0", outputs=[*OUTPUTS, "loss:0"]).eval()
    funcs = [n.target for n in module.graph.nodes
             if n.op == "call_function" and hasattr(n.target, "prepared")]
    calls: dict[str, int] = {}
    with torch.no_grad():
        for i in range(CALLS + 1):
            if i == 1:  # after the first call prepared the kernels
                _force_dnnl(_prepared(funcs), calls)
            got = module(torch.from_numpy(x))
            _check([g.numpy() for g in got[:len(OUTPUTS)]], made)
        assert_same(module(torch.from_numpy(x[:1]))[0].numpy(), made.expected[0][:1], **TOL)  # batch 1
    prepared = [p for f in funcs for p in f.prepared.values() if p.out[0] == 3]
    assert len(prepared) == FUSED and all(p.chosen == "dnnl" for p in prepared)
    assert calls.get("into", 0) > 0  # the dying residual, in place
    before = dict(calls)
    loss = module(torch.from_numpy(x))[-1]  # autograd: the plain ops, never the prepared kernels
    assert calls == before
    assert_same(loss.detach().numpy(), made.expected[len(OUTPUTS)], **TOL)
    loss.backward()
    params = dict(module.named_parameters())
    for name, expected in zip(VARIABLES, made.expected[len(OUTPUTS) + 1:], strict=True):
        assert_same(params[name].grad.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_dnnl_is_timed_by_default_on_every_float32_convolution(tmp_path):
    x = _images(2, "NHWC")
    made, graph = _made(tmp_path, "NHWC", x)
    for _ in range(CALLS):
        _check(graph.run(OUTPUTS, {"x:0": x}), made)
    prepared = _prepared(_graph_funcs(graph))
    assert len(prepared) == FUSED
    for p in prepared:
        assert len(p.trials["dnnl"]) == TRIALS + 1, p.trials  # it ran, matched TF, and was timed
        assert p.chosen in p.kernels


def test_the_extension_names_a_wrong_filter():
    conv = conv_kernels._dnnl_conv.Conv
    with pytest.raises(ValueError, match="weight must be 216 contiguous float32 values"):
        conv((1, 3, 8, 8), True, np.zeros((8, 3, 3, 3)), 1, None, (1, 1), (1, 1), (1, 1), (1, 1), "none",
             False)
    with pytest.raises(ValueError, match="act must be 'none', 'relu' or 'relu6', found 'gelu'"):
        conv((1, 3, 8, 8), True, np.zeros((8, 3, 3, 3), np.float32), 1, None, (1, 1), (1, 1), (1, 1), (1, 1),
             "gelu", False)


def test_data_on_another_device_never_reaches_dnnl(tmp_path):
    """dnnl reads raw addresses: data on another device (here the meta device, which has none) after
    a CPU call, with the kernel kept, must go to torch's ops (or their device error), never to oneDNN."""
    x = _images(3, "NHWC")
    made, graph = _made(tmp_path, "NHWC", x)
    module = graph.to_module(inputs="x:0", outputs=OUTPUTS[0]).eval()
    funcs = [n.target for n in module.graph.nodes
             if n.op == "call_function" and hasattr(n.target, "prepared")]
    calls: dict[str, int] = {}
    with torch.no_grad():
        for i in range(CALLS + 1):
            if i == 1:
                _force_dnnl(_prepared(funcs), calls)
            module(torch.from_numpy(x))
        before = dict(calls)
        assert before.get("dnnl", 0) > 0
        out = module(torch.from_numpy(x).to("meta"))  # torch's ops: shapes only, on the meta device
    assert calls == before
    assert out.device.type == "meta" and tuple(out.shape) == made.expected[0].shape


def test_threads_sharing_dnnl_kernels_each_get_their_own_result(tmp_path):
    """Primitives made on this thread, run by four others at once on different inputs: each call
    brings its own scratchpad (oneDNN's library-managed one is shared and bound to the thread that
    made the primitive), so every result matches TF's for its own input."""
    inputs = [_images(2, "NHWC") for _ in range(5)]
    meta, ckpt, expected, _ = session_values(tmp_path, "threads", build_net("NHWC"),
                                             [{"x:0": xi} for xi in inputs], OUTPUTS)
    graph = import_meta_graph(meta)
    graph.restore(ckpt, strict=True)
    graph.run(OUTPUTS, {"x:0": inputs[-1]})
    calls: dict[str, int] = {}
    _force_dnnl(_prepared(_graph_funcs(graph)), calls)
    for _ in range(CALLS):
        graph.run(OUTPUTS, {"x:0": inputs[-1]})
    failures: list[str] = []

    def worker(i):
        for _ in range(15):
            got = graph.run(OUTPUTS, {"x:0": inputs[i]})
            try:
                for g, e in zip(got, expected[i], strict=True):
                    assert_same(g, e, **TOL)
            except AssertionError as error:
                failures.append(f"thread {i}: {error}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:2]
    prepared = [p for p in _prepared(_graph_funcs(graph)) if p.out[0] == 2]
    assert prepared and all(p.chosen == "dnnl" for p in prepared)
