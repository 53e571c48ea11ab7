"""Adaptive max pooling (timm's ``max``/``avgmax`` heads): ATen -> TensorFlow.

torch's adaptive window ``i`` along a dim of size ``n`` pooled to ``m`` covers
``floor(i * n / m) .. ceil((i + 1) * n / m)``; windows may overlap and differ in size when ``m``
does not divide ``n``, which ``MaxPool`` cannot express. A maximum over a rectangle is the maximum
over rows of the maximum over columns, so each spatial dim is pooled on its own: one ``Max`` per
window of static slices, concatenated (``m_h + m_w`` small reductions; 1x1 is one ``Max``).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from lightning_saver.errors import UnsupportedOpError
from lightning_saver.formats import tf_dtypes
from lightning_saver.graph.tf_export.builder import GraphBuilder, TfTensor
from lightning_saver.graph.tf_export.ops_shape import _strided_slice
from lightning_saver.graph.tf_export.table import TF_EXPORT, Ctx

aten = torch.ops.aten


def _windows(size: int, out: int) -> list[tuple[int, int]]:
    return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]


def _pool_dim(g: GraphBuilder, x: TfTensor, axis: int, size: int, out: int) -> TfTensor:
    shape = tuple(out if a == axis else d for a, d in enumerate(x.shape or ()))
    if out == 1:
        return g.op("Max", x, [axis], keep_dims=True, out_shape=shape)
    parts = [g.op("Max", _strided_slice(g, x, axis, start, stop, 1, shrink=False), [axis], keep_dims=True)
             for start, stop in _windows(size, out)]
    return g.op("ConcatV2", parts, g.scalar(axis, tf_dtypes.DT_INT32), out_shape=shape)


@TF_EXPORT.register(aten.adaptive_max_pool2d.default)
def adaptive_max_pool2d(cx: Ctx, x: TfTensor, output_size: Sequence[int]) -> list[TfTensor]:
    if any(u.args[1] == 1 for u in cx.node.users if u.target is operator.getitem):
        raise UnsupportedOpError("TensorFlow export: adaptive max pooling indices (return_indices=True) "
                                 "are not supported (only the pooled values)")
    rank = x.rank or 4
    sizes = x.shape[-2:] if x.shape is not None else (None, None)
    if not all(isinstance(s, int) for s in sizes):
        raise UnsupportedOpError("TensorFlow export: adaptive max pooling needs static spatial sizes")
    (h, w), (out_h, out_w) = sizes, output_size
    rows = _pool_dim(cx.g, x, rank - 2, h, out_h)  # type: ignore[arg-type]
    return [_pool_dim(cx.g, rows, rank - 1, w, out_w)]  # type: ignore[arg-type]
