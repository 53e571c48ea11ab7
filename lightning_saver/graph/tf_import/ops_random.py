"""TensorFlow import converters: the random ops variable initializers and dropout use.

Converters follow the contract in :mod:`lightning_saver.graph.tf_import.table`. The values match
TF's distributions, not TF's bits: TF's Philox streams are not reproduced. The ``seed``/``seed2``
attrs are accepted and the numbers come from torch's default generator, so ``torch.manual_seed``
makes an imported graph reproducible, and a seeded dropout mask still changes from step to step
as TF's does. The stateless ops (``StatelessRandom*``) are deterministic like TF's: the same seed
(or key and counter) gives the same values on every call, from a torch generator seeded by it.
Example::

    w = table.call("TruncatedNormal", [torch.tensor([784, 10])], {"dtype": torch.float32})
"""

from __future__ import annotations

import torch

from lightning_saver.graph.tf_import.table import TF_OPS

Tensor = torch.Tensor

# the float types TF's random kernels produce; anything else is refused like TF refuses it
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(op: str, shape: Tensor) -> list[int]:
    dims = [int(d) for d in shape.reshape(-1).tolist()]
    if any(d < 0 for d in dims):
        raise ValueError(f"{op}: shape {dims} has a negative dimension")
    return dims


def _check_float(op: str, dtype: torch.dtype) -> None:
    if dtype not in _FLOATS:
        raise TypeError(f"{op}: dtype must be one of float16, bfloat16, float32, float64, found {dtype}")


def _generator(device: torch.device, *seeds: Tensor) -> torch.Generator:
    """A generator on ``device`` whose state is a pure function of the seed tensors' values."""
    state = 0
    for value in torch.cat([t.reshape(-1).to(torch.int64) for t in seeds]).tolist():
        state = (state * 1_000_003 + value) % (1 << 63)
    return torch.Generator(device=device).manual_seed(state)


def _uniform(op: str, shape: Tensor, dtype: torch.dtype, gen: torch.Generator | None) -> Tensor:
    _check_float(op, dtype)
    return torch.rand(_shape(op, shape), dtype=dtype, generator=gen, device=shape.device)


def _normal(op: str, shape: Tensor, dtype: torch.dtype, gen: torch.Generator | None) -> Tensor:
    _check_float(op, dtype)
    return torch.randn(_shape(op, shape), dtype=dtype, generator=gen, device=shape.device)


def _truncated(op: str, shape: Tensor, dtype: torch.dtype, gen: torch.Generator | None) -> Tensor:
    # inverse CDF in float32 or wider: exactly the law TF's resampling gives, with no loop
    _check_float(op, dtype)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    out = torch.empty(_shape(op, shape), dtype=work, device=shape.device)
    torch.nn.init.trunc_normal_(out, mean=0.0, std=1.0, a=-2.0, b=2.0, generator=gen)
    return out.to(dtype)


def _uniform_int(
    op: str, shape: Tensor, minval: Tensor, maxval: Tensor, gen: torch.Generator | None
) -> Tensor:
    low, high = int(minval), int(maxval)
    dims = _shape(op, shape)
    if not all(dims):
        return torch.empty(dims, dtype=minval.dtype, device=shape.device)
    if low >= high:
        raise ValueError(f"{op}: need minval < maxval, found minval {low} and maxval {high}")
    return torch.randint(low, high, dims, dtype=minval.dtype, generator=gen, device=shape.device)


@TF_OPS.register("RandomUniform")
def random_uniform(shape: Tensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Uniform in ``[0, 1)``."""
    return _uniform("RandomUniform", shape, dtype, None)


@TF_OPS.register("RandomStandardNormal")
def random_standard_normal(shape: Tensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
    return _normal("RandomStandardNormal", shape, dtype, None)


@TF_OPS.register("TruncatedNormal")
def truncated_normal(shape: Tensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """A standard normal restricted to ``[-2, 2]``, the law TF's resampling gives."""
    return _truncated("TruncatedNormal", shape, dtype, None)


@TF_OPS.register("RandomUniformInt")
def random_uniform_int(shape: Tensor, minval: Tensor, maxval: Tensor) -> Tensor:
    """Integers uniform in ``[minval, maxval)``, in the dtype of ``minval``.

    Raises:
        ValueError: ``minval >= maxval`` (an empty range), as TF.
    """
    return _uniform_int("RandomUniformInt", shape, minval, maxval, None)


@TF_OPS.register("StatelessRandomUniform")
def stateless_random_uniform(shape: Tensor, seed: Tensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
    return _uniform("StatelessRandomUniform", shape, dtype, _generator(shape.device, seed))


@TF_OPS.register("StatelessRandomNormal")
def stateless_random_normal(shape: Tensor, seed: Tensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
    return _normal("StatelessRandomNormal", shape, dtype, _generator(shape.device, seed))


@TF_OPS.register("StatelessTruncatedNormal")
def stateless_truncated_normal(shape: Tensor, seed: Tensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
    return _truncated("StatelessTruncatedNormal", shape, dtype, _generator(shape.device, seed))


@TF_OPS.register("StatelessRandomUniformInt")
def stateless_random_uniform_int(shape: Tensor, seed: Tensor, minval: Tensor, maxval: Tensor) -> Tensor:
    return _uniform_int("StatelessRandomUniformInt", shape, minval, maxval, _generator(shape.device, seed))


@TF_OPS.register("StatelessRandomUniformV2")
def stateless_random_uniform_v2(
    shape: Tensor, key: Tensor, counter: Tensor, alg: Tensor, *, dtype: torch.dtype = torch.float32
) -> Tensor:
    return _uniform("StatelessRandomUniformV2", shape, dtype, _generator(shape.device, key, counter))


@TF_OPS.register("StatelessRandomNormalV2")
def stateless_random_normal_v2(
    shape: Tensor, key: Tensor, counter: Tensor, alg: Tensor, *, dtype: torch.dtype = torch.float32
) -> Tensor:
    return _normal("StatelessRandomNormalV2", shape, dtype, _generator(shape.device, key, counter))


@TF_OPS.register("StatelessTruncatedNormalV2")
def stateless_truncated_normal_v2(
    shape: Tensor, key: Tensor, counter: Tensor, alg: Tensor, *, dtype: torch.dtype = torch.float32
) -> Tensor:
    return _truncated("StatelessTruncatedNormalV2", shape, dtype, _generator(shape.device, key, counter))


@TF_OPS.register("StatelessRandomUniformIntV2")
def stateless_random_uniform_int_v2(
    shape: Tensor, key: Tensor, counter: Tensor, alg: Tensor, minval: Tensor, maxval: Tensor
) -> Tensor:
    gen = _generator(shape.device, key, counter)
    return _uniform_int("StatelessRandomUniformIntV2", shape, minval, maxval, gen)
