"""Shapes, layout and indexing: view, permute, cat, split, slicing, gather, padding, fills."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lightning_saver.errors import UnsupportedOpError
from lightning_saver.formats import tf_dtypes
from lightning_saver.graph.tf_export.builder import GraphBuilder, TfTensor
from lightning_saver.graph.tf_export.ops_math import axes, operand
from lightning_saver.graph.tf_export.table import TF_EXPORT, Ctx

aten = torch.ops.aten
INT32 = tf_dtypes.DT_INT32
_BIG = 2**31 - 1


def dim_size(g: GraphBuilder, x: TfTensor, dim: int) -> int | TfTensor:
    """Size of ``x`` along ``dim``: an int when static, else an int32 scalar computed from Shape."""
    if x.shape is not None and x.shape[dim] is not None:
        return int(x.shape[dim])  # type: ignore[arg-type]
    shape = g.op("Shape", x)
    return g.op("StridedSlice", shape, [dim], [dim + 1], [1], shrink_axis_mask=1, out_shape=())


def shape_vector(sizes: Sequence[Any]) -> list[Any]:
    """A reshape target where one dynamic size becomes -1, so the shape stays a constant."""
    dynamic = [i for i, s in enumerate(sizes) if isinstance(s, TfTensor)]
    if len(dynamic) == 1 and all(isinstance(s, TfTensor) or s != -1 for s in sizes):
        return [-1 if isinstance(s, TfTensor) else s for s in sizes]
    return list(sizes)


@TF_EXPORT.register(aten.sym_size.int)
def sym_size(cx: Ctx, x: TfTensor, dim: int) -> int | TfTensor:
    return dim_size(cx.g, x, axes(dim, x.rank)[0])


@TF_EXPORT.register(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def view(cx: Ctx, x: TfTensor, size: Sequence[Any]) -> TfTensor:
    return cx.g.reshape(x, shape_vector(size))


@TF_EXPORT.register(aten.permute.default)
def permute(cx: Ctx, x: TfTensor, dims: Sequence[int]) -> TfTensor:
    return cx.g.transpose(x, axes(list(dims), x.rank))


@TF_EXPORT.register(aten.t.default)
def t(cx: Ctx, x: TfTensor) -> TfTensor:
    return cx.g.transpose(x, [1, 0]) if x.rank == 2 else x


@TF_EXPORT.register(aten.transpose.int)
def transpose(cx: Ctx, x: TfTensor, dim0: int, dim1: int) -> TfTensor:
    perm = list(range(x.rank or 0))
    a, b = axes([dim0, dim1], x.rank)
    perm[a], perm[b] = perm[b], perm[a]
    return cx.g.transpose(x, perm)


@TF_EXPORT.register(aten.clone.default, aten.alias.default, aten.detach.default,
                    aten.lift_fresh_copy.default, aten.contiguous.default, aten.dropout.default)
def identity(cx: Ctx, x: TfTensor, *_: Any, **__: Any) -> TfTensor:
    return x  # a copy changes nothing in a dataflow graph; dropout is the identity in eval


@TF_EXPORT.register(aten.flip.default)
def flip(cx: Ctx, x: TfTensor, dims: Sequence[int]) -> TfTensor:
    return cx.g.op("ReverseV2", x, axes(list(dims), x.rank))


@TF_EXPORT.register(aten.unsqueeze.default)
def unsqueeze(cx: Ctx, x: TfTensor, dim: int) -> TfTensor:
    dim = dim % ((x.rank or 0) + 1) if dim < 0 else dim
    return cx.g.op("ExpandDims", x, cx.g.scalar(dim, INT32))


@TF_EXPORT.register(aten.squeeze.dims, aten.squeeze.dim, aten.squeeze.default)
def squeeze(cx: Ctx, x: TfTensor, dim: Any = None) -> TfTensor:
    candidates = axes(dim, x.rank)
    # torch ignores the listed dims that are not of size 1; TF would fail on them
    dims = [d for d in candidates if x.shape is not None and x.shape[d] == 1]
    return cx.g.op("Squeeze", x, squeeze_dims=dims) if dims else x


@TF_EXPORT.register(aten.expand.default)
def expand(cx: Ctx, x: TfTensor, size: Sequence[Any], *, implicit: bool = False) -> TfTensor:
    g = cx.g
    lead = len(size) - (x.rank or 0)
    sizes = [dim_size(g, x, i - lead) if not isinstance(s, TfTensor) and s == -1 else s
             for i, s in enumerate(size)]
    if cx.shape is not None and all(d is not None for d in cx.shape):
        sizes = list(cx.shape)
    return g.op("BroadcastTo", x, g.int_vector(sizes))


@TF_EXPORT.register(aten.repeat.default)
def repeat(cx: Ctx, x: TfTensor, repeats: Sequence[int]) -> TfTensor:
    g = cx.g
    lead = len(repeats) - (x.rank or 0)
    if lead > 0:
        x = g.reshape(x, [1] * lead + [dim_size(g, x, i) for i in range(x.rank or 0)])
    return g.op("Tile", x, g.int_vector(list(repeats)))


@TF_EXPORT.register(aten.cat.default)
def cat(cx: Ctx, tensors: Sequence[TfTensor], dim: int = 0) -> TfTensor:
    parts = [operand(cx, t, cx.dtype) for t in tensors if t.shape is None or 0 not in t.shape]
    if len(parts) == 1:
        return parts[0]
    return cx.g.op("ConcatV2", parts, cx.g.scalar(axes(dim, cx.shape and len(cx.shape))[0], INT32))


@TF_EXPORT.register(aten.stack.default)
def stack(cx: Ctx, tensors: Sequence[TfTensor], dim: int = 0) -> TfTensor:
    parts = [operand(cx, t, cx.dtype) for t in tensors]
    return cx.g.op("Pack", parts, axis=axes(dim, len(cx.shape or ()))[0])


@TF_EXPORT.register(aten.split_with_sizes.default)
def split_with_sizes(cx: Ctx, x: TfTensor, split_sizes: Sequence[int], dim: int = 0) -> list[TfTensor]:
    g = cx.g
    dim = axes(dim, x.rank)[0]
    out = g.op("SplitV", x, g.const(np.asarray(list(split_sizes), np.int32)), g.scalar(dim, INT32),
               num_split=len(split_sizes))
    return [t.with_meta(*cx.out(i)) for i, t in enumerate(out)]


@TF_EXPORT.register(aten.split.Tensor)
def split(cx: Ctx, x: TfTensor, split_size: int, dim: int = 0) -> list[TfTensor]:
    dim = axes(dim, x.rank)[0]
    total = x.shape[dim] if x.shape is not None else None
    if total is None:
        raise UnsupportedOpError("TensorFlow export: split along a dynamic dimension is not supported")
    sizes = [min(split_size, total - start) for start in range(0, total, split_size)]
    return split_with_sizes(cx, x, sizes, dim)


def _strided_slice(g: GraphBuilder, x: TfTensor, dim: int, start: Any, end: Any, step: int,
                   shrink: bool) -> TfTensor:
    rank = x.rank or 0
    begin, stop, strides = [0] * rank, [0] * rank, [1] * rank
    begin_mask = end_mask = 0
    for i in range(rank):
        if i != dim:
            begin_mask |= 1 << i
            end_mask |= 1 << i
    begin[dim], strides[dim] = (0 if start is None else start), step
    if end is None or (isinstance(end, int) and end >= _BIG):
        end_mask |= 1 << dim
    else:
        stop[dim] = end
    if shrink:
        stop[dim] = (begin[dim] + 1) if isinstance(begin[dim], int) and begin[dim] != -1 else 0
        if begin[dim] == -1:
            end_mask |= 1 << dim
    if isinstance(begin[dim], int) and begin[dim] >= _BIG:
        begin[dim] = _BIG
    return g.op("StridedSlice", x, g.int_vector(begin), g.int_vector(stop), g.int_vector(strides),
                begin_mask=begin_mask, end_mask=end_mask, shrink_axis_mask=(1 << dim) if shrink else 0)


@TF_EXPORT.register(aten.slice.Tensor)
def slice_(cx: Ctx, x: TfTensor, dim: int = 0, start: Any = None, end: Any = None, step: int = 1) -> TfTensor:
    dim = axes(dim, x.rank)[0]
    if start in (None, 0) and (end is None or (isinstance(end, int) and end >= _BIG)) and step == 1:
        return x
    return _strided_slice(cx.g, x, dim, start, end, step, shrink=False)


@TF_EXPORT.register(aten.select.int)
def select(cx: Ctx, x: TfTensor, dim: int, index: Any) -> TfTensor:
    dim = axes(dim, x.rank)[0]
    if isinstance(index, int) and index < 0 and x.shape is not None and x.shape[dim] is not None:
        index += x.shape[dim]  # type: ignore[operator]
    return _strided_slice(cx.g, x, dim, index, None, 1, shrink=True)


def _positive_index(g: GraphBuilder, idx: TfTensor, x: TfTensor, axis: int) -> TfTensor:
    # torch wraps negative indices; TF's GatherV2 on CPU rejects them
    if idx.value is not None and (idx.value >= 0).all():
        return idx
    size = dim_size(g, x, axis)
    size_t = operand_int(g, size, idx.dtype)
    return g.op("FloorMod", idx, size_t)


def operand_int(g: GraphBuilder, value: int | TfTensor, dtype: int) -> TfTensor:
    return g.cast(value, dtype) if isinstance(value, TfTensor) else g.scalar(value, dtype)


@TF_EXPORT.register(aten.index_select.default)
def index_select(cx: Ctx, x: TfTensor, dim: int, index: TfTensor) -> TfTensor:
    dim = axes(dim, x.rank)[0]
    return cx.g.op("GatherV2", x, _positive_index(cx.g, index, x, dim), cx.g.scalar(dim, INT32))


@TF_EXPORT.register(aten.embedding.default)
def embedding(cx: Ctx, weight: TfTensor, indices: TfTensor, padding_idx: int = -1,
              scale_grad_by_freq: bool = False, sparse: bool = False) -> TfTensor:
    return cx.g.op("GatherV2", weight, indices, cx.g.scalar(0, INT32))


@TF_EXPORT.register(aten.constant_pad_nd.default)
def constant_pad_nd(cx: Ctx, x: TfTensor, pad: Sequence[int], value: float = 0) -> TfTensor:
    rank = x.rank or 0
    pairs = [[0, 0] for _ in range(rank)]
    for i in range(len(pad) // 2):  # torch lists (before, after) from the last dim backwards
        pairs[rank - 1 - i] = [pad[2 * i], pad[2 * i + 1]]
    if any(p < 0 for pair in pairs for p in pair):
        raise UnsupportedOpError("TensorFlow export: negative padding (cropping) is not supported")
    g = cx.g
    return g.op("PadV2", x, g.const(np.asarray(pairs, np.int32)), g.scalar(value, x.dtype))


def _fill(cx: Ctx, dims: TfTensor, value: Any) -> TfTensor:
    return cx.g.op("Fill", dims, cx.g.scalar(value, cx.dtype))


@TF_EXPORT.register(aten.full.default)
def full(cx: Ctx, size: Sequence[Any], fill_value: Any, **_: Any) -> TfTensor:
    if all(isinstance(s, int) for s in size):
        return cx.g.const(np.full(tuple(size), fill_value, dtype=tf_dtypes.to_numpy(cx.dtype)))
    return _fill(cx, cx.g.int_vector(list(size)), fill_value)


@TF_EXPORT.register(aten.full_like.default)
def full_like(cx: Ctx, x: TfTensor, fill_value: Any, **_: Any) -> TfTensor:
    return _fill(cx, cx.g.op("Shape", x), fill_value)


@TF_EXPORT.register(aten.zeros_like.default)
def zeros_like(cx: Ctx, x: TfTensor, **_: Any) -> TfTensor:
    return _fill(cx, cx.g.op("Shape", x), 0)


@TF_EXPORT.register(aten.ones_like.default)
def ones_like(cx: Ctx, x: TfTensor, **_: Any) -> TfTensor:
    return _fill(cx, cx.g.op("Shape", x), 1)


@TF_EXPORT.register(aten.scalar_tensor.default)
def scalar_tensor(cx: Ctx, value: Any, **_: Any) -> TfTensor:
    if isinstance(value, TfTensor):  # a symbolic size (torch.tensor([x.numel()]))
        return cx.g.cast(value, cx.dtype)
    return cx.g.scalar(value, cx.dtype)


@TF_EXPORT.register(aten.arange.start_step, aten.arange.default, aten.arange.start)
def arange(cx: Ctx, *args: Any, **_: Any) -> TfTensor:
    numbers = [a for a in args if not isinstance(a, torch.dtype)]
    start, end, step = (0, numbers[0], 1) if len(numbers) == 1 else (list(numbers) + [1])[:3]
    if all(not isinstance(v, TfTensor) for v in (start, end, step)):
        return cx.g.const(np.arange(start, end, step, dtype=tf_dtypes.to_numpy(cx.dtype)))
    g = cx.g
    return g.cast(g.op("Range", *(operand_int(g, v, INT32) for v in (start, end, step))), cx.dtype)


@TF_EXPORT.register(aten._assert_tensor_metadata.default, aten._assert_scalar.default,
                    aten.sym_constrain_range_for_size.default)
def assertion(cx: Ctx, *_: Any, **__: Any) -> None:
    return None  # checks torch makes while tracing; they compute nothing
