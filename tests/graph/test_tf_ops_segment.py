"""Segment, search and trigonometry converters (tf_import/ops_segment.py, ops_math.py) against real
TensorFlow ``tf.raw_ops``, run eagerly."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import torch

from lightning_saver.graph.tf_import import table


def _same(got: torch.Tensor, expected: np.ndarray) -> None:
    got_np = got.numpy()
    assert got_np.dtype == expected.dtype and got_np.shape == expected.shape
    if np.issubdtype(expected.dtype, np.floating):
        np.testing.assert_allclose(got_np, expected, rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_array_equal(got_np, expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64])
@pytest.mark.parametrize("op", ["UnsortedSegmentSum", "UnsortedSegmentProd", "UnsortedSegmentMax",
                                "UnsortedSegmentMin"])
def test_unsorted_segments_with_empty_and_dropped_segments(op: str, dtype: type) -> None:
    rng = np.random.default_rng(3)
    data = (rng.standard_normal((6, 3, 2)) * 4).astype(dtype)
    for ids in (np.array([0, 2, 2, -1, 4, 0]), np.array([[1, 1, 3], [0, -1, 3]])):  # 1 and 3 segments empty
        rows = data if ids.ndim == 1 else data.reshape(2, 3, 3, 2)[:, :, 0]
        expected = getattr(tf.raw_ops, op)(data=rows, segment_ids=ids, num_segments=5).numpy()
        got = table.call(op, [torch.from_numpy(rows), torch.from_numpy(ids), torch.tensor(5)], {})
        _same(got, expected)


@pytest.mark.parametrize("x", [np.array([[0.0, 1.5], [-2.0, 0.0]], np.float32), np.array([True, False, True]),
                               np.arange(24).reshape(2, 3, 4) % 5 == 0, np.zeros((2, 0), np.int32)],
                         ids=["float", "bool", "3d", "empty"])
def test_where_lists_true_coordinates_in_row_major_order(x: np.ndarray) -> None:
    _same(table.call("Where", [torch.from_numpy(x)], {}), tf.where(x).numpy())


@pytest.mark.parametrize("out_type", [torch.int32, torch.int64])
@pytest.mark.parametrize("op", ["LowerBound", "UpperBound"])
def test_bounds_per_row_with_ties(op: str, out_type: torch.dtype) -> None:
    sorted_inputs = np.array([[-1.0, 0.0, 0.0, 2.0], [0.5, 0.5, 0.5, 3.0]], np.float32)
    values = np.array([[0.0, -3.0, 2.0, 5.0, 0.1], [0.5, 3.0, 0.0, 4.0, 0.6]], np.float32)
    tf_type = tf.int32 if out_type == torch.int32 else tf.int64
    expected = getattr(tf.raw_ops, op)(sorted_inputs=sorted_inputs, values=values, out_type=tf_type).numpy()
    got = table.call(op, [torch.from_numpy(sorted_inputs), torch.from_numpy(values)], {"out_type": out_type})
    _same(got, expected)


@pytest.mark.parametrize("exclusive", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_cumulative_logsumexp(axis: int, exclusive: bool, reverse: bool) -> None:
    x = np.random.default_rng(5).standard_normal((3, 4, 2)).astype(np.float32)
    expected = tf.raw_ops.CumulativeLogsumexp(x=x, axis=axis, exclusive=exclusive, reverse=reverse).numpy()
    got = table.call("CumulativeLogsumexp", [torch.from_numpy(x), torch.tensor(axis)],
                     {"exclusive": exclusive, "reverse": reverse})
    _same(got, expected)


@pytest.mark.parametrize("op", ["Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh"])
def test_trigonometry(op: str) -> None:
    x = np.random.default_rng(7).uniform(-0.95, 0.95, (3, 5)).astype(np.float32)
    x = np.abs(x) + 1 if op == "Acosh" else x
    _same(table.call(op, [torch.from_numpy(x)], {}), getattr(tf.raw_ops, op)(x=x).numpy())
