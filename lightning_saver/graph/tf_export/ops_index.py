"""Gathers, scatters and in-place writes made functional: ATen -> TensorFlow.

``torch.gather``/``scatter`` index one axis per element: TensorFlow's ``GatherNd`` and
``TensorScatterUpdate``/``TensorScatterAdd`` take full coordinates, so each converter stacks the
index with ``Range`` iotas of the other axes (broadcast to the index's shape). In-place writes
(``x[:, 0:3] = 1``, Swin's window mask, ``torch.roll``) reach us functionalized as
``slice_scatter``/``select_scatter``/``index_put``/``copy``: slices become a ``ConcatV2`` of the
untouched parts and the new values, masks a ``SelectV2``, integer indices a ``TensorScatterUpdate``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lightning_saver.errors import UnsupportedOpError
from lightning_saver.formats import tf_dtypes
from lightning_saver.graph.capture import static_size
from lightning_saver.graph.tf_export.builder import GraphBuilder, TfTensor
from lightning_saver.graph.tf_export.ops_math import axes, operand
from lightning_saver.graph.tf_export.ops_select import bool_index, masked_index, masked_put
from lightning_saver.graph.tf_export.ops_shape import _positive_index, _strided_slice, dim_size
from lightning_saver.graph.tf_export.table import TF_EXPORT, Ctx

aten = torch.ops.aten
INT32, INT64, BOOL = tf_dtypes.DT_INT32, tf_dtypes.DT_INT64, tf_dtypes.DT_BOOL


def _shape_of(g: GraphBuilder, x: TfTensor) -> TfTensor:
    if x.shape is not None and all(d is not None for d in x.shape):
        return g.int_vector(list(x.shape))
    return g.op("Shape", x)


def _coordinates(g: GraphBuilder, index: TfTensor, dim: int) -> TfTensor:
    """Full coordinates ``[..., rank]`` for torch.gather/scatter's ``index`` along ``dim``."""
    rank = index.rank or 0
    shape = _shape_of(g, index)
    columns = []
    for axis in range(rank):
        if axis == dim:
            columns.append(g.cast(index, INT64))
            continue
        size = dim_size(g, index, axis)
        limit = size if isinstance(size, TfTensor) else g.scalar(size, INT32)
        iota = g.op("Range", g.scalar(0, INT32), limit, g.scalar(1, INT32))
        iota = g.reshape(iota, [-1 if a == axis else 1 for a in range(rank)])
        columns.append(g.cast(g.op("BroadcastTo", iota, shape), INT64))
    return g.op("Pack", columns, axis=rank)


@TF_EXPORT.register(aten.gather.default)
def gather(cx: Ctx, x: TfTensor, dim: int, index: TfTensor, *, sparse_grad: bool = False) -> TfTensor:
    return cx.g.op("GatherNd", x, _coordinates(cx.g, index, axes(dim, x.rank)[0]))


def _updates(cx: Ctx, src: Any, index: TfTensor) -> TfTensor:
    g = cx.g
    if not isinstance(src, TfTensor):  # scatter.value: one value everywhere the index points
        return g.op("Fill", _shape_of(g, index), g.scalar(src, cx.dtype))
    src = g.cast(src, cx.dtype)
    if src.shape is not None and src.shape == index.shape and None not in src.shape:
        return src
    # torch reads src only where index has elements: its leading corner of index's shape
    return g.op("Slice", src, g.const(np.zeros(index.rank or 0, np.int32)), _shape_of(g, index))


@TF_EXPORT.register(aten.scatter.src, aten.scatter.value, aten.scatter_add.default)
def scatter(cx: Ctx, x: TfTensor, dim: int, index: TfTensor, src: Any, *,
            reduce: str | None = None) -> TfTensor:
    if reduce is not None:
        raise UnsupportedOpError(f"TensorFlow export: scatter with reduce={reduce!r} is not supported")
    op = "TensorScatterAdd" if cx.node.target is aten.scatter_add.default else "TensorScatterUpdate"
    g = cx.g
    coords = _coordinates(g, index, axes(dim, x.rank)[0])
    return g.op(op, g.cast(x, cx.dtype), coords, _updates(cx, src, index))


