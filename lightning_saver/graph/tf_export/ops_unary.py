"""More elementwise math: trigonometry, float classification, atan2/hypot, log-cumsum-exp: ATen -> TF.

Each has a TensorFlow op of the same meaning (``aten.asin`` -> ``Asin``...); ``hypot`` is
``Sqrt(x^2 + y^2)``. ``one_hot`` checks its classes with ``_assert_async``, which computes nothing.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_saver.formats import tf_dtypes
from lightning_saver.graph.tf_export.builder import TfTensor
from lightning_saver.graph.tf_export.ops_math import axes, operand
from lightning_saver.graph.tf_export.table import TF_EXPORT, Ctx

aten = torch.ops.aten
FLOAT = tf_dtypes.DT_FLOAT

_SAME_NAME = ("tan", "asin", "acos", "atan", "sinh", "cosh", "asinh", "acosh", "atanh")
_CLASSIFY = {"isnan": "IsNan", "isinf": "IsInf", "isfinite": "IsFinite"}


def _elementwise(tf_op: str) -> Any:
    def convert(cx: Ctx, x: TfTensor) -> TfTensor:
        return cx.g.op(tf_op, operand(cx, x, cx.dtype))

    convert.__name__ = f"elementwise_{tf_op}"
    return convert


def _classify(tf_op: str) -> Any:
    def convert(cx: Ctx, x: TfTensor) -> TfTensor:
        if x.dtype not in (FLOAT, tf_dtypes.DT_DOUBLE, tf_dtypes.DT_HALF):  # integers are finite
            return cx.g.op("Fill", cx.g.op("Shape", x), cx.g.scalar(tf_op == "IsFinite", tf_dtypes.DT_BOOL))
        return cx.g.op(tf_op, x)

    convert.__name__ = f"classify_{tf_op}"
    return convert


for _name in _SAME_NAME:
    TF_EXPORT.register(getattr(aten, _name).default)(_elementwise(_name.capitalize()))
for _name, _tf_op in _CLASSIFY.items():
    TF_EXPORT.register(getattr(aten, _name).default)(_classify(_tf_op))


@TF_EXPORT.register(aten.atan2.default)
def atan2(cx: Ctx, y: TfTensor, x: TfTensor) -> TfTensor:
    return cx.g.op("Atan2", operand(cx, y, cx.dtype), operand(cx, x, cx.dtype))


@TF_EXPORT.register(aten.hypot.default)
def hypot(cx: Ctx, x: TfTensor, y: TfTensor) -> TfTensor:
    g = cx.g
    a, b = operand(cx, x, cx.dtype), operand(cx, y, cx.dtype)
    return g.op("Sqrt", g.op("AddV2", g.op("Square", a), g.op("Square", b)))


@TF_EXPORT.register(aten.logcumsumexp.default)
def logcumsumexp(cx: Ctx, x: TfTensor, dim: int) -> TfTensor:
    axis = cx.g.scalar(axes(dim, x.rank)[0], tf_dtypes.DT_INT32)
    return cx.g.op("CumulativeLogsumexp", operand(cx, x, cx.dtype), axis)


@TF_EXPORT.register(aten._assert_async.msg, aten._assert_async.default)
def assert_async(cx: Ctx, *_: Any, **__: Any) -> None:
    return None  # a check on the data (one_hot's class range); torch raises, the graph computes nothing
