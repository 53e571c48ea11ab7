"""TensorFlow import converters: element-wise arithmetic, comparisons, unary math, matrices.

Every converter follows the contract in :mod:`lightning_saver.graph.tf_import.table`: data inputs
positional, attrs keyword-only with TF's defaults. Broadcasting is numpy's, like TF's, and the
dtype of the inputs is kept (TF gives both operands the same dtype, so torch's promotion never
widens: int32 stays int32). Activations, softmax and the array helpers (Cast, Select, Gather, ...)
live in :mod:`ops_activation` and :mod:`ops_array`.
Example::

    table.call("FloorMod", [torch.tensor([7, -7]), torch.tensor([-3, 3])], {})  # tensor([-2, 2])
"""

from __future__ import annotations

from collections.abc import Callable
from functools import reduce

import torch

from lightning_saver.graph.tf_import.table import TF_OPS

Tensor = torch.Tensor


def _is_float(x: Tensor) -> bool:
    return x.is_floating_point() or x.is_complex()


# ---- ops that are exactly one torch function (same broadcasting, same dtype rules) -------------

_UNARY: tuple[tuple[tuple[str, ...], str, Callable[[Tensor], Tensor]], ...] = (
    (("Neg",), "neg", torch.neg),
    (("Abs",), "abs_", torch.abs),
    (("Exp",), "exp", torch.exp),
    (("Expm1",), "expm1", torch.expm1),
    (("Log",), "log", torch.log),
    (("Log1p",), "log1p", torch.log1p),
    (("Sqrt",), "sqrt", torch.sqrt),
    (("Rsqrt",), "rsqrt", torch.rsqrt),
    (("Erf",), "erf", torch.erf),
    (("Erfc",), "erfc", torch.erfc),
    (("Tanh",), "tanh", torch.tanh),
    (("Sigmoid",), "sigmoid", torch.sigmoid),
    (("Floor",), "floor", torch.floor),
    (("Ceil",), "ceil", torch.ceil),
    (("Sin",), "sin", torch.sin),
    (("Cos",), "cos", torch.cos),
    (("Tan",), "tan", torch.tan),
    (("Asin",), "asin", torch.asin),
    (("Acos",), "acos", torch.acos),
    (("Atan",), "atan", torch.atan),
    (("Sinh",), "sinh", torch.sinh),
    (("Cosh",), "cosh", torch.cosh),
    (("Asinh",), "asinh", torch.asinh),
    (("Acosh",), "acosh", torch.acosh),
    (("Atanh",), "atanh", torch.atanh),
    (("IsNan",), "is_nan", torch.isnan),
    (("IsInf",), "is_inf", torch.isinf),
    (("IsFinite",), "is_finite", torch.isfinite),
    (("LogicalNot",), "logical_not", torch.logical_not),
    (("Invert",), "invert", torch.bitwise_not),
)
_BINARY: tuple[tuple[tuple[str, ...], str, Callable[[Tensor, Tensor], Tensor]], ...] = (
    (("Add", "AddV2"), "add", torch.add),
    (("Sub",), "sub", torch.sub),
    (("Mul",), "mul", torch.mul),
    (("Atan2",), "atan2", torch.atan2),
    (("Less",), "less", torch.lt),
    (("LessEqual",), "less_equal", torch.le),
    (("Greater",), "greater", torch.gt),
    (("GreaterEqual",), "greater_equal", torch.ge),
    (("LogicalAnd",), "logical_and", torch.logical_and),
    (("LogicalOr",), "logical_or", torch.logical_or),
    (("BitwiseAnd",), "bitwise_and", torch.bitwise_and),
    (("BitwiseOr",), "bitwise_or", torch.bitwise_or),
    (("BitwiseXor",), "bitwise_xor", torch.bitwise_xor),
)


