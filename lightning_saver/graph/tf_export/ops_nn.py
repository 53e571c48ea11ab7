"""Convolutions, pooling and normalization: ATen (NCHW) -> TensorFlow CPU kernels (NHWC).

TensorFlow's CPU kernels for Conv2D, DepthwiseConv2dNative, MaxPool and AvgPool only take NHWC, so
each converter transposes NCHW -> NHWC, runs the op, and transposes back (``to_nhwc``/``to_nchw``;
the builder cancels back-to-back inverse transposes). Explicit padding becomes a ``Pad`` before a
VALID op: ``explicit_paddings`` is too recent an attr for older TensorFlow.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lightning_saver.errors import UnsupportedOpError
from lightning_saver.formats import tf_dtypes
from lightning_saver.graph.tf_export.builder import GraphBuilder, TfTensor
from lightning_saver.graph.tf_export.ops_math import mean
from lightning_saver.graph.tf_export.ops_shape import dim_size
from lightning_saver.graph.tf_export.table import TF_EXPORT, Ctx

aten = torch.ops.aten
INT32 = tf_dtypes.DT_INT32


def to_nhwc(g: GraphBuilder, x: TfTensor) -> TfTensor:
    return g.transpose(x, [0, 2, 3, 1])


def to_nchw(g: GraphBuilder, x: TfTensor) -> TfTensor:
    return g.transpose(x, [0, 3, 1, 2])


def _pair(value: Sequence[int] | int, n: int = 2) -> list[int]:
    items = [value] * n if isinstance(value, int) else list(value)
    return items * n if len(items) == 1 else items


def pad_nhwc(g: GraphBuilder, x: TfTensor, hw_pads: Sequence[tuple[int, int]],
             value: float = 0.0) -> TfTensor:
    """Pad H and W of an NHWC tensor by (before, after) pairs; no node when nothing to pad."""
    if not any(a or b for a, b in hw_pads):
        return x
    pairs = np.asarray([[0, 0], *hw_pads, [0, 0]], np.int32)
    if value == 0.0:
        return g.op("Pad", x, g.const(pairs))
    return g.op("PadV2", x, g.const(pairs), g.scalar(value, x.dtype))


def _as_2d(g: GraphBuilder, x: TfTensor) -> TfTensor:
    # a 1-D op (N, C, L) runs as 2-D on (N, C, 1, L)
    shape = None if x.shape is None else (*x.shape[:2], 1, x.shape[2])
    return g.op("ExpandDims", x, g.scalar(2, INT32), out_shape=shape)


# --- convolution -----------------------------------------------------------------------------


def _conv_nhwc(g: GraphBuilder, x: TfTensor, w: TfTensor, stride: list[int], dilation: list[int],
               groups: int) -> TfTensor:
    """Convolve an NHWC input (already padded) with an OIHW torch weight."""
    out_ch, in_per_group = w.shape[0], w.shape[1]  # type: ignore[index]
    strides, dilations = [1, *stride, 1], [1, *dilation, 1]
    if groups == 1:
        return g.op("Conv2D", x, g.transpose(w, [2, 3, 1, 0]), strides=strides, padding="VALID",
                    dilations=dilations)
    depthwise_ok = in_per_group == 1 and stride[0] == stride[1] and dilation == [1, 1]
    if depthwise_ok:
        multiplier = out_ch // groups
        filt = g.transpose(g.reshape(w, [groups, multiplier, *w.shape[2:]]), [2, 3, 0, 1])  # type: ignore[misc]
        return g.op("DepthwiseConv2dNative", x, filt, strides=strides, padding="VALID")
    # general groups: TF's CPU Conv2D has no grouped kernel, so convolve each group and concatenate
    xs = g.op("SplitV", x, g.const(np.full(groups, in_per_group, np.int32)), g.scalar(3, INT32),
              num_split=groups)
    per_out = out_ch // groups
    outs = []
    for i in range(groups):
        wi = g.op("StridedSlice", w, [i * per_out, 0, 0, 0], [(i + 1) * per_out, 0, 0, 0], [1, 1, 1, 1],
                  begin_mask=0b1110, end_mask=0b1110)
        if w.value is not None:
            wi = g.const(w.value[i * per_out:(i + 1) * per_out], w.dtype)
        wi = TfTensor(wi.ref, w.dtype, (per_out, *w.shape[1:]), wi.value)  # type: ignore[misc]
        outs.append(g.op("Conv2D", xs[i], g.transpose(wi, [2, 3, 1, 0]), strides=strides, padding="VALID",
                         dilations=dilations))
    return g.op("ConcatV2", outs, g.scalar(3, INT32))


def _conv_transpose_nhwc(cx: Ctx, x: TfTensor, w: TfTensor, stride: list[int], padding: list[int],
                         dilation: list[int], output_padding: list[int],
                         out_hw: Sequence[int | None]) -> TfTensor:
    g = cx.g
    in_ch, out_ch, kh, kw = w.shape  # type: ignore[misc]
    h, wd = x.shape[1], x.shape[2]  # type: ignore[index]
    if h is None or wd is None:
        raise UnsupportedOpError("TensorFlow export: ConvTranspose2d needs static spatial sizes")
    geometry = zip((h, wd), stride, dilation, (kh, kw), strict=True)
    full = [(n - 1) * s + d * (k - 1) + 1 for n, s, d, k in geometry]
    # the rows output_padding adds beyond the cropped padding; always fewer than the stride
    extra = [max(0, op - p) for op, p in zip(output_padding, padding, strict=True)]
    sizes = g.int_vector([dim_size(g, x, 0), full[0] + extra[0], full[1] + extra[1], out_ch])
    y = g.op("Conv2DBackpropInput", sizes, g.transpose(w, [2, 3, 1, 0]), x, strides=[1, *stride, 1],
             padding="VALID", dilations=[1, *dilation, 1])
    return g.op("StridedSlice", y, [0, padding[0], padding[1], 0], [0, padding[0] + out_hw[0],
                padding[1] + out_hw[1], 0], [1, 1, 1, 1], begin_mask=0b1001, end_mask=0b1001)


@TF_EXPORT.register(aten.convolution.default)
def convolution(cx: Ctx, x: TfTensor, weight: TfTensor, bias: TfTensor | None, stride: Sequence[int],
                padding: Sequence[int], dilation: Sequence[int], transposed: bool,
                output_padding: Sequence[int], groups: int) -> TfTensor:
    g = cx.g
    one_d = x.rank == 3
    if x.rank not in (3, 4):
        raise UnsupportedOpError(f"TensorFlow export: convolution of rank {x.rank} (only 1-D and 2-D)")
    out_shape = cx.shape
    if one_d:
        x = _as_2d(g, x)
        weight = g.reshape(weight, [*weight.shape[:2], 1, weight.shape[2]])  # type: ignore[index]
        stride, padding, dilation = [1, *stride], [0, *padding], [1, *dilation]
        output_padding = [0, *output_padding]
        out_shape = None if out_shape is None else (*out_shape[:2], 1, out_shape[2])
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    xh = to_nhwc(g, x)
    if transposed:
        if groups != 1:
            raise UnsupportedOpError("TensorFlow export: ConvTranspose with groups > 1 is not supported")
        y = _conv_transpose_nhwc(cx, xh, weight, stride, padding, dilation, _pair(output_padding),
                                 out_shape[2:] if out_shape else (None, None))
    else:
        xh = pad_nhwc(g, xh, [(padding[0], padding[0]), (padding[1], padding[1])])
        y = _conv_nhwc(g, xh, weight, stride, dilation, groups)
    if bias is not None:
        y = g.op("BiasAdd", y, bias)
    y = to_nchw(g, y)
    if one_d:
        y = g.op("Squeeze", y, squeeze_dims=[2])
    return y


# --- pooling ---------------------------------------------------------------------------------


def _pool_geometry(x: TfTensor, out_shape: Any, kernel: list[int], stride: list[int], padding: list[int]
                   ) -> list[tuple[int, int]]:
    """(before, after) pads per spatial dim, with the extra rows that ceil_mode windows reach."""
    pads = []
    for i in range(2):
        size, out = x.shape[2 + i], out_shape[2 + i]
        if size is None or out is None:
            raise UnsupportedOpError("TensorFlow export: pooling needs static spatial sizes")
        extra = max(0, (out - 1) * stride[i] + kernel[i] - (size + 2 * padding[i]))
        pads.append((padding[i], padding[i] + extra))
    return pads


@TF_EXPORT.register(aten.max_pool2d_with_indices.default, aten.max_pool2d.default)
def max_pool2d(cx: Ctx, x: TfTensor, kernel_size: Sequence[int], stride: Sequence[int] = (),
               padding: Sequence[int] = (0,), dilation: Sequence[int] = (1,), ceil_mode: bool = False) -> Any:
    g = cx.g
    kernel = _pair(kernel_size)
    strides = _pair(stride) if stride else kernel
    if _pair(dilation) != [1, 1]:
        raise UnsupportedOpError("TensorFlow export: max pooling with dilation > 1 is not supported")
    if any(u.args[1] == 1 for u in cx.node.users if u.target.__name__ == "getitem"):
        raise UnsupportedOpError("TensorFlow export: max pooling indices (return_indices=True) "
                                 "are not supported")
    pads = _pool_geometry(x, cx.out(0)[1], kernel, strides, _pair(padding))
    lowest = float(np.finfo(tf_dtypes.to_numpy(x.dtype)).min)
    xh = pad_nhwc(g, to_nhwc(g, x), pads, lowest)
    y = to_nchw(g, g.op("MaxPool", xh, ksize=[1, *kernel, 1], strides=[1, *strides, 1], padding="VALID"))
    return [y, None] if cx.node.target is aten.max_pool2d_with_indices.default else y


@TF_EXPORT.register(aten.avg_pool2d.default)
def avg_pool2d(cx: Ctx, x: TfTensor, kernel_size: Sequence[int], stride: Sequence[int] = (),
               padding: Sequence[int] = (0,), ceil_mode: bool = False, count_include_pad: bool = True,
               divisor_override: int | None = None) -> TfTensor:
    g = cx.g
    kernel = _pair(kernel_size)
    strides = _pair(stride) if stride else kernel
    pad = _pair(padding)
    pads = _pool_geometry(x, cx.shape, kernel, strides, pad)
    attrs = {"ksize": [1, *kernel, 1], "strides": [1, *strides, 1], "padding": "VALID"}
    y = g.op("AvgPool", pad_nhwc(g, to_nhwc(g, x), pads), **attrs)
    if divisor_override:
        y = g.op("Mul", y, g.scalar(kernel[0] * kernel[1] / divisor_override, x.dtype))
    elif any(a or b for a, b in pads):
        # torch divides by the window's count of real (and, with count_include_pad, padded) cells;
        # AvgPool of a 0/1 mask gives that count over the window size, the factor to divide by
        h, w = x.shape[2], x.shape[3]  # type: ignore[index]
        inner = 1.0 if count_include_pad else 0.0
        mask = np.full((1, h + 2 * pad[0], w + 2 * pad[1], 1), inner, tf_dtypes.to_numpy(x.dtype))
        mask[:, pad[0]:pad[0] + h, pad[1]:pad[1] + w, :] = 1.0
        mask = np.pad(mask, [(0, 0), (0, pads[0][1] - pad[0]), (0, pads[1][1] - pad[1]), (0, 0)])
        y = g.op("RealDiv", y, g.op("AvgPool", g.const(mask), **attrs))
    return to_nchw(g, y)


@TF_EXPORT.register(aten._adaptive_avg_pool2d.default, aten.adaptive_avg_pool2d.default)
def adaptive_avg_pool2d(cx: Ctx, x: TfTensor, output_size: Sequence[int]) -> TfTensor:
    g = cx.g
    out = _pair(output_size)
    h, w = x.shape[2], x.shape[3]  # type: ignore[index]
    if out == [1, 1]:
        return g.op("Mean", x, [2, 3], keep_dims=True)
    if h is None or w is None or h % out[0] or w % out[1]:
        raise UnsupportedOpError(f"TensorFlow export: adaptive average pooling from {h}x{w} to "
                                 f"{out[0]}x{out[1]}; only output sizes that divide the input are supported")
    kernel = [h // out[0], w // out[1]]
    y = g.op("AvgPool", to_nhwc(g, x), ksize=[1, *kernel, 1], strides=[1, *kernel, 1], padding="VALID")
    return to_nchw(g, y)


@TF_EXPORT.register(aten.upsample_nearest2d.vec, aten.upsample_bilinear2d.vec)
def upsample2d(cx: Ctx, x: TfTensor, output_size: Sequence[int] | None, *rest: Any) -> TfTensor:
    g = cx.g
    bilinear = cx.node.target is aten.upsample_bilinear2d.vec
    align_corners = bool(rest[0]) if bilinear else False
    out_hw = cx.shape[2:] if cx.shape is not None else (None, None)
    if any(d is None for d in out_hw):
        raise UnsupportedOpError("TensorFlow export: upsampling needs static output sizes")
    # torch's "nearest" picks floor(dst * in / out), TF's default; torch's bilinear without
    # align_corners samples at half-pixel centers, TF's half_pixel_centers
    attrs = {"align_corners": True} if align_corners else ({"half_pixel_centers": True} if bilinear else {})
    op = "ResizeBilinear" if bilinear else "ResizeNearestNeighbor"
    y = g.op(op, to_nhwc(g, x), g.const(np.asarray(out_hw, np.int32)), **attrs)
    return to_nchw(g, g.cast(y, x.dtype))


# --- normalization ---------------------------------------------------------------------------


def _per_channel(g: GraphBuilder, v: TfTensor, rank: int) -> TfTensor:
    """A (C,) vector shaped (C, 1, ..., 1) to broadcast over channel dim 1 of a rank-``rank`` tensor."""
    return g.reshape(v, [-1] + [1] * (rank - 2)) if rank > 2 else v


def _fused_batch_norm(g: GraphBuilder, source: TfTensor, weight: TfTensor | None, bias: TfTensor | None,
                      running_mean: TfTensor, running_var: TfTensor, eps: float, multiplier: TfTensor
                      ) -> TfTensor | None:
    """Batch norm of a Conv2D's NHWC output as ``FusedBatchNormV3(is_training=False)`` on the Conv2D
    itself, when its parameters are variables; None where the multiply-add serves better.

    TensorFlow's remapper fuses Conv2D + FusedBatchNormV3 (+ Relu) into one ``_FusedConv2D`` whose
    oneDNN kernel applies the normalization as post-ops: no pass over the activations. With variables,
    the multiply-add is two more passes plus the ReLU's (batch 8 ResNet-18: 8% of the run). A Conv2D
    bias ``b`` moves into the offset, ``BN(conv + b) = FBN(conv, offset + b * multiplier)`` with
    ``multiplier = weight * rsqrt(var + eps)``, so the Conv2D feeds the batch norm directly. Not into
    the mean: TensorFlow's gradient of an inference FusedBatchNormV3 gives the mean none, and ``b``
    would stop training; through the offset it gets its true gradient. With constants
    (``freeze=True``) the multiply-add stays: grappler folds it into the filter and a BiasAdd,
    which runs faster still.
    """
    params = [t for t in (weight, bias, running_mean, running_var) if t is not None]
    constants = all(t.value is not None for t in params)
    floats = all(t.dtype == tf_dtypes.DT_FLOAT for t in (source, *params))
    if constants or not floats or running_mean.shape is None or None in running_mean.shape:
        return None
    node = g.node(source.node_name)
    if node.op == "BiasAdd" and "data_format" not in node.attr:  # NHWC, the default
        conv = g.node(node.input[0])
        if conv.op != "Conv2D":
            return None
        conv_bias = TfTensor(node.input[1], source.dtype, running_mean.shape)
        moved = g.op("Mul", conv_bias, multiplier, out_shape=running_mean.shape)
        offset = moved if bias is None else g.op("AddV2", bias, moved, out_shape=running_mean.shape)
        source = TfTensor(node.input[0], source.dtype, source.shape)
    elif node.op == "Conv2D":
        offset = bias if bias is not None else g.const(np.zeros(running_mean.shape, np.float32))
    else:
        return None
    scale = weight if weight is not None else g.const(np.ones(running_mean.shape, np.float32))
    outs = g.op("FusedBatchNormV3", source, scale, offset, running_mean, running_var, epsilon=float(eps),
                is_training=False, name="FusedBatchNormV3")
    return outs[0].with_meta(source.dtype, source.shape)


@TF_EXPORT.register(aten._native_batch_norm_legit_no_training.default)
def batch_norm(cx: Ctx, x: TfTensor, weight: TfTensor | None, bias: TfTensor | None, running_mean: TfTensor,
               running_var: TfTensor, momentum: float, eps: float) -> list[Any]:
    g = cx.g
    scale = g.op("Rsqrt", g.op("AddV2", running_var, g.scalar(eps, running_var.dtype)))
    if weight is not None:
        scale = g.op("Mul", scale, weight)
    shift = g.op("Neg", g.op("Mul", running_mean, scale))
    if bias is not None:
        shift = g.op("AddV2", shift, bias)
    rank = x.rank or 4
    shape = (None,) if running_mean.shape is None else running_mean.shape
    scale, shift = (TfTensor(t.ref, t.dtype, shape) for t in (scale, shift))
    if x.transposed_from is not None and x.transposed_from[1] == (0, 3, 1, 2):
        # a conv's output still in NHWC: channels are last, the vectors broadcast as they are
        source = x.transposed_from[0]
        fused = _fused_batch_norm(g, source, weight, bias, running_mean, running_var, eps, scale)
        if fused is not None:
            return [to_nchw(g, fused), None, None]
        return [to_nchw(g, g.op("AddV2", g.op("Mul", source, scale), shift)), None, None]
    y = g.op("AddV2", g.op("Mul", x, _per_channel(g, scale, rank)), _per_channel(g, shift, rank))
    return [y, None, None]


def _normalize(g: GraphBuilder, x: TfTensor, reduce_axes: list[int], eps: float) -> tuple[TfTensor, ...]:
    """(x - mean) * rsqrt(var + eps) over ``reduce_axes``; also returns mean and rstd.

    Means are ``ops_math.mean`` (a Sum times 1/n): TensorFlow's oneDNN layer/instance-norm rewrite
    needs ``Mean`` ops to match, and it drops our epsilon when it does.
    """
    mu = mean(g, x, reduce_axes, keep_dims=True)
    centered = g.op("Sub", x, mu)
    variance = mean(g, g.op("Square", centered), reduce_axes, keep_dims=True)
    rstd = g.op("Rsqrt", g.op("AddV2", variance, g.scalar(eps, x.dtype)))
    return g.op("Mul", centered, rstd), mu, rstd


@TF_EXPORT.register(aten._native_batch_norm_legit.no_stats)
def batch_norm_batch_stats(cx: Ctx, x: TfTensor, weight: TfTensor | None, bias: TfTensor | None,
                           training: bool, momentum: float, eps: float) -> list[Any]:
    # normalizes with the batch's own statistics: what InstanceNorm lowers to
    g = cx.g
    rank = x.rank or 0
    y, mean, rstd = _normalize(g, x, [0, *range(2, rank)], eps)
    if weight is not None:
        y = g.op("Mul", y, _per_channel(g, weight, rank))
    if bias is not None:
        y = g.op("AddV2", y, _per_channel(g, bias, rank))
    return [y, mean, rstd]


@TF_EXPORT.register(aten.native_layer_norm.default)
def layer_norm(cx: Ctx, x: TfTensor, normalized_shape: Sequence[int], weight: TfTensor | None,
               bias: TfTensor | None, eps: float) -> list[TfTensor]:
    g = cx.g
    rank = x.rank or 0
    y, mean, rstd = _normalize(g, x, list(range(rank - len(normalized_shape), rank)), eps)
    if weight is not None:
        y = g.op("Mul", y, weight)
    if bias is not None:
        y = g.op("AddV2", y, bias)
    return [y, mean, rstd]


@TF_EXPORT.register(aten.native_group_norm.default)
def group_norm(cx: Ctx, x: TfTensor, weight: TfTensor | None, bias: TfTensor | None, n: Any, c: int,
               hxw: Any, group: int, eps: float) -> list[Any]:
    g = cx.g
    rank = x.rank or 0
    grouped = g.reshape(x, [-1, group, (c // group) * hxw if isinstance(hxw, int) else -1])
    y, mean, rstd = _normalize(g, grouped, [2], eps)
    y = g.op("Reshape", y, g.op("Shape", x))
    if weight is not None:
        y = g.op("Mul", y, _per_channel(g, weight, rank))
    if bias is not None:
        y = g.op("AddV2", y, _per_channel(g, bias, rank))
    return [y, mean, rstd]