# --- advanced indexing -----------------------------------------------------------------------


def _broadcast(g: GraphBuilder, tensors: list[TfTensor]) -> list[TfTensor]:
    shapes = [t.shape for t in tensors]
    if any(s is None or None in s for s in shapes):
        # a dynamic batch: adding zeros of every index broadcasts each to the common shape
        zeros = [g.op("ZerosLike", t) for t in tensors]
        total = zeros[0]
        for z in zeros[1:]:
            total = g.op("AddV2", total, z)
        rank = max(len(s or ()) for s in shapes)
        known = _static_broadcast(shapes, rank)
        return [g.op("AddV2", t, total, out_shape=known) for t in tensors]
    target = tuple(np.broadcast_shapes(*shapes))  # type: ignore[arg-type]
    return [t if t.shape == target else g.op("BroadcastTo", t, g.int_vector(list(target)), out_shape=target)
            for t in tensors]


def _static_broadcast(shapes: list[Any], rank: int) -> tuple[int | None, ...]:
    """The broadcast shape, with None where a size is dynamic."""
    out: list[int | None] = []
    for k in range(rank):
        sizes = [s[len(s) - rank + k] for s in shapes if s is not None and len(s) - rank + k >= 0]
        known = [d for d in sizes if d is not None and d != 1]
        out.append(known[0] if known else (1 if None not in sizes else None))
    return tuple(out)


class _Indexing:
    """x[i0, i1, ...] with integer index tensors: x transposed so the indexed axes lead, the indices
    broadcast and stacked as GatherNd/TensorScatter coordinates, and where torch puts the result."""

    def __init__(self, g: GraphBuilder, x: TfTensor, indices: Sequence[TfTensor | None]) -> None:
        used = [(i, t) for i, t in enumerate(indices) if t is not None]
        if not used or any(t.dtype == BOOL for _, t in used):
            raise UnsupportedOpError("TensorFlow export: a boolean mask together with other index tensors "
                                     "(x[mask, idx]) is not supported; supported: one mask (x[mask], "
                                     "x[:, mask]) or integer index tensors")
        rank = x.rank or 0
        self.positions = [i for i, _ in used]
        self.rest = [a for a in range(rank) if a not in self.positions]
        self.perm = self.positions + self.rest
        wrapped = [_positive_index(g, t, x, i).with_meta(t.dtype, t.shape) for i, t in used]
        idx = _broadcast(g, [g.cast(t, INT64) for t in wrapped])
        self.batch = len(idx[0].shape or ())
        self.coords = g.op("Pack", idx, axis=self.batch, out_shape=(*(idx[0].shape or ()), len(idx)))
        first = self.positions[0]
        adjacent = self.positions == list(range(first, first + len(used)))
        # torch keeps adjacent indexed axes in place, and puts separated ones first
        self.lead = first if adjacent else 0

    def result_perm(self) -> list[int]:
        """From GatherNd's (index dims, other axes) to torch's order."""
        b, lead, n_rest = self.batch, self.lead, len(self.rest)
        return [b + i for i in range(lead)] + list(range(b)) + [b + i for i in range(lead, n_rest)]


@TF_EXPORT.register(aten.index.Tensor)
def index(cx: Ctx, x: TfTensor, indices: Sequence[TfTensor | None]) -> TfTensor:
    g = cx.g
    mask = bool_index(indices)
    if mask is not None:  # x[mask]: as many rows as the mask has true elements
        return masked_index(g, x, *mask)
    plan = _Indexing(g, x, indices)
    picked = g.op("GatherNd", g.transpose(x, plan.perm), plan.coords)
    return g.transpose(picked, plan.result_perm())


