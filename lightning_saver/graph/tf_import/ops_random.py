"""TensorFlow import converters: the random ops variable initializers and dropout use.

Converters follow the contract in :mod:`lightning_saver.graph.tf_import.table`. The values match
TF's distributions, not TF's bits: TF's Philox streams are not reproduced. The ``seed``/``seed2``
attrs are accepted and the numbers come from torch's default generator, so ``torch.manual_seed``
makes an imported graph reproducible, and a seeded dropout mask still changes from step to step
as TF's does. Example::

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


@TF_OPS.register("RandomUniform")
def random_uniform(shape: Tensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Uniform in ``[0, 1)``."""
    _check_float("RandomUniform", dtype)
    return torch.rand(_shape("RandomUniform", shape), dtype=dtype)


@TF_OPS.register("RandomStandardNormal")
def random_standard_normal(shape: Tensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
    _check_float("RandomStandardNormal", dtype)
    return torch.randn(_shape("RandomStandardNormal", shape), dtype=dtype)


@TF_OPS.register("TruncatedNormal")
def truncated_normal(shape: Tensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """A standard normal restricted to ``[-2, 2]``, as TF's resampling gives.

    Sampled by inverse CDF in float32 or wider (exactly the truncated law, with no resampling
    loop), then cast to ``dtype``.
    """
    _check_float("TruncatedNormal", dtype)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    out = torch.empty(_shape("TruncatedNormal", shape), dtype=work)
    torch.nn.init.trunc_normal_(out, mean=0.0, std=1.0, a=-2.0, b=2.0)
    return out.to(dtype)


@TF_OPS.register("RandomUniformInt")
def random_uniform_int(shape: Tensor, minval: Tensor, maxval: Tensor) -> Tensor:
    """Integers uniform in ``[minval, maxval)``, in the dtype of ``minval``.

    Raises:
        ValueError: ``minval >= maxval`` (an empty range), as TF.
    """
    low, high = int(minval), int(maxval)
    dims = _shape("RandomUniformInt", shape)
    if low >= high and all(dims):
        raise ValueError(f"RandomUniformInt: need minval < maxval, found minval {low} and maxval {high}")
    if not all(dims):
        return torch.empty(dims, dtype=minval.dtype)
    return torch.randint(low, high, dims, dtype=minval.dtype)
