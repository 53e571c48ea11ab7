"""NN converters (conv, pooling, batch norm, bias, resize) against real TensorFlow raw ops.

TF's CPU kernels run Conv2D, DepthwiseConv2dNative, Conv2DBackpropInput, MaxPool and AvgPool in
NHWC only, so the NCHW cases run TF in NHWC and give our converter the transposed input and
data_format="NCHW"; its result is transposed back before comparing.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf  # a pinned test dependency: imported, never skipped
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lightning_saver.errors import GraphImportError, UnsupportedOpError
from lightning_saver.graph.tf_import import table
from lightning_saver.graph.tf_import.layout import same_pads

RNG = np.random.default_rng(1234)
ATOL = 1e-5


def rand(*shape: int, dtype: type = np.float32) -> np.ndarray:
    return RNG.standard_normal(shape).astype(dtype)


def ours(op: str, inputs: list[np.ndarray], attrs: dict) -> torch.Tensor:
    return table.call(op, [torch.from_numpy(a.copy()) for a in inputs], attrs)


def nchw(a: np.ndarray) -> np.ndarray:
    return a.transpose(0, 3, 1, 2)


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def dilate_filter(filt: np.ndarray, dilation: tuple[int, ...]) -> np.ndarray:
    """The same filter with zeros between its taps: TF's CPU depthwise, backprop-input and 3-D
    kernels refuse dilations, and a zero-dilated filter is the same linear map."""
    spatial = [(k - 1) * d + 1 for k, d in zip(filt.shape, dilation, strict=False)]
    out = np.zeros((*spatial, *filt.shape[len(dilation):]), filt.dtype)
    out[tuple(slice(None, None, d) for d in dilation)] = filt
    return out


def check_image_op(op: str, image_arg: str, image: np.ndarray, others: dict, attrs: dict,
                   data_format: str, atol: float = ATOL, tf_others: dict | None = None) -> None:
    """Run ``op`` in TF (NHWC) and ours in ``data_format``; compare in NHWC."""
    tf_args = {image_arg: image, **others, **(tf_others or {})}
    tf_attrs = {**attrs, **({"dilations": [1, 1, 1, 1]} if tf_others else {})}
    expected = getattr(tf.raw_ops, op)(**tf_args, **tf_attrs).numpy()
    names = [image_arg, *others]
    values = {image_arg: image, **others}
    if data_format == "NCHW":
        values[image_arg] = nchw(image)
        if attrs.get("explicit_paddings"):
            p = attrs["explicit_paddings"]
            attrs = {**attrs, "explicit_paddings": p[:2] + p[6:] + p[2:6]}
        attrs = {**attrs, **{k: [v[0], v[3], v[1], v[2]] for k, v in attrs.items()
                             if k in ("strides", "ksize", "dilations")}}
        got = nhwc(ours(op, [values[n] for n in names], {**attrs, "data_format": "NCHW"}))
    else:
        got = ours(op, [values[n] for n in names], attrs).detach().numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=atol, rtol=1e-5)


@pytest.mark.parametrize(("size", "kernel", "stride", "dilation", "expected"), [
    (4, 3, 2, 1, (0, 1)), (5, 3, 2, 1, (1, 1)), (7, 1, 3, 1, (0, 0)),
    (6, 3, 1, 2, (2, 2)), (2, 5, 4, 1, (1, 2)),
])
def test_same_pads_puts_the_odd_pixel_after(size, kernel, stride, dilation, expected):
    assert same_pads(size, kernel, stride, dilation) == expected


@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
@pytest.mark.parametrize("shape", [(2, 5), (2, 4, 6, 3), (1, 3, 2, 2, 5)])
def test_bias_add(shape, data_format):
    value, bias = rand(*shape), rand(shape[1] if data_format == "NCHW" else shape[-1])
    expected = tf.raw_ops.BiasAdd(value=value, bias=bias, data_format=data_format).numpy()
    np.testing.assert_allclose(ours("BiasAdd", [value, bias], {"data_format": data_format}), expected)


CONV_CASES = [
    # image NHWC, filter HWIO, strides, dilations
    ((2, 7, 6, 3), (3, 3, 3, 4), (1, 1), (1, 1)),
    ((1, 8, 9, 2), (3, 2, 2, 3), (2, 2), (1, 1)),
    ((1, 9, 7, 3), (4, 3, 3, 2), (3, 2), (1, 1)),
    ((2, 9, 8, 2), (3, 3, 2, 2), (1, 1), (2, 3)),
    ((1, 5, 5, 4), (1, 1, 4, 6), (2, 2), (1, 1)),
    ((1, 6, 6, 4), (3, 3, 2, 4), (1, 2), (1, 1)),  # grouped: 4 input channels, filter takes 2
]
PADDINGS = ["SAME", "VALID", [0, 0, 1, 2, 0, 3, 0, 0]]


def _padding_attrs(padding) -> dict:
    if isinstance(padding, list):
        return {"padding": "EXPLICIT", "explicit_paddings": padding}
    return {"padding": padding}


@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize(("image", "kernel", "stride", "dilation"), CONV_CASES)
def test_conv2d(image, kernel, stride, dilation, padding, data_format):
    attrs = {"strides": [1, *stride, 1], "dilations": [1, *dilation, 1], **_padding_attrs(padding)}
    check_image_op("Conv2D", "input", rand(*image), {"filter": rand(*kernel)}, attrs, data_format, atol=1e-4)


DEPTHWISE_CASES = [
    ((2, 7, 6, 3), (3, 3, 3, 1), (1, 1), (1, 1)),
    ((1, 8, 9, 2), (3, 2, 2, 3), (2, 2), (1, 1)),
    ((1, 9, 7, 3), (5, 4, 3, 2), (3, 3), (1, 1)),  # TF's kernel wants equal row/column strides
    ((1, 9, 8, 2), (3, 3, 2, 2), (1, 1), (2, 2)),
]


@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize(("image", "kernel", "stride", "dilation"), DEPTHWISE_CASES)
def test_depthwise_conv2d_native(image, kernel, stride, dilation, padding, data_format):
    attrs = {"strides": [1, *stride, 1], "dilations": [1, *dilation, 1], **_padding_attrs(padding)}
    filt = rand(*kernel)
    tf_filter = {"filter": dilate_filter(filt, dilation)} if dilation != (1, 1) else None
    check_image_op("DepthwiseConv2dNative", "input", rand(*image), {"filter": filt}, attrs,
                   data_format, atol=1e-4, tf_others=tf_filter)


@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
@pytest.mark.parametrize("padding", ["SAME", "VALID", [0, 0, 2, 1, 0, 1, 0, 0]])
@pytest.mark.parametrize(("image", "kernel", "stride", "dilation"), [
    ((2, 7, 6, 3), (3, 3, 3, 4), (2, 2), (1, 1)),
    ((1, 8, 9, 2), (4, 2, 2, 3), (3, 2), (1, 1)),
    ((1, 6, 5, 2), (3, 3, 2, 2), (1, 1), (2, 2)),
    ((1, 5, 5, 3), (1, 1, 3, 2), (2, 2), (1, 1)),
])
def test_conv2d_backprop_input(image, kernel, stride, dilation, padding, data_format):
    """The gradient of a forward Conv2D of ``image``, as Keras' Conv2DTranspose emits it."""
    attrs = {"strides": [1, *stride, 1], "dilations": [1, *dilation, 1], **_padding_attrs(padding)}
    filt = rand(*kernel)
    forward = tf.raw_ops.Conv2D(input=rand(*image), filter=filt, **attrs).numpy()
    grad = rand(*forward.shape)
    expected = tf.raw_ops.Conv2DBackpropInput(
        input_sizes=np.array(image, np.int32), filter=dilate_filter(filt, dilation), out_backprop=grad,
        **{**attrs, "dilations": [1, 1, 1, 1]}).numpy()
    if data_format == "NCHW":
        if "explicit_paddings" in attrs:
            p = attrs["explicit_paddings"]
            attrs["explicit_paddings"] = p[:2] + p[6:] + p[2:6]
        attrs = {**attrs, "strides": [1, 1, *stride], "dilations": [1, 1, *dilation], "data_format": "NCHW"}
        sizes = np.array(nchw(np.zeros(image)).shape, np.int32)
        got = nhwc(ours("Conv2DBackpropInput", [sizes, filt, nchw(grad)], attrs))
    else:
        got = ours("Conv2DBackpropInput", [np.array(image, np.int32), filt, grad], attrs).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-5)


