"""Plan rewrite shared by ``run`` and ``to_module``: a convolution and the per-channel affine ops
after it become one step, whose filter is packed once in the layout torch's convolution wants.

TensorFlow writes a convolution's bias and an inference batch norm as separate ops after it:
``BiasAdd``, ``FusedBatchNorm(is_training=False)``, or, from Keras 3, ``Mul``/``AddV2``/``Sub`` by
per-channel vectors. All are ``y = conv(x, W) * s + t`` for vectors ``s``/``t``, which is
``conv(x, W * s) + t``: one convolution with a bias, and no passes over the activations (what
TensorFlow's grappler does with its fused conv kernels). The filter is permuted from TF's
``HWIO`` once, to torch's ``OIHW`` in the memory format of the input (channels-last for NHWC
graphs, so the activations stay NHWC from end to end and nothing is transposed).

The folded filter is cached while the filter and vectors are unchanged (same tensors at the same
version, or equal small vectors), unless autograd is recording and something requires a gradient:
then it is folded inside the step, so a module trains the original variables (gradients flow to
the filter, ``gamma``, ``beta``, ...) under their own names. A vector that turns out not to be per
channel at run time, or a dtype other than float32/float64, runs the original ops one by one.
Only ops whose intermediate output feeds nothing else are absorbed, and only vectors computed from
constants and variables (not from the fed inputs).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lightning_saver.graph.tf_import.ops_nn import conv_layout, conv_weight

CONVS = frozenset({"Conv2D", "DepthwiseConv2dNative"})
BATCH_NORMS = frozenset({"FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3"})
# op -> how a per-channel vector v changes (s, t): "add" t += v, "sub" t -= v, "mul" s, t *= v
_AFFINE = {"BiasAdd": "add", "BiasAddV1": "add", "Add": "add", "AddV2": "add", "Sub": "sub", "Mul": "mul"}
_FLOATS = (torch.float32, torch.float64)
_SMALL = 1 << 16  # vectors up to this size are compared by value when their tensor changes


class _NotPerChannel(Exception):
    pass


@dataclass(frozen=True)
class _Link:
    """One absorbed op: how it changes (s, t), where the chain value sits in its inputs, its operands."""

    step: Any
    mode: str  # "add", "sub", "mul" or "bn"
    chain_pos: int
    operands: tuple[int, int]  # slice of the fused step's inputs


def _vector(v: torch.Tensor, out: int, channels_first: bool, dtype: torch.dtype) -> torch.Tensor:
    """``v`` as an ``[out]`` vector when broadcasting it against the conv output is per channel."""
    if v.dtype != dtype:
        raise _NotPerChannel
    if v.dim() == 0:
        return v.expand(out)
    shape = list(v.shape)
    axis = len(shape) - 3 if channels_first else len(shape) - 1
    if len(shape) > 4 or axis < 0 or shape[axis] not in (1, out) or any(
            d != 1 for i, d in enumerate(shape) if i != axis):
        raise _NotPerChannel
    return v.reshape(-1).expand(out)


class _Cache:
    """The last folded (weight, bias) and what it was folded from."""

    def __init__(self) -> None:
        self.params: tuple[torch.Tensor, ...] = ()
        self.versions: tuple[int, ...] = ()
        self.extra: Any = None
        self.value: Any = None

    def hit(self, params: tuple[torch.Tensor, ...], extra: Any) -> bool:
        if len(params) != len(self.params) or extra != self.extra:
            return False
        for i, (new, old) in enumerate(zip(params, self.params, strict=True)):
            if new is old:
                if new._version != self.versions[i]:
                    return False
            elif i == 0 or new.numel() > _SMALL or new.shape != old.shape or not torch.equal(new, old):
                return False
        return True

    def store(self, params: tuple[torch.Tensor, ...], extra: Any, value: Any) -> None:
        # holding the params keeps their ids from being reused by other tensors
        self.params, self.extra, self.value = params, extra, value
        self.versions = tuple(p._version for p in params)


def _fold(conv: Any, links: Sequence[_Link], x: torch.Tensor, filter: torch.Tensor,
          operands: Sequence[torch.Tensor]) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    data_format = conv.kwargs.get("data_format", "NHWC")
    channels_first = data_format.startswith("NC")
    weight, groups = conv_weight(conv.op, x, filter, data_format)
    out, dtype = weight.shape[0], x.dtype
    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    for link in links:
        values = operands[link.operands[0]:link.operands[1]]
        if link.mode == "bn":
            gamma, beta, mean, variance = (_vector(v, out, True, dtype) for v in values)
            a = gamma * torch.rsqrt(variance + float(link.step.kwargs.get("epsilon", 1e-4)))
            scale = a if scale is None else scale * a
            shift = beta - mean * a if shift is None else shift * a + (beta - mean * a)
            continue
        v = _vector(values[0], out, channels_first, dtype)
        if link.mode == "mul":
            scale = v if scale is None else scale * v
            shift = None if shift is None else shift * v
        else:
            v = -v if link.mode == "sub" else v
            shift = v if shift is None else shift + v
    if _is_matmul(conv, filter, channels_first):
        # a 1x1 convolution over NHWC is a matrix product with TF's own [in, out] filter
        matrix = filter.reshape(filter.shape[2], filter.shape[3])
        return (matrix if scale is None else matrix * scale).contiguous(), 0, shift
    if scale is not None:
        weight = weight * scale.reshape(-1, *[1] * (weight.dim() - 1))
    layout = torch.contiguous_format if channels_first else torch.channels_last
    return weight.contiguous(memory_format=layout), groups, shift


def _is_matmul(conv: Any, filter: torch.Tensor, channels_first: bool) -> bool:
    kwargs = conv.kwargs
    return (conv.op == "Conv2D" and not channels_first and filter.dim() == 4 and filter.shape[0] == 1
            and filter.shape[1] == 1 and kwargs.get("padding") != "EXPLICIT"
            and all(int(v) == 1 for v in kwargs.get("strides", ())) and len(kwargs.get("strides", ())) == 4
            and all(int(v) == 1 for v in kwargs.get("dilations", (1, 1, 1, 1))))


def _matmul(x: torch.Tensor, matrix: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if x.dim() != 4 or x.shape[-1] != matrix.shape[0]:
        raise _NotPerChannel
    rows = x.reshape(-1, matrix.shape[0])
    y = torch.mm(rows, matrix) if bias is None else torch.addmm(bias, rows, matrix)
    return y.reshape(*x.shape[:-1], matrix.shape[1])


def _fused(conv: Any, links: Sequence[_Link]) -> Callable[..., torch.Tensor]:
    cache = _Cache()
    channel = 1 if str(conv.kwargs.get("data_format", "NHWC")).startswith("NC") else -1

    def unfused(x: torch.Tensor, filter: torch.Tensor, *operands: torch.Tensor) -> torch.Tensor:
        y = conv.func(x, filter, **conv.kwargs)
        for link in links:
            args = list(operands[link.operands[0]:link.operands[1]])
            args.insert(link.chain_pos, y)
            y = link.step.func(*args, **link.step.kwargs)
            y = y[0] if link.mode == "bn" else y
        return y

    def fused(x: torch.Tensor, filter: torch.Tensor, *operands: torch.Tensor) -> torch.Tensor:
        params = (filter, *operands)
        if x.dtype not in _FLOATS or any(p.dtype != x.dtype for p in params):
            return unfused(x, filter, *operands)
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        extra = (x.dtype, x.shape[channel] if x.dim() > 2 else None)
        try:
            if grad:
                weight, groups, bias = _fold(conv, links, x, filter, operands)
            elif cache.hit(params, extra):
                weight, groups, bias = cache.value
            else:
                weight, groups, bias = _fold(conv, links, x, filter, operands)
                cache.store(params, extra, (weight, groups, bias))
            if groups == 0:
                return _matmul(x, weight, bias)
        except _NotPerChannel:
            return unfused(x, filter, *operands)
        y = conv_layout(conv.op, x, weight, groups, bias=bias, **conv.kwargs)
        # y is a layout view of the conv's private buffer: handed on as a plain tensor when autograd
        # is off, so a following activation can run in place
        return y if torch.is_grad_enabled() else y.detach()

    fused.__name__ = fused.__qualname__ = "_".join(
        [_snake(conv.op)] + [_snake(link.step.op) for link in links]) + "_folded"
    return fused


def _snake(op: str) -> str:
    return re.sub(r"(?<=[a-z])(?=[A-Z])", "_", op).lower()  # BiasAdd -> bias_add, Conv2D -> conv2d


def _static_refs(steps: Sequence[Any], consts: Any) -> set[Any]:
    """Refs computed from constants and variables only (never from a feed)."""
    static = set(consts)
    for step in steps:
        if step.kind == "read" or (step.kind == "call" and all(r in static for r in step.inputs)):
            static.update((step.name, k) for k in range(8))
    return static


def _link(step: Any, y: Any, static: set[Any], data_format: str) -> tuple[str, int, list[Any]] | None:
    """(mode, chain position, operand refs) when ``step`` applies a per-channel affine op to ``y``."""
    if step.kind != "call" or step.controls:
        return None
    if step.op in BATCH_NORMS:
        ok = (not step.kwargs.get("is_training", True) and len(step.inputs) == 5 and step.inputs[0] == y
              and step.kwargs.get("data_format", "NHWC") == data_format)
        return ("bn", 0, list(step.inputs[1:])) if ok and all(r in static for r in step.inputs[1:]) else None
    mode = _AFFINE.get(step.op)
    if mode is None or len(step.inputs) != 2 or step.inputs[0] == step.inputs[1] or y not in step.inputs:
        return None
    pos = step.inputs.index(y)
    if step.op.startswith("BiasAdd") and (pos != 0 or step.kwargs.get("data_format", "NHWC")[:2]
                                          != data_format[:2]):
        return None
    if mode == "sub" and pos != 0:
        return None
    other = step.inputs[1 - pos]
    return (mode, pos, [other]) if other in static else None


def fuse_convolutions(steps: list[Any], fetches: list[Any], consts: Any,
                      make_step: Callable[..., Any]) -> list[Any]:
    """``steps`` with each Conv2D/DepthwiseConv2dNative and the affine ops after it as one step."""
    uses = Counter(ref for step in steps for ref in step.inputs)
    uses.update(fetches)
    consumers: dict[Any, Any] = {}
    for step in steps:
        for ref in step.inputs:
            consumers.setdefault(ref, step)
    static = _static_refs(steps, consts)
    replaced: dict[str, Any] = {}
    for conv in steps:
        if conv.op not in CONVS or conv.kind != "call" or conv.controls or len(conv.inputs) != 2:
            continue
        data_format = conv.kwargs.get("data_format", "NHWC")
        links: list[_Link] = []
        inputs = list(conv.inputs)
        y = (conv.name, 0)
        while uses[y] == 1 and y in consumers:
            step = consumers[y]
            found = _link(step, y, static, data_format)
            if found is None or (found[0] == "bn" and any(uses[(step.name, k)] for k in range(1, 6))):
                break
            mode, pos, operands = found
            links.append(_Link(step, mode, pos, (len(inputs) - 2, len(inputs) - 2 + len(operands))))
            inputs += operands
            y = (step.name, 0)
        last = links[-1].step if links else conv
        for link in links:
            replaced[link.step.name] = None
        replaced[conv.name] = None
        replaced[last.name] = make_step(last.name, "+".join([conv.op] + [k.step.op for k in links]), "call",
                                        _fused(conv, links), tuple(inputs), {})
    if not replaced:
        return steps
    return [replaced.get(step.name, step) if step.kind == "call" and step.name in replaced else step
            for step in steps if not (step.kind == "call" and replaced.get(step.name, step) is None)]
