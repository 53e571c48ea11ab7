"""TensorFlow import converters: bias, 2-D/3-D convolutions and pooling.

Every converter follows the contract in :mod:`lightning_saver.graph.tf_import.table`; layouts and
padding come from :mod:`lightning_saver.graph.tf_import.layout`. Example::

    y = table.call("Conv2D", [x, w], {"strides": [1, 2, 2, 1], "padding": "SAME"})
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

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
    torch_pool_padding,
)
from lightning_saver.graph.tf_import.table import TF_OPS

_ONES = (1, 1, 1, 1)
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {2: F.avg_pool2d, 3: F.avg_pool3d}


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
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """A 2-D/3-D convolution with TF padding; ``weight`` is already O, I, spatial; ``bias`` per O."""
    stride = spatial_attr(strides, data_format, "strides", op)
    dilation = spatial_attr(dilations, data_format, "dilations", op)
    x = to_nchw(x, data_format, op)
    pads = spatial_pads(
        x.shape[2:], weight.shape[2:], stride, dilation, padding, explicit_paddings, data_format, op
    )
    torch_pad = symmetric(pads)
    if torch_pad is None:
        x, torch_pad = pad_spatial(x, pads), (0,) * len(pads)
    y = _CONV[len(stride)](x, weight, bias, stride, torch_pad, dilation, groups)
    return from_nchw(y, data_format, op)


def _grouped_weight(
    op: str, x: torch.Tensor, filter: torch.Tensor, data_format: str
) -> tuple[torch.Tensor, int]:
    """A TF filter (spatial..., in, out) as torch's (out, in, spatial...) weight, and the group count."""
    in_channels = int(x.shape[1] if check_data_format(data_format, op) else x.shape[-1])
    per_group = filter.shape[-2]
    if in_channels % per_group:
        raise GraphImportError(
            f"{op}: input has {in_channels} channels, not a multiple of the filter's {per_group}"
        )
    spatial = range(filter.dim() - 2)
    return filter.permute(filter.dim() - 1, filter.dim() - 2, *spatial), in_channels // per_group


def conv_weight(op: str, input: torch.Tensor, filter: torch.Tensor,
                data_format: str) -> tuple[torch.Tensor, int]:
    """Torch's (O, I, spatial...) view of a Conv2D/Conv3D/DepthwiseConv2dNative filter, and the groups."""
    if op != "DepthwiseConv2dNative":
        return _grouped_weight(op, input, filter, data_format)
    height, width, channels, multiplier = filter.shape
    # TF orders output channels as in_channel * multiplier + m, which is torch's grouped order
    return filter.permute(2, 3, 0, 1).reshape(channels * multiplier, 1, height, width), channels


