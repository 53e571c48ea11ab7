"""Elementwise math, activations, comparisons, matmul and reductions: ATen -> TensorFlow."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lightning_saver.errors import UnsupportedOpError
from lightning_saver.formats import tf_dtypes
from lightning_saver.graph.tf_export.builder import GraphBuilder, TfTensor
from lightning_saver.graph.tf_export.table import TF_EXPORT, Ctx

aten = torch.ops.aten


def operand(cx: Ctx, value: Any, dtype: int) -> TfTensor:
    """``value`` (a TfTensor or a Python number) as a tensor of ``dtype``."""
    if isinstance(value, TfTensor):
        return cx.g.cast(value, dtype)
    return cx.g.scalar(value, dtype)


def axes(dims: Any, rank: int | None) -> list[int]:
    """Non-negative axes from an int, a list, or None (= every axis)."""
    if dims is None or (isinstance(dims, Sequence) and len(dims) == 0):
        if rank is None:
            raise UnsupportedOpError("TensorFlow export: a reduction over all axes needs a known rank")
        return list(range(rank))
    items = [dims] if isinstance(dims, int) else list(dims)
    return [d % rank if rank is not None and d < 0 else d for d in items]


def mean(g: GraphBuilder, x: TfTensor, reduce_axes: list[int], keep_dims: bool) -> TfTensor:
    """The mean over ``reduce_axes`` as ``Sum * (1 / n)`` when the reduced sizes are static.

    TensorFlow's oneDNN remapper matches ``Rsqrt(AddV2(Mean(Square(x - Mean(x))), eps))`` (and the
    ``SquaredDifference`` form) followed by an affine, and rewrites it into ``_MklLayerNorm`` or
    ``_MklFusedInstanceNorm`` **without the epsilon** (its kernel then uses 1e-3): a silent error
    once weight and bias are variables. Every such pattern needs ``Mean`` ops, so our means are a
    ``Sum`` times a constant (the same value to an ulp), which no rewrite pattern expects.
    """
    sizes = [None if x.shape is None else x.shape[a] for a in reduce_axes]
    floating = x.dtype in (tf_dtypes.DT_FLOAT, tf_dtypes.DT_DOUBLE)
    if not floating or not all(isinstance(s, int) and s > 0 for s in sizes):
        return g.op("Mean", x, reduce_axes, keep_dims=keep_dims)
    total = g.op("Sum", x, reduce_axes, keep_dims=keep_dims)
    return g.op("Mul", total, g.scalar(1.0 / float(math.prod(sizes)), x.dtype))  # type: ignore[arg-type]


def _common_dtype(*values: Any) -> int:
    tensors = [v for v in values if isinstance(v, TfTensor)]
    float_types = (tf_dtypes.DT_FLOAT, tf_dtypes.DT_DOUBLE, tf_dtypes.DT_HALF)
    floats = [t.dtype for t in tensors if t.dtype in float_types]
    if floats:
        return floats[0]
    if any(isinstance(v, float) for v in values):
        return tf_dtypes.DT_FLOAT
    return tensors[0].dtype


def sunk(g: GraphBuilder, inputs: Sequence[TfTensor], make: Callable[..., TfTensor]) -> TfTensor:
    """``make(*inputs)`` for an elementwise op, computed below a pending layout transpose.

    A conv's NHWC result comes back to NCHW through a Transpose; when every input is that kind of
    transpose (same perm) or a scalar, the op runs on the NHWC sources and the transpose moves after
    it, so the next conv's NCHW -> NHWC transpose cancels and conv -> BN -> ReLU -> conv stays NHWC.
    """
    perms = {t.transposed_from[1] for t in inputs if t.transposed_from is not None}
    if len(perms) == 1 and all(t.transposed_from is not None or t.rank == 0 for t in inputs):
        perm = perms.pop()
        sources = [t.transposed_from[0] if t.transposed_from is not None else t for t in inputs]
        return g.transpose(make(*sources), perm)
    return make(*inputs)


_ON_BOOL = {"Mul": "LogicalAnd", "AddV2": "LogicalOr"}


def _binary(tf_op: str, swap: bool = False) -> Any:
    def convert(cx: Ctx, x: Any, y: Any, alpha: Any = 1) -> TfTensor:
        a, b = operand(cx, x, cx.dtype), operand(cx, y, cx.dtype)
        if cx.dtype == tf_dtypes.DT_BOOL and tf_op in _ON_BOOL:  # isfinite lowers to a bool product
            return cx.g.op(_ON_BOOL[tf_op], a, b)
        if alpha != 1:
            b = cx.g.op("Mul", b, cx.g.scalar(alpha, cx.dtype))
        pair = [b, a] if swap else [a, b]
        return sunk(cx.g, pair, lambda p, q: cx.g.op(tf_op, p, q))

    convert.__name__ = f"binary_{tf_op}"
    return convert


TF_EXPORT.register(aten.add.Tensor, aten.add.Scalar)(_binary("AddV2"))
TF_EXPORT.register(aten.sub.Tensor, aten.sub.Scalar)(_binary("Sub"))
TF_EXPORT.register(aten.rsub.Scalar, aten.rsub.Tensor)(_binary("Sub", swap=True))
TF_EXPORT.register(aten.mul.Tensor, aten.mul.Scalar)(_binary("Mul"))
TF_EXPORT.register(aten.div.Tensor, aten.div.Scalar)(_binary("RealDiv"))
TF_EXPORT.register(aten.maximum.default)(_binary("Maximum"))
TF_EXPORT.register(aten.minimum.default)(_binary("Minimum"))
TF_EXPORT.register(aten.remainder.Tensor, aten.remainder.Scalar)(_binary("FloorMod"))
TF_EXPORT.register(aten.pow.Tensor_Tensor)(_binary("Pow"))
TF_EXPORT.register(aten.pow.Scalar)(_binary("Pow"))


@TF_EXPORT.register(aten.div.Tensor_mode)
def div_mode(cx: Ctx, x: Any, y: Any, *, rounding_mode: str | None = None) -> TfTensor:
    a, b = operand(cx, x, cx.dtype), operand(cx, y, cx.dtype)
    if rounding_mode == "floor":
        return cx.g.op("FloorDiv", a, b)
    q = cx.g.op("RealDiv", a, b)
    if rounding_mode == "trunc":  # toward zero: sign(q) * floor(|q|)
        return cx.g.op("Mul", cx.g.op("Sign", q), cx.g.op("Floor", cx.g.op("Abs", q)))
    return q


@TF_EXPORT.register(aten.pow.Tensor_Scalar)
def pow_scalar(cx: Ctx, x: TfTensor, exponent: float) -> TfTensor:
    x = operand(cx, x, cx.dtype)
    if exponent == 2:
        return cx.g.op("Square", x)
    if exponent == 0.5:
        return cx.g.op("Sqrt", x)
    if exponent == -0.5:
        return cx.g.op("Rsqrt", x)
    if exponent == 1:
        return x
    return cx.g.op("Pow", x, cx.g.scalar(exponent, cx.dtype))


def _unary(tf_op: str) -> Any:
    def convert(cx: Ctx, x: TfTensor) -> TfTensor:
        return sunk(cx.g, [operand(cx, x, cx.dtype)], lambda v: cx.g.op(tf_op, v))

    convert.__name__ = f"unary_{tf_op}"
    return convert


for _aten_op, _tf_op in (
    (aten.neg.default, "Neg"), (aten.abs.default, "Abs"), (aten.sqrt.default, "Sqrt"),
    (aten.rsqrt.default, "Rsqrt"), (aten.exp.default, "Exp"), (aten.log.default, "Log"),
    (aten.tanh.default, "Tanh"), (aten.sigmoid.default, "Sigmoid"), (aten.erf.default, "Erf"),
    (aten.reciprocal.default, "Reciprocal"), (aten.floor.default, "Floor"), (aten.ceil.default, "Ceil"),
    (aten.sin.default, "Sin"), (aten.cos.default, "Cos"), (aten.sign.default, "Sign"),
    (aten.round.default, "Round"), (aten.log1p.default, "Log1p"), (aten.expm1.default, "Expm1"),
    (aten.relu.default, "Relu"), (aten.logical_not.default, "LogicalNot"),
):
    TF_EXPORT.register(_aten_op)(_unary(_tf_op))


def _clamp(cx: Ctx, x: TfTensor, low: Any, high: Any) -> TfTensor:
    x = operand(cx, x, cx.dtype)
    if isinstance(low, TfTensor) or isinstance(high, TfTensor):
        return _clamp_here(cx, x, low, high)
    return sunk(cx.g, [x], lambda v: _clamp_here(cx, v, low, high))


def _clamp_here(cx: Ctx, x: TfTensor, low: Any, high: Any) -> TfTensor:
    if isinstance(low, int | float) and low == 0 and high is None:
        return cx.g.op("Relu", x)
    if isinstance(low, int | float) and low == 0 and isinstance(high, int | float) and high == 6:
        return cx.g.op("Relu6", x)
    if low is not None:
        x = cx.g.op("Maximum", x, operand(cx, low, cx.dtype))
    if high is not None:
        x = cx.g.op("Minimum", x, operand(cx, high, cx.dtype))
    return x


@TF_EXPORT.register(aten.clamp.default, aten.clamp.Tensor)
def clamp(cx: Ctx, x: TfTensor, min: Any = None, max: Any = None) -> TfTensor:
    return _clamp(cx, x, min, max)


@TF_EXPORT.register(aten.clamp_min.default, aten.clamp_min.Tensor)
def clamp_min(cx: Ctx, x: TfTensor, min: Any) -> TfTensor:
    return _clamp(cx, x, min, None)


@TF_EXPORT.register(aten.clamp_max.default, aten.clamp_max.Tensor)
def clamp_max(cx: Ctx, x: TfTensor, max: Any) -> TfTensor:
    return _clamp(cx, x, None, max)


@TF_EXPORT.register(aten.hardtanh.default)
def hardtanh(cx: Ctx, x: TfTensor, min_val: float = -1.0, max_val: float = 1.0) -> TfTensor:
    return _clamp(cx, x, min_val, max_val)


@TF_EXPORT.register(aten.gelu.default)
def gelu(cx: Ctx, x: TfTensor, *, approximate: str = "none") -> TfTensor:
    """GELU in a form TensorFlow's oneDNN remapper leaves alone.

    The textbook ``0.5 x (1 + erf(x / sqrt 2))`` after a MatMul + BiasAdd is rewritten into
    ``_FusedMatMul`` with a GELU about 2e-4 off (and the tanh form likewise). The same function as
    ``x * 0.5 erfc(-x / sqrt 2)`` (and ``x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3))`` for tanh,
    since 1 + tanh(z) = 2 sigmoid(2z)) has no Erf/Tanh for the rewrite to match, and is as exact.
    """
    g, dt = cx.g, cx.dtype
    if approximate == "tanh":
        inner = g.op("AddV2", x, g.op("Mul", g.op("Mul", g.op("Square", x), x), g.scalar(0.044715, dt)))
        doubled = g.op("Mul", inner, g.scalar(2.0 * math.sqrt(2.0 / math.pi), dt))
        return g.op("Mul", x, g.op("Sigmoid", doubled))
    erfc = g.op("Erfc", g.op("Mul", x, g.scalar(-1.0 / math.sqrt(2.0), dt)))
    half_erfc = g.op("Mul", erfc, g.scalar(0.5, dt))
    return g.op("Mul", x, half_erfc)


@TF_EXPORT.register(aten.silu.default)
def silu(cx: Ctx, x: TfTensor) -> TfTensor:
    return cx.g.op("Mul", x, cx.g.op("Sigmoid", x))


@TF_EXPORT.register(aten.hardsigmoid.default)
def hardsigmoid(cx: Ctx, x: TfTensor) -> TfTensor:  # relu6(x + 3) / 6
    g = cx.g
    return g.op("Mul", g.op("Relu6", g.op("AddV2", x, g.scalar(3.0, x.dtype))), g.scalar(1.0 / 6.0, x.dtype))


@TF_EXPORT.register(aten.hardswish.default)
def hardswish(cx: Ctx, x: TfTensor) -> TfTensor:
    return cx.g.op("Mul", x, hardsigmoid(cx, x))


@TF_EXPORT.register(aten.leaky_relu.default)
def leaky_relu(cx: Ctx, x: TfTensor, negative_slope: float = 0.01) -> TfTensor:
    g = cx.g
    negative = g.op("Mul", g.op("Minimum", x, g.scalar(0.0, x.dtype)), g.scalar(negative_slope, x.dtype))
    return g.op("AddV2", g.op("Relu", x), negative)


@TF_EXPORT.register(aten.elu.default)
def elu(cx: Ctx, x: TfTensor, alpha: float = 1.0, scale: float = 1.0, input_scale: float = 1.0) -> TfTensor:
    g, dt = cx.g, x.dtype
    expm1 = g.op("Expm1", g.op("Mul", x, g.scalar(input_scale, dt)))
    negative = g.op("Mul", expm1, g.scalar(alpha * scale, dt))
    positive = g.op("Mul", x, g.scalar(scale, dt)) if scale != 1 else x
    return g.op("SelectV2", g.op("Greater", x, g.scalar(0.0, dt)), positive, negative)


def _softmax_like(tf_op: str) -> Any:
    def convert(cx: Ctx, x: TfTensor, dim: int, half_to_float: bool = False) -> TfTensor:
        x = operand(cx, x, cx.dtype)
        rank = x.rank
        if rank is None:
            raise UnsupportedOpError(f"TensorFlow export: {tf_op} needs an input of known rank")
        dim %= rank
        if dim == rank - 1:
            return cx.g.op(tf_op, x)
        perm = list(range(rank))
        perm[dim], perm[-1] = perm[-1], perm[dim]
        return cx.g.transpose(cx.g.op(tf_op, cx.g.transpose(x, perm)), perm)

    convert.__name__ = f"softmax_{tf_op}"
    return convert


TF_EXPORT.register(aten._softmax.default)(_softmax_like("Softmax"))
TF_EXPORT.register(aten._log_softmax.default)(_softmax_like("LogSoftmax"))


def _compare(tf_op: str) -> Any:
    def convert(cx: Ctx, x: Any, y: Any) -> TfTensor:
        dtype = _common_dtype(x, y)
        return cx.g.op(tf_op, operand(cx, x, dtype), operand(cx, y, dtype))

    convert.__name__ = f"compare_{tf_op}"
    return convert


for _name, _tf_op in (("eq", "Equal"), ("ne", "NotEqual"), ("lt", "Less"), ("le", "LessEqual"),
                      ("gt", "Greater"), ("ge", "GreaterEqual")):
    TF_EXPORT.register(getattr(aten, _name).Tensor, getattr(aten, _name).Scalar)(_compare(_tf_op))


@TF_EXPORT.register(aten.logical_and.default)
def logical_and(cx: Ctx, x: TfTensor, y: TfTensor) -> TfTensor:
    bool_ = tf_dtypes.DT_BOOL
    return cx.g.op("LogicalAnd", operand(cx, x, bool_), operand(cx, y, bool_))


@TF_EXPORT.register(aten.logical_or.default)
def logical_or(cx: Ctx, x: TfTensor, y: TfTensor) -> TfTensor:
    bool_ = tf_dtypes.DT_BOOL
    return cx.g.op("LogicalOr", operand(cx, x, bool_), operand(cx, y, bool_))


@TF_EXPORT.register(aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar)
def where(cx: Ctx, condition: TfTensor, x: Any, y: Any) -> TfTensor:
    cond = operand(cx, condition, tf_dtypes.DT_BOOL)
    return cx.g.op("SelectV2", cond, operand(cx, x, cx.dtype), operand(cx, y, cx.dtype))


@TF_EXPORT.register(aten._to_copy.default)
def to_copy(cx: Ctx, x: TfTensor, **_: Any) -> TfTensor:
    return cx.g.cast(x, cx.dtype)


# --- matmul ----------------------------------------------------------------------------------


def _matmul(cx: Ctx, a: TfTensor, b: TfTensor) -> TfTensor:
    # x @ w.T arrives as mm(x, permute(w)); multiply by w with transpose_b instead of transposing it
    if b.transposed_from is not None and b.transposed_from[1] == (1, 0):
        return cx.g.op("MatMul", a, b.transposed_from[0], transpose_b=True)
    return cx.g.op("MatMul", a, b)


@TF_EXPORT.register(aten.mm.default)
def mm(cx: Ctx, a: TfTensor, b: TfTensor) -> TfTensor:
    return _matmul(cx, a, b)


@TF_EXPORT.register(aten.addmm.default)
def addmm(cx: Ctx, bias: TfTensor, a: TfTensor, b: TfTensor, *, beta: float = 1,
          alpha: float = 1) -> TfTensor:
    g = cx.g
    product = _matmul(cx, a, b)
    if alpha != 1:
        product = g.op("Mul", product, g.scalar(alpha, cx.dtype))
    if beta != 1:
        bias = g.op("Mul", bias, g.scalar(beta, cx.dtype))
    if bias.rank == 1:
        return g.op("BiasAdd", product, bias)
    return g.op("AddV2", product, bias)


@TF_EXPORT.register(aten.bmm.default)
def bmm(cx: Ctx, a: TfTensor, b: TfTensor) -> TfTensor:
    return cx.g.op("BatchMatMulV2", a, b)


@TF_EXPORT.register(aten.log2.default)
def log2(cx: Ctx, x: TfTensor) -> TfTensor:
    natural = cx.g.op("Log", operand(cx, x, cx.dtype))
    return cx.g.op("Mul", natural, cx.g.scalar(1.0 / math.log(2.0), cx.dtype))


# --- symbolic sizes (scalars computed from the dynamic batch) ---------------------------------


def _sym(tf_op: str, py_op: Any) -> Any:
    def convert(cx: Ctx, a: Any, b: Any) -> Any:
        if not isinstance(a, TfTensor) and not isinstance(b, TfTensor):
            return py_op(a, b)
        int32 = tf_dtypes.DT_INT32
        return cx.g.op(tf_op, operand(cx, a, int32), operand(cx, b, int32), out_shape=())

    convert.__name__ = f"sym_{tf_op}"
    return convert


TF_EXPORT.register(operator.mul)(_sym("Mul", operator.mul))
TF_EXPORT.register(operator.add)(_sym("AddV2", operator.add))
TF_EXPORT.register(operator.sub)(_sym("Sub", operator.sub))
TF_EXPORT.register(operator.floordiv)(_sym("FloorDiv", operator.floordiv))