POOL_CASES = [
    # image, ksize, strides
    ((2, 7, 6, 3), (2, 2), (2, 2)),
    ((1, 8, 9, 2), (3, 3), (2, 2)),
    ((1, 9, 7, 3), (3, 2), (1, 3)),
    ((1, 5, 5, 1), (5, 5), (1, 1)),
    ((2, 4, 4, 2), (1, 1), (3, 3)),
]


@pytest.mark.parametrize("op", ["MaxPool", "AvgPool"])
@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize(("image", "ksize", "stride"), POOL_CASES)
def test_pool(op, image, ksize, stride, padding, data_format):
    attrs = {"ksize": [1, *ksize, 1], "strides": [1, *stride, 1], "padding": padding}
    # negative data: zero padding would win a max, and would pull an average towards zero
    check_image_op(op, "input" if op == "MaxPool" else "value", rand(*image) - 3.0, {}, attrs, data_format)


@pytest.mark.parametrize(("image", "ksize", "padding"), [
    ((8, 32, 32, 16), (2, 2), "VALID"),   # the small CNN's pooling at batch 8
    ((2, 24, 36, 40), (3, 2), "SAME"),    # tiles that cover the image: SAME pads nothing
    ((1, 64, 64, 16), (1, 4), "VALID"),
])
def test_max_pool_over_exact_tiles_matches_tf(image, ksize, padding):
    # big enough for the tiled path (ops_nn.tiled_max_pool); negative data, as in test_pool
    attrs = {"ksize": [1, *ksize, 1], "strides": [1, *ksize, 1], "padding": padding}
    x = rand(*image) - 3.0
    expected = tf.raw_ops.MaxPool(input=x, **attrs).numpy()
    np.testing.assert_array_equal(ours("MaxPool", [x], attrs).numpy(), expected)
    # under autograd the gradient goes to one input per window, as TF's (torch's pooling runs)
    xt = torch.from_numpy(x).requires_grad_()
    table.call("MaxPool", [xt], attrs).sum().backward()
    with tf.GradientTape() as tape:
        xv = tf.constant(x)
        tape.watch(xv)
        y = tf.reduce_sum(tf.raw_ops.MaxPool(input=xv, **attrs))
    np.testing.assert_array_equal(xt.grad.numpy(), tape.gradient(y, xv).numpy())


