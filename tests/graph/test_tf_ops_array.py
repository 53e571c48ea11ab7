"""Array converters (ops_array.py: Cast, Select, OneHot, gathers, Range, Fill, *Like) against real TF."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import torch
from tf_raw_ops import check

from lightning_saver.graph.tf_import import table

RNG = np.random.default_rng(30)
FRACTIONS = np.array([-2.7, -1.5, -0.5, -0.2, 0.0, 0.3, 0.5, 1.5, 2.5, 99.9], np.float32)


@pytest.mark.parametrize(
    "src, dst",
    [
        (FRACTIONS, torch.int32),
        (FRACTIONS, torch.int64),
        (FRACTIONS, torch.bool),
        (FRACTIONS, torch.float64),
        (FRACTIONS.astype(np.float64), torch.float32),
        (np.array([-300, -1, 0, 1, 255, 256, 300], np.int32), torch.uint8),
        (np.array([-(2**40), -1, 2**31, 7], np.int64), torch.int32),
        (np.array([3, -2, 0], np.int32), torch.float32),
        (np.array([True, False]), torch.float32),
        (np.array([True, False]), torch.int32),
        (np.array([1 + 2j, -3.5 - 1j], np.complex64), torch.float32),
    ],
    ids=str,
)
def test_cast(src: np.ndarray, dst: torch.dtype) -> None:
    check("Cast", {"x": src}, {"DstT": dst})


@pytest.mark.parametrize("truncate", [False, True])
@pytest.mark.parametrize("dst", [torch.float16, torch.bfloat16])
def test_cast_truncate_to_half_types(dst: torch.dtype, truncate: bool) -> None:
    x = RNG.standard_normal(2000).astype(np.float32) * 100
    check("Cast", {"x": x}, {"DstT": dst, "Truncate": truncate})


@pytest.mark.parametrize(
    "shapes",
    [((), (2, 3), (2, 3)), ((2, 3), (2, 3), (2, 3)), ((2,), (2, 3), (2, 3)), ((3,), (3, 2, 2), (3, 2, 2))],
)
def test_select(shapes: tuple) -> None:
    cond = np.asarray(RNG.random(shapes[0]) < 0.5)
    x = RNG.standard_normal(shapes[1]).astype(np.float32)
    y = RNG.standard_normal(shapes[2]).astype(np.float32)
    check("Select", {"condition": cond, "x": x, "y": y})


@pytest.mark.parametrize("shapes", [((2, 1), (1, 3), ()), ((3,), (2, 3), (2, 1)), ((), (4,), (4,))])
@pytest.mark.parametrize("dtype", [np.float32, np.int32])
def test_select_v2_broadcasts(shapes: tuple, dtype: type) -> None:
    cond = np.asarray(RNG.random(shapes[0]) < 0.5)
    t = np.asarray(RNG.integers(-9, 9, shapes[1]), dtype)
    e = np.asarray(RNG.integers(-9, 9, shapes[2]), dtype)
    check("SelectV2", {"condition": cond, "t": t, "e": e})


@pytest.mark.parametrize("axis", [-1, 0, 1, 2])
@pytest.mark.parametrize("values", [(1.0, 0.0, np.float32), (5, -1, np.int32), (True, False, np.bool_)])
def test_one_hot(axis: int, values: tuple) -> None:
    indices = np.array([[0, 3, -1], [2, 4, 1]], np.int32)  # -1 and 4 are out of [0, 4): all off
    on, off, dtype = values
    inputs = {"indices": indices, "depth": np.int32(4), "on_value": np.asarray(on, dtype),
              "off_value": np.asarray(off, dtype)}
    check("OneHot", inputs, {"axis": axis})


@pytest.mark.parametrize(
    "params_shape, indices_shape, axis, batch_dims",
    [
        ((5,), (3,), 0, 0),
        ((5, 4), (), 0, 0),
        ((5, 4), (2, 3), 1, 0),
        ((5, 4, 3), (6,), -2, 0),
        ((2, 5, 4), (2, 3), 1, 1),
        ((2, 5, 4), (2, 3), 2, 1),
        ((2, 3, 5, 4), (2, 3, 2), 2, 2),
        ((2, 3, 5, 4), (2, 3, 2, 2), 3, -2),
        ((2, 5, 4, 3), (2, 6), 2, 1),
    ],
)
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_gather_v2(
    params_shape: tuple, indices_shape: tuple, axis: int, batch_dims: int, index_dtype: type
) -> None:
    params = RNG.standard_normal(params_shape).astype(np.float32)
    size = params_shape[axis]
    indices = np.asarray(RNG.integers(0, size, indices_shape), index_dtype)
    inputs = {"params": params, "indices": indices, "axis": np.int32(axis)}
    check("GatherV2", inputs, {"batch_dims": batch_dims})


def test_gather_v2_refuses_out_of_range_indices() -> None:
    params, indices = np.zeros((3, 2), np.float32), np.array([0, 3], np.int32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="not in"):
        tf.raw_ops.GatherV2(params=params, indices=indices, axis=np.int32(0))
    with pytest.raises(IndexError, match=r"GatherV2: index 3 is out of range \[0, 3\) for axis 0"):
        table.call("GatherV2", [torch.from_numpy(params), torch.from_numpy(indices), torch.tensor(0)], {})


@pytest.mark.parametrize(
    "params_shape, indices",
    [
        ((4, 5), [[1, 2], [3, 4], [0, 0]]),
        ((4, 5, 6), [[1], [3]]),
        ((4, 5, 6), [[[1, 2], [0, 4]], [[3, 3], [2, 1]]]),
        ((4, 5, 6), [[1, 2, 3]]),
        ((4, 5), [1, 2]),
    ],
)
def test_gather_nd(params_shape: tuple, indices: list) -> None:
    params = RNG.standard_normal(params_shape).astype(np.float32)
    check("GatherNd", {"params": params, "indices": np.array(indices, np.int32)})


@pytest.mark.parametrize(
    "start, limit, delta",
    [(0, 10, 3), (10, 0, -2), (5, 5, 1), (-3, 4, 1), (0.1, 1.0, 0.3), (1.0, -1.0, -0.25), (0.0, 1.0, 0.1)],
)
@pytest.mark.parametrize("int64", [False, True])
def test_range(start: float, limit: float, delta: float, int64: bool) -> None:
    kind = type(start)
    dtype = {int: np.int64 if int64 else np.int32, float: np.float64 if int64 else np.float32}[kind]
    inputs = {"start": dtype(start), "limit": dtype(limit), "delta": dtype(delta)}
    check("Range", inputs, rtol=1e-6, atol=1e-7)


def test_range_refuses_what_tf_refuses() -> None:
    with pytest.raises(ValueError, match="delta must not be 0"):
        table.call("Range", [torch.tensor(0), torch.tensor(3), torch.tensor(0)], {})
    with pytest.raises(ValueError, match="start 5 cannot reach limit 1 with delta 1"):
        table.call("Range", [torch.tensor(5), torch.tensor(1), torch.tensor(1)], {})


@pytest.mark.parametrize("dims", [[2, 3], [], [4, 0, 2]])
@pytest.mark.parametrize("value", [np.float32(1.5), np.int32(-7), np.bool_(True)])
def test_fill(dims: list, value: np.generic) -> None:
    check("Fill", {"dims": np.array(dims, np.int32), "value": np.asarray(value)})


@pytest.mark.parametrize("op", ["ZerosLike", "OnesLike"])
@pytest.mark.parametrize(
    "x", [np.float32(2.0), np.arange(6, dtype=np.int32).reshape(2, 3), np.array([True, False])], ids=str
)
def test_zeros_ones_like(op: str, x: np.ndarray) -> None:
    check(op, {"x": np.asarray(x)})


def test_gathers_select_and_fill_are_differentiable() -> None:
    params = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    value = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    out = table.call("GatherV2", [params, torch.tensor([3, 3, 0]), torch.tensor(0)], {}).sum()
    out = out + table.call("GatherNd", [params, torch.tensor([[1, 2], [1, 2]])], {}).sum()
    out = out + table.call("SelectV2", [torch.tensor([True, False]), params[:2, 0], value], {}).sum()
    out = out + table.call("Fill", [torch.tensor([2, 2]), value], {}).sum()
    out.backward()
    expected = torch.zeros(4, 5, dtype=torch.float64)
    expected[3] += 2
    expected[0] += 1
    expected[1, 2] += 2
    expected[0, 0] += 1
    torch.testing.assert_close(params.grad, expected)
    assert value.grad.item() == 5.0


def test_one_hot_refuses_negative_depth() -> None:
    inputs = [torch.tensor([0, 1]), torch.tensor(-2), torch.tensor(1.0), torch.tensor(0.0)]
    with pytest.raises(ValueError, match="OneHot: depth must be non-negative, found -2"):
        table.call("OneHot", inputs, {})


def test_truncating_cast_keeps_a_gradient() -> None:
    x = torch.tensor([1.0009765625, -3.14159], requires_grad=True)
    y = table.call("Cast", [x], {"DstT": torch.bfloat16, "Truncate": True})
    assert y.tolist() == [1.0, -3.140625]
    y.float().sum().backward()
    assert x.grad.tolist() == [1.0, 1.0]


def test_gather_v2_refuses_an_axis_before_the_batch_axes() -> None:
    params, indices = torch.zeros(2, 3, 4), torch.zeros(2, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"GatherV2: axis 0 must lie in \[1, 3\) .*batch_dims 1"):
        table.call("GatherV2", [params, indices, torch.tensor(0)], {"batch_dims": 1})
