"""Reductions into positions chosen by an index: scatter_reduce, scatter(reduce=...), embedding_bag.

Each is a TensorFlow ``UnsortedSegment{Sum,Prod,Max,Min}`` over flat segment ids, with a
``UnsortedSegmentSum`` of ones counting how many elements reached each segment: the count says which
positions were written (``include_self=False`` keeps the rest), divides for ``mean``, and gives
empty bags torch's zeros. ``scatter_reduce``'s segments are the elements of ``x`` (the index's
coordinates, linearised by ``x``'s strides); ``embedding_bag``'s are the bags (a position belongs to
the last offset at or before it: ``UpperBound(offsets, position) - 1``).
"""

from __future__ import annotations

import operator
from typing import Any

import torch

from lightning_saver.errors import UnsupportedOpError
from lightning_saver.formats import tf_dtypes
from lightning_saver.graph.tf_export.builder import GraphBuilder, TfTensor
from lightning_saver.graph.tf_export.ops_index import _coordinates, _updates
from lightning_saver.graph.tf_export.ops_math import axes
from lightning_saver.graph.tf_export.ops_shape import dim_size
from lightning_saver.graph.tf_export.table import TF_EXPORT, Ctx

aten = torch.ops.aten
INT32, INT64, BOOL = tf_dtypes.DT_INT32, tf_dtypes.DT_INT64, tf_dtypes.DT_BOOL
_SEGMENT = {"sum": "UnsortedSegmentSum", "mean": "UnsortedSegmentSum", "prod": "UnsortedSegmentProd",
            "amax": "UnsortedSegmentMax", "amin": "UnsortedSegmentMin"}
_SCATTER_REDUCE = {"add": "sum", "multiply": "prod"}  # scatter(..., reduce=) names


def _segments(g: GraphBuilder, op: str, data: TfTensor, ids: TfTensor, count: Any
              ) -> tuple[TfTensor, TfTensor]:
    """The reduction of ``data`` rows per segment id, and how many rows each segment received."""
    n = count if isinstance(count, TfTensor) else g.scalar(count, INT64)
    reduced = g.op(op, data, ids, n)
    ones = g.op("Fill", g.op("Shape", ids), g.scalar(1, data.dtype))
    return reduced, g.op("UnsortedSegmentSum", ones, ids, n)


def _linear_ids(g: GraphBuilder, coords: TfTensor, x: TfTensor) -> tuple[TfTensor, TfTensor]:
    """Flat element ids of ``x`` for coordinates ``[..., rank]``, and ``x``'s element count."""
    shape = g.cast(g.op("Shape", x), INT64)
    strides = g.op("Cumprod", shape, g.scalar(0, INT32), exclusive=True, reverse=True)
    ids = g.op("Sum", g.op("Mul", coords, strides), g.scalar(-1, INT32))
    return g.reshape(ids, [-1]), g.op("Prod", shape, g.scalar(0, INT32))


def _divide(g: GraphBuilder, total: TfTensor, count: TfTensor) -> TfTensor:
    floating = total.dtype in (tf_dtypes.DT_FLOAT, tf_dtypes.DT_DOUBLE, tf_dtypes.DT_HALF)
    at_least_one = g.op("Maximum", count, g.scalar(1, count.dtype))
    return g.op("RealDiv" if floating else "FloorDiv", total, at_least_one)


def _scatter_reduce(cx: Ctx, x: TfTensor, dim: int, index: TfTensor, src: Any, reduce: str,
                    include_self: bool) -> TfTensor:
    if reduce not in _SEGMENT:
        raise UnsupportedOpError(f"TensorFlow export: scatter_reduce with reduce={reduce!r} is not supported "
                                 f"(supported: {', '.join(_SEGMENT)})")
    g = cx.g
    x = g.cast(x, cx.dtype)
    coords = _coordinates(g, index, axes(dim, x.rank)[0])
    ids, n = _linear_ids(g, coords, x)
    data = g.reshape(_updates(cx, src, index), [-1])
    flat, count = _segments(g, _SEGMENT[reduce], data, ids, n)
    shape = g.op("Shape", x)
    reduced, count = g.op("Reshape", flat, shape), g.op("Reshape", count, shape)
    written = g.op("Greater", count, g.scalar(0, cx.dtype))
    if reduce == "mean":
        total = g.op("AddV2", x, reduced) if include_self else reduced
        if include_self:
            count = g.op("AddV2", count, g.scalar(1, cx.dtype))
        reduced = _divide(g, total, count)
    elif include_self:
        combine = {"sum": "AddV2", "prod": "Mul", "amax": "Maximum", "amin": "Minimum"}[reduce]
        reduced = g.op(combine, x, reduced)
    return g.op("SelectV2", written, reduced, x)


