"""TensorFlow import converters: activations, softmax and the softmax cross-entropy losses.

Registered by :func:`table.load_converters`; converters follow the contract in
:mod:`lightning_saver.graph.tf_import.table`. Softmax ops work on the last axis, as TF's do.
Example::

    loss, backprop = table.call("SparseSoftmaxCrossEntropyWithLogits", [logits, labels], {})
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lightning_saver.graph.tf_import.table import TF_OPS

Tensor = torch.Tensor

_SELU_SCALE = 1.0507009873554804934193349852946
_SELU_ALPHA = 1.6732632423543772848170429916717


def _exp_minus_one(x: Tensor) -> Tensor:
    # exp(x) - 1 as TF writes it (not expm1), on x <= 0 only so the unused branch of a
    # torch.where never overflows into a NaN gradient
    return torch.exp(torch.clamp_max(x, 0)) - 1


@TF_OPS.register("Relu")
def relu(features: Tensor) -> Tensor:
    return torch.relu(features)


@TF_OPS.register("Relu6")
def relu6(features: Tensor) -> Tensor:
    """``min(max(x, 0), 6)``; integer inputs stay integers."""
    if features.is_floating_point():
        return F.relu6(features)
    return torch.clamp(features, 0, 6)


@TF_OPS.register("Elu")
def elu(features: Tensor) -> Tensor:
    """``x`` for ``x >= 0``, else ``exp(x) - 1`` (TF's formula: tiny negatives give exactly 0)."""
    return torch.where(features < 0, _exp_minus_one(features), features)


@TF_OPS.register("Selu")
def selu(features: Tensor) -> Tensor:
    """``scale * x`` for ``x >= 0``, else ``scale * alpha * (exp(x) - 1)``.

    Written out because F.selu takes the exponential branch's gradient at exactly 0 and TF does not.
    """
    negative = _SELU_SCALE * _SELU_ALPHA * _exp_minus_one(features)
    return torch.where(features < 0, negative, _SELU_SCALE * features)


@TF_OPS.register("LeakyRelu")
def leaky_relu(features: Tensor, *, alpha: float = 0.2) -> Tensor:
    """``x if x > 0 else alpha * x`` (also for ``alpha > 1``, where it is not a max)."""
    # a TF float attr is a float32: round the default the same way so float64 graphs match
    alpha = torch.tensor(alpha, dtype=torch.float32).item()
    return F.leaky_relu(features, alpha)


@TF_OPS.register("Softplus")
def softplus(features: Tensor) -> Tensor:
    """``log(1 + exp(x))`` by TF's formula: ``x`` above ``-log(eps) - 2``, ``exp(x)`` below
    ``log(eps) + 2`` (``eps`` of the dtype, so bfloat16 switches already at 2.85), else ``log1p(exp(x))``.
    """
    threshold = math.log(torch.finfo(features.dtype).eps) + 2.0
    # clamped so the branches torch.where drops never overflow into NaN gradients
    exp_x = torch.exp(torch.clamp_max(features, -threshold))
    small_or_mid = torch.where(features < threshold, exp_x, torch.log1p(exp_x))
    return torch.where(features > -threshold, features, small_or_mid)


@TF_OPS.register("Softsign")
def softsign(features: Tensor) -> Tensor:
    return features / (1 + torch.abs(features))


@TF_OPS.register("Gelu")
def gelu(features: Tensor, *, approximate: bool = False) -> Tensor:
    """Exact ``x * Phi(x)``, or the tanh form when ``approximate`` (as ``tf.nn.gelu``)."""
    return F.gelu(features, approximate="tanh" if approximate else "none")


@TF_OPS.register("Softmax")
def softmax(logits: Tensor) -> Tensor:
    return torch.softmax(logits, dim=-1)


@TF_OPS.register("LogSoftmax")
def log_softmax(logits: Tensor) -> Tensor:
    return torch.log_softmax(logits, dim=-1)


@TF_OPS.register("SoftmaxCrossEntropyWithLogits")
def softmax_cross_entropy_with_logits(features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(loss, backprop)`` for ``[batch, classes]`` logits and label distributions (broadcast).

    ``loss[b] = -sum(labels[b] * log_softmax(features[b]))``; ``backprop = softmax - labels``.
    """
    features, labels = torch.broadcast_tensors(features, labels)
    log_probs = torch.log_softmax(features, dim=-1)
    loss = -(labels * log_probs).sum(dim=-1)
    return loss, torch.exp(log_probs) - labels


@TF_OPS.register("SparseSoftmaxCrossEntropyWithLogits")
def sparse_softmax_cross_entropy_with_logits(features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(loss, backprop)`` for ``[batch, classes]`` logits and ``[batch]`` class indices.

    Raises:
        ValueError: a label outside ``[0, classes)`` (TF's CPU kernel refuses it too).
    """
    classes = features.shape[-1]
    bad = (labels < 0) | (labels >= classes)
    if bool(bad.any()):
        raise ValueError(
            f"SparseSoftmaxCrossEntropyWithLogits: label {int(labels[bad][0])} is outside the valid "
            f"range [0, {classes}) of the logits' last axis; fix the labels or the number of classes"
        )
    index = labels.long().unsqueeze(-1)
    log_probs = torch.log_softmax(features, dim=-1)
    loss = -log_probs.gather(-1, index).squeeze(-1)
    one_hot = torch.zeros_like(features).scatter(-1, index, 1.0)
    return loss, torch.exp(log_probs) - one_hot
