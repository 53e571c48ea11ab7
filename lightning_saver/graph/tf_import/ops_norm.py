"""TensorFlow import converters: FusedBatchNorm, FusedBatchNormV2 and FusedBatchNormV3.

TF's CPU kernel semantics: ``epsilon`` defaults to 1e-4; in training the batch statistics
normalise, output 1/2 are the (exponentially averaged) mean and the Bessel-corrected variance and
outputs 3/4 the batch mean and biased variance; in inference ``mean``/``variance`` are used.
Registered by :func:`table.load_converters`. Example::

    y, *_ = table.call("FusedBatchNormV3", [x, scale, offset, mean, var], {"is_training": False})
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_saver.graph.tf_import.layout import check_data_format
from lightning_saver.graph.tf_import.table import TF_OPS


def _normalize(
    x: torch.Tensor,
    channel: int,
    mean: torch.Tensor,
    variance: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    epsilon: float,
) -> torch.Tensor:
    shape = [-1 if d == channel else 1 for d in range(x.dim())]
    # one fused pass x * a + b over the data, the form torch's own batch norm kernel uses
    a = torch.rsqrt(variance + epsilon) * scale
    return torch.addcmul((offset - mean * a).reshape(shape), x, a.reshape(shape))


def _batch_norm(
    x: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    mean: torch.Tensor,
    variance: torch.Tensor,
    epsilon: float,
    exponential_avg_factor: float,
    data_format: str,
    is_training: bool,
) -> tuple[torch.Tensor, ...]:
    """y, running mean, running variance, saved mean, saved (biased) variance, as TF's CPU kernel.

    Like TF's FusedBatchNormGrad, gradients flow from ``y`` only (through the batch statistics in
    training), not from the statistics outputs.
    """
    first = check_data_format(data_format, "FusedBatchNorm")
    # half/bfloat16 inputs are normalised in the float32 of scale, like TF's mixed-precision kernel
    xf = x.to(scale.dtype)
    channel = 1 if first else x.dim() - 1
    count = xf.numel() // max(xf.shape[channel], 1)
    if not is_training:
        y = _normalize(xf, channel, mean, variance, scale, offset, epsilon)
        return y.to(x.dtype), mean, variance, mean, variance
    if count > 1:
        channels_first = xf if first else xf.movedim(-1, 1)
        # torch's fused kernel writes the batch mean and unbiased variance into these (momentum 1)
        batch_mean, unbiased = scale.new_zeros(xf.shape[channel]), scale.new_ones(xf.shape[channel])
        y = F.batch_norm(channels_first, batch_mean, unbiased, scale, offset, True, 1.0, epsilon)
        y = y if first else y.movedim(1, -1)
        batch_var = unbiased * ((count - 1) / count)
    else:  # one value per channel, which torch's kernel refuses: the variance is zero
        dims = [d for d in range(x.dim()) if d != channel]
        batch_var, batch_mean = torch.var_mean(xf, dims, correction=0)
        unbiased = batch_var
        y = _normalize(xf, channel, batch_mean, batch_var, scale, offset, epsilon)
    factor = exponential_avg_factor
    if factor != 1.0:
        running_mean = (1.0 - factor) * mean + factor * batch_mean
        running_var = (1.0 - factor) * variance + factor * unbiased
    else:
        running_mean, running_var = batch_mean, unbiased
    return y.to(x.dtype), running_mean, running_var, batch_mean, batch_var


@TF_OPS.register("FusedBatchNorm", "FusedBatchNormV2")
def fused_batch_norm(
    x: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    mean: torch.Tensor,
    variance: torch.Tensor,
    *,
    epsilon: float = 1e-4,
    exponential_avg_factor: float = 1.0,
    data_format: str = "NHWC",
    is_training: bool = True,
) -> tuple[torch.Tensor, ...]:
    return _batch_norm(
        x, scale, offset, mean, variance, epsilon, exponential_avg_factor, data_format, is_training
    )


@TF_OPS.register("FusedBatchNormV3")
def fused_batch_norm_v3(
    x: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    mean: torch.Tensor,
    variance: torch.Tensor,
    *,
    epsilon: float = 1e-4,
    exponential_avg_factor: float = 1.0,
    data_format: str = "NHWC",
    is_training: bool = True,
) -> tuple[torch.Tensor, ...]:
    outputs = _batch_norm(
        x, scale, offset, mean, variance, epsilon, exponential_avg_factor, data_format, is_training
    )
    # reserve_space_3 is an opaque scratch output (a scalar on TF's CPU kernel)
    return outputs + (scale.new_zeros(()),)
