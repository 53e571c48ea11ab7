"""Sampling at computed positions: ``F.grid_sample`` and ``Tensor.unfold`` windows: ATen -> TF.

TensorFlow has no grid sampler, so ``grid_sampler_2d`` is built from ``GatherNd`` reads of the
NHWC image at the integer neighbours of each grid point, with torch's arithmetic: the grid is
unnormalised as ``(g + 1) * size / 2 - 0.5`` (``(g + 1) * (size - 1) / 2`` with
``align_corners=True``), clipped to the image for ``padding_mode="border"`` (mirrored into it first
for ``"reflection"``, as torch's ``reflect_coordinates``); bilinear weights are
products of the fractional offsets, and neighbours outside the image read zeros. ``nearest`` rounds
half to even, like torch's ``nearbyint`` (TensorFlow's ``Round``). Bicubic sampling is refused with
``UnsupportedOpError``.
"""

from __future__ import annotations

import numpy as np
import torch

from lightning_saver.errors import UnsupportedOpError
from lightning_saver.formats import tf_dtypes
from lightning_saver.graph.tf_export.builder import GraphBuilder, TfTensor
from lightning_saver.graph.tf_export.ops_math import axes
from lightning_saver.graph.tf_export.ops_shape import _strided_slice, dim_size
from lightning_saver.graph.tf_export.table import TF_EXPORT, Ctx

aten = torch.ops.aten
INT32, BOOL = tf_dtypes.DT_INT32, tf_dtypes.DT_BOOL
_MODES = {0: "bilinear", 1: "nearest", 2: "bicubic"}
_PADDING = {0: "zeros", 1: "border", 2: "reflection"}


def _number(g: GraphBuilder, size: int | TfTensor, dtype: int) -> TfTensor:
    return g.cast(size, dtype) if isinstance(size, TfTensor) else g.scalar(size, dtype)


class _Image:
    """An NCHW image as NHWC, read at integer positions with zeros outside."""

    def __init__(self, g: GraphBuilder, image: TfTensor, grid: TfTensor) -> None:
        self.g = g
        self.nhwc = g.transpose(image, [0, 2, 3, 1])
        self.height, self.width = dim_size(g, image, 2), dim_size(g, image, 3)
        batch = dim_size(g, grid, 0)
        iota = g.op("Range", g.scalar(0, INT32), _number(g, batch, INT32), g.scalar(1, INT32))
        points = g.op("Shape", _strided_slice(g, grid, 3, 0, None, 1, shrink=True))
        self.batch = g.op("BroadcastTo", g.reshape(iota, [-1, 1, 1]), points)

    def read(self, x: TfTensor, y: TfTensor) -> TfTensor:
        """Pixels at integer (x, y) [N, Ho, Wo] (float), as [N, Ho, Wo, C]; zeros outside the image."""
        g = self.g
        xi, yi = g.cast(x, INT32), g.cast(y, INT32)
        inside = g.op("LogicalAnd",
                      g.op("LogicalAnd", g.op("GreaterEqual", xi, g.scalar(0, INT32)),
                           g.op("Less", xi, _number(g, self.width, INT32))),
                      g.op("LogicalAnd", g.op("GreaterEqual", yi, g.scalar(0, INT32)),
                           g.op("Less", yi, _number(g, self.height, INT32))))
        xc = self._clip(xi, self.width)
        yc = self._clip(yi, self.height)
        values = g.op("GatherNd", self.nhwc, g.op("Pack", [self.batch, yc, xc], axis=3))
        zeros = g.op("ZerosLike", values)
        return g.op("SelectV2", g.op("ExpandDims", inside, g.scalar(-1, INT32)), values, zeros)

    def _clip(self, i: TfTensor, size: int | TfTensor) -> TfTensor:
        g = self.g
        last = g.op("Sub", _number(g, size, INT32), g.scalar(1, INT32))
        return g.op("Minimum", g.op("Maximum", i, g.scalar(0, INT32)), last)


def _source_index(g: GraphBuilder, coord: TfTensor, size: int | TfTensor, align_corners: bool,
                  padding: str) -> TfTensor:
    dtype = coord.dtype
    n = _number(g, size, dtype)
    if align_corners:  # (g + 1) * ((size - 1) / 2), as torch's vectorized CPU kernel computes it
        scale = g.op("Mul", g.op("Sub", n, g.scalar(1, dtype)), g.scalar(0.5, dtype))
        index = g.op("Mul", g.op("AddV2", coord, g.scalar(1, dtype)), scale)
    else:  # (g + 1) * (size / 2) - 0.5
        scale = g.op("Mul", n, g.scalar(0.5, dtype))
        index = g.op("Mul", g.op("AddV2", coord, g.scalar(1, dtype)), scale)
        index = g.op("Sub", index, g.scalar(0.5, dtype))
    if padding == "reflection":
        index = _reflect(g, index, size, align_corners)
    if padding in ("border", "reflection"):
        last = g.op("Sub", n, g.scalar(1, dtype))
        index = g.op("Minimum", g.op("Maximum", index, g.scalar(0, dtype)), last)
    return index