def test_max_pool_v2_reads_ksize_and_strides_from_inputs():
    image = rand(1, 7, 6, 2)
    ksize, strides = np.array([1, 3, 3, 1], np.int32), np.array([1, 2, 2, 1], np.int32)
    expected = tf.raw_ops.MaxPoolV2(input=image, ksize=ksize, strides=strides, padding="SAME").numpy()
    np.testing.assert_array_equal(ours("MaxPoolV2", [image, ksize, strides], {"padding": "SAME"}), expected)


def test_pool_over_channels_is_refused_with_the_attr():
    attrs = {"ksize": [1, 2, 2, 2], "strides": [1, 1, 1, 1], "padding": "SAME"}
    with pytest.raises(UnsupportedOpError, match=r"MaxPool: ksize=\[1, 2, 2, 2\] acts on the batch or"):
        ours("MaxPool", [rand(1, 4, 4, 2)], attrs)


def test_unknown_padding_is_named():
    with pytest.raises(GraphImportError, match="Conv2D: padding 'FULL' is not one of"):
        ours("Conv2D", [rand(1, 4, 4, 1), rand(2, 2, 1, 1)], {"strides": [1, 1, 1, 1], "padding": "FULL"})


BN_OPS = ["FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3"]


@pytest.mark.parametrize("op", BN_OPS)
@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
@pytest.mark.parametrize("is_training", [True, False])
@pytest.mark.parametrize("attrs", [{}, {"epsilon": 0.01, "exponential_avg_factor": 0.3}])
def test_fused_batch_norm(op, data_format, is_training, attrs):
    if op == "FusedBatchNorm":
        attrs = {k: v for k, v in attrs.items() if k != "exponential_avg_factor"}
    channels = 4
    x = rand(2, 5, 3, channels) if data_format == "NHWC" else rand(2, channels, 5, 3)
    params = [rand(channels), rand(channels), rand(channels), RNG.random(channels).astype(np.float32) + 0.5]
    names = ["x", "scale", "offset", "mean", "variance"]
    attrs = {**attrs, "is_training": is_training, "data_format": data_format}
    expected = getattr(tf.raw_ops, op)(**dict(zip(names, [x, *params], strict=True)), **attrs)
    got = ours(op, [x, *params], attrs)
    assert len(got) == len(expected) == (6 if op.endswith("V3") else 5)
    # in inference TF's reserve-space outputs are scratch memory, not values to match
    compared = 5 if is_training else 3
    for g, e in zip(got[:compared], expected[:compared], strict=True):
        np.testing.assert_allclose(g.numpy(), e.numpy(), atol=1e-5, rtol=1e-5)


def test_fused_batch_norm_v3_training_with_empty_running_stats_as_keras_emits():
    x, scale, offset = rand(3, 4, 4, 2), rand(2), rand(2)
    empty = np.zeros(0, np.float32)
    expected = tf.raw_ops.FusedBatchNormV3(x=x, scale=scale, offset=offset, mean=empty, variance=empty,
                                           is_training=True, epsilon=1e-3)
    got = ours("FusedBatchNormV3", [x, scale, offset, empty, empty], {"is_training": True, "epsilon": 1e-3})
    for g, e in zip(got[:5], expected[:5], strict=True):
        np.testing.assert_allclose(g.numpy(), e.numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (1, 2, 1, 3)])