@TF_EXPORT.register(aten.index_put.default)
def index_put(cx: Ctx, x: TfTensor, indices: Sequence[TfTensor | None], values: TfTensor,
              accumulate: bool = False) -> TfTensor:
    g = cx.g
    values = operand(cx, values, cx.dtype)
    used = [(i, t) for i, t in enumerate(indices) if t is not None]
    if len(used) == 1 and used[0][1].dtype == BOOL:
        return _put_mask(cx, x, used[0], values, accumulate)
    plan = _Indexing(g, x, indices)
    rank = x.rank or 0
    # values broadcast to torch's result shape, then brought to GatherNd's order
    inverse = list(np.argsort(plan.result_perm()))
    result_rank = plan.batch + len(plan.rest)
    shape_in_torch_order = _torch_result_shape(g, x, plan)
    full = g.op("BroadcastTo", g.reshape(values, [1] * max(0, result_rank - (values.rank or 0))
                                         + [dim_size(g, values, a) for a in range(values.rank or 0)])
                if (values.rank or 0) < result_rank else values, shape_in_torch_order)
    updates = g.transpose(full, inverse)
    op = "TensorScatterAdd" if accumulate else "TensorScatterUpdate"
    moved = g.op(op, g.transpose(x, plan.perm), plan.coords, updates)
    return g.transpose(moved, list(np.argsort(plan.perm))) if rank else moved


def _torch_result_shape(g: GraphBuilder, x: TfTensor, plan: _Indexing) -> TfTensor:
    batch = [dim_size(g, plan.coords, i) for i in range(plan.batch)]
    rest = [dim_size(g, x, a) for a in plan.rest]
    return g.int_vector(rest[:plan.lead] + batch + rest[plan.lead:])


def _put_mask(cx: Ctx, x: TfTensor, used: tuple[int, TfTensor], values: TfTensor,
              accumulate: bool) -> TfTensor:
    g = cx.g
    first, mask = used
    if values.shape is None or int(np.prod([d or 0 for d in values.shape])) != 1:
        return masked_put(g, x, first, mask, values, accumulate)  # one value per true element
    rank, mask_rank = x.rank or 0, mask.rank or 0
    # the mask covers axes first .. first + mask_rank; trailing axes broadcast
    sizes = [dim_size(g, mask, a) for a in range(mask_rank)]
    mask = g.reshape(mask, sizes + [1] * (rank - first - mask_rank))
    value = g.reshape(values, [])
    new = g.op("AddV2", x, value) if accumulate else value
    return g.op("SelectV2", mask, new, x)


# --- in-place writes, functionalized ---------------------------------------------------------


def _bounds(size: Any, start: Any, end: Any) -> tuple[int, int]:
    if not isinstance(size, int):
        raise UnsupportedOpError("TensorFlow export: slice_scatter along a dynamic dimension is not "
                                 "supported")
    begin = 0 if start is None else int(start)
    stop = size if end is None else min(int(end), size)
    begin, stop = (begin + size if begin < 0 else begin), (stop + size if stop < 0 else stop)
    return max(0, min(begin, size)), max(0, min(stop, size))


@TF_EXPORT.register(aten.slice_scatter.default)
def slice_scatter(cx: Ctx, x: TfTensor, src: TfTensor, dim: int = 0, start: Any = None, end: Any = None,
                  step: int = 1) -> TfTensor:
    g = cx.g
    dim = axes(dim, x.rank)[0]
    size = x.shape[dim] if x.shape is not None else None
    src = g.cast(src, x.dtype)
    whole = end is None or (isinstance(end, int) and (end >= 2**31 - 1
                                                      or (isinstance(size, int) and end >= size)))
    if start in (None, 0) and whole and step == 1:
        return src  # the slice is all of x (x[:, idx] = v writes through x[0:big])
    begin, stop = _bounds(size, start, end)
    if step == 1:
        parts = []
        if begin > 0:
            parts.append(_strided_slice(g, x, dim, 0, begin, 1, shrink=False))
        parts.append(src)
        if stop < size:  # type: ignore[operator]
            parts.append(_strided_slice(g, x, dim, stop, None, 1, shrink=False))
        return parts[0] if len(parts) == 1 else g.op("ConcatV2", parts, g.scalar(dim, INT32))
    perm = [dim] + [a for a in range(x.rank or 0) if a != dim]
    rows = g.const(np.arange(begin, stop, step, dtype=np.int64).reshape(-1, 1))
    moved = g.op("TensorScatterUpdate", g.transpose(x, perm), rows, g.transpose(src, perm))
    return g.transpose(moved, list(np.argsort(perm)))


