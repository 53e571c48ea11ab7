"""The step a ``MatMul`` and the ``BiasAdd`` of its only reader become (a Keras ``Dense`` layer,
the classifier at the end of every convnet; :mod:`fuse` finds the pair).

``torch.addmm(bias, a, b)`` is one call where the two ops were two, as TensorFlow's grappler fuses
them into ``_FusedMatMul``. It is differentiable, so the module trains through it; anything but
2-D operands with a 1-D bias of one dtype runs the two original ops.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lightning_saver.graph.tf_import.ops_math import mat_mul
from lightning_saver.graph.tf_import.ops_nn import bias_add


def fused_mat_mul_bias(transpose_a: bool, transpose_b: bool) -> Callable[..., torch.Tensor]:
    """The step ``(a, b, bias) -> BiasAdd(MatMul(a, b), bias)`` for the ``MatMul``'s attrs."""

    def mat_mul_bias_add_folded(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        if a.dim() == b.dim() == 2 and bias.dim() == 1 and a.dtype == b.dtype == bias.dtype:
            return torch.addmm(bias, a.mT if transpose_a else a, b.mT if transpose_b else b)
        return bias_add(mat_mul(a, b, transpose_a=transpose_a, transpose_b=transpose_b), bias)

    return mat_mul_bias_add_folded
