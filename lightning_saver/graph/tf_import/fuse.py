"""Plan rewrites for ``run`` only: a convolution feeding an inference batch norm becomes one step.

``FusedBatchNorm(is_training=False)`` is ``y = x * a + b`` per channel with
``a = scale / sqrt(variance + epsilon)`` and ``b = offset - mean * a``; folding ``a`` into the
filter and adding ``b`` in place saves a full pass over the activations (what TensorFlow's
grappler does with its fused conv kernels). The rewrite applies only when the convolution's output
feeds nothing else, the batch norm's other outputs are unused, and everything is float32; the
fused step falls back to the two converters otherwise. Modules keep the two ops, as written.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

CONVS = frozenset({"Conv2D", "DepthwiseConv2dNative"})
BATCH_NORMS = frozenset({"FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3"})


def _fused(conv: Any, norm: Any) -> Callable[..., torch.Tensor]:
    depthwise = conv.op == "DepthwiseConv2dNative"
    epsilon = float(norm.kwargs.get("epsilon", 1e-4))
    channels_first = str(norm.kwargs.get("data_format", "NHWC")).startswith("NC")

    cache: dict[str, Any] = {"key": None}

    def folded(params: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        # the variables rarely change between calls: reuse the folded filter while every
        # parameter is the same tensor at the same version (in-place updates bump _version)
        key = tuple((id(t), t._version) for t in params)
        if cache["key"] != key:
            filter, scale, offset, mean, variance = params
            a = scale * torch.rsqrt(variance + epsilon)
            weight = filter * (a.reshape(filter.shape[2], filter.shape[3]) if depthwise else a)
            bias = offset - mean * a
            cache.update(key=key, value=(weight, bias.reshape(-1, 1, 1) if channels_first else bias),
                         params=params)  # holding the params keeps their ids from being reused
        return cache["value"]

    def conv_batch_norm(x: Any, filter: Any, scale: Any, offset: Any, mean: Any, variance: Any) -> Any:
        if not all(t.dtype == torch.float32 for t in (x, filter, scale, offset, mean, variance)):
            y = conv.func(x, filter, **conv.kwargs)
            return norm.func(y, scale, offset, mean, variance, **norm.kwargs)[0]
        weight, bias = folded((filter, scale, offset, mean, variance))
        y = conv.func(x, weight, **conv.kwargs).add_(bias)
        # y may be a layout view of the conv's private buffer; nothing else holds that buffer, so
        # hand it on as a plain tensor and a following activation can still run in place
        return y.detach()

    return conv_batch_norm


def fuse_conv_batch_norm(steps: list[Any], fetches: list[Any], make_step: Callable[..., Any]) -> list[Any]:
    """``steps`` with each eligible Conv2D/DepthwiseConv2dNative + FusedBatchNorm pair merged."""
    uses = Counter(ref for step in steps for ref in step.inputs)
    uses.update(fetches)
    by_name = {step.name: step for step in steps if step.kind == "call"}
    merged: dict[str, Any] = {}
    for norm in steps:
        if norm.op not in BATCH_NORMS or norm.kind != "call" or norm.kwargs.get("is_training", True):
            continue
        conv = by_name.get(norm.inputs[0][0])
        if conv is None or conv.op not in CONVS or uses[norm.inputs[0]] != 1 or len(norm.inputs) != 5:
            continue
        if any(uses[(norm.name, k)] for k in range(1, 6)):
            continue
        if conv.kwargs.get("data_format", "NHWC") != norm.kwargs.get("data_format", "NHWC"):
            continue
        merged[conv.name] = None
        merged[norm.name] = make_step(norm.name, f"{conv.op}+{norm.op}", "call", _fused(conv, norm),
                                      tuple(conv.inputs) + tuple(norm.inputs[1:]), {})
    if not merged:
        return steps
    return [merged.get(step.name, step) if step.kind == "call" else step for step in steps
            if not (step.kind == "call" and step.name in merged and merged[step.name] is None)]
