"""Compare one converter with real TensorFlow's ``tf.raw_ops`` run eagerly on the same numpy inputs.

Shared by the math, reduction, activation and array op tests (tests/graph is on sys.path). Example::

    check("FloorMod", {"x": np.array([7, -7]), "y": np.array([-3, 3])})
    check("Cast", {"x": x}, {"DstT": torch.int32})       # attrs spelled with torch dtypes
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import torch

from lightning_saver.graph.tf_import import table

F32_TOL = {"rtol": 2e-6, "atol": 1e-6}
F64_TOL = {"rtol": 1e-12, "atol": 1e-12}


def tol_for(dtype: object) -> dict[str, float]:
    """The comparison tolerance for a float dtype's precision."""
    return F64_TOL if np.dtype(dtype) == np.float64 else F32_TOL


def _tf_attr(value: object) -> object:
    if isinstance(value, torch.dtype):
        return tf.as_dtype(str(value).removeprefix("torch."))
    return value


BFLOAT16 = np.dtype(tf.bfloat16.as_numpy_dtype)


def _to_torch(array: object) -> torch.Tensor:
    array = np.array(array)
    if array.dtype == BFLOAT16:  # torch.from_numpy has no bfloat16: share the bits
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def run_both(op: str, inputs: dict[str, object], attrs: dict[str, object] | None = None) -> tuple:
    """Run ``op`` in TF (keyword inputs) and through our table (positional); list inputs are ``*args``."""
    attrs = attrs or {}
    # tf.constant pins the dtype: eager raw ops fed bare numpy arrays can reuse a cached float32 kernel
    tf_inputs = {k: [tf.constant(a) for a in v] if isinstance(v, list) else tf.constant(v)
                 for k, v in inputs.items()}
    theirs = getattr(tf.raw_ops, op)(**tf_inputs, **{k: _tf_attr(v) for k, v in attrs.items()})
    args: list[torch.Tensor] = []
    for value in inputs.values():
        values = value if isinstance(value, list) else [value]
        args += [_to_torch(v) for v in values]
    return table.call(op, args, attrs), theirs


def assert_same(ours: torch.Tensor, theirs: tf.Tensor, rtol: float = 0.0, atol: float = 0.0) -> None:
    expected, ours = theirs.numpy(), ours.detach()
    if expected.dtype == BFLOAT16:
        assert ours.dtype == torch.bfloat16, (ours.dtype, expected.dtype)
        expected, ours = expected.astype(np.float32), ours.float()
    got = ours.numpy()
    assert got.dtype == expected.dtype, (got.dtype, expected.dtype)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    if np.issubdtype(expected.dtype, np.floating) and (rtol or atol):
        np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol, equal_nan=True)
    else:
        np.testing.assert_array_equal(got, expected)


def check(op: str, inputs: dict[str, object], attrs: dict[str, object] | None = None, **tol: float) -> None:
    ours, theirs = run_both(op, inputs, attrs)
    if isinstance(ours, tuple):
        assert len(ours) == len(theirs)
        for o, t in zip(ours, theirs, strict=True):
            assert_same(o, t, **tol)
    else:
        assert_same(ours, theirs, **tol)