def _static_hw(image: TfTensor) -> bool:
    return image.shape is not None and all(isinstance(d, int) for d in image.shape[2:])


def _reflect(g: GraphBuilder, index: TfTensor, size: int | TfTensor, align_corners: bool) -> TfTensor:
    """torch's ``reflect_coordinates`` (its vectorized CPU form): fold ``index`` into the image by
    mirroring at the borders (pixel centres with align_corners, pixel edges without)."""
    dtype = index.dtype
    twice_low, twice_high = (0, 2 * (size - 1)) if align_corners else (-1, 2 * size - 1)  # type: ignore[operator]
    if twice_low == twice_high:
        return g.op("ZerosLike", index)
    low, span = g.scalar(twice_low / 2, dtype), g.scalar((twice_high - twice_low) / 2, dtype)
    distance = g.op("Abs", g.op("Sub", index, low))
    flips = g.op("Floor", g.op("RealDiv", distance, span))
    extra = g.op("Sub", distance, g.op("Mul", flips, span))
    odd = g.op("Equal", g.op("FloorMod", flips, g.scalar(2, dtype)), g.scalar(1, dtype))
    return g.op("SelectV2", odd, g.op("AddV2", g.op("Sub", span, extra), low), g.op("AddV2", extra, low))


@TF_EXPORT.register(aten.grid_sampler_2d.default)
def grid_sampler_2d(cx: Ctx, image: TfTensor, grid: TfTensor, interpolation_mode: int, padding_mode: int,
                    align_corners: bool) -> TfTensor:
    mode, padding = _MODES.get(interpolation_mode), _PADDING.get(padding_mode)
    if mode not in ("bilinear", "nearest") or padding is None or (padding == "reflection"
                                                                 and not _static_hw(image)):
        raise UnsupportedOpError(f"TensorFlow export: grid_sample with mode={mode!r}, "
                                 f"padding_mode={padding!r} is not supported (supported: mode 'bilinear' or "
                                 "'nearest' with padding_mode 'zeros', 'border' or 'reflection' (static "
                                 "image size), align_corners either way)")
    g = cx.g
    pixels = _Image(g, image, grid)
    gx, gy = (_strided_slice(g, grid, 3, k, None, 1, shrink=True) for k in (0, 1))
    x = _source_index(g, gx, pixels.width, align_corners, padding)
    y = _source_index(g, gy, pixels.height, align_corners, padding)
    if mode == "nearest":
        out = pixels.read(g.op("Round", x), g.op("Round", y))
    else:
        out = _bilinear(g, pixels, x, y)
    return g.transpose(out, [0, 3, 1, 2])


def _bilinear(g: GraphBuilder, pixels: _Image, x: TfTensor, y: TfTensor) -> TfTensor:
    west, north = g.op("Floor", x), g.op("Floor", y)
    one = g.scalar(1, x.dtype)
    east, south = g.op("AddV2", west, one), g.op("AddV2", north, one)
    w, n = g.op("Sub", x, west), g.op("Sub", y, north)  # offsets from the north-west neighbour
    e, s = g.op("Sub", one, w), g.op("Sub", one, n)

    def term(px: TfTensor, py: TfTensor, a: TfTensor, b: TfTensor) -> TfTensor:
        return g.op("Mul", pixels.read(px, py), g.op("ExpandDims", g.op("Mul", a, b), g.scalar(-1, INT32)))

    total = g.op("AddV2", term(west, north, s, e), term(east, north, s, w))
    total = g.op("AddV2", total, term(west, south, n, e))
    return g.op("AddV2", total, term(east, south, n, w))


@TF_EXPORT.register(aten.unfold.default)
def unfold(cx: Ctx, x: TfTensor, dimension: int, size: int, step: int) -> TfTensor:
    """``x.unfold(dim, size, step)``: windows along ``dim``, each window's elements in a new last axis."""
    g = cx.g
    rank = x.rank or 0
    dim = axes(dimension, max(rank, 1))[0]
    length = dim_size(g, x, dim) if rank else 1
    if not isinstance(length, int):
        raise UnsupportedOpError("TensorFlow export: Tensor.unfold along a dynamic dimension is not "
                                 "supported (only the batch may be dynamic)")
    count = (length - size) // step + 1
    positions = np.arange(count)[:, None] * step + np.arange(size)[None, :]
    if rank == 0:
        return g.reshape(x, [1])
    windows = g.op("GatherV2", x, g.const(positions.astype(np.int32)), g.scalar(dim, INT32))
    # GatherV2 gives (..., count, size, rest...): torch appends the window axis last
    return g.transpose(windows, [*range(dim + 1), *range(dim + 2, rank + 1), dim + 1])
