"""The no-autograd convolution kernels (conv_kernels.py) and absorbed ``Pad`` ops, against real TensorFlow.

One small NHWC network holds each case the kernels handle differently: a symmetric ``Pad`` before a
VALID convolution, an asymmetric one (Keras' ``ZeroPadding2D`` before a strided depthwise
convolution), TF's asymmetric ``SAME`` at stride 2, and a residual sum. Every call is compared
with TensorFlow, including the first calls, which time both kernels; the prepared (pre-packed)
filters must follow an optimizer step and ``load_state_dict``. (The 1x1 ``gemm`` and ``linear`` kernels have
their own tests in test_tf_conv_gemm.py.)
"""

from __future__ import annotations

import numpy as np
import torch
from tf_graphs import assert_same, build_tf_graph, tf_module

from lightning_saver import import_meta_graph
from lightning_saver.graph.tf_import import conv_kernels
from lightning_saver.graph.tf_import.conv_kernels import KERNELS as CONV_KERNELS
from lightning_saver.graph.tf_import.conv_kernels import TRIALS

tf_module()
RNG = np.random.default_rng(1606)
TOL = {"rtol": 1e-5, "atol": 1e-5}
KERNELS = ["pad/kernel", "down/kernel", "down/bias", "dw/kernel", "dw/bias", "mix/kernel", "bn/gamma",
           "bn/beta"]
LR = 0.05
DNNL = ["dnnl"] if conv_kernels._dnnl_conv is not None else []  # the optional oneDNN extension, where built


def _var(tf, name, shape, low=-0.5, high=0.5, trainable=True):
    v1 = tf.compat.v1
    seed = sum(map(ord, name))  # the same initial values in every graph built here
    return v1.get_variable(name, shape, initializer=v1.random_uniform_initializer(low, high, seed=seed),
                           use_resource=False, trainable=trainable)


def build_padded_net(tf):
    v1 = tf.compat.v1
    x = v1.placeholder(tf.float32, [None, 10, 10, 3], name="x")
    h = tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])                                   # symmetric Pad
    h = tf.nn.conv2d(h, _var(tf, "pad/kernel", [3, 3, 3, 8]), 1, "VALID")
    mean = _var(tf, "bn/moving_mean", [8], -1.0, 1.0, trainable=False)
    var = _var(tf, "bn/moving_variance", [8], 0.2, 3.0, trainable=False)
    h = v1.nn.fused_batch_norm(h, _var(tf, "bn/gamma", [8], 0.5, 1.5), _var(tf, "bn/beta", [8]), mean, var,
                               epsilon=1e-3, is_training=False)[0]
    h = tf.nn.relu6(h)
    a = tf.nn.conv2d(h, _var(tf, "down/kernel", [3, 3, 8, 8]), 2, "SAME")             # SAME pads (0, 1)
    a = tf.nn.relu(tf.nn.bias_add(a, _var(tf, "down/bias", [8])))
    d = tf.pad(h, [[0, 0], [0, 1], [0, 1], [0, 0]])                                   # ZeroPadding2D
    d = tf.nn.depthwise_conv2d(d, _var(tf, "dw/kernel", [3, 3, 8, 1]), [1, 2, 2, 1], "VALID")
    d = tf.nn.relu(tf.nn.bias_add(d, _var(tf, "dw/bias", [8])))
    r = tf.nn.relu(tf.nn.conv2d(a, _var(tf, "mix/kernel", [1, 1, 8, 8]), 1, "VALID") + d)  # residual
    y = tf.identity(tf.reduce_mean(r, axis=[1, 2]), name="y")
    weights = tf.constant(np.random.default_rng(8).normal(size=(1, 8)).astype(np.float32))  # alike in each
    loss = tf.reduce_sum(y * weights, name="loss")
    variables = {v.op.name: v for v in v1.trainable_variables()}
    for name, g in zip(KERNELS, tf.gradients(loss, [variables[k] for k in KERNELS]), strict=True):
        tf.identity(g, name="grad/" + name)
    return loss


def _sgd_step(x):
    """One plain gradient-descent step on the loss at ``x``, in TensorFlow."""

    def train(tf, sess):
        variables = {v.op.name: v for v in tf.compat.v1.trainable_variables()}
        grads = sess.run([f"grad/{name}:0" for name in KERNELS], {"x:0": x})
        for name, g in zip(KERNELS, grads, strict=True):
            sess.run(variables[name].assign(sess.run(variables[name]) - LR * g))

    return train


def _images(n):
    return (RNG.uniform(0, 255, size=(n, 10, 10, 3)) / 127.5 - 0.3).astype(np.float32)


FETCHES = ["y:0", "loss:0"] + [f"grad/{k}:0" for k in KERNELS]