def conv_layout(
    op: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    groups: int,
    *,
    strides: Sequence[int],
    padding: str,
    explicit_paddings: Sequence[int] = (),
    data_format: str = "NHWC",
    dilations: Sequence[int] = _ONES,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """A convolution whose weight is already in torch's layout (see :func:`conv_weight`), with TF's attrs."""
    return _conv(op, x, weight, groups, strides, padding, explicit_paddings, data_format, dilations, bias)


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
    weight, groups = _grouped_weight("Conv2D", input, filter, data_format)  # HWIO -> OIHW
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
    op = "DepthwiseConv2dNative"
    weight, channels = conv_weight(op, input, filter, data_format)
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
    sizes = [int(s) for s in input_sizes.tolist()]
    return _backprop_input("Conv2DBackpropInput", sizes, filter, out_backprop,
                           strides, padding, explicit_paddings, data_format, dilations)


@TF_OPS.register("Conv3DBackpropInputV2")
def conv3d_backprop_input_v2(
    input_sizes: torch.Tensor,
    filter: torch.Tensor,
    out_backprop: torch.Tensor,
    *,
    strides: Sequence[int],
    padding: str,
    data_format: str = "NDHWC",
    dilations: Sequence[int] = (1, 1, 1, 1, 1),
) -> torch.Tensor:
    return _backprop_input("Conv3DBackpropInputV2", [int(s) for s in input_sizes.tolist()], filter,
                           out_backprop, strides, padding, (), data_format, dilations)


def _backprop_input(
    op: str,
    sizes: list[int],
    filter: torch.Tensor,
    out_backprop: torch.Tensor,
    strides: Sequence[int],
    padding: str,
    explicit_paddings: Sequence[int],
    data_format: str,
    dilations: Sequence[int],
) -> torch.Tensor:
    """The input gradient of a 2-D/3-D convolution whose input had ``sizes`` (full or spatial only)."""
    rank = filter.dim() - 2
    stride = spatial_attr(strides, data_format, "strides", op)
    dilation = spatial_attr(dilations, data_format, "dilations", op)
    groups = 1
    if len(sizes) == rank + 2:
        channels_first = check_data_format(data_format, op)
        groups = max(sizes[1 if channels_first else -1] // int(filter.shape[-2]), 1)
        sizes = sizes[2:] if channels_first else sizes[1:-1]
    grad = to_nchw(out_backprop, data_format, op)
    kernel = filter.shape[:rank]
    pads = spatial_pads(sizes, kernel, stride, dilation, padding, explicit_paddings, data_format, op)
    weight = filter.permute(rank + 1, rank, *range(rank))  # spatial, I, O -> O, I, spatial
    transpose = F.conv_transpose2d if rank == 2 else F.conv_transpose3d
    # the full transposed output covers the padded input from its first row: crop `before` rows,
    # keep `size`, and zero-fill rows the forward conv never reached. torch's padding and
    # output_padding do exactly that when the extra rows at the end are few enough
    full = [(o - 1) * s + d * (k - 1) + 1
            for o, s, d, k in zip(grad.shape[2:], stride, dilation, kernel, strict=True)]
    befores = tuple(before for before, _ in pads)
    extra = tuple(size - f + 2 * b for size, f, b in zip(sizes, full, befores, strict=True))
    if all(0 <= e < max(s, d) for e, s, d in zip(extra, stride, dilation, strict=True)):
        y = transpose(grad, weight, None, stride, befores, extra, groups, dilation)
        return from_nchw(y, data_format, op)
    y = transpose(grad, weight, None, stride, 0, 0, groups, dilation)
    crop = tuple((-b, b + size - f) for b, size, f in zip(befores, sizes, full, strict=True))
    return from_nchw(pad_spatial(y, crop), data_format, op)


_PoolFn = Callable[[torch.Tensor, tuple[int, ...], tuple[int, ...], Pads], torch.Tensor]


def _pool(
    op: str,
    pool: _PoolFn,
    input: torch.Tensor,
    ksize: Sequence[int],
    strides: Sequence[int],
    padding: str,
    explicit_paddings: Sequence[int],
    data_format: str,
) -> torch.Tensor:
    """A 2-D/3-D pooling with TF's attrs: layout and padding resolved here, ``pool`` on NC* data."""
    x = to_nchw(input, data_format, op)
    kernel, stride, pads = pool_geometry(op, x.shape[2:], tuple(ksize), tuple(strides), padding,
                                         tuple(explicit_paddings), data_format)
    return from_nchw(pool(x, kernel, stride, pads), data_format, op)


# the attrs and sizes of a pooling are the same call after call: resolving them in Python took
# half of a 1x32x32x16 MaxPool's time (13 of 25 us), so the answers are kept (errors are not)
@functools.lru_cache(maxsize=512)
def pool_geometry(op: str, sizes: tuple[int, ...], ksize: tuple[int, ...], strides: tuple[int, ...],
                  padding: str, explicit_paddings: tuple[int, ...],
                  data_format: str) -> tuple[tuple[int, ...], tuple[int, ...], Pads]:
    kernel = spatial_attr(ksize, data_format, "ksize", op)
    stride = spatial_attr(strides, data_format, "strides", op)
    dilation = (1,) * len(kernel)
    pads = spatial_pads(sizes, kernel, stride, dilation, padding, explicit_paddings, data_format, op)
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
    if (data_format == "NHWC" and list(ksize) == list(strides) and padding in ("VALID", "SAME")
            and len(ksize) == 4 and ksize[0] == ksize[3] == 1):
        tiled = tiled_max_pool(input, int(ksize[1]), int(ksize[2]))
        if tiled is not None:
            return tiled
    return _pool("MaxPool", _max_pool, input, ksize, strides, padding, explicit_paddings, data_format)


_TILED_MIN_SIZE = 1 << 15  # below this torch's pooling was as fast (1x32x32x16: 15 us either way)


def tiled_max_pool(x: torch.Tensor, kh: int, kw: int) -> torch.Tensor | None:
    """Max over non-overlapping ``kh x kw`` tiles of an NHWC image that they cover exactly, as
    element-wise maxima of strided views; None where that does not apply.

    torch's channels-last ``max_pool2d`` took 81 us on 8x32x32x16 (2x2, stride 2) against 44 us
    this way. Not under autograd: ``torch.maximum`` splits a tie's gradient where TF's pooling
    gives it to one input.
    """
    if (x.dim() != 4 or not x.is_floating_point() or (x.requires_grad and torch.is_grad_enabled())
            or x.numel() < _TILED_MIN_SIZE or not x.is_contiguous()):
        return None
    n, h, w, c = x.shape
    if h % kh or w % kw or kh * kw == 1:
        return None
    return tiled_max_pool_views(x, kh, kw)


def tiled_max_pool_views(x: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """The maxima of :func:`tiled_max_pool`, its checks already passed (a contiguous NHWC float
    image that the tiles cover exactly, no autograd)."""
    n, h, w, c = x.shape
    tiles = x.view(n, h // kh, kh, w // kw, kw * c)
    rows = tiles[:, :, 0]
    for i in range(1, kh):
        rows = torch.maximum(rows, tiles[:, :, i])
    out = rows[..., :c]
    for j in range(1, kw):
        out = torch.maximum(out, rows[..., j * c:(j + 1) * c])
    return out


def _max_pool(x: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], pads: Pads) -> torch.Tensor:
    pool = _MAX_POOL[len(kernel)]
    torch_args = torch_pool_padding(x.shape[2:], kernel, stride, pads)
    if torch_args is not None:
        return pool(x, kernel, stride, torch_args[0], ceil_mode=torch_args[1])
    # padded cells never win a max, whatever the sign of the data
    return pool(pad_spatial(x, pads, value=float("-inf")), kernel, stride)


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
    return _pool("AvgPool", _avg_pool, value, ksize, strides, padding, (), data_format)


def _avg_pool(x: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], pads: Pads) -> torch.Tensor:
    """TF's average: the divisor counts only the real (unpadded) cells of each window."""
    pool = _AVG_POOL[len(kernel)]
    torch_args = torch_pool_padding(x.shape[2:], kernel, stride, pads)
    if torch_args is not None:
        return pool(x, kernel, stride, torch_args[0], ceil_mode=torch_args[1], count_include_pad=False)
    total = pool(pad_spatial(x, pads), kernel, stride, divisor_override=1)
    ones = x.new_ones((1, 1) + tuple(x.shape[2:]))
    return total / pool(pad_spatial(ones, pads), kernel, stride, divisor_override=1)


@TF_OPS.register("Conv3D")
def conv3d(
    input: torch.Tensor,
    filter: torch.Tensor,
    *,
    strides: Sequence[int],
    padding: str,
    data_format: str = "NDHWC",
    dilations: Sequence[int] = (1, 1, 1, 1, 1),
) -> torch.Tensor:
    weight, groups = _grouped_weight("Conv3D", input, filter, data_format)  # DHWIO -> OIDHW
    return _conv("Conv3D", input, weight, groups, strides, padding, (), data_format, dilations)


@TF_OPS.register("MaxPool3D")
def max_pool3d(
    input: torch.Tensor,
    *,
    ksize: Sequence[int],
    strides: Sequence[int],
    padding: str,
    data_format: str = "NDHWC",
) -> torch.Tensor:
    return _pool("MaxPool3D", _max_pool, input, ksize, strides, padding, (), data_format)


@TF_OPS.register("AvgPool3D")
def avg_pool3d(
    input: torch.Tensor,
    *,
    ksize: Sequence[int],
    strides: Sequence[int],
    padding: str,
    data_format: str = "NDHWC",
) -> torch.Tensor:
    return _pool("AvgPool3D", _avg_pool, input, ksize, strides, padding, (), data_format)
