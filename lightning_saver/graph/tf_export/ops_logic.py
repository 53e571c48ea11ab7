"""Bitwise and logical ops, and C-style remainder: ATen -> TensorFlow.

``transformers`` builds its attention masks with ``&``/``|`` on bool tensors (``aten.bitwise_and``),
which TensorFlow spells ``LogicalAnd``; on integers they are TensorFlow's ``Bitwise*`` ops.
``torch.roll`` lowers to ``fmod`` + ``index_select``.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_saver.formats import tf_dtypes
from lightning_saver.graph.tf_export.builder import TfTensor
from lightning_saver.graph.tf_export.ops_math import operand
from lightning_saver.graph.tf_export.table import TF_EXPORT, Ctx

aten = torch.ops.aten
BOOL = tf_dtypes.DT_BOOL

# torch op -> (TensorFlow op on bool, TensorFlow op on integers)
_BITWISE = {
    "bitwise_and": ("LogicalAnd", "BitwiseAnd"),
    "bitwise_or": ("LogicalOr", "BitwiseOr"),
    "bitwise_xor": ("NotEqual", "BitwiseXor"),
}


def _bitwise(bool_op: str, int_op: str) -> Any:
    def convert(cx: Ctx, x: Any, y: Any) -> TfTensor:
        a, b = operand(cx, x, cx.dtype), operand(cx, y, cx.dtype)
        return cx.g.op(bool_op if cx.dtype == BOOL else int_op, a, b)

    convert.__name__ = f"bitwise_{int_op}"
    return convert


for _name, (_bool_op, _int_op) in _BITWISE.items():
    _overloads = getattr(aten, _name)
    TF_EXPORT.register(_overloads.Tensor, _overloads.Scalar)(_bitwise(_bool_op, _int_op))


@TF_EXPORT.register(aten.bitwise_not.default)
def bitwise_not(cx: Ctx, x: TfTensor) -> TfTensor:
    return cx.g.op("LogicalNot" if x.dtype == BOOL else "Invert", x)


@TF_EXPORT.register(aten.logical_xor.default)
def logical_xor(cx: Ctx, x: TfTensor, y: TfTensor) -> TfTensor:
    return cx.g.op("NotEqual", operand(cx, x, BOOL), operand(cx, y, BOOL))


@TF_EXPORT.register(aten.fmod.Tensor, aten.fmod.Scalar)
def fmod(cx: Ctx, x: Any, y: Any) -> TfTensor:
    # C's fmod: the remainder takes the dividend's sign (remainder/FloorMod takes the divisor's)
    return cx.g.op("TruncateMod", operand(cx, x, cx.dtype), operand(cx, y, cx.dtype))