def test_fused_batch_norm_training_on_tiny_batches(shape):
    x, params = rand(*shape), [rand(3), rand(3), rand(3), RNG.random(3).astype(np.float32) + 0.5]
    expected = tf.raw_ops.FusedBatchNormV3(x=x, scale=params[0], offset=params[1], mean=params[2],
                                           variance=params[3], is_training=True, exponential_avg_factor=0.5)
    got = ours("FusedBatchNormV3", [x, *params], {"is_training": True, "exponential_avg_factor": 0.5})
    for g, e in zip(got[:5], expected[:5], strict=True):
        np.testing.assert_allclose(g.numpy(), e.numpy(), atol=1e-5, rtol=1e-5)


def test_fused_batch_norm_half_input_keeps_its_dtype():
    x = rand(2, 3, 3, 2).astype(np.float16)
    params = [rand(2), rand(2), rand(2), RNG.random(2).astype(np.float32) + 0.5]
    expected = tf.raw_ops.FusedBatchNormV3(x=x, scale=params[0], offset=params[1], mean=params[2],
                                           variance=params[3], is_training=False)[0].numpy()
    got = ours("FusedBatchNormV3", [x, *params], {"is_training": False})[0]
    assert got.dtype == torch.float16
    np.testing.assert_allclose(got.float().numpy(), expected.astype(np.float32), atol=3e-3)


RESIZE_MODES = [(False, False), (True, False), (False, True)]
RESIZE_SIZES = [((1, 4, 5, 2), (8, 10)), ((2, 7, 6, 1), (3, 4)), ((1, 5, 5, 3), (5, 9)),
                ((1, 3, 4, 1), (1, 1)), ((1, 6, 7, 2), (13, 5))]


@pytest.mark.parametrize("op", ["ResizeBilinear", "ResizeNearestNeighbor"])
@pytest.mark.parametrize(("align_corners", "half_pixel_centers"), RESIZE_MODES)
@pytest.mark.parametrize(("image", "size"), RESIZE_SIZES)
def test_resize(op, image, size, align_corners, half_pixel_centers):
    x, size = rand(*image), np.array(size, np.int32)
    attrs = {"align_corners": align_corners, "half_pixel_centers": half_pixel_centers}
    expected = getattr(tf.raw_ops, op)(images=x, size=size, **attrs).numpy()
    got = ours(op, [x, size], attrs).numpy()
    assert got.dtype == expected.dtype
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("op", ["ResizeBilinear", "ResizeNearestNeighbor"])
def test_resize_integer_images(op):
    x = RNG.integers(0, 255, (1, 5, 6, 3)).astype(np.uint8)
    size = np.array([9, 4], np.int32)
    expected = getattr(tf.raw_ops, op)(images=x, size=size, half_pixel_centers=True).numpy()
    got = ours(op, [x, size], {"half_pixel_centers": True}).numpy()
    assert got.dtype == expected.dtype
    np.testing.assert_allclose(got, expected, atol=1e-4)


def _tf_grads(op: str, args: dict, attrs: dict, wrt: list[str], weights: np.ndarray):
    tensors = {k: tf.constant(v) for k, v in args.items()}
    with tf.GradientTape() as tape:
        for name in wrt:
            tape.watch(tensors[name])
        out = getattr(tf.raw_ops, op)(**tensors, **attrs)
        out = out[0] if isinstance(out, (list, tuple)) else out
        loss = tf.reduce_sum(out * weights)
    return [g.numpy() for g in tape.gradient(loss, [tensors[n] for n in wrt])]


POOL_ATTRS = {"ksize": [1, 3, 3, 1], "strides": [1, 2, 2, 1], "padding": "SAME"}
GRAD_CASES = [
    ("Conv2D", {"input": rand(1, 6, 5, 2), "filter": rand(3, 3, 2, 3)},
     {"strides": [1, 2, 2, 1], "padding": "SAME"}, ["input", "filter"]),
    ("DepthwiseConv2dNative", {"input": rand(1, 6, 5, 2), "filter": rand(3, 3, 2, 2)},
     {"strides": [1, 1, 1, 1], "padding": "SAME"}, ["input", "filter"]),
    ("MaxPool", {"input": rand(1, 6, 5, 2)}, POOL_ATTRS, ["input"]),
    ("AvgPool", {"value": rand(1, 6, 5, 2)}, POOL_ATTRS, ["value"]),
    ("FusedBatchNormV3", {"x": rand(2, 3, 3, 2), "scale": rand(2), "offset": rand(2), "mean": rand(2),
                          "variance": RNG.random(2).astype(np.float32) + 0.5},
     {"is_training": True}, ["x", "scale", "offset"]),
    ("ResizeBilinear", {"images": rand(1, 4, 5, 2), "size": np.array([7, 3], np.int32)},
     {"half_pixel_centers": True}, ["images"]),
]


