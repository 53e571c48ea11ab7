"""The ``*_pad`` kernels of asymmetrically padded convolutions (conv_kernels.py, padded_input.py),
against real TensorFlow.

One small network, built NHWC and NCHW, holds each asymmetric case: TF's ``SAME`` at stride 2 on
even sizes with 3 input channels (3x3: pads (0, 1), MobileNetV2's first convolution; 7x7: pads
(2, 3), ResNet50's), Keras' ``ZeroPadding2D`` before a strided depthwise convolution, a strided
``SAME`` convolution whose dying residual may take the result in place, and a ``Pad`` before a
dilated convolution (never widened: only the ``*_pad`` kernels run it). Each ``*_pad`` kernel is
forced (the others slowed down, and the kernels offered on every asymmetric convolution) and every
call compared with TensorFlow at 1e-5, in ``graph.run`` and in the ``to_module`` module; the
module's gradients still match ``tf.gradients``. With the default threshold only the 7x7 one (and
the dilated one) time them.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from kernel_timing import handicap
from tf_graphs import assert_same, build_tf_graph, session_values, tf_module

from lightning_saver import import_meta_graph
from lightning_saver.graph.tf_import import conv_kernels, padded_input
from lightning_saver.graph.tf_import.conv_kernels import KERNELS, TRIALS, Prepared

tf_module()
RNG = np.random.default_rng(2424)
TOL = {"rtol": 1e-5, "atol": 1e-5}
CALLS = len(KERNELS) * (TRIALS + 1) + 1  # every kernel's trial calls, then the kept one's
DNNL = {"dnnl"} if conv_kernels._dnnl_conv is not None else set()  # the optional oneDNN extension
PAD_KERNELS = ("onednn_pad", "native_pad")
VARIABLES = ["k3/kernel", "k7/kernel", "dw/kernel", "mix/kernel", "dil/kernel"]
# the fused steps with asymmetric pads, and how many of them: the dilated one has no widened filter
ASYMMETRIC = {"Conv2D+BiasAdd+Relu": 2, "Pad+DepthwiseConv2dNative+BiasAdd+Relu6": 1,
              "Conv2D+AddV2+Relu": 1, "Pad+Conv2D": 1}


def _var(tf, name, shape):
    v1 = tf.compat.v1
    init = v1.random_uniform_initializer(-0.5, 0.5, seed=sum(map(ord, name)))
    return v1.get_variable(name, shape, initializer=init, use_resource=False)


def build_net(data_format):
    nchw = data_format == "NCHW"

    def spatial(h, w):  # a per-dimension attr or Pad row list in data_format's order
        return [1, 1, h, w] if nchw else [1, h, w, 1]

    def pads(after):
        rows = [[0, 0], [0, after], [0, after]]
        return [[0, 0], [0, 0], *rows[1:]] if nchw else [*rows, [0, 0]]

    def build(tf):
        v1 = tf.compat.v1
        x = v1.placeholder(tf.float32, [None, 3, 12, 12] if nchw else [None, 12, 12, 3], name="x")
        conv = lambda h, k, s, p, **kw: tf.nn.conv2d(h, k, spatial(s, s), p, data_format=data_format, **kw)  # noqa: E731
        bias = lambda h, name, n=8: tf.nn.bias_add(h, _var(tf, name, [n]), data_format=data_format)  # noqa: E731
        a = tf.nn.relu(bias(conv(x, _var(tf, "k3/kernel", [3, 3, 3, 8]), 2, "SAME"), "k3/bias"))  # (0, 1)
        b = conv(x, _var(tf, "k7/kernel", [7, 7, 3, 64]), 2, "SAME")                            # (2, 3)
        b = tf.nn.relu(bias(b, "k7/bias", 64))
        d = tf.nn.depthwise_conv2d(tf.pad(a, pads(1)), _var(tf, "dw/kernel", [3, 3, 8, 1]), spatial(2, 2),
                                   "VALID", data_format=data_format)                     # ZeroPadding2D
        d = tf.nn.relu6(bias(d, "dw/bias"))
        r = tf.nn.relu(conv(b, _var(tf, "mix/kernel", [3, 3, 64, 8]), 2, "SAME") + d)  # d dies here
        q = conv(tf.pad(x, pads(1)), _var(tf, "dil/kernel", [3, 3, 3, 8]), 1, "VALID",
                 dilations=spatial(2, 2))
        tf.identity(r, name="r")
        tf.identity(q, name="q")
        loss = tf.reduce_sum(r * tf.reduce_mean(x)) + tf.reduce_sum(q * q) * 0.01
        loss = tf.identity(loss, name="loss")
        variables = {v.op.name: v for v in v1.trainable_variables()}
        for name, g in zip(VARIABLES, tf.gradients(loss, [variables[k] for k in VARIABLES]), strict=True):
            tf.identity(g, name="grad/" + name)

    return build


def _images(n, data_format):
    x = RNG.uniform(-1.5, 1.5, size=(n, 12, 12, 3)).astype(np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if data_format == "NCHW" else x


def _made(tmp_path, data_format, x):
    fetches = ["r:0", "q:0", "loss:0"] + [f"grad/{k}:0" for k in VARIABLES]
    made = build_tf_graph(tmp_path, build_net(data_format), fetches, {"x:0": x})
    graph = import_meta_graph(made.meta)
    graph.restore(made.ckpt, strict=True)
    return made, graph


def _asymmetric(funcs):
    """{chain op: [Prepared, ...]} of the asymmetrically padded convolutions among fused ``funcs``."""
    found: dict[str, list[Prepared]] = {}
    for op, func in funcs:
        for p in func.prepared.values():
            if p.padded is not None:
                found.setdefault(op, []).append(p)
    return found


def _steps(graph):
    steps = graph.plan([("r", 0), ("q", 0)], frozenset({("x", 0)})).fused_steps
    return [(s.op, s.func) for s in steps if hasattr(s.func, "prepared")]


def _check(got, made, batch=None):
    for g, e in zip(got, made.expected[:2], strict=True):
        assert_same(g, e if batch is None else e[:batch], **TOL)


@pytest.fixture
def everywhere(monkeypatch):
    """The *_pad kernels tried on every asymmetric convolution, however few taps widening adds."""
    monkeypatch.setattr(conv_kernels, "PAD_MIN_MACS_PER_COPIED", 0)


@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
def test_pad_kernels_are_timed_for_every_asymmetric_convolution(tmp_path, data_format, everywhere):
    x = _images(2, data_format)
    made, graph = _made(tmp_path, data_format, x)
    for _ in range(CALLS):
        _check(graph.run(["r:0", "q:0"], {"x:0": x}), made)
    funcs = _steps(graph)
    assert all(f.unfused_calls == 0 for _, f in funcs)  # NCHW's BiasAdd folds too
    found = _asymmetric(funcs)
    assert {op: len(ps) for op, ps in found.items()} == ASYMMETRIC
    for op, ps in found.items():
        for p in ps:
            assert "onednn_pad" in p.kernels, (op, list(p.kernels))
            assert all(len(times) == TRIALS + 1 for times in p.trials.values())  # each one ran
            assert p.chosen in p.kernels
            if op.startswith("Pad+Conv2D"):  # dilated: no widened filter
                assert set(p.kernels) == set(PAD_KERNELS) | DNNL
            elif "Depthwise" in op:  # groups > 1: oneDNN only
                assert set(p.kernels) == {"onednn", "onednn_pad"} | DNNL
            else:
                assert set(p.kernels) == {"onednn", "native", "onednn_pad", "native_pad"} | DNNL
            assert (p.padded.buffer is None) == (not p.chosen.endswith("_pad"))  # kept only if used
    symmetric = [p for _, f in funcs for p in f.prepared.values() if p.padded is None]
    assert all(not set(PAD_KERNELS) & set(p.kernels) for p in symmetric)


def test_by_default_pad_kernels_are_tried_where_widening_adds_many_taps(tmp_path):
    x = _images(2, "NHWC")
    made, graph = _made(tmp_path, "NHWC", x)
    for _ in range(CALLS):
        _check(graph.run(["r:0", "q:0"], {"x:0": x}), made)
    tried: dict[str, list[list[str]]] = {}
    for op, f in _steps(graph):
        tried.setdefault(op, []).extend(sorted(p.trials) for p in f.prepared.values())
    # the 7x7 to 64 channels: 15 extra taps x 3 channels x 64 outputs per 4 input pixels; the 3x3
    # ones to 8 channels and the depthwise one add too few; the dilated one cannot be widened
    wide = {"native", "native_pad", "onednn", "onednn_pad"}
    assert sorted(tried["Conv2D+BiasAdd+Relu"]) == [sorted(wide | DNNL), sorted({"native", "onednn"} | DNNL)]
    assert tried["Pad+DepthwiseConv2dNative+BiasAdd+Relu6"] == [sorted({"onednn"} | DNNL)]
    assert tried["Conv2D+AddV2+Relu"] == [sorted({"native", "onednn"} | DNNL)]
    assert tried["Pad+Conv2D"] == [sorted(set(PAD_KERNELS) | DNNL)]


def test_a_resnet_stem_gets_pad_kernels_and_mobilenetv2s_strided_convolutions_do_not():
    for shape, k, cout, groups, expected in (
            ((1, 3, 224, 224), 7, 64, 1, True),      # 7x7 SAME stride 2: pads (2, 3)
            ((8, 3, 224, 224), 7, 64, 1, True),
            ((1, 3, 224, 224), 3, 32, 1, False),     # MobileNetV2's first: pads (0, 1)
            ((1, 96, 112, 112), 3, 96, 96, False)):  # its strided depthwise ones
        pads = ((2, 3), (2, 3)) if k == 7 else ((0, 1), (0, 1))
        weight = torch.randn(cout, shape[1] // groups, k, k)
        p = Prepared(shape, weight, groups, torch.zeros(cout), (2, 2), (1, 1), pads, "relu", True, False)
        assert ("onednn_pad" in p.kernels) is expected, (shape, k, list(p.kernels))
        assert "onednn" in p.kernels  # the widened filter, always
        assert p.out_size == torch.Size([shape[0], shape[2] // 2, shape[3] // 2, cout])  # NHWC


@pytest.mark.parametrize("keep", PAD_KERNELS)
@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
def test_a_forced_pad_kernel_matches_tf_on_every_call(tmp_path, data_format, keep, everywhere):
    x = _images(2, data_format)
    made, graph = _made(tmp_path, data_format, x)
    _check(graph.run(["r:0", "q:0"], {"x:0": x}), made)  # prepares the kernels
    funcs = _steps(graph)
    forced = [p for ps in _asymmetric(funcs).values() for p in ps if keep in p.kernels]
    assert len(forced) == (5 if keep == "onednn_pad" else 4)
    handicap(forced, keep)
    for _ in range(CALLS):
        _check(graph.run(["r:0", "q:0"], {"x:0": x}), made)
    assert [p.chosen for p in forced] == [keep] * len(forced), [p.trials for p in forced]
    assert all(p.padded.buffer is not None for p in forced)
    residual = next(f for op, f in funcs if op == "Conv2D+AddV2+Relu")
    before = residual.overwrites
    for _ in range(3):
        _check(graph.run(["r:0", "q:0"], {"x:0": x}), made)
    if keep == "onednn_pad":  # oneDNN's sum post-op into the dying residual, on the padded copy
        assert residual.overwrites == before + 3
    _check(graph.run(["r:0", "q:0"], {"x:0": x[:1]}), made, batch=1)  # a new shape, new kernels
    assert all(f.unfused_calls == 0 for _, f in funcs)


def test_a_pad_kernel_pads_a_fresh_copy_while_another_call_holds_the_kept_one(tmp_path, monkeypatch,
                                                                             everywhere):
    x = _images(2, "NHWC")
    made, graph = _made(tmp_path, "NHWC", x)
    _check(graph.run(["r:0", "q:0"], {"x:0": x}), made)
    forced = [p for ps in _asymmetric(_steps(graph)).values() for p in ps]
    handicap(forced, "onednn_pad")
    for _ in range(CALLS):
        _check(graph.run(["r:0", "q:0"], {"x:0": x}), made)
    kept = [p.padded.buffer for p in forced]
    assert all(b is not None for b in kept)
    for p in forced:  # as if another thread were inside each convolution
        assert p.padded.lock.acquire(blocking=False)
    try:
        garbage = [b.fill_(float("nan")) for b in kept]  # a call that used them would show it
        _check(graph.run(["r:0", "q:0"], {"x:0": x}), made)
    finally:
        for p in forced:
            p.padded.lock.release()
    assert all(p.padded.buffer is b for p, b in zip(forced, garbage, strict=True))
    for p in forced:  # forgotten, so the next use makes a new one (a released one is never kept again)
        p.padded.buffer = p.padded.inner = None
    monkeypatch.setattr(padded_input, "KEEP_MAX_BYTES", 0)  # too large to keep: a fresh copy each call
    _check(graph.run(["r:0", "q:0"], {"x:0": x}), made)
    assert all(p.padded.buffer is None for p in forced)


def test_threads_sharing_a_pad_kernel_each_get_their_own_result(tmp_path, everywhere):
    inputs = [_images(2, "NHWC") for _ in range(5)]
    meta, ckpt, expected, _ = session_values(tmp_path, "threads", build_net("NHWC"),
                                             [{"x:0": xi} for xi in inputs], ["r:0", "q:0"])
    graph = import_meta_graph(meta)
    graph.restore(ckpt, strict=True)
    graph.run(["r:0", "q:0"], {"x:0": inputs[-1]})
    forced = [p for ps in _asymmetric(_steps(graph)).values() for p in ps]
    handicap(forced, "onednn_pad")
    for _ in range(CALLS):
        graph.run(["r:0", "q:0"], {"x:0": inputs[-1]})
    failures: list[str] = []

    def worker(i):
        for _ in range(20):
            got = graph.run(["r:0", "q:0"], {"x:0": inputs[i]})
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
    assert all(p.chosen == "onednn_pad" for p in forced)


def test_a_released_padded_input_is_not_kept_again_by_a_late_trial_call(tmp_path, everywhere):
    x = _images(2, "NHWC")
    made, graph = _made(tmp_path, "NHWC", x)
    _check(graph.run(["r:0", "q:0"], {"x:0": x}), made)
    forced = [p for ps in _asymmetric(_steps(graph)).values() for p in ps if "onednn" in p.kernels]
    handicap(forced, "onednn")
    for _ in range(CALLS):
        _check(graph.run(["r:0", "q:0"], {"x:0": x}), made)
    assert forced and all(p.chosen == "onednn" and p.padded.buffer is None for p in forced)
    for p in forced:  # another thread's trial of a *_pad kernel, finishing after the choice
        n, h, w, c = p.padded.shape
        _, _, w0, w1, h0, h1 = p.padded.flat
        p.kernels["onednn_pad"](torch.zeros(n, h - h0 - h1, w - w0 - w1, c), None)
    assert all(p.padded.buffer is None for p in forced)
    _check(graph.run(["r:0", "q:0"], {"x:0": x}), made)


def test_a_module_run_under_inference_mode_then_no_grad_matches_tf(tmp_path, everywhere):
    x = _images(2, "NHWC")
    made, graph = _made(tmp_path, "NHWC", x)
    module = graph.to_module(inputs="x:0", outputs=["r:0", "q:0"]).eval()
    fused = [(n.target.__name__, n.target) for n in module.graph.nodes
             if n.op == "call_function" and hasattr(n.target, "prepared")]
    with torch.inference_mode():  # the first calls prepare the kernels and keep the padded inputs
        for i in range(CALLS + 1):
            if i == 1:
                handicap([p for ps in _asymmetric(fused).values() for p in ps], "onednn_pad")
            _check([g.numpy() for g in module(torch.from_numpy(x))], made)
    found = [p for ps in _asymmetric(fused).values() for p in ps]
    assert len(found) == 5 and all(p.chosen == "onednn_pad" and p.padded.buffer is not None for p in found)
    for mode in (torch.no_grad, torch.inference_mode, torch.no_grad):
        with mode():
            _check([g.numpy() for g in module(torch.from_numpy(x))], made)


@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
def test_module_runs_pad_kernels_and_its_gradients_match_tf(tmp_path, data_format, everywhere):
    x = _images(2, data_format)
    made, graph = _made(tmp_path, data_format, x)
    module = graph.to_module(inputs="x:0", outputs=["r:0", "q:0", "loss:0"]).eval()
    fused = [(n.target.__name__, n.target) for n in module.graph.nodes
             if n.op == "call_function" and hasattr(n.target, "prepared")]
    with torch.no_grad():
        for i in range(CALLS + 1):
            if i == 1:  # after the first call prepared the kernels
                handicap([p for ps in _asymmetric(fused).values() for p in ps], "onednn_pad")
            got = module(torch.from_numpy(x))
            _check([g.numpy() for g in got[:2]], made)
    found = [p for ps in _asymmetric(fused).values() for p in ps]
    assert len(found) == 5 and all(p.chosen == "onednn_pad" for p in found)
    loss = module(torch.from_numpy(x))[2]  # autograd: the plain ops, not the prepared kernels
    assert_same(loss.detach().numpy(), made.expected[2], **TOL)
    loss.backward()
    params = dict(module.named_parameters())
    for name, expected in zip(VARIABLES, made.expected[3:], strict=True):
        assert_same(params[name].grad.numpy(), expected, rtol=1e-4, atol=1e-5)
    counted = [f for _, f in fused if hasattr(f, "unfused_calls")]  # not an `overwriting` twin
    assert len(counted) >= 4 and all(f.unfused_calls == 0 for f in counted)  # NCHW's BiasAdd folds too


@pytest.mark.parametrize("keep", PAD_KERNELS)
@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
def test_a_pad_kernel_places_the_input_after_a_larger_leading_pad(tmp_path, data_format, keep, everywhere):
    # rows padded (2, 0), columns (1, 3): the copy's remainders are (2, 0) and (0, 2), so the input
    # sits 2 rows down in it (the network above only pads after)
    nchw = data_format == "NCHW"
    rows = [[0, 0], [2, 0], [1, 3], [0, 0]]

    def build(tf):
        x = tf.compat.v1.placeholder(tf.float32, [None, 3, 9, 10] if nchw else [None, 9, 10, 3], name="x")
        padded = tf.pad(x, [rows[0], rows[3], *rows[1:3]] if nchw else rows)
        kernel = _var(tf, "k/kernel", [3, 3, 3, 4])
        y = tf.nn.conv2d(padded, kernel, [1, 1, 1, 1], "VALID", data_format=data_format)
        tf.identity(y, name="y")

    x = RNG.uniform(-1.5, 1.5, size=(2, 3, 9, 10) if nchw else (2, 9, 10, 3)).astype(np.float32)
    made = build_tf_graph(tmp_path, build, ["y:0"], {"x:0": x})
    graph = import_meta_graph(made.meta)
    graph.restore(made.ckpt, strict=True)
    assert_same(graph.run(["y:0"], {"x:0": x})[0], made.expected[0], **TOL)
    steps = graph.plan([("y", 0)], frozenset({("x", 0)})).fused_steps
    (prepared,) = [p for s in steps if hasattr(s.func, "prepared") for p in s.func.prepared.values()]
    assert prepared.padded is not None and keep in prepared.kernels, list(prepared.kernels)
    handicap([prepared], keep)
    for _ in range(CALLS):
        assert_same(graph.run(["y:0"], {"x:0": x})[0], made.expected[0], **TOL)
    assert prepared.chosen == keep and prepared.padded.buffer is not None
    with prepared.padded.lock:  # the fresh copy (F.pad) another thread's call would make
        assert_same(graph.run(["y:0"], {"x:0": x})[0], made.expected[0], **TOL)
