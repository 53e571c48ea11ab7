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
from lightning_saver.graph.tf_import.layout import (
    Pads,
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
    # padded cells never win a max, whatever the sign of the data
    x = pad_spatial(x, pads, value=float("-inf"))
    return from_nchw(F.max_pool2d(x, kernel, stride), data_format, "MaxPool")


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
    if not any(before or after for before, after in pads):
        return from_nchw(F.avg_pool2d(x, kernel, stride), data_format, "AvgPool")
    # TF divides by the number of real (unpadded) cells in each window
    total = F.avg_pool2d(pad_spatial(x, pads), kernel, stride, divisor_override=1)
    ones = x.new_ones((1, 1) + tuple(x.shape[2:]))
    count = F.avg_pool2d(pad_spatial(ones, pads), kernel, stride, divisor_override=1)
    return from_nchw(total / count, data_format, "AvgPool")


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
    """y, running mean, running variance, saved mean, saved (biased) variance, as TF's CPU kernel."""
    channel = 1 if check_data_format(data_format, "FusedBatchNorm") else x.dim() - 1
    dims = [d for d in range(x.dim()) if d != channel]
    shape = [-1 if d == channel else 1 for d in range(x.dim())]
    # half/bfloat16 inputs are normalised in the float32 of scale, like TF's mixed-precision kernel
    xf = x.to(scale.dtype)
    if is_training:
        batch_mean = xf.mean(dims)
        batch_var = xf.var(dims, correction=0)
        count = xf.numel() // max(xf.shape[channel], 1)
        unbiased = batch_var * (count / max(count - 1, 1))
        factor = exponential_avg_factor
        if factor != 1.0:
            running_mean = (1.0 - factor) * mean + factor * batch_mean
            running_var = (1.0 - factor) * variance + factor * unbiased
        else:
            running_mean, running_var = batch_mean, unbiased
        used_mean, used_var = batch_mean, batch_var
    else:
        used_mean, used_var = mean, variance
        running_mean, running_var = mean, variance
    inv = torch.rsqrt(used_var + epsilon) * scale
    y = (xf - used_mean.reshape(shape)) * inv.reshape(shape) + offset.reshape(shape)
    return y.to(x.dtype), running_mean, running_var, used_mean, used_var


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


def _resize_scale(in_size: int, out_size: int, align_corners: bool) -> torch.Tensor:
    # float32 division, as TF computes it, so nearest-neighbour picks the same pixels
    if align_corners and out_size > 1:
        return torch.tensor(in_size - 1, dtype=torch.float32) / (out_size - 1)
    return torch.tensor(in_size, dtype=torch.float32) / out_size


def _linear_taps(
    in_size: int, out_size: int, align_corners: bool, half_pixel_centers: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lower and upper source index and the weight of the upper one, per output pixel."""
    scale = _resize_scale(in_size, out_size, align_corners).to(device)
    dst = torch.arange(out_size, dtype=torch.float32, device=device)
    src = (dst + 0.5) * scale - 0.5 if half_pixel_centers else dst * scale
    floor = torch.floor(src)
    lower = floor.clamp(0, in_size - 1).long()
    upper = torch.ceil(src).clamp(0, in_size - 1).long()
    return lower, upper, src - floor


def _resize_size(size: torch.Tensor, op: str) -> tuple[int, int]:
    values = [int(v) for v in size.tolist()]
    if len(values) != 2 or min(values) <= 0:
        raise GraphImportError(f"{op}: size must be 2 positive ints [new_height, new_width], found {values}")
    return values[0], values[1]


@TF_OPS.register("ResizeBilinear")
def resize_bilinear(
    images: torch.Tensor, size: torch.Tensor, *, align_corners: bool = False, half_pixel_centers: bool = False
) -> torch.Tensor:
    out_h, out_w = _resize_size(size, "ResizeBilinear")
    x = images.float()
    y0, y1, wy = _linear_taps(x.shape[1], out_h, align_corners, half_pixel_centers, x.device)
    x0, x1, wx = _linear_taps(x.shape[2], out_w, align_corners, half_pixel_centers, x.device)
    wx = wx[:, None]

    def along_width(rows: torch.Tensor) -> torch.Tensor:
        left = rows.index_select(2, x0)
        return left + (rows.index_select(2, x1) - left) * wx

    top = along_width(x.index_select(1, y0))
    bottom = along_width(x.index_select(1, y1))
    return top + (bottom - top) * wy[:, None, None]


def _nearest_index(
    in_size: int, out_size: int, align_corners: bool, half_pixel_centers: bool, device: torch.device
) -> torch.Tensor:
    scale = _resize_scale(in_size, out_size, align_corners).to(device)
    dst = torch.arange(out_size, dtype=torch.float32, device=device)
    src = (dst + 0.5) * scale if half_pixel_centers else dst * scale
    floor = torch.floor(src)
    if align_corners:  # C roundf: halves go up for these non-negative coordinates
        floor = floor + (src - floor >= 0.5).float()
    return floor.clamp(0, in_size - 1).long()


@TF_OPS.register("ResizeNearestNeighbor")
def resize_nearest_neighbor(
    images: torch.Tensor, size: torch.Tensor, *, align_corners: bool = False, half_pixel_centers: bool = False
) -> torch.Tensor:
    out_h, out_w = _resize_size(size, "ResizeNearestNeighbor")
    rows = _nearest_index(images.shape[1], out_h, align_corners, half_pixel_centers, images.device)
    cols = _nearest_index(images.shape[2], out_w, align_corners, half_pixel_centers, images.device)
    return images.index_select(1, rows).index_select(2, cols)