@pytest.mark.parametrize(("op", "args", "attrs", "wrt"), GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_gradients_match_tensorflow(op, args, attrs, wrt):
    """Imported graphs are trained: the converters' autograd must agree with TF's gradients."""
    inputs = {k: torch.from_numpy(v.copy()).requires_grad_(k in wrt) for k, v in args.items()}
    snapshot = {k: v.detach().clone() for k, v in inputs.items()}
    out = table.call(op, list(inputs.values()), attrs)
    out = out[0] if isinstance(out, tuple) else out
    weights = rand(*out.shape)
    (out * torch.from_numpy(weights)).sum().backward()
    expected = _tf_grads(op, args, attrs, wrt, weights)
    for name, e in zip(wrt, expected, strict=True):
        np.testing.assert_allclose(inputs[name].grad.numpy(), e, atol=1e-4, rtol=1e-4)
    for name, value in inputs.items():  # converters never write into their inputs
        assert torch.equal(value.detach(), snapshot[name])


@settings(max_examples=80, deadline=None)
@given(h=st.integers(1, 13), w=st.integers(1, 13), kh=st.integers(1, 5), kw=st.integers(1, 5),
       s=st.integers(1, 4), padding=st.sampled_from(["SAME", "VALID"]),
       op=st.sampled_from(["MaxPool", "AvgPool"]))
def test_pool_property(h, w, kh, kw, s, padding, op):
    """Random sizes, windows and strides (covering torch's ceil-mode shortcut and the padded path)."""
    assume(padding == "SAME" or (kh <= h and kw <= w))
    image = rand(2, h, w, 3) - 3.0
    attrs = {"ksize": [1, kh, kw, 1], "strides": [1, s, s, 1], "padding": padding}
    check_image_op(op, "input" if op == "MaxPool" else "value", image, {}, attrs, "NHWC")


@settings(max_examples=120, deadline=None)
@given(h=st.integers(1, 12), w=st.integers(1, 12), oh=st.integers(1, 25), ow=st.integers(1, 25),
       mode=st.sampled_from(RESIZE_MODES),
       op=st.sampled_from(["ResizeBilinear", "ResizeNearestNeighbor"]))
def test_resize_property(h, w, oh, ow, mode, op):
    x, size = rand(1, h, w, 2), np.array([oh, ow], np.int32)
    attrs = {"align_corners": mode[0], "half_pixel_centers": mode[1]}
    expected = getattr(tf.raw_ops, op)(images=x, size=size, **attrs).numpy()
    np.testing.assert_allclose(ours(op, [x, size], attrs).numpy(), expected, atol=ATOL, rtol=1e-5)


def _frozen_keras_layers():
    """A frozen Keras graph using the layers that lower to this module's ops (and the shape ops)."""
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    layers = tf.keras.layers
    tf.keras.utils.set_random_seed(5)
    inp = tf.keras.Input((12, 12, 3))
    x = layers.Conv2D(6, 3, padding="same", strides=2)(inp)
    x = layers.BatchNormalization()(x)
    x = layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2)(x)
    x = layers.SeparableConv2D(6, 3, dilation_rate=2, padding="same")(x)  # SpaceToBatchND / BatchToSpaceND
    x = layers.Conv2DTranspose(4, 3, strides=2, padding="same")(x)  # Conv2DBackpropInput
    x = layers.UpSampling2D(interpolation="bilinear")(x)
    x = layers.MaxPooling2D(3, strides=2, padding="same")(x)
    x = layers.AveragePooling2D(3, strides=2, padding="same")(x)
    x = layers.ZeroPadding2D(1)(x)
    x = layers.Cropping2D(((1, 0), (0, 1)))(x)
    x = layers.Flatten()(x)
    out = layers.Dense(5)(x)
    model = tf.keras.Model(inp, out)
    spec = tf.TensorSpec((None, 12, 12, 3), name="images")
    frozen = convert_variables_to_constants_v2(tf.function(lambda t: model(t, training=False))
                                               .get_concrete_function(spec))
    return frozen


def test_frozen_keras_layers_import_and_train_through_the_importer():
    from lightning_saver import import_meta_graph

    frozen = _frozen_keras_layers()
    graph_def = frozen.graph.as_graph_def()
    ops = {node.op for node in graph_def.node}
    assert {"Conv2DBackpropInput", "SpaceToBatchND", "ResizeBilinear", "AvgPool", "StridedSlice"} <= ops
    data = rand(3, 12, 12, 3)
    expected = frozen(tf.constant(data))[0].numpy()
    graph = import_meta_graph(graph_def.SerializeToString())
    feeds, fetch = frozen.inputs[0].name, frozen.outputs[0].name
    np.testing.assert_allclose(graph.run(fetch, feed_dict={feeds: data}), expected, atol=1e-4, rtol=1e-4)
    module = graph.to_module(inputs=[feeds], outputs=[fetch])
    images = torch.from_numpy(data).requires_grad_(True)
    result = module(images)
    result = result[0] if isinstance(result, (tuple, list)) else result
    np.testing.assert_allclose(result.detach().numpy(), expected, atol=1e-4, rtol=1e-4)
    result.square().sum().backward()
    watched = tf.constant(data)
    with tf.GradientTape() as tape:
        tape.watch(watched)
        loss = tf.reduce_sum(tf.square(frozen(watched)[0]))
    expected_grad = tape.gradient(loss, watched).numpy()
    np.testing.assert_allclose(images.grad.numpy(), expected_grad, atol=1e-3, rtol=1e-3)


