"""Reductions, scans, norms and top-k: ATen -> TensorFlow."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from lightning_saver.errors import UnsupportedOpError
from lightning_saver.formats import tf_dtypes
from lightning_saver.graph.tf_export.builder import TfTensor
from lightning_saver.graph.tf_export.ops_math import axes, mean, operand
from lightning_saver.graph.tf_export.table import TF_EXPORT, Ctx

aten = torch.ops.aten


# --- reductions ------------------------------------------------------------------------------


def _reduce(tf_op: str, input_dtype: int | None = None) -> Any:
    def convert(cx: Ctx, x: TfTensor, dim: Any = None, keepdim: bool = False, *,
                dtype: Any = None) -> TfTensor:
        x = operand(cx, x, input_dtype if input_dtype is not None else cx.dtype)
        return cx.g.op(tf_op, x, axes(dim, x.rank), keep_dims=keepdim)

    convert.__name__ = f"reduce_{tf_op}"
    return convert


TF_EXPORT.register(aten.sum.dim_IntList, aten.sum.default)(_reduce("Sum"))
TF_EXPORT.register(aten.max.default)(_reduce("Max"))
TF_EXPORT.register(aten.min.default)(_reduce("Min"))


@TF_EXPORT.register(aten.mean.dim, aten.mean.default)
def mean_(cx: Ctx, x: TfTensor, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> TfTensor:
    x = operand(cx, x, cx.dtype)
    return mean(cx.g, x, axes(dim, x.rank), keepdim)


TF_EXPORT.register(aten.amax.default)(_reduce("Max"))
TF_EXPORT.register(aten.amin.default)(_reduce("Min"))
TF_EXPORT.register(aten.prod.dim_int, aten.prod.default)(_reduce("Prod"))
TF_EXPORT.register(aten.any.dim, aten.any.dims, aten.any.default)(_reduce("Any", tf_dtypes.DT_BOOL))
TF_EXPORT.register(aten.all.dim, aten.all.dims, aten.all.default)(_reduce("All", tf_dtypes.DT_BOOL))


def _arg_reduce(tf_op: str) -> Any:
    def convert(cx: Ctx, x: TfTensor, dim: int | None = None, keepdim: bool = False) -> TfTensor:
        g = cx.g
        if dim is None:
            x, dim = g.reshape(x, [-1]), 0
        dim = axes(dim, x.rank)[0]
        out = g.op(tf_op, x, g.scalar(dim, tf_dtypes.DT_INT32), output_type=cx.dtype)
        return g.op("ExpandDims", out, g.scalar(dim, tf_dtypes.DT_INT32)) if keepdim else out

    convert.__name__ = f"arg_{tf_op}"
    return convert


TF_EXPORT.register(aten.argmax.default)(_arg_reduce("ArgMax"))
TF_EXPORT.register(aten.argmin.default)(_arg_reduce("ArgMin"))


def _value_and_index(tf_reduce: str, tf_arg: str) -> Any:
    def convert(cx: Ctx, x: TfTensor, dim: int, keepdim: bool = False) -> list[TfTensor]:
        g = cx.g
        axis = axes(dim, x.rank)[0]
        values = g.op(tf_reduce, x, [axis], keep_dims=keepdim)
        index = g.op(tf_arg, x, g.scalar(axis, tf_dtypes.DT_INT32))
        if keepdim:
            index = g.op("ExpandDims", index, g.scalar(axis, tf_dtypes.DT_INT32))
        return [values, index]

    convert.__name__ = f"value_index_{tf_reduce}"
    return convert


TF_EXPORT.register(aten.max.dim)(_value_and_index("Max", "ArgMax"))
TF_EXPORT.register(aten.min.dim)(_value_and_index("Min", "ArgMin"))


@TF_EXPORT.register(aten.var.correction)
def var(cx: Ctx, x: TfTensor, dim: Any = None, *, correction: float = 1, keepdim: bool = False) -> TfTensor:
    g = cx.g
    reduce_axes = axes(dim, x.rank)
    sizes = [x.shape[a] for a in reduce_axes] if x.shape is not None else [None]
    if any(s is None for s in sizes):
        raise UnsupportedOpError("TensorFlow export: var over a dynamic dimension is not supported")
    n = int(np.prod(sizes))
    # sums, not Means: see ops_math.mean (TensorFlow's oneDNN layer-norm rewrite matches Means)
    centered = g.op("Sub", x, mean(g, x, reduce_axes, keep_dims=True))
    total = g.op("Sum", g.op("Square", centered), reduce_axes, keep_dims=keepdim)
    return g.op("Mul", total, g.scalar(1.0 / max(n - correction, 1), cx.dtype))


@TF_EXPORT.register(aten.cumsum.default)
def cumsum(cx: Ctx, x: TfTensor, dim: int, *, dtype: Any = None) -> TfTensor:
    return cx.g.op("Cumsum", operand(cx, x, cx.dtype), cx.g.scalar(axes(dim, x.rank)[0], tf_dtypes.DT_INT32))


@TF_EXPORT.register(aten.cumprod.default)
def cumprod(cx: Ctx, x: TfTensor, dim: int, *, dtype: Any = None) -> TfTensor:
    axis = cx.g.scalar(axes(dim, x.rank)[0], tf_dtypes.DT_INT32)
    return cx.g.op("Cumprod", operand(cx, x, cx.dtype), axis)


@TF_EXPORT.register(aten.linalg_vector_norm.default)
def vector_norm(cx: Ctx, x: TfTensor, ord: float = 2, dim: Any = None, keepdim: bool = False, *,
                dtype: Any = None) -> TfTensor:
    g = cx.g
    reduce_axes = axes(dim, x.rank)
    if ord == 2:
        return g.op("Sqrt", g.op("Sum", g.op("Square", x), reduce_axes, keep_dims=keepdim))
    if ord == 1:
        return g.op("Sum", g.op("Abs", x), reduce_axes, keep_dims=keepdim)
    if ord == math.inf:
        return g.op("Max", g.op("Abs", x), reduce_axes, keep_dims=keepdim)
    raise UnsupportedOpError(f"TensorFlow export: vector norm of order {ord} (only 1, 2 and inf)")


@TF_EXPORT.register(aten.topk.default)
def topk(cx: Ctx, x: TfTensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True
         ) -> list[TfTensor]:
    g = cx.g
    rank = x.rank or 1
    dim = axes(dim, rank)[0]
    perm = list(range(rank))
    perm[dim], perm[-1] = perm[-1], perm[dim]
    source = g.transpose(x, perm)  # TopKV2 works on the last axis
    if not largest:
        source = g.op("Neg", source)
    values, indices = g.op("TopKV2", source, g.scalar(k, tf_dtypes.DT_INT32), index_type=tf_dtypes.DT_INT64)
    if not largest:
        values = g.op("Neg", values)
    return [g.transpose(values, perm), g.transpose(indices, perm)]
