"""Math converters (ops_math.py) against real TensorFlow ``tf.raw_ops``, run eagerly on the same inputs."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tf_raw_ops import check, tol_for

from lightning_saver.errors import UnsupportedOpError
from lightning_saver.graph.tf_import import table

# ---- binary arithmetic -------------------------------------------------------------------------

SHAPES = [((), ()), ((4,), ()), ((), (3, 1)), ((2, 3, 4), (3, 1)), ((2, 3), (2, 3))]
FLOAT_BINARY = ["Add", "AddV2", "Sub", "Mul", "RealDiv", "Div", "DivNoNan", "FloorDiv", "FloorMod",
                "TruncateDiv", "TruncateMod", "Maximum", "Minimum", "Pow", "SquaredDifference", "Atan2",
                "Xlogy"]
INT_BINARY = ["Add", "AddV2", "Sub", "Mul", "Div", "FloorDiv", "FloorMod", "TruncateDiv", "TruncateMod",
              "Maximum", "Minimum", "Pow", "SquaredDifference"]
DIVIDES = {"RealDiv", "Div", "DivNoNan", "FloorDiv", "FloorMod", "TruncateDiv", "TruncateMod"}


def _float_operands(op: str, shapes: tuple, dtype: type, rng: np.random.Generator) -> tuple:
    x = rng.uniform(-4, 4, shapes[0]).astype(dtype)
    y = rng.uniform(-4, 4, shapes[1]).astype(dtype)
    if op in DIVIDES:
        y = (np.where(y < 0, -1, 1) * (np.abs(y) + 0.5)).astype(dtype)
    if op == "DivNoNan" and y.ndim:
        y.reshape(-1)[::2] = 0
    if op == "Pow":
        x = np.abs(x) + dtype(0.25)
    if op == "Xlogy":
        y = np.abs(y) + dtype(0.1)
        x = np.where(x > 1, 0, x).astype(dtype)
    return np.asarray(x, dtype), np.asarray(y, dtype)


def _int_operands(op: str, shapes: tuple, dtype: type, rng: np.random.Generator) -> tuple:
    x = rng.integers(-20, 21, shapes[0]).astype(dtype)
    y = rng.integers(-6, 7, shapes[1]).astype(dtype)
    if op in DIVIDES:
        y = np.where(y == 0, 3, y).astype(dtype)
    if op == "Pow":
        x, y = (x % 7 - 3).astype(dtype), np.abs(y % 5).astype(dtype)
    return np.asarray(x, dtype), np.asarray(y, dtype)


@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", FLOAT_BINARY)
def test_float_binary(op: str, dtype: type, shapes: tuple) -> None:
    x, y = _float_operands(op, shapes, dtype, np.random.default_rng(0))
    check(op, {"x": x, "y": y} if op != "Atan2" else {"y": x, "x": y}, **tol_for(dtype))


@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("op", INT_BINARY)
def test_int_binary(op: str, dtype: type, shapes: tuple) -> None:
    x, y = _int_operands(op, shapes, dtype, np.random.default_rng(1))
    check(op, {"x": x, "y": y})


@pytest.mark.parametrize("op", ["FloorDiv", "FloorMod", "TruncateDiv", "TruncateMod", "Div"])
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.float32])
def test_division_signs(op: str, dtype: type) -> None:
    # every sign combination, exact multiples and |x| < |y|
    x = np.array([7, -7, 7, -7, 6, -6, 6, -6, 2, -2, 0, 0], dtype)
    y = np.array([3, 3, -3, -3, 3, 3, -3, -3, 5, 5, 4, -4], dtype)
    check(op, {"x": x, "y": y})


def test_div_no_nan_zero_divisor_beats_inf_and_nan() -> None:
    x = np.array([1.0, np.inf, np.nan, -2.0, 0.0], np.float32)
    y = np.array([0.0, 0.0, 0.0, 4.0, 0.0], np.float32)
    check("DivNoNan", {"x": x, "y": y})


def test_maximum_minimum_propagate_nan() -> None:
    x = np.array([np.nan, 1.0, 2.0], np.float32)
    y = np.array([1.0, np.nan, 3.0], np.float32)
    check("Maximum", {"x": x, "y": y})
    check("Minimum", {"x": x, "y": y})


def test_int_pow_negative_exponent_is_an_error() -> None:
    x, y = np.array([2, 3], np.int32), np.array([-1, 2], np.int32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="negative integer powers"):
        tf.raw_ops.Pow(x=x, y=y)
    with pytest.raises(ValueError, match="negative integer powers are not allowed .exponent -1"):
        table.call("Pow", [torch.from_numpy(x), torch.from_numpy(y)], {})


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("dtype", [np.float32, np.int32])
def test_add_n(n: int, dtype: type) -> None:
    rng = np.random.default_rng(n)
    check("AddN", {"inputs": [rng.integers(-9, 9, (2, 3)).astype(dtype) for _ in range(n)]})


def test_clip_by_value_scalar_or_same_shape_bounds() -> None:
    t = np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4)
    check("ClipByValue", {"t": t, "clip_value_min": np.float32(-1), "clip_value_max": np.float32(2)})
    lo = np.linspace(-2, 1, 12, dtype=np.float32).reshape(3, 4)
    check("ClipByValue", {"t": t, "clip_value_min": lo, "clip_value_max": lo + 1})


# ---- unary math --------------------------------------------------------------------------------

UNARY_DOMAINS = {
    "Neg": (-5, 5), "Abs": (-5, 5), "Sign": (-5, 5), "Exp": (-5, 5), "Expm1": (-2, 2), "Log": (0.01, 9),
    "Log1p": (-0.9, 5), "Sqrt": (0, 9), "Rsqrt": (0.05, 9), "Square": (-5, 5), "Reciprocal": (0.1, 5),
    "Erf": (-3, 3), "Erfc": (-3, 3), "Tanh": (-5, 5), "Sigmoid": (-9, 9), "Floor": (-5, 5),
    "Ceil": (-5, 5), "Sin": (-5, 5), "Cos": (-5, 5),
}
INT_UNARY = ["Neg", "Abs", "Sign", "Square"]


@pytest.mark.parametrize("shape", [(), (5,), (2, 3, 4)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", sorted(UNARY_DOMAINS))
def test_float_unary(op: str, dtype: type, shape: tuple) -> None:
    x = np.asarray(np.random.default_rng(2).uniform(*UNARY_DOMAINS[op], shape), dtype)
    check(op, {"x": x}, **tol_for(dtype))


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("op", INT_UNARY)
def test_int_unary(op: str, dtype: type) -> None:
    check(op, {"x": np.arange(-6, 6, dtype=dtype).reshape(3, 4)})


@pytest.mark.parametrize("op", ["Sign", "Round", "Rint", "IsNan", "IsInf", "IsFinite", "Abs", "Neg"])
def test_unary_special_values(op: str) -> None:
    x = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 0.5, 1.5, 2.5, -0.5, -2.5, 3.7], np.float32)
    check(op, {"x": x})


# ---- comparisons and logic ---------------------------------------------------------------------

COMPARISONS = ["Equal", "NotEqual", "Less", "LessEqual", "Greater", "GreaterEqual"]


@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.int64])
@pytest.mark.parametrize("op", COMPARISONS)
def test_comparisons(op: str, dtype: type, shapes: tuple) -> None:
    rng = np.random.default_rng(3)
    x = np.asarray(rng.integers(-2, 3, shapes[0]), dtype)
    y = np.asarray(rng.integers(-2, 3, shapes[1]), dtype)
    check(op, {"x": x, "y": y})


@pytest.mark.parametrize("op", ["Equal", "NotEqual"])
def test_equality_of_bools_and_incompatible_shapes(op: str) -> None:
    check(op, {"x": np.array([True, False]), "y": np.array([True, True])})
    x, y = np.zeros((2, 3), np.float32), np.zeros((4,), np.float32)
    check(op, {"x": x, "y": y}, {"incompatible_shape_error": False})
    check(op, {"x": x, "y": np.zeros((3,), np.float32)}, {"incompatible_shape_error": False})


@pytest.mark.parametrize("op", ["LogicalAnd", "LogicalOr"])
def test_logical_binary(op: str) -> None:
    x = np.array([[True, False], [True, False]])
    check(op, {"x": x, "y": np.array([True, False])})
    check(op, {"x": x, "y": np.array(False)})


def test_logical_not() -> None:
    check("LogicalNot", {"x": np.array([[True, False, True]])})


# ---- matrices ----------------------------------------------------------------------------------


@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_mat_mul(dtype: type, transpose_a: bool, transpose_b: bool) -> None:
    rng = np.random.default_rng(4)
    a = rng.integers(-5, 5, (4, 3) if transpose_a else (3, 4)).astype(dtype)
    b = rng.integers(-5, 5, (5, 4) if transpose_b else (4, 5)).astype(dtype)
    attrs = {"transpose_a": transpose_a, "transpose_b": transpose_b}
    check("MatMul", {"a": a, "b": b}, attrs, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    "shapes", [((3, 4), (4, 2)), ((2, 3, 4), (2, 4, 5)), ((2, 1, 3, 4), (5, 4, 2)), ((3, 4), (6, 4, 2))]
)
@pytest.mark.parametrize("adj", [(False, False), (True, False), (False, True), (True, True)])
def test_batch_mat_mul_v2_broadcasts(shapes: tuple, adj: tuple) -> None:
    rng = np.random.default_rng(5)
    xs, ys = list(shapes[0]), list(shapes[1])
    if adj[0]:
        xs[-2:] = xs[-1], xs[-2]
    if adj[1]:
        ys[-2:] = ys[-1], ys[-2]
    x, y = rng.standard_normal(xs).astype(np.float32), rng.standard_normal(ys).astype(np.float32)
    check("BatchMatMulV2", {"x": x, "y": y}, {"adj_x": adj[0], "adj_y": adj[1]}, rtol=1e-5, atol=1e-5)


def test_batch_mat_mul_v3_int8_to_int32() -> None:
    rng = np.random.default_rng(6)
    x = rng.integers(-100, 100, (2, 3, 8), dtype=np.int8)
    y = rng.integers(-100, 100, (2, 8, 4), dtype=np.int8)
    check("BatchMatMulV3", {"x": x, "y": y}, {"Tout": torch.int32})


@pytest.mark.parametrize(
    "equation, shapes",
    [
        ("ij,jk->ik", [(3, 4), (4, 5)]),
        ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]),
        ("...ij,...jk->...ik", [(2, 3, 4), (2, 4, 5)]),
        ("bhqd,bhkd->bhqk", [(2, 2, 3, 4), (2, 2, 5, 4)]),
        ("ij->ji", [(3, 4)]),
        ("i,i->", [(6,), (6,)]),
        ("abc,cd->abd", [(2, 3, 4), (4, 5)]),
    ],
)
def test_einsum(equation: str, shapes: list) -> None:
    rng = np.random.default_rng(7)
    inputs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    check("Einsum", {"inputs": inputs}, {"equation": equation}, rtol=1e-5, atol=1e-5)


# ---- registration ------------------------------------------------------------------------------

OWNED = (
    "Add AddV2 AddN Sub Mul RealDiv DivNoNan FloorDiv FloorMod Maximum Minimum Pow SquaredDifference "
    "Neg Abs Sign Exp Log Log1p Sqrt Rsqrt Square Reciprocal Erf Erfc Tanh Sigmoid "
    "Equal NotEqual Less LessEqual Greater GreaterEqual LogicalAnd LogicalOr LogicalNot "
    "Cast Select SelectV2 OneHot GatherV2 GatherNd Range Fill ZerosLike OnesLike "
    "MatMul BatchMatMulV2 Einsum "
    "Relu Relu6 Elu Selu LeakyRelu Softplus Gelu Softmax LogSoftmax "
    "SparseSoftmaxCrossEntropyWithLogits SoftmaxCrossEntropyWithLogits "
    "Sum Mean Max Min Prod ArgMax ArgMin All Any "
    "RandomUniform RandomStandardNormal TruncatedNormal RandomUniformInt"
).split()


def test_every_owned_op_is_registered() -> None:
    ops = table.load_converters()
    assert [op for op in OWNED if op not in ops] == []


def test_unknown_op_names_itself() -> None:
    with pytest.raises(UnsupportedOpError, match="'NoSuchTfOp' node 'scope/n1'"):
        table.call("NoSuchTfOp", [torch.zeros(1)], {}, where="node 'scope/n1'")


# ---- property: any broadcastable shapes and integer values agree with TF -----------------------

_DIMS = st.lists(st.integers(1, 3), min_size=0, max_size=3)


def _ints(draw: st.DrawFn, shape: list[int], nonzero: bool) -> np.ndarray:
    values = st.integers(-50, 50).filter(bool) if nonzero else st.integers(-50, 50)
    size = int(np.prod(shape))
    return np.array(draw(st.lists(values, min_size=size, max_size=size)), np.int32).reshape(shape)


@st.composite
def _broadcast_pair(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    shape = draw(_DIMS)
    # the other shape drops leading axes and sets some axes to 1; either one may be x's
    other = [1 if draw(st.booleans()) else d for d in shape[draw(st.integers(0, len(shape))):]]
    if draw(st.booleans()):
        shape, other = other, shape
    return _ints(draw, shape, nonzero=False), _ints(draw, other, nonzero=True)


@settings(max_examples=40, deadline=None)
@given(pair=_broadcast_pair(), op=st.sampled_from(["FloorDiv", "FloorMod", "TruncateMod", "Maximum", "Mul"]))
def test_integer_ops_agree_with_tf_on_any_broadcast(pair: tuple[np.ndarray, np.ndarray], op: str) -> None:
    check(op, {"x": pair[0], "y": pair[1]})


@pytest.mark.parametrize("op", sorted(UNARY_DOMAINS))
def test_unary_nan_infinities_and_out_of_domain(op: str) -> None:
    x = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, -1.0, -2.0, 1e-30, 1e30, -1e30], np.float32)
    check(op, {"x": x}, rtol=1e-6, atol=0)


@pytest.mark.parametrize("op", FLOAT_BINARY)
def test_binary_special_values(op: str) -> None:
    specials = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -2.0, 0.5], np.float32)
    x, y = np.meshgrid(specials, specials)
    check(op, {"y": x, "x": y} if op == "Atan2" else {"x": x, "y": y}, rtol=1e-6, atol=0)


HALF_CASES = {
    "AddV2": ("x", "y"), "Mul": ("x", "y"), "RealDiv": ("x", "y"), "Maximum": ("x", "y"),
    "SquaredDifference": ("x", "y"), "Exp": ("x",), "Rsqrt": ("x",), "Tanh": ("x",), "Sigmoid": ("x",),
    "Erf": ("x",), "Relu": ("features",), "Softplus": ("features",), "Softmax": ("logits",),
    "MatMul": ("a", "b"),
}


@pytest.mark.parametrize("dtype", [np.float16, tf.bfloat16.as_numpy_dtype], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("op", sorted(HALF_CASES))
def test_half_precision_keeps_the_dtype(op: str, dtype: type) -> None:
    values = np.random.default_rng(8).uniform(0.25, 3, (len(HALF_CASES[op]), 4, 4))
    inputs = {name: v.astype(dtype) for name, v in zip(HALF_CASES[op], values, strict=True)}
    check(op, inputs, rtol=1e-2, atol=1e-2)