def _to_channels_first(values: list[int]) -> list[int]:
    return [values[0], values[-1], *values[1:-1]]


VOLUME_CASES = [
    # op, volume NDHWC, filter DHWIO or window, strides, dilations
    ("Conv3D", (2, 5, 6, 4, 3), (3, 2, 3, 3, 4), (1, 1, 1), (1, 1, 1)),
    ("Conv3D", (1, 7, 6, 5, 2), (3, 3, 2, 2, 3), (2, 2, 3), (1, 1, 1)),
    ("Conv3D", (1, 7, 7, 6, 2), (2, 3, 2, 2, 2), (1, 1, 1), (2, 1, 2)),
    ("MaxPool3D", (2, 5, 6, 4, 3), (2, 3, 2), (2, 2, 2), None),
    ("MaxPool3D", (1, 7, 5, 6, 2), (3, 3, 3), (2, 1, 3), None),
    ("AvgPool3D", (2, 5, 6, 4, 3), (2, 3, 2), (2, 2, 2), None),
    ("AvgPool3D", (1, 7, 5, 6, 2), (3, 3, 3), (2, 1, 3), None),
]


@pytest.mark.parametrize("data_format", ["NDHWC", "NCDHW"])
@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize(("op", "volume", "window", "stride", "dilation"), VOLUME_CASES)
def test_3d_ops(op, volume, window, stride, dilation, padding, data_format):
    """TF's CPU 3-D kernels take NDHWC only: the NCDHW case moves channels around ours."""
    x = rand(*volume) - 3.0
    attrs = {"strides": [1, *stride, 1], "padding": padding}
    if op == "Conv3D":
        attrs["dilations"] = [1, *dilation, 1]
        filt = rand(*window)
        tf_attrs = {**attrs, "dilations": [1, 1, 1, 1, 1]}
        expected = tf.raw_ops.Conv3D(input=x, filter=dilate_filter(filt, dilation), **tf_attrs).numpy()
        others = [filt]
    else:
        attrs["ksize"] = [1, *window, 1]
        expected = getattr(tf.raw_ops, op)(input=x, **attrs).numpy()
        others = []
    if data_format == "NCDHW":
        attrs = {k: _to_channels_first(v) if isinstance(v, list) else v for k, v in attrs.items()}
        got = ours(op, [np.moveaxis(x, -1, 1), *others], {**attrs, "data_format": "NCDHW"})
        got = np.moveaxis(got.numpy(), 1, -1)
    else:
        got = ours(op, [x, *others], attrs).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-5)


W33 = rand(3, 3, 3, 4)
DW = rand(3, 3, 3, 2)
BN = [rand(3), rand(3), rand(3), RNG.random(3).astype(np.float32) + 0.5]
TF1_NN_GRAPHS = {
    "conv2d_same_s2": lambda tf, x: tf.nn.conv2d(x, W33, [1, 2, 2, 1], "SAME"),
    "conv2d_dilated_explicit": lambda tf, x: tf.nn.conv2d(x, W33, 1, [[0, 0], [1, 2], [2, 0], [0, 0]],
                                                          dilations=2),
    "depthwise": lambda tf, x: tf.nn.depthwise_conv2d(x, DW, [1, 2, 2, 1], "SAME"),
    "separable_rate2": lambda tf, x: tf.nn.separable_conv2d(x, DW, rand(1, 1, 6, 4), [1, 1, 1, 1], "SAME",
                                                            dilations=[2, 2]),
    "conv2d_transpose": lambda tf, x: tf.nn.conv2d_transpose(x, rand(3, 3, 5, 3), [2, 15, 13, 5], 2, "SAME"),
    "pools": lambda tf, x: [tf.nn.max_pool2d(x, 3, 2, "SAME"), tf.nn.avg_pool2d(x, [2, 3], [2, 1], "SAME")],
    "bias_add": lambda tf, x: tf.nn.bias_add(x, BN[0]),
    "fused_bn_training": lambda tf, x: list(tf.compat.v1.nn.fused_batch_norm(x, BN[0], BN[1], epsilon=1e-3)),
    "fused_bn_inference": lambda tf, x: tf.compat.v1.nn.fused_batch_norm(x, *BN, is_training=False)[0],
    "resize_legacy": lambda tf, x: [tf.compat.v1.image.resize_bilinear(x, [11, 5]),
                                    tf.compat.v1.image.resize_nearest_neighbor(x, [4, 17])],
    "resize_align_corners": lambda tf, x: [
        tf.compat.v1.image.resize_bilinear(x, [9, 9], align_corners=True),
        tf.compat.v1.image.resize_nearest_neighbor(x, [9, 9], align_corners=True)],
    "resize_half_pixel": lambda tf, x: [tf.image.resize(x, [13, 4]), tf.image.resize(x, [13, 4], "nearest")],
}


