"""Random converters (ops_random.py): shape, dtype, range and distribution statistics beside TF's.

TF's Philox bits are not reproduced, so each test draws a sample from TF's op and from ours and
compares what the distribution fixes: support, mean, standard deviation, and a two-sample
Kolmogorov-Smirnov distance.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import torch

from lightning_saver.graph.tf_import import table

N = 20_000
# two samples of N from one law: the KS distance exceeds 0.03 with probability < 1e-7
KS_LIMIT = 0.03


def _tf_dtype(dtype: torch.dtype) -> tf.DType:
    return tf.as_dtype(str(dtype).removeprefix("torch."))


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.sort(a.ravel()), np.sort(b.ravel())
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / a.size
    cdf_b = np.searchsorted(b, grid, side="right") / b.size
    return float(np.abs(cdf_a - cdf_b).max())


def _both(op: str, shape: list[int], attrs: dict[str, object], extra: dict | None = None) -> tuple:
    extra = extra or {}
    tf_attrs = {k: _tf_dtype(v) if isinstance(v, torch.dtype) else v for k, v in attrs.items()}
    theirs = getattr(tf.raw_ops, op)(shape=np.array(shape, np.int32), **extra, **tf_attrs).numpy()
    inputs = [torch.tensor(shape, dtype=torch.int32)]
    inputs += [torch.from_numpy(np.array(v)) for v in extra.values()]
    ours = table.call(op, inputs, attrs)
    return ours, theirs


@pytest.mark.parametrize("seeds", [(0, 0), (7, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("op", ["RandomUniform", "RandomStandardNormal", "TruncatedNormal"])
def test_float_distributions_match_tf(op: str, dtype: torch.dtype, seeds: tuple) -> None:
    torch.manual_seed(0)
    attrs = {"dtype": dtype, "seed": seeds[0], "seed2": seeds[1]}
    ours, theirs = _both(op, [N // 100, 100], attrs)
    assert ours.dtype == dtype and ours.shape == theirs.shape == (N // 100, 100)
    got, want = ours.double().numpy(), theirs.astype(np.float64)
    low, high = {"RandomUniform": (0.0, 1.0), "TruncatedNormal": (-2.0, 2.0)}.get(op, (-np.inf, np.inf))
    assert low <= got.min() and got.max() <= high
    # TF's unseeded sample differs per process: 0.05 is 5 standard errors of the mean difference
    assert abs(got.mean() - want.mean()) < 0.05
    assert abs(got.std() - want.std()) < 0.05
    assert _ks(got, want) < KS_LIMIT


def test_uniform_excludes_one() -> None:
    ours, _ = _both("RandomUniform", [N], {"dtype": torch.float32})
    assert float(ours.max()) < 1.0


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("bounds", [(0, 10), (-5, 3), (100, 101)])
def test_random_uniform_int_matches_tf(bounds: tuple, dtype: type) -> None:
    extra = {"minval": dtype(bounds[0]), "maxval": dtype(bounds[1])}
    ours, theirs = _both("RandomUniformInt", [N], {"seed": 1}, extra)
    assert ours.dtype == torch.from_numpy(theirs).dtype and ours.shape == theirs.shape
    got = ours.numpy()
    assert got.min() >= bounds[0] and got.max() < bounds[1]
    values = np.arange(bounds[0], bounds[1])
    freq_ours = (got[:, None] == values).mean(0)
    freq_tf = (theirs[:, None] == values).mean(0)
    np.testing.assert_allclose(freq_ours, freq_tf, atol=0.02)


@pytest.mark.parametrize("shape", [[], [0], [3, 0, 2], [1, 1, 1, 5]])
def test_shapes_including_empty_and_scalar(shape: list[int]) -> None:
    for op in ("RandomUniform", "RandomStandardNormal", "TruncatedNormal"):
        ours, theirs = _both(op, shape, {"dtype": torch.float32})
        assert tuple(ours.shape) == theirs.shape
    ours, theirs = _both("RandomUniformInt", shape, {}, {"minval": np.int32(0), "maxval": np.int32(4)})
    assert tuple(ours.shape) == theirs.shape and ours.dtype == torch.int32


def test_torch_seed_makes_draws_reproducible() -> None:
    shape = torch.tensor([64])
    torch.manual_seed(3)
    first = table.call("TruncatedNormal", [shape], {"dtype": torch.float32, "seed": 5})
    torch.manual_seed(3)
    second = table.call("TruncatedNormal", [shape], {"dtype": torch.float32, "seed": 5})
    assert torch.equal(first, second)


def test_bad_arguments_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="need minval < maxval, found minval 3 and maxval 3"):
        table.call("RandomUniformInt", [torch.tensor([4]), torch.tensor(3), torch.tensor(3)], {})
    with pytest.raises(TypeError, match="RandomUniform: dtype must be one of .*found torch.int32"):
        table.call("RandomUniform", [torch.tensor([4])], {"dtype": torch.int32})
    with pytest.raises(ValueError, match=r"shape \[2, -1\] has a negative dimension"):
        table.call("RandomStandardNormal", [torch.tensor([2, -1])], {})


STATELESS = {
    "StatelessRandomUniform": (0.0, 1.0),
    "StatelessRandomNormal": (-np.inf, np.inf),
    "StatelessTruncatedNormal": (-2.0, 2.0),
    "StatelessRandomUniformV2": (0.0, 1.0),
    "StatelessRandomNormalV2": (-np.inf, np.inf),
    "StatelessTruncatedNormalV2": (-2.0, 2.0),
}


def _stateless_inputs(op: str, seed: int) -> dict[str, np.ndarray]:
    if op.endswith("V2"):
        return {"key": np.array([seed], np.uint64), "counter": np.array([0, seed], np.uint64),
                "alg": np.int32(1)}
    return {"seed": np.array([seed, 7], np.int64)}


def _stateless(op: str, shape: list[int], seed: int, dtype: torch.dtype) -> torch.Tensor:
    extra = [torch.from_numpy(np.asarray(v)) for v in _stateless_inputs(op, seed).values()]
    return table.call(op, [torch.tensor(shape), *extra], {"dtype": dtype})


@pytest.mark.parametrize("op", sorted(STATELESS))
def test_stateless_ops_are_deterministic_and_match_tf_distributions(op: str) -> None:
    ours = _stateless(op, [N], 5, torch.float32)
    assert torch.equal(ours, _stateless(op, [N], 5, torch.float32))  # same seed, same values, as in TF
    assert not torch.equal(ours, _stateless(op, [N], 6, torch.float32))
    inputs = {k: tf.constant(v) for k, v in _stateless_inputs(op, 5).items()}
    theirs = getattr(tf.raw_ops, op)(shape=np.array([N], np.int32), **inputs).numpy()
    got = ours.double().numpy()
    low, high = STATELESS[op]
    assert ours.dtype == torch.float32 and low <= got.min() and got.max() <= high
    assert _ks(got, theirs.astype(np.float64)) < KS_LIMIT


@pytest.mark.parametrize("op", ["StatelessRandomUniformInt", "StatelessRandomUniformIntV2"])
def test_stateless_uniform_int(op: str) -> None:
    extra = _stateless_inputs(op.replace("Int", ""), 9)
    bounds = {"minval": np.int64(-3), "maxval": np.int64(4)}
    theirs = getattr(tf.raw_ops, op)(shape=np.array([N], np.int32), **extra, **bounds).numpy()
    args = [torch.tensor([N])] + [torch.from_numpy(np.asarray(v)) for v in {**extra, **bounds}.values()]
    ours = table.call(op, args, {})
    assert torch.equal(ours, table.call(op, args, {}))
    assert ours.dtype == torch.int64 and int(ours.min()) == -3 and int(ours.max()) == 3
    values = np.arange(-3, 4)
    np.testing.assert_allclose((ours.numpy()[:, None] == values).mean(0), (theirs[:, None] == values).mean(0),
                               atol=0.02)
