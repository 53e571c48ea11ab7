"""TensorFlow import converters: convolutions, pooling, batch norm, bias and image resizing.

Every converter follows the contract in :mod:`lightning_saver.graph.tf_import.table`; layouts and
padding come from :mod:`lightning_saver.graph.tf_import.layout`. Example::

    y = table.call("Conv2D", [x, w], {"strides": [1, 2, 2, 1], "padding": "SAME"})
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lightning_saver.errors import GraphImportError
from lightning_saver.graph.tf_import import ops_image  # noqa: F401  registers the resize ops
from lightning_saver.graph.tf_import.layout import (
    Pads,
    ceil_mode_pads,
    check_data_format,
    from_nchw,
    pad_spatial,
    spatial_attr,
    spatial_pads,
    symmetric,
    to_nchw,
)
from lightning_saver.graph.tf_import.table import TF_OPS

_ONES = (1, 1, 1, 1)


@TF_OPS.register("BiasAdd", "BiasAddV1")
def bias_add(value: torch.Tensor, bias: torch.Tensor, *, data_format: str = "NHWC") -> torch.Tensor:
    if check_data_format(data_format, "BiasAdd") and value.dim() > 2:
        return value + bias.reshape((-1,) + (1,) * (value.dim() - 2))
    return value + bias


def _conv(
    op: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    groups: int,
    strides: Sequence[int],
    padding: str,
    explicit_paddings: Sequence[int],
    data_format: str,
    dilations: Sequence[int],
) -> torch.Tensor:
    """A channels-first convolution with TF padding; ``weight`` is already OIHW."""
    stride = spatial_attr(strides, data_format, "strides", op)
    dilation = spatial_attr(dilations, data_format, "dilations", op)
    x = to_nchw(x, data_format, op)
    pads = spatial_pads(
        x.shape[2:], weight.shape[2:], stride, dilation, padding, explicit_paddings, data_format, op
    )
    torch_pad = symmetric(pads)
    if torch_pad is None:
        x, torch_pad = pad_spatial(x, pads), (0,) * len(pads)
    y = F.conv2d(x, weight, None, stride, torch_pad, dilation, groups)
    return from_nchw(y, data_format, op)


def _channels(x: torch.Tensor, data_format: str, op: str) -> int:
    return int(x.shape[1] if check_data_format(data_format, op) else x.shape[-1])


@TF_OPS.register("Conv2D")
def conv2d(
    input: torch.Tensor,
    filter: torch.Tensor,
    *,
    strides: Sequence[int],
    padding: str,
    explicit_paddings: Sequence[int] = (),
    data_format: str = "NHWC",
    dilations: Sequence[int] = _ONES,
) -> torch.Tensor:
    in_channels = _channels(input, data_format, "Conv2D")
    if in_channels % filter.shape[2]:
        raise GraphImportError(
            f"Conv2D: input has {in_channels} channels, not a multiple of the filter's {filter.shape[2]}"
        )
    weight = filter.permute(3, 2, 0, 1)  # HWIO -> OIHW
    groups = in_channels // filter.shape[2]
    return _conv("Conv2D", input, weight, groups, strides, padding, explicit_paddings, data_format, dilations)


@TF_OPS.register("DepthwiseConv2dNative")
def depthwise_conv2d_native(
    input: torch.Tensor,
    filter: torch.Tensor,
    *,
    strides: Sequence[int],
    padding: str,
    explicit_paddings: Sequence[int] = (),
    data_format: str = "NHWC",
    dilations: Sequence[int] = _ONES,
) -> torch.Tensor:
    height, width, channels, multiplier = filter.shape
    # TF orders output channels as in_channel * multiplier + m, which is torch's grouped order
    weight = filter.permute(2, 3, 0, 1).reshape(channels * multiplier, 1, height, width)
    op = "DepthwiseConv2dNative"
    return _conv(op, input, weight, channels, strides, padding, explicit_paddings, data_format, dilations)


@TF_OPS.register("Conv2DBackpropInput")
def conv2d_backprop_input(
    input_sizes: torch.Tensor,
    filter: torch.Tensor,
    out_backprop: torch.Tensor,
    *,
    strides: Sequence[int],
    padding: str,
    explicit_paddings: Sequence[int] = (),
    data_format: str = "NHWC",
    dilations: Sequence[int] = _ONES,
) -> torch.Tensor:
    op = "Conv2DBackpropInput"
    stride = spatial_attr(strides, data_format, "strides", op)
    dilation = spatial_attr(dilations, data_format, "dilations", op)
    sizes = [int(s) for s in input_sizes.tolist()]
    groups = 1
    if len(sizes) == 4:
        channels_first = check_data_format(data_format, op)
        groups = max(sizes[1 if channels_first else 3] // int(filter.shape[2]), 1)
        sizes = sizes[2:] if channels_first else sizes[1:3]
    grad = to_nchw(out_backprop, data_format, op)
    kernel = filter.shape[:2]
    pads = spatial_pads(sizes, kernel, stride, dilation, padding, explicit_paddings, data_format, op)
    full = F.conv_transpose2d(grad, filter.permute(3, 2, 0, 1), None, stride, 0, 0, groups, dilation)
    # the full transposed output covers the padded input from its first row; crop the padding
    # (negative pads) and zero-fill rows the forward conv never reached
    crop = tuple((-before, before + size - full_size) for (before, _), size, full_size in
                 zip(pads, sizes, full.shape[2:], strict=True))
    return from_nchw(pad_spatial(full, crop), data_format, op)


def _pool_pads(
    op: str,
    x: torch.Tensor,
    ksize: Sequence[int],
    strides: Sequence[int],
    padding: str,
    explicit_paddings: Sequence[int],
    data_format: str,
) -> tuple[tuple[int, ...], tuple[int, ...], Pads]:
    kernel = spatial_attr(ksize, data_format, "ksize", op)
    stride = spatial_attr(strides, data_format, "strides", op)
    pads = spatial_pads(
        x.shape[2:], kernel, stride, (1,) * len(kernel), padding, explicit_paddings, data_format, op
    )
    return kernel, stride, pads


@TF_OPS.register("MaxPool")
def max_pool(
    input: torch.Tensor,
    *,
    ksize: Sequence[int],
    strides: Sequence[int],
    padding: str,
    explicit_paddings: Sequence[int] = (),
    data_format: str = "NHWC",
) -> torch.Tensor:
    x = to_nchw(input, data_format, "MaxPool")
    kernel, stride, pads = _pool_pads("MaxPool", x, ksize, strides, padding, explicit_paddings, data_format)
    torch_pad = ceil_mode_pads(x.shape[2:], kernel, stride, pads)
    if torch_pad is not None:
        y = F.max_pool2d(x, kernel, stride, torch_pad, ceil_mode=True)
    else:  # padded cells never win a max, whatever the sign of the data
        y = F.max_pool2d(pad_spatial(x, pads, value=float("-inf")), kernel, stride)
    return from_nchw(y, data_format, "MaxPool")


@TF_OPS.register("MaxPoolV2")
def max_pool_v2(
    input: torch.Tensor,
    ksize: torch.Tensor,
    strides: torch.Tensor,
    *,
    padding: str,
    data_format: str = "NHWC",
) -> torch.Tensor:
    return max_pool(input, ksize=ksize.tolist(), strides=strides.tolist(), padding=padding,
                    data_format=data_format)


@TF_OPS.register("AvgPool")
def avg_pool(
    value: torch.Tensor,
    *,
    ksize: Sequence[int],
    strides: Sequence[int],
    padding: str,
    data_format: str = "NHWC",
) -> torch.Tensor:
    x = to_nchw(value, data_format, "AvgPool")
    kernel, stride, pads = _pool_pads("AvgPool", x, ksize, strides, padding, (), data_format)
    # TF divides by the number of real (unpadded) cells in each window
    torch_pad = ceil_mode_pads(x.shape[2:], kernel, stride, pads)
    if torch_pad is not None:
        y = F.avg_pool2d(x, kernel, stride, torch_pad, ceil_mode=True, count_include_pad=False)
        return from_nchw(y, data_format, "AvgPool")
    total = F.avg_pool2d(pad_spatial(x, pads), kernel, stride, divisor_override=1)
    ones = x.new_ones((1, 1) + tuple(x.shape[2:]))
    count = F.avg_pool2d(pad_spatial(ones, pads), kernel, stride, divisor_override=1)
    return from_nchw(total / count, data_format, "AvgPool")


def _normalize(
    x: torch.Tensor,
    channel: int,
    mean: torch.Tensor,
    variance: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    epsilon: float,
) -> torch.Tensor:
    shape = [-1 if d == channel else 1 for d in range(x.dim())]
    # one fused pass x * a + b over the data, the form torch's own batch norm kernel uses
    a = torch.rsqrt(variance + epsilon) * scale
    return torch.addcmul((offset - mean * a).reshape(shape), x, a.reshape(shape))


def _batch_norm(
    x: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    mean: torch.Tensor,
    variance: torch.Tensor,
    epsilon: float,
    exponential_avg_factor: float,
    data_format: str,
    is_training: bool,
) -> tuple[torch.Tensor, ...]:
    """y, running mean, running variance, saved mean, saved (biased) variance, as TF's CPU kernel.

    Like TF's FusedBatchNormGrad, gradients flow from ``y`` only (through the batch statistics in
    training), not from the statistics outputs.
    """
    first = check_data_format(data_format, "FusedBatchNorm")
    # half/bfloat16 inputs are normalised in the float32 of scale, like TF's mixed-precision kernel
    xf = x.to(scale.dtype)
    channel = 1 if first else x.dim() - 1
    count = xf.numel() // max(xf.shape[channel], 1)
    if not is_training:
        y = _normalize(xf, channel, mean, variance, scale, offset, epsilon)
        return y.to(x.dtype), mean, variance, mean, variance
    if count > 1:
        channels_first = xf if first else xf.movedim(-1, 1)
        # torch's fused kernel writes the batch mean and unbiased variance into these (momentum 1)
        batch_mean, unbiased = scale.new_zeros(xf.shape[channel]), scale.new_ones(xf.shape[channel])
        y = F.batch_norm(channels_first, batch_mean, unbiased, scale, offset, True, 1.0, epsilon)
        y = y if first else y.movedim(1, -1)
        batch_var = unbiased * ((count - 1) / count)
    else:  # one value per channel, which torch's kernel refuses: the variance is zero
        dims = [d for d in range(x.dim()) if d != channel]
        batch_var, batch_mean = torch.var_mean(xf, dims, correction=0)
        unbiased = batch_var
        y = _normalize(xf, channel, batch_mean, batch_var, scale, offset, epsilon)
    factor = exponential_avg_factor
    if factor != 1.0:
        running_mean = (1.0 - factor) * mean + factor * batch_mean
        running_var = (1.0 - factor) * variance + factor * unbiased
    else:
        running_mean, running_var = batch_mean, unbiased
    return y.to(x.dtype), running_mean, running_var, batch_mean, batch_var


@TF_OPS.register("FusedBatchNorm", "FusedBatchNormV2")
def fused_batch_norm(
    x: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    mean: torch.Tensor,
    variance: torch.Tensor,
    *,
    epsilon: float = 1e-4,
    exponential_avg_factor: float = 1.0,
    data_format: str = "NHWC",
    is_training: bool = True,
) -> tuple[torch.Tensor, ...]:
    return _batch_norm(
        x, scale, offset, mean, variance, epsilon, exponential_avg_factor, data_format, is_training
    )


@TF_OPS.register("FusedBatchNormV3")
def fused_batch_norm_v3(
    x: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    mean: torch.Tensor,
    variance: torch.Tensor,
    *,
    epsilon: float = 1e-4,
    exponential_avg_factor: float = 1.0,
    data_format: str = "NHWC",
    is_training: bool = True,
) -> tuple[torch.Tensor, ...]:
    outputs = _batch_norm(
        x, scale, offset, mean, variance, epsilon, exponential_avg_factor, data_format, is_training
    )
    # reserve_space_3 is an opaque scratch output (a scalar on TF's CPU kernel)
    return outputs + (scale.new_zeros(()),)