@pytest.mark.parametrize("name", list(TF1_NN_GRAPHS))
def test_tf1_graphs_through_the_importer(tmp_path, name):
    """The same ops written by TF1's Python API: attrs come from real NodeDefs, run by session.run."""
    from tf_graphs import check_one_op

    check_one_op(tmp_path, TF1_NN_GRAPHS[name], {"x": rand(2, 8, 7, 3)}, rtol=1e-4, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 11), w=st.integers(1, 11), kh=st.integers(1, 4), kw=st.integers(1, 4),
       sh=st.integers(1, 3), sw=st.integers(1, 3), padding=st.sampled_from(["SAME", "VALID"]))
def test_conv2d_backprop_input_property(h, w, kh, kw, sh, sw, padding):
    """Random sizes, kernels and strides: torch's output_padding shortcut or the crop-and-fill path."""
    assume(padding == "SAME" or (kh <= h and kw <= w))
    image, filt = rand(1, h, w, 2), rand(kh, kw, 2, 3)
    attrs = {"strides": [1, sh, sw, 1], "padding": padding}
    grad = rand(*tf.raw_ops.Conv2D(input=image, filter=filt, **attrs).shape)
    sizes = np.array(image.shape, np.int32)
    expected = tf.raw_ops.Conv2DBackpropInput(input_sizes=sizes, filter=filt, out_backprop=grad, **attrs)
    got = ours("Conv2DBackpropInput", [sizes, filt, grad], attrs)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("data_format", ["NDHWC", "NCDHW"])
@pytest.mark.parametrize(("volume", "kernel", "stride", "padding"), [
    ((1, 5, 6, 4, 2), (3, 3, 3, 2, 3), (2, 2, 2), "SAME"),
    ((2, 7, 5, 6, 1), (2, 3, 2, 1, 2), (3, 1, 2), "VALID"),
    ((1, 4, 4, 4, 2), (3, 3, 3, 2, 2), (1, 1, 1), "SAME"),
])
def test_conv3d_backprop_input_v2(volume, kernel, stride, padding, data_format):
    """Keras Conv3DTranspose; TF's CPU kernel is NDHWC only, so NCDHW moves channels around ours."""
    filt = rand(*kernel)
    attrs = {"strides": [1, *stride, 1], "padding": padding}
    grad = rand(*tf.raw_ops.Conv3D(input=rand(*volume), filter=filt, **attrs).shape)
    sizes = np.array(volume, np.int32)
    expected = tf.raw_ops.Conv3DBackpropInputV2(input_sizes=sizes, filter=filt, out_backprop=grad, **attrs)
    if data_format == "NCDHW":
        attrs = {"strides": [1, 1, *stride], "padding": padding, "data_format": "NCDHW"}
        sizes = np.array(_to_channels_first(list(volume)), np.int32)
        got = ours("Conv3DBackpropInputV2", [sizes, filt, np.moveaxis(grad, -1, 1)], attrs)
        got = np.moveaxis(got.numpy(), 1, -1)
    else:
        got = ours("Conv3DBackpropInputV2", [sizes, filt, grad], attrs).numpy()
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4, rtol=1e-5)


def _keras_conv1d(layers):
    inp = tf.keras.Input((20, 3))
    x = layers.Conv1D(4, 3, padding="causal", dilation_rate=2)(inp)  # ExpandDims / Conv2D / Squeeze
    x = layers.MaxPooling1D()(x)
    x = layers.UpSampling1D()(x)
    x = layers.Conv1DTranspose(4, 3, strides=2)(x)
    return inp, layers.GlobalMaxPooling1D()(x), rand(2, 20, 3)


def _keras_3d(layers):
    inp = tf.keras.Input((6, 6, 6, 2))
    x = layers.Conv3D(4, 3, padding="same")(inp)
    x = layers.MaxPooling3D()(x)
    x = layers.Conv3DTranspose(2, 3, strides=2, padding="same")(x)  # Conv3DBackpropInputV2
    return inp, layers.AveragePooling3D(2, padding="same")(x), rand(2, 6, 6, 6, 2)


