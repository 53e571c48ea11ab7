"""Reduction converters (ops_reduce.py) against real TensorFlow ``tf.raw_ops``, run eagerly."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import torch

from lightning_saver.graph.tf_import import table

AXES = [0, -1, [], [0], [1, 2], [-1, 0], [1, -1], [0, 1, 2]]


def _check(op: str, x: np.ndarray, axis: object, attrs: dict, axis_dtype: type = np.int32) -> None:
    axis_np = np.array(axis, axis_dtype)
    tf_attrs = {k: tf.as_dtype(str(v).removeprefix("torch.")) if isinstance(v, torch.dtype) else v
                for k, v in attrs.items()}
    key = "dimension" if op.startswith("Arg") else "axis"
    expected = getattr(tf.raw_ops, op)(input=x, **{key: axis_np}, **tf_attrs).numpy()
    got = table.call(op, [torch.from_numpy(x), torch.from_numpy(axis_np)], attrs).numpy()
    assert got.dtype == expected.dtype
    assert got.shape == expected.shape
    if np.issubdtype(expected.dtype, np.floating):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    else:
        np.testing.assert_array_equal(got, expected)


def _input(op: str, dtype: type, shape: tuple = (2, 3, 4)) -> np.ndarray:
    rng = np.random.default_rng(11)
    if dtype == np.bool_:
        return rng.random(shape) < (0.8 if op == "All" else 0.1)
    if op == "Prod":
        return rng.choice(np.array([-2, -1, 1, 2, 3], dtype), shape)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(-50, 50, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("keep_dims", [False, True])
@pytest.mark.parametrize("axis", AXES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.int64])
@pytest.mark.parametrize("op", ["Sum", "Mean", "Max", "Min", "Prod"])
def test_numeric_reductions(op: str, dtype: type, axis: object, keep_dims: bool) -> None:
    _check(op, _input(op, dtype), axis, {"keep_dims": keep_dims})


@pytest.mark.parametrize("keep_dims", [False, True])
@pytest.mark.parametrize("axis", AXES, ids=str)
@pytest.mark.parametrize("op", ["All", "Any"])
def test_boolean_reductions(op: str, axis: object, keep_dims: bool) -> None:
    _check(op, _input(op, np.bool_), axis, {"keep_dims": keep_dims})


@pytest.mark.parametrize("op", ["Sum", "Mean", "Max", "Prod"])
def test_int64_axis_float64_and_scalar_inputs(op: str) -> None:
    _check(op, _input(op, np.float64), [1, -1], {"keep_dims": False}, axis_dtype=np.int64)
    _check(op, np.array(3.5, np.float32), [], {"keep_dims": True})


def test_an_axis_named_twice_is_refused() -> None:
    x, axis = _input("Sum", np.float32), np.array([1, -2], np.int32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="duplicate"):
        tf.raw_ops.Sum(input=x, axis=axis)
    with pytest.raises(ValueError, match=r"Sum: reduction axes \[1, -2\] name one axis twice"):
        table.call("Sum", [torch.from_numpy(x), torch.from_numpy(axis)], {})


@pytest.mark.parametrize("dtype", [np.float32, np.int32])
@pytest.mark.parametrize("op", ["Sum", "Mean", "Max", "Min", "Prod"])
def test_reducing_an_empty_axis_gives_tf_identities(op: str, dtype: type) -> None:
    x = np.zeros((2, 0, 3), dtype)
    _check(op, x, [1], {"keep_dims": False})
    _check(op, x, [0, 1], {"keep_dims": True})


def test_integer_mean_truncates() -> None:
    x = np.array([[-7, 2, 0], [5, 1, 1], [-1, -1, 1]], np.int32)
    for axis in (0, 1, [0, 1]):
        _check("Mean", x, axis, {"keep_dims": False})


def test_axis_out_of_range_names_op_and_rank() -> None:
    with pytest.raises(ValueError, match=r"Sum: reduction axis 3 is out of range .*rank 3.*\[-3, 3\)"):
        table.call("Sum", [torch.zeros(2, 3, 4), torch.tensor([3])], {})


@pytest.mark.parametrize("output_type", [torch.int32, torch.int64])
@pytest.mark.parametrize("axis", [0, 1, 2, -1])
@pytest.mark.parametrize("op", ["ArgMax", "ArgMin"])
def test_arg_reductions(op: str, axis: int, output_type: torch.dtype) -> None:
    _check(op, _input(op, np.float32), axis, {"output_type": output_type})


@pytest.mark.parametrize("op", ["ArgMax", "ArgMin"])
def test_arg_reductions_pick_the_first_of_ties(op: str) -> None:
    x = np.array([[1, 3, 3, 0, 0], [2, 2, 2, 2, 2], [0, 5, 0, 5, 0]], np.int32)
    _check(op, x, 1, {})
    _check(op, x, 0, {"output_type": torch.int32}, axis_dtype=np.int64)


@pytest.mark.parametrize("op", ["ArgMax", "ArgMin"])
def test_arg_reductions_skip_nan_like_tf(op: str) -> None:
    x = np.array([[1, np.nan, 3], [np.nan, 0, -1], [2, 5, np.nan]], np.float32)
    _check(op, x, 1, {})


def test_reductions_are_differentiable() -> None:
    rng = np.random.default_rng(12)
    x_np = rng.standard_normal((3, 4)).astype(np.float32)
    for op in ("Sum", "Mean", "Max", "Prod"):
        x = torch.from_numpy(x_np).requires_grad_()
        table.call(op, [x, torch.tensor([1])], {}).sum().backward()
        xt = tf.constant(x_np)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = tf.reduce_sum(getattr(tf.raw_ops, op)(input=xt, axis=np.array([1], np.int32)))
        np.testing.assert_allclose(x.grad.numpy(), tape.gradient(y, xt).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_l2_loss(dtype: type) -> None:
    x = _input("Sum", dtype)
    expected = tf.raw_ops.L2Loss(t=x).numpy()
    got = table.call("L2Loss", [torch.from_numpy(x)], {}).numpy()
    assert got.dtype == expected.dtype and got.shape == expected.shape == ()
    np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("exclusive", [False, True])
@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("dtype", [np.float32, np.int32])
@pytest.mark.parametrize("op", ["Cumsum", "Cumprod"])
def test_scans(op: str, dtype: type, axis: int, exclusive: bool, reverse: bool) -> None:
    x = _input("Prod", dtype)
    axis_np = np.array(axis, np.int32)
    attrs = {"exclusive": exclusive, "reverse": reverse}
    expected = getattr(tf.raw_ops, op)(x=x, axis=axis_np, **attrs).numpy()
    got = table.call(op, [torch.from_numpy(x), torch.from_numpy(axis_np)], attrs).numpy()
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize("k", [0, 1, 3, 6])
@pytest.mark.parametrize("dtype", [np.float32, np.int32])
@pytest.mark.parametrize("shape", [(6,), (2, 3, 6)])
def test_top_k_v2_matches_tensorflow_ties_included(shape: tuple, dtype: type, k: int) -> None:
    # few distinct values, so ties are common: TF returns the lower index first
    x = np.random.default_rng(5).integers(0, 3, shape).astype(dtype)
    want_v, want_i = tf.raw_ops.TopKV2(input=x, k=np.int32(k), sorted=True)
    inputs = [torch.from_numpy(x), torch.tensor(k, dtype=torch.int32)]
    got_v, got_i = table.call("TopKV2", inputs, {"sorted": True})
    np.testing.assert_array_equal(got_v.numpy(), want_v.numpy())
    np.testing.assert_array_equal(got_i.numpy(), want_i.numpy())
    assert got_i.dtype == torch.int32


def test_top_k_v2_refuses_k_larger_than_the_axis() -> None:
    with pytest.raises(ValueError, match=r"TopKV2: k=4 must lie in \[0, 3\]"):
        table.call("TopKV2", [torch.zeros(2, 3), torch.tensor(4)], {})
