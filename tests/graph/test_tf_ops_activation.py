"""Activation and softmax converters (ops_activation.py) against real TensorFlow, values and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import torch
from tf_raw_ops import check, tol_for

from lightning_saver.graph.tf_import import table

ACTIVATIONS = ["Relu", "Relu6", "Elu", "Selu", "LeakyRelu", "Softplus", "Softsign", "Softmax", "LogSoftmax"]


@pytest.mark.parametrize("shape", [(7,), (2, 3, 5)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", ACTIVATIONS)
def test_float_activations(op: str, dtype: type, shape: tuple) -> None:
    x = np.random.default_rng(20).uniform(-10, 10, shape).astype(dtype)
    key = "logits" if "Softmax" in op else "features"
    check(op, {key: x}, **tol_for(dtype))


@pytest.mark.parametrize("op", ["Relu", "Relu6"])
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_integer_relus_keep_the_dtype(op: str, dtype: type) -> None:
    check(op, {"features": np.arange(-9, 9, dtype=dtype).reshape(3, 6)})


def test_softplus_is_stable_at_the_extremes() -> None:
    x = np.array([-1000, -100, -20, -15, -14, -1e-3, 0, 1e-3, 14, 15, 20, 100, 1000], np.float32)
    # atol covers exp(-100) ~ 4e-44, a float32 denormal that TF's CPU flushes to zero
    check("Softplus", {"features": x}, rtol=1e-6, atol=1e-37)
    check("Softplus", {"features": x.astype(np.float64)}, rtol=1e-14, atol=0)


def test_relu6_clamps_both_ends() -> None:
    check("Relu6", {"features": np.array([-np.inf, -3, 0, 3, 6, 6.5, np.inf], np.float32)})


@pytest.mark.parametrize("alpha", [None, 0.01, 1.5])
def test_leaky_relu_alpha(alpha: float | None) -> None:
    x = np.linspace(-4, 4, 9, dtype=np.float32)
    check("LeakyRelu", {"features": x}, {} if alpha is None else {"alpha": alpha})


@pytest.mark.parametrize("approximate", [False, True])
def test_gelu_matches_tf_nn_gelu(approximate: bool) -> None:
    # TF has no Gelu kernel of its own in 2.21: tf.nn.gelu is what writes the graph's math
    x = np.random.default_rng(21).uniform(-6, 6, (4, 5)).astype(np.float32)
    expected = tf.nn.gelu(x, approximate=approximate).numpy()
    got = table.call("Gelu", [torch.from_numpy(x)], {"approximate": approximate}).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def _distribution(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    p = rng.random(shape).astype(np.float32)
    return p / p.sum(-1, keepdims=True)


@pytest.mark.parametrize("shapes", [((4, 5), (4, 5)), ((4, 5), (1, 5)), ((1, 5), (3, 5))])
def test_softmax_cross_entropy(shapes: tuple) -> None:
    rng = np.random.default_rng(22)
    features = (rng.standard_normal(shapes[0]) * 5).astype(np.float32)
    check("SoftmaxCrossEntropyWithLogits", {"features": features, "labels": _distribution(rng, shapes[1])},
          rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("label_dtype", [np.int32, np.int64])
def test_sparse_softmax_cross_entropy(label_dtype: type) -> None:
    rng = np.random.default_rng(23)
    features = (rng.standard_normal((6, 4)) * 5).astype(np.float32)
    labels = np.array([0, 3, 1, 2, 3, 0], label_dtype)
    inputs = {"features": features, "labels": labels}
    check("SparseSoftmaxCrossEntropyWithLogits", inputs, rtol=1e-5, atol=1e-6)


def test_sparse_softmax_cross_entropy_refuses_bad_labels() -> None:
    features, labels = np.zeros((2, 3), np.float32), np.array([1, 3], np.int32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="outside the valid range"):
        tf.raw_ops.SparseSoftmaxCrossEntropyWithLogits(features=features, labels=labels)
    with pytest.raises(ValueError, match=r"label 3 is outside the valid range \[0, 3\)"):
        inputs = [torch.from_numpy(features), torch.from_numpy(labels)]
        table.call("SparseSoftmaxCrossEntropyWithLogits", inputs, {})


# ---- gradients: autograd through our converters against tf.GradientTape -----------------------

def _with_kinks(values: np.ndarray) -> np.ndarray:
    """``values`` with exact 0s and 6s, where piecewise activations change slope."""
    values = np.array(values, np.float64)
    values.reshape(-1)[:3] = [0.0, 6.0, 0.0]
    return values


GRAD_CASES = {
    "Relu": lambda r: {"features": _with_kinks(r.uniform(-3, 9, (3, 4)))},
    "Relu6": lambda r: {"features": _with_kinks(r.uniform(-3, 9, (3, 4)))},
    "Maximum": lambda r: {"x": _with_kinks(r.uniform(-3, 3, (3, 4))), "y": np.array([0.0, 6.0, 1.0, -1.0])},
    "Minimum": lambda r: {"x": _with_kinks(r.uniform(-3, 3, (3, 4))), "y": np.array([0.0, 6.0, 1.0, -1.0])},
    "Abs": lambda r: {"x": _with_kinks(r.uniform(-3, 3, (3, 4)))},
    "Elu": lambda r: {"features": _with_kinks(r.uniform(-3, 3, (3, 4)))},
    "Selu": lambda r: {"features": _with_kinks(r.uniform(-3, 3, (3, 4)))},
    "Softplus": lambda r: {"features": _with_kinks(r.uniform(-30, 30, (3, 4)))},
    "Softmax": lambda r: {"logits": r.standard_normal((3, 4))},
    "LogSoftmax": lambda r: {"logits": r.standard_normal((3, 4))},
    "LeakyRelu": lambda r: {"features": _with_kinks(r.uniform(-3, 3, (3, 4)))},
    "DivNoNan": lambda r: {"x": r.standard_normal((3, 4)), "y": np.where(r.random((3, 4)) < 0.3, 0, 2.0)},
    "FloorMod": lambda r: {"x": r.uniform(-9, 9, (3, 4)), "y": r.choice([-2.5, 1.5, 3.0], (3, 4))},
    "SquaredDifference": lambda r: {"x": r.standard_normal((3, 4)), "y": r.standard_normal((4,))},
    "Rsqrt": lambda r: {"x": r.uniform(0.5, 4, (3, 4))},
    "Xlogy": lambda r: {"x": _with_kinks(r.uniform(-2, 2, (3, 4))) % 6, "y": np.array([0.0, 2.0, 0.5, 3.0])},
    "BatchMatMulV2": lambda r: {"x": r.standard_normal((2, 3, 4)), "y": r.standard_normal((4, 5))},
    "SoftmaxCrossEntropyWithLogits": lambda r: {"features": r.standard_normal((3, 4)),
                                                "labels": _distribution(r, (3, 4))},
}


@pytest.mark.parametrize("op", sorted(GRAD_CASES))
def test_gradients_match_tf(op: str) -> None:
    rng = np.random.default_rng(24)
    inputs = {k: np.asarray(v, np.float64) for k, v in GRAD_CASES[op](rng).items()}
    ours = {k: torch.from_numpy(v).requires_grad_() for k, v in inputs.items()}
    out = table.call(op, list(ours.values()), {})
    out = out[0] if isinstance(out, tuple) else out
    weights = rng.standard_normal(tuple(out.shape))
    (out * torch.from_numpy(weights)).sum().backward()

    theirs = {k: tf.constant(v) for k, v in inputs.items()}
    with tf.GradientTape() as tape:
        tape.watch(list(theirs.values()))
        tf_out = getattr(tf.raw_ops, op)(**theirs)
        tf_out = tf_out[0] if isinstance(tf_out, (tuple, list)) else tf_out
        loss = tf.reduce_sum(tf_out * weights)
    grads = tape.gradient(loss, list(theirs.values()))
    # TF's cross-entropy gradient assumes each label row sums to exactly 1; float32-normalised
    # labels miss that by ~1e-8, which autograd's exact derivative sees
    rtol = 1e-6 if op == "SoftmaxCrossEntropyWithLogits" else 1e-9
    for name, grad in zip(ours, grads, strict=True):
        np.testing.assert_allclose(ours[name].grad.numpy(), grad.numpy(), rtol=rtol, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("op", ["Relu", "Relu6", "Elu", "Selu", "LeakyRelu", "Softplus", "Softsign"])
def test_activations_on_nan_and_infinities(op: str) -> None:
    x = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-30, -1e-30], np.float32)
    check(op, {"features": x}, rtol=1e-6, atol=0)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_softmax_with_masked_and_extreme_logits(op: str) -> None:
    x = np.array([[0.0, -np.inf, 1.0], [-np.inf, -np.inf, -np.inf], [1e30, 0.0, -1e30],
                  [-1e4, -1e4 + 1, -1e4 + 2]], np.float32)
    check(op, {"logits": x}, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_softmax_of_a_row_with_inf_or_nan_is_all_nan(op: str) -> None:
    # TensorFlow disagrees with itself here: its AVX-512 Softmax kernel gives [nan, 0, 0] for
    # [inf, 0, 1] and [nan, 0, 1] (and NaN only where the NaN was for [0, 1, nan]), other CPUs give
    # all NaN. We return all NaN on every CPU (what
    # torch and TF's LogSoftmax give): a row with +inf or NaN has no defined distribution.
    x = np.array([[np.inf, 0.0, 1.0], [np.nan, 0.0, 1.0], [0.0, 1.0, np.nan]], np.float32)
    out = table.call(op, [torch.from_numpy(x)], {})
    assert torch.isnan(out).all()
    theirs = (tf.nn.softmax if op == "Softmax" else tf.nn.log_softmax)(x).numpy()
    assert np.isnan(theirs).any(axis=1).all()  # what every TF build agrees on: the row is not a distribution