def _keras_causal_attention(layers):
    inp = tf.keras.Input((10, 8))
    x = layers.MultiHeadAttention(2, 4)(inp, inp, use_causal_mask=True)  # MatrixBandPart
    return inp, layers.LayerNormalization()(x), rand(3, 10, 8)


@pytest.mark.parametrize("build", [_keras_conv1d, _keras_3d, _keras_causal_attention],
                         ids=["conv1d", "3d", "causal_attention"])
def test_frozen_keras_models_import(build):
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    from lightning_saver import import_meta_graph

    tf.keras.utils.set_random_seed(3)
    inp, out, data = build(tf.keras.layers)
    model = tf.keras.Model(inp, out)
    spec = tf.TensorSpec((None, *data.shape[1:]), name="inputs")
    frozen = convert_variables_to_constants_v2(tf.function(lambda t: model(t, training=False))
                                               .get_concrete_function(spec))
    graph = import_meta_graph(frozen.graph.as_graph_def().SerializeToString())
    got = graph.run(frozen.outputs[0].name, feed_dict={frozen.inputs[0].name: data})
    np.testing.assert_allclose(got, frozen(tf.constant(data))[0].numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("is_training", [True, False])
def test_fused_batch_norm_v3_on_volumes(is_training):
    x = rand(2, 3, 4, 2, 3)
    params = [rand(3), rand(3), rand(3), RNG.random(3).astype(np.float32) + 0.5]
    attrs = {"is_training": is_training, "data_format": "NDHWC", "epsilon": 1e-3}
    expected = tf.raw_ops.FusedBatchNormV3(x=x, scale=params[0], offset=params[1], mean=params[2],
                                           variance=params[3], **attrs)
    got = ours("FusedBatchNormV3", [x, *params], attrs)
    for g, e in zip(got[:3], expected[:3], strict=True):
        np.testing.assert_allclose(g.numpy(), e.numpy(), atol=1e-5, rtol=1e-5)
    first = ours("FusedBatchNormV3", [np.moveaxis(x, -1, 1), *params], {**attrs, "data_format": "NCDHW"})
    np.testing.assert_allclose(np.moveaxis(first[0].numpy(), 1, -1), expected[0].numpy(), atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_conv2d_and_pools_keep_their_dtype(dtype):
    image, filt = rand(1, 6, 5, 2).astype(dtype), rand(3, 3, 2, 3).astype(dtype)
    tol = 1e-9 if dtype == np.float64 else 2e-2
    conv = {"strides": [1, 2, 2, 1], "padding": "SAME"}
    # tf.constant: a raw op given numpy falls back to its attr's default dtype (MaxPool: float32)
    cases = [("Conv2D", {"input": image, "filter": filt}, [image, filt], conv),
             ("MaxPool", {"input": image}, [image], POOL_ATTRS),
             ("AvgPool", {"value": image}, [image], POOL_ATTRS)]
    for op, tf_args, inputs, attrs in cases:
        tf_args = {k: tf.constant(v) for k, v in tf_args.items()}
        expected = getattr(tf.raw_ops, op)(**tf_args, **attrs).numpy()
        got = ours(op, inputs, attrs).numpy()
        assert got.dtype == expected.dtype == dtype
        np.testing.assert_allclose(got.astype(np.float64), expected.astype(np.float64), atol=tol, rtol=tol)


@settings(max_examples=50, deadline=None)
@given(h=st.integers(1, 10), w=st.integers(1, 10), kh=st.integers(1, 4), kw=st.integers(1, 4),
       sh=st.integers(1, 3), sw=st.integers(1, 3), dh=st.integers(1, 2), dw=st.integers(1, 2),
       padding=st.sampled_from(["SAME", "VALID", "EXPLICIT"]),
       pads=st.lists(st.integers(0, 2), min_size=4, max_size=4))
def test_conv2d_property(h, w, kh, kw, sh, sw, dh, dw, padding, pads):
    """Random sizes, kernels, strides, dilations and paddings (symmetric or not) against TF."""
    explicit = [0, 0, *pads, 0, 0] if padding == "EXPLICIT" else []
    padded_h, padded_w = h + sum(pads[:2]) * bool(explicit), w + sum(pads[2:]) * bool(explicit)
    assume(padding == "SAME" or ((kh - 1) * dh < padded_h and (kw - 1) * dw < padded_w))
    attrs = {"strides": [1, sh, sw, 1], "dilations": [1, dh, dw, 1], "padding": padding,
             "explicit_paddings": explicit}
    image, filt = rand(1, h, w, 2), rand(kh, kw, 2, 3)
    expected = tf.raw_ops.Conv2D(input=image, filter=filt, **attrs).numpy()
    np.testing.assert_allclose(ours("Conv2D", [image, filt], attrs).numpy(), expected, atol=1e-4, rtol=1e-5)