def _unary(name: str, fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    def convert(x: Tensor) -> Tensor:
        return fn(x)

    convert.__name__ = convert.__qualname__ = name
    return convert


def _binary(name: str, fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    def convert(x: Tensor, y: Tensor) -> Tensor:
        return fn(x, y)

    convert.__name__ = convert.__qualname__ = name
    return convert


for _keys, _name, _fn in _UNARY:
    TF_OPS.register(*_keys)(_unary(_name, _fn))
for _keys, _name, _binary_fn in _BINARY:
    TF_OPS.register(*_keys)(_binary(_name, _binary_fn))


# ---- binary arithmetic -------------------------------------------------------------------------


@TF_OPS.register("AddN")
def add_n(*inputs: Tensor) -> Tensor:
    """Sum of same-shaped tensors (AddN does not broadcast in TF either)."""
    return reduce(torch.add, inputs)


@TF_OPS.register("RealDiv")
def real_div(x: Tensor, y: Tensor) -> Tensor:
    """``x / y``; integer inputs divide with C++ truncation, as TF's ``Div`` does."""
    if _is_float(x):
        return torch.div(x, y)
    return torch.div(x, y, rounding_mode="trunc")


@TF_OPS.register("Div")
def div(x: Tensor, y: Tensor) -> Tensor:
    """The legacy ``Div``: true division for floats, truncating division for integers."""
    return real_div(x, y)


@TF_OPS.register("DivNoNan")
def div_no_nan(x: Tensor, y: Tensor) -> Tensor:
    """``x / y``, and 0 where ``y == 0`` (even for ``x`` inf or nan)."""
    zero = y == 0
    # divide by 1 where y == 0 so the unused branch has no inf/nan to leak into gradients
    quotient = x / torch.where(zero, torch.ones_like(y), y)
    return torch.where(zero, torch.zeros_like(quotient), quotient)


@TF_OPS.register("FloorDiv")
def floor_div(x: Tensor, y: Tensor) -> Tensor:
    """Python-style floor division; for floats TF computes ``floor(x / y)``."""
    if _is_float(x):
        return torch.floor(torch.div(x, y))
    return torch.div(x, y, rounding_mode="floor")


@TF_OPS.register("FloorMod")
def floor_mod(x: Tensor, y: Tensor) -> Tensor:
    """Remainder with the divisor's sign (Python's ``%``), computed from ``fmod`` like TF."""
    if not _is_float(x):
        return torch.remainder(x, y)
    trunc = torch.fmod(x, y)
    fix = (trunc != 0) & ((y < 0) != (trunc < 0))
    return torch.where(fix, trunc + y, trunc)


@TF_OPS.register("TruncateDiv")
def truncate_div(x: Tensor, y: Tensor) -> Tensor:
    if _is_float(x):
        return torch.trunc(torch.div(x, y))
    return torch.div(x, y, rounding_mode="trunc")


@TF_OPS.register("TruncateMod", "Mod")
def truncate_mod(x: Tensor, y: Tensor) -> Tensor:
    """Remainder with the dividend's sign (C's ``fmod`` / ``%``)."""
    return torch.fmod(x, y)


@TF_OPS.register("Maximum")
def maximum(x: Tensor, y: Tensor) -> Tensor:
    """The larger of ``x`` and ``y``; NaN wins, and at ties the gradient goes to ``x`` as in TF."""
    if not x.is_floating_point():
        return torch.maximum(x, y)
    # torch.maximum would split a tie's gradient in halves
    return torch.where((x >= y) | torch.isnan(x), x, y)


@TF_OPS.register("Minimum")
def minimum(x: Tensor, y: Tensor) -> Tensor:
    """The smaller of ``x`` and ``y``; NaN wins, and at ties the gradient goes to ``x`` as in TF."""
    if not x.is_floating_point():
        return torch.minimum(x, y)
    return torch.where((x <= y) | torch.isnan(x), x, y)


@TF_OPS.register("Pow")
def pow_(x: Tensor, y: Tensor) -> Tensor:
    """``x ** y``.

    Raises:
        ValueError: an integer ``x`` raised to a negative integer power (TF refuses it too).
    """
    if not _is_float(y) and bool((y < 0).any()):
        raise ValueError(
            f"Pow: integers to negative integer powers are not allowed (exponent {int(y.min())}); "
            "cast the base to a float type first"
        )
    return torch.pow(x, y)


@TF_OPS.register("SquaredDifference")
def squared_difference(x: Tensor, y: Tensor) -> Tensor:
    diff = x - y
    return diff * diff.conj() if diff.is_complex() else diff * diff


@TF_OPS.register("Xlogy")
def xlogy(x: Tensor, y: Tensor) -> Tensor:
    """``x * log(y)``, and ``x`` itself (a signed zero) wherever ``x == 0``, even for a NaN ``y``."""
    zero = x == 0
    # log(1) where x == 0 keeps the unused branch's gradient finite
    product = x * torch.log(torch.where(zero, torch.ones_like(y), y))
    return torch.where(zero, x * 0, product)


@TF_OPS.register("ClipByValue")
def clip_by_value(t: Tensor, clip_value_min: Tensor, clip_value_max: Tensor) -> Tensor:
    return torch.minimum(torch.maximum(t, clip_value_min), clip_value_max)


# ---- unary math --------------------------------------------------------------------------------


@TF_OPS.register("Sign")
def sign(x: Tensor) -> Tensor:
    """-1, 0 or 1; TF keeps NaN as NaN where torch would give 0."""
    if x.is_floating_point():
        return torch.where(torch.isnan(x), x, torch.sign(x))
    return torch.sign(x)


@TF_OPS.register("Square")
def square(x: Tensor) -> Tensor:
    # x * x keeps integer dtypes (and bool is not a TF Square type)
    return x * x


@TF_OPS.register("Reciprocal", "Inv")
def reciprocal(x: Tensor) -> Tensor:
    if _is_float(x):
        return torch.reciprocal(x)
    return torch.div(torch.ones_like(x), x, rounding_mode="trunc")


@TF_OPS.register("Round", "Rint")
def round_(x: Tensor) -> Tensor:
    """Half to even, like TF (and torch)."""
    return torch.round(x) if x.is_floating_point() else x


# ---- comparisons and logic ---------------------------------------------------------------------


def _broadcastable(x: Tensor, y: Tensor) -> bool:
    try:
        torch.broadcast_shapes(x.shape, y.shape)
    except RuntimeError:
        return False
    return True


@TF_OPS.register("Equal")
def equal(x: Tensor, y: Tensor, *, incompatible_shape_error: bool = True) -> Tensor:
    """With ``incompatible_shape_error=False``, shapes that do not broadcast give a scalar False."""
    if not incompatible_shape_error and not _broadcastable(x, y):
        return torch.tensor(False, device=x.device)
    return torch.eq(x, y)


@TF_OPS.register("NotEqual")
def not_equal(x: Tensor, y: Tensor, *, incompatible_shape_error: bool = True) -> Tensor:
    """With ``incompatible_shape_error=False``, shapes that do not broadcast give a scalar True."""
    if not incompatible_shape_error and not _broadcastable(x, y):
        return torch.tensor(True, device=x.device)
    return torch.ne(x, y)


# ---- matrices ----------------------------------------------------------------------------------


@TF_OPS.register("MatMul")
def mat_mul(a: Tensor, b: Tensor, *, transpose_a: bool = False, transpose_b: bool = False) -> Tensor:
    return torch.matmul(a.mT if transpose_a else a, b.mT if transpose_b else b)


@TF_OPS.register("BatchMatMul", "BatchMatMulV2")
def batch_mat_mul(x: Tensor, y: Tensor, *, adj_x: bool = False, adj_y: bool = False) -> Tensor:
    """Batched ``x @ y`` over the last two axes; V2 broadcasts the batch axes (so does torch)."""
    return torch.matmul(x.mH if adj_x else x, y.mH if adj_y else y)


@TF_OPS.register("BatchMatMulV3")
def batch_mat_mul_v3(
    x: Tensor, y: Tensor, *, Tout: torch.dtype | None = None, adj_x: bool = False, adj_y: bool = False
) -> Tensor:
    """Like V2, with the product computed in ``Tout`` (int8 x int8 -> int32)."""
    if Tout is not None:
        x, y = x.to(Tout), y.to(Tout)
    return batch_mat_mul(x, y, adj_x=adj_x, adj_y=adj_y)


@TF_OPS.register("Einsum")
def einsum(*inputs: Tensor, equation: str) -> Tensor:
    return torch.einsum(equation, *inputs)