@TF_EXPORT.register(aten.select_scatter.default)
def select_scatter(cx: Ctx, x: TfTensor, src: TfTensor, dim: int, index: int) -> TfTensor:
    dim = axes(dim, x.rank)[0]
    size = x.shape[dim] if x.shape is not None else None
    position = index + size if isinstance(size, int) and index < 0 else index
    expanded = cx.g.op("ExpandDims", src, cx.g.scalar(dim, INT32))
    return slice_scatter(cx, x, expanded, dim, position, position + 1, 1)


@TF_EXPORT.register(aten.copy.default)
def copy(cx: Ctx, x: TfTensor, src: TfTensor, non_blocking: bool = False) -> TfTensor:
    g = cx.g
    value = operand(cx, src, x.dtype)
    if value.shape == x.shape and x.shape is not None and None not in x.shape:
        return value
    return g.op("BroadcastTo", value, _shape_of(g, x))


@TF_EXPORT.register(aten.as_strided.default)
def as_strided(cx: Ctx, x: TfTensor, size: Sequence[Any], stride: Sequence[Any],
               storage_offset: Any = None) -> TfTensor:
    """A view over x's storage. The same elements in the same order (a restride after ``permute``,
    as AdaptiveAvgPool2d leaves it) is the identity; otherwise, with static shapes, a constant gather."""
    source, out = cx.node.args[0].meta["val"], cx.node.meta["val"]  # type: ignore[union-attr]
    if _same_elements(source, out):
        return x
    try:
        positions = _storage_positions(source)
        wanted = _strided_positions(out.shape, out.stride(), out.storage_offset())
    except TypeError:
        raise UnsupportedOpError("TensorFlow export: as_strided needs static shapes unless it keeps "
                                 "the input's element order") from None
    where = {int(p): i for i, p in enumerate(positions.ravel())}
    if any(int(p) not in where for p in wanted.ravel()):
        raise UnsupportedOpError("TensorFlow export: as_strided reads storage outside its input")
    picked = np.asarray([where[int(p)] for p in wanted.ravel()], np.int64)
    g = cx.g
    flat = g.op("GatherV2", g.reshape(x, [-1]), g.const(picked), g.scalar(0, INT32))
    return g.reshape(flat, list(wanted.shape))


def _same_elements(source: torch.Tensor, out: torch.Tensor) -> bool:
    def key(t: torch.Tensor) -> list[tuple[str, str]]:
        return [(str(n), str(s) if str(n) != "1" else "-") for n, s in zip(t.shape, t.stride(), strict=True)]

    return (len(source.shape) == len(out.shape) and key(source) == key(out)
            and str(source.storage_offset()) == str(out.storage_offset()))


def _static(value: Any) -> int:
    size = static_size(value)
    if size is None:
        raise TypeError("symbolic size")
    return size


def _strided_positions(shape: Sequence[Any], stride: Sequence[Any], offset: Any) -> np.ndarray:
    dims = [_static(d) for d in shape]
    stride, offset = [_static(s) for s in stride], _static(offset)
    grids = np.indices(dims, dtype=np.int64) if dims else np.zeros((0,), np.int64)
    return offset + sum((grids[k] * stride[k] for k in range(len(dims))), np.zeros(dims, np.int64))


def _storage_positions(t: torch.Tensor) -> np.ndarray:
    return _strided_positions(t.shape, t.stride(), t.storage_offset())


@TF_EXPORT.register(aten.empty_permuted.default, aten.empty.memory_format)
def empty(cx: Ctx, size: Sequence[Any], *_: Any, **__: Any) -> TfTensor:
    # uninitialized memory in torch, written before it is read (``empty_like(x).copy_(y)``): zeros here
    return cx.g.op("Fill", cx.g.int_vector(list(size)), cx.g.scalar(0, cx.dtype))


@TF_EXPORT.register(aten.empty_like.default)
def empty_like(cx: Ctx, x: TfTensor, **_: Any) -> TfTensor:
    return cx.g.op("Fill", _shape_of(cx.g, x), cx.g.scalar(0, cx.dtype))