@TF_EXPORT.register(aten.scatter_reduce.two)
def scatter_reduce(cx: Ctx, x: TfTensor, dim: int, index: TfTensor, src: TfTensor, reduce: str, *,
                   include_self: bool = True) -> TfTensor:
    return _scatter_reduce(cx, x, dim, index, src, reduce, include_self)


@TF_EXPORT.register(aten.scatter.reduce, aten.scatter.value_reduce)
def scatter_with_reduce(cx: Ctx, x: TfTensor, dim: int, index: TfTensor, src: Any, *,
                        reduce: str) -> TfTensor:
    if reduce not in _SCATTER_REDUCE:
        raise UnsupportedOpError(f"TensorFlow export: scatter with reduce={reduce!r} is not supported "
                                 "(supported: 'add', 'multiply')")
    return _scatter_reduce(cx, x, dim, index, src, _SCATTER_REDUCE[reduce], True)


_BAG_MODES = {0: "sum", 1: "mean", 2: "max"}


@TF_EXPORT.register(aten._embedding_bag.default, aten._embedding_bag_forward_only.default)
def embedding_bag(cx: Ctx, weight: TfTensor, indices: TfTensor, offsets: TfTensor,
                  scale_grad_by_freq: bool = False, mode: int = 0, sparse: bool = False,
                  per_sample_weights: TfTensor | None = None, include_last_offset: bool = False,
                  padding_idx: int = -1) -> list[TfTensor]:
    picked = {user.args[1] for user in cx.node.users if user.target is operator.getitem}
    if picked - {0}:
        raise UnsupportedOpError("TensorFlow export: embedding_bag's offset2bag, bag_size and max_indices "
                                 "outputs are not supported (only the bags themselves)")
    g = cx.g
    rows = g.op("GatherV2", weight, indices, g.scalar(0, INT32))
    if per_sample_weights is not None:
        weights = g.cast(per_sample_weights, rows.dtype)
        rows = g.op("Mul", rows, g.op("ExpandDims", weights, g.scalar(-1, INT32)))
    ids, bags = _bag_ids(g, indices, offsets, include_last_offset, padding_idx)
    op = "UnsortedSegmentMax" if _BAG_MODES.get(mode) == "max" else "UnsortedSegmentSum"
    reduced, count = _segments(g, op, rows, ids, bags)
    count = g.op("ExpandDims", count, g.scalar(-1, INT32))
    if _BAG_MODES.get(mode) == "mean":
        reduced = _divide(g, reduced, count)
    elif _BAG_MODES.get(mode) == "max":  # an empty bag is zeros in torch (the lowest value in TensorFlow)
        reduced = g.op("SelectV2", g.op("Greater", count, g.scalar(0, rows.dtype)), reduced,
                       g.scalar(0, rows.dtype))
    return [reduced]


def _bag_ids(g: GraphBuilder, indices: TfTensor, offsets: TfTensor, include_last_offset: bool,
             padding_idx: int) -> tuple[TfTensor, Any]:
    """The bag of each index (-1: dropped), and the number of bags."""
    starts = g.cast(offsets, INT64)
    size = dim_size(g, indices, 0)
    limit = g.cast(size, INT64) if isinstance(size, TfTensor) else g.scalar(size, INT64)
    positions = g.op("Range", g.scalar(0, INT64), limit, g.scalar(1, INT64))
    found = g.op("UpperBound", g.reshape(starts, [1, -1]), g.reshape(positions, [1, -1]), out_type=INT64)
    ids = g.op("Sub", g.reshape(found, [-1]), g.scalar(1, INT64))
    bags = dim_size(g, offsets, 0)
    bags = g.cast(bags, INT64) if isinstance(bags, TfTensor) else g.scalar(bags, INT64)
    none = g.scalar(-1, INT64)
    if include_last_offset:  # the last offset closes the last bag: positions after it belong to none
        bags = g.op("Sub", bags, g.scalar(1, INT64))
        ids = g.op("SelectV2", g.op("Less", ids, bags), ids, none)
    if padding_idx >= 0:  # padding entries count for nothing, not even a bag's size
        ids = g.op("SelectV2", g.op("Equal", g.cast(indices, INT64), g.scalar(padding_idx, INT64)), none, ids)
    return ids, bags
