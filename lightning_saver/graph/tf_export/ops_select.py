"""Selections whose size or order depends on the data: boolean masks, nonzero, sort, bucketize.

``x[mask]``, ``masked_select`` and ``nonzero`` have as many rows as the mask has true elements:
torch.export records that count as an unbacked size (``u0``, checked by ``_assert_scalar``), and
TensorFlow computes it the same way, with ``Where`` (the coordinates of the true elements, in
row-major order, as torch lists them) and ``GatherNd``. ``sort`` is ``TopKV2`` over the whole axis
(TensorFlow keeps equal elements in index order, as torch's stable sort does); ``bucketize`` and
``searchsorted`` are ``LowerBound``/``UpperBound`` over rows, and so is ``repeat_interleave`` with
a tensor of repeats (its length is their sum).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lightning_saver.errors import UnsupportedOpError
from lightning_saver.formats import tf_dtypes
from lightning_saver.graph.tf_export.builder import GraphBuilder, TfTensor
from lightning_saver.graph.tf_export.ops_math import axes, operand
from lightning_saver.graph.tf_export.ops_shape import dim_size
from lightning_saver.graph.tf_export.table import TF_EXPORT, Ctx

aten = torch.ops.aten
INT32, INT64, BOOL = tf_dtypes.DT_INT32, tf_dtypes.DT_INT64, tf_dtypes.DT_BOOL


def _mask_axes_first(g: GraphBuilder, x: TfTensor, first: int, mask: TfTensor) -> tuple[TfTensor, list[int]]:
    """x with the masked axes (first .. first + mask rank) moved to the front, and that perm."""
    rank, covered = x.rank or 0, mask.rank or 0
    if covered == 0:
        raise UnsupportedOpError("TensorFlow export: indexing with a 0-d boolean mask is not supported")
    masked = list(range(first, first + covered))
    perm = masked + [a for a in range(rank) if a not in masked]
    return g.transpose(x, perm), perm


def masked_index(g: GraphBuilder, x: TfTensor, first: int, mask: TfTensor) -> TfTensor:
    """``x[..., mask]`` (the mask starting at axis ``first``): one row per true element, in place of
    the masked axes."""
    moved, _ = _mask_axes_first(g, x, first, mask)
    picked = g.op("GatherNd", moved, g.op("Where", mask))
    kept = (x.rank or 0) - (mask.rank or 0)
    # GatherNd gives (rows, axes before first, axes after): torch puts the rows at ``first``
    return g.transpose(picked, [*range(1, first + 1), 0, *range(first + 1, kept + 1)])


def masked_put(g: GraphBuilder, x: TfTensor, first: int, mask: TfTensor, values: TfTensor,
               accumulate: bool) -> TfTensor:
    """``x[..., mask] = values`` with one value per true element (``x[m] = y[m]``)."""
    moved, perm = _mask_axes_first(g, x, first, mask)
    coords = g.op("Where", mask)
    if first:  # values come in torch's order (axes before first, rows, after): rows first here
        values = g.transpose(values, [first, *range(first), *range(first + 1, values.rank or 0)])
    rows = g.op("Shape", coords)
    rest = g.op("StridedSlice", g.op("Shape", moved), [mask.rank or 0], [0], [1], end_mask=1)
    target = g.op("ConcatV2", [g.op("StridedSlice", rows, [0], [1], [1]), rest], g.scalar(0, INT32))
    updates = g.op("BroadcastTo", g.cast(values, x.dtype), target)
    op = "TensorScatterAdd" if accumulate else "TensorScatterUpdate"
    return g.transpose(g.op(op, moved, coords, updates), list(np.argsort(perm)))


@TF_EXPORT.register(aten.nonzero.default)
def nonzero(cx: Ctx, x: TfTensor) -> TfTensor:
    return cx.g.op("Where", x)


@TF_EXPORT.register(aten.masked_select.default)
def masked_select(cx: Ctx, x: TfTensor, mask: TfTensor) -> TfTensor:
    g = cx.g
    if x.shape != mask.shape or x.shape is None or None in x.shape:
        zeros_x, zeros_m = g.op("ZerosLike", x), g.op("ZerosLike", g.cast(mask, x.dtype))
        x = g.op("AddV2", x, zeros_m)  # both broadcast to the common shape
        mask = g.op("NotEqual", g.op("AddV2", g.cast(mask, x.dtype), zeros_x), g.scalar(0, x.dtype))
    return g.op("GatherNd", x, g.op("Where", mask))


def _sort(cx: Ctx, x: TfTensor, dim: int, descending: bool) -> list[TfTensor]:
    g = cx.g
    if x.dtype == BOOL:
        raise UnsupportedOpError("TensorFlow export: sort of a bool tensor is not supported (supported: "
                                 "floating and signed integer tensors); sort x.to(torch.int8) instead")
    rank = x.rank or 1
    dim = axes(dim, rank)[0]
    perm = list(range(rank))
    perm[dim], perm[-1] = perm[-1], perm[dim]
    source = g.transpose(x, perm)  # TopKV2 sorts the last axis
    if not descending:  # the largest of -x first: ascending, equal elements still in index order
        source = g.op("Neg", source)
    k = dim_size(g, x, dim)
    values, indices = g.op("TopKV2", source, k if isinstance(k, TfTensor) else g.scalar(k, INT32),
                           index_type=INT64)
    if not descending:
        values = g.op("Neg", values)
    return [g.transpose(values, perm), g.transpose(indices, perm)]


@TF_EXPORT.register(aten.sort.default)
def sort(cx: Ctx, x: TfTensor, dim: int = -1, descending: bool = False) -> list[TfTensor]:
    return _sort(cx, x, dim, descending)


@TF_EXPORT.register(aten.sort.stable)
def sort_stable(cx: Ctx, x: TfTensor, *, stable: bool | None = None, dim: int = -1,
                descending: bool = False) -> list[TfTensor]:
    return _sort(cx, x, dim, descending)


def _bound(cx: Ctx, sorted_sequence: TfTensor, values: TfTensor, right: bool) -> TfTensor:
    """Per row of ``sorted_sequence`` (its leading dims match ``values``'), the insertion points."""
    g = cx.g
    common = tf_dtypes.DT_DOUBLE if tf_dtypes.DT_DOUBLE in (values.dtype, sorted_sequence.dtype) else (
        values.dtype if values.dtype == sorted_sequence.dtype else tf_dtypes.DT_FLOAT)
    rows = g.reshape(g.cast(sorted_sequence, common), [1, -1] if sorted_sequence.rank == 1
                     else [-1, dim_size(g, sorted_sequence, (sorted_sequence.rank or 1) - 1)])
    flat = g.reshape(g.cast(values, common), [1, -1] if sorted_sequence.rank == 1
                     else [dim_size(g, rows, 0), -1])
    found = g.op("UpperBound" if right else "LowerBound", rows, flat, out_type=cx.dtype)
    return g.op("Reshape", found, g.op("Shape", values, out_type=INT32))


@TF_EXPORT.register(aten.bucketize.Tensor)
def bucketize(cx: Ctx, x: TfTensor, boundaries: TfTensor, *, out_int32: bool = False,
              right: bool = False) -> TfTensor:
    return _bound(cx, boundaries, x, right)


@TF_EXPORT.register(aten.searchsorted.Tensor)
def searchsorted(cx: Ctx, sorted_sequence: TfTensor, x: TfTensor, *, out_int32: bool = False,
                 right: bool = False, side: str | None = None, sorter: TfTensor | None = None) -> TfTensor:
    if sorter is not None:
        raise UnsupportedOpError("TensorFlow export: searchsorted with a sorter is not supported; sort "
                                 "the sequence first (torch.sort) and pass it sorted")
    return _bound(cx, sorted_sequence, x, right or side == "right")


@TF_EXPORT.register(aten.repeat_interleave.Tensor)
def repeat_interleave(cx: Ctx, repeats: TfTensor, *, output_size: Any = None) -> TfTensor:
    """``[0] * r0 + [1] * r1 + ...`` (``index_select`` then repeats the rows): position p belongs to
    the first i whose running total of repeats exceeds p."""
    g = cx.g
    ends = g.op("Cumsum", g.cast(repeats, INT64), g.scalar(0, INT32))
    total = g.op("StridedSlice", ends, [-1], [0], [1], end_mask=1, shrink_axis_mask=1)
    positions = g.op("Range", g.scalar(0, INT64), total, g.scalar(1, INT64))
    found = g.op("UpperBound", g.reshape(ends, [1, -1]), g.reshape(positions, [1, -1]), out_type=INT64)
    return g.reshape(found, [-1])


def _sym_compare(tf_op: str, py_op: Any) -> Any:
    # comparisons of data-dependent sizes (``u0 >= 0``), made for torch's runtime assertions
    def convert(cx: Ctx, a: Any, b: Any) -> Any:
        if not isinstance(a, TfTensor) and not isinstance(b, TfTensor):
            return py_op(a, b)
        return cx.g.op(tf_op, operand(cx, a, INT32), operand(cx, b, INT32), out_shape=())

    convert.__name__ = f"sym_{tf_op}"
    return convert


for _py_op, _tf_op in ((operator.ge, "GreaterEqual"), (operator.gt, "Greater"), (operator.le, "LessEqual"),
                       (operator.lt, "Less"), (operator.eq, "Equal")):
    TF_EXPORT.register(_py_op)(_sym_compare(_tf_op, _py_op))


def bool_index(indices: Sequence[TfTensor | None]) -> tuple[int, TfTensor] | None:
    """(position, mask) when ``indices`` is a single boolean mask (``x[mask]``, ``x[:, mask]``)."""
    used = [(i, t) for i, t in enumerate(indices) if t is not None]
    if len(used) == 1 and used[0][1].dtype == BOOL:
        return used[0]
    return None