def test_absorbed_pads_and_both_kernels_match_tf_on_every_call(tmp_path):
    x = _images(3)
    made = build_tf_graph(tmp_path, build_padded_net, FETCHES, {"x:0": x})
    graph = import_meta_graph(made.meta)
    graph.restore(made.ckpt, strict=True)
    steps = graph.plan([("y", 0)], frozenset({("x", 0)})).fused_steps
    assert [s.op for s in steps if "+" in s.op] == [
        "Pad+Conv2D+FusedBatchNormV3+Relu6", "Conv2D+BiasAdd+Relu", "Pad+DepthwiseConv2dNative+BiasAdd+Relu",
        "Conv2D+AddV2+Relu"]
    assert not [s for s in steps if s.op == "Pad"]  # no padded copy of the activations
    for _ in range(len(CONV_KERNELS) * (TRIALS + 1) + 1):  # every kernel's trial calls, then the kept one's
        assert_same(graph.run("y:0", {"x:0": x}), made.expected[0], **TOL)
    fused = [s.func for s in steps if "+" in s.op]
    assert all(f.unfused_calls == 0 for f in fused)
    prepared = [p for f in fused for p in f.prepared.values()]
    tried = [sorted(name for name, times in p.trials.items() if times) for p in prepared]
    assert sorted(["native", "onednn", *DNNL]) in tried  # groups-of-1 convolutions ran (and matched TF)
    assert sorted(["gemm", "linear", "native", "onednn", *DNNL]) in tried  # the 1x1 one (residual, no bias)
    assert all(p.kernel is not None for p in prepared)
    assert_same(graph.run("y:0", {"x:0": x[1:2]}), made.expected[0][1:2], **TOL)  # a new shape


def test_module_gradients_and_prepacked_filters_follow_sgd_and_load_state_dict(tmp_path):
    x = _images(2)
    made = build_tf_graph(tmp_path, build_padded_net, FETCHES, {"x:0": x}, name="before")
    stepped = build_tf_graph(tmp_path, build_padded_net, FETCHES, {"x:0": x}, train=_sgd_step(x),
                             name="after")
    assert not np.allclose(stepped.expected[0], made.expected[0])
    graph = import_meta_graph(made.meta)
    graph.restore(made.ckpt, strict=True)
    module = graph.to_module(inputs="x:0", outputs=["y:0", "loss:0"]).eval()
    assert "pad_depthwise_conv2d_native_bias_add_relu_folded" in module.code
    with torch.no_grad():
        for _ in range(len(CONV_KERNELS) * (TRIALS + 1) + 1):  # fills the prepared kernels
            assert_same(module(torch.from_numpy(x))[0].numpy(), made.expected[0], **TOL)
    # an SGD step with the module's gradients (autograd path) changes the parameters in place
    params = dict(module.named_parameters())
    optimizer = torch.optim.SGD([params[k] for k in KERNELS], lr=LR)
    module(torch.from_numpy(x))[1].backward()
    optimizer.step()
    with torch.no_grad():
        assert_same(module(torch.from_numpy(x))[0].numpy(), stepped.expected[0], **TOL)
    assert_same(graph.run("y:0", {"x:0": x}), stepped.expected[0], **TOL)  # the shared variables moved too
    # load_state_dict copies into the same tensors: the prepared filters are rebuilt again
    # (strict=False: folded constants are buffers of the module that no TF checkpoint holds)
    loaded = module.load_state_dict({k: torch.from_numpy(v) for k, v in made.variables.items()}, strict=False)
    assert not loaded.unexpected_keys and not [k for k in loaded.missing_keys if not k.startswith("const:")]
    with torch.no_grad():
        assert_same(module(torch.from_numpy(x))[0].numpy(), made.expected[0], **TOL)
    assert_same(graph.run("y:0", {"x:0": x}), made.expected[0], **TOL)


def test_module_gradients_through_absorbed_pads_match_tf(tmp_path):
    x = _images(2)
    made = build_tf_graph(tmp_path, build_padded_net, FETCHES, {"x:0": x})
    graph = import_meta_graph(made.meta)
    graph.restore(made.ckpt, strict=True)
    module = graph.to_module(inputs="x:0", outputs="loss:0")
    with torch.no_grad():
        module(torch.from_numpy(x))  # a no-autograd call first: its caches must not leak into autograd
    loss = module(torch.from_numpy(x))
    assert_same(loss.detach().numpy(), made.expected[1], **TOL)
    loss.backward()
    params = dict(module.named_parameters())
    for name, expected in zip(KERNELS, made.expected[2:], strict=True):
        assert_same(params[name].grad.numpy(), expected, rtol=1e-4, atol=1e-5)
