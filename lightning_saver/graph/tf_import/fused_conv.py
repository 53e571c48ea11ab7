"""The step a fused convolution chain runs (see :mod:`fuse` for which ops form a chain).

``y = act(conv(x, W) * s + t + other)``: the per-channel vectors ``s``/``t`` come from the chain's
BiasAdd, inference batch norm and ``Mul``/``AddV2``/``Sub`` ops; ``other`` is a residual input;
``act`` a ReLU or ReLU6. ``W * s`` is folded once and kept, in the memory format of the input
(channels-last for NHWC: no transposes), while the filter and vectors are unchanged. Without
autograd, float32 runs oneDNN's convolution with the bias, the residual sum and the activation
inside the kernel (``torch.ops.mkldnn._convolution_pointwise``, what ``torch.compile`` emits for
CPU convolutions), so no extra pass over the activations; with autograd recording, the fold runs
inside the step with differentiable torch ops, so gradients reach the original variables.

A residual that dies at its step (the plan and ``to_module`` know: its last reader) takes the
result in place, oneDNN's sum post-op (``_convolution_pointwise_``) instead of a binary add into a
fresh buffer, once a run-time check finds that nothing else holds it (a fed or fetched tensor, a
view, a second name: as for the runner's in-place activations). Keras ResNet50, 1 thread, paired in
one process: batch 1 2.2%, batch 8 2.9% faster; the result is bit-identical.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lightning_saver.graph.tf_import.conv_kernels import Prepared
from lightning_saver.graph.tf_import.layout import Pads, spatial_attr, spatial_pads, to_nchw
from lightning_saver.graph.tf_import.ops_nn import conv_layout, conv_weight
from lightning_saver.graph.tf_import.runner import is_private, refs_when_private

_FLOATS = (torch.float32, torch.float64)
_SMALL = 1 << 16  # vectors up to this size are compared by value when their tensor changes
_ONES = (1, 1, 1, 1)
_PREPARED_SHAPES = 4  # kernels prepared for this many input shapes per convolution
# True while compiled.py traces a module: the differentiable ops, which inductor folds and fuses
# itself, instead of the prepared oneDNN kernels (opaque to tracing, and picked by timing)
PLAIN_OPS: ContextVar[bool] = ContextVar("plain_ops", default=False)


class NotFoldable(Exception):
    """A vector is not per channel (or a residual has another shape): run the original ops."""


@dataclass(frozen=True)
class Link:
    """One absorbed op: its mode, where the chain value sits in its inputs, its operands' slice.

    Modes: "add"/"sub"/"mul" (a per-channel vector), "bn" (inference batch norm, four vectors),
    "sum" (a residual tensor of the output's shape), "relu"/"relu6" (no operand).
    """

    step: Any
    mode: str
    chain_pos: int
    operands: tuple[int, int]


def _vector(v: torch.Tensor, out: int, channels_first: bool, dtype: torch.dtype) -> torch.Tensor:
    """``v`` as an ``[out]`` vector when broadcasting it against the conv output is per channel."""
    if v.dtype != dtype:
        raise NotFoldable
    if v.dim() == 0:
        return v.expand(out)
    shape = list(v.shape)
    axis = len(shape) - 3 if channels_first else len(shape) - 1
    if len(shape) > 4 or axis < 0 or shape[axis] not in (1, out) or any(
            d != 1 for i, d in enumerate(shape) if i != axis):
        raise NotFoldable
    return v.reshape(-1).expand(out)


class _Cache:
    """The last folded (weight, groups, bias) and what it was folded from."""

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


def _fold(conv: Any, links: Sequence[Link], x: torch.Tensor, filter: torch.Tensor,
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
            # batch-norm vectors are 1-D, whatever the data format
            gamma, beta, mean, variance = (_vector(v, out, False, dtype) for v in values)
            a = gamma * torch.rsqrt(variance + float(link.step.kwargs.get("epsilon", 1e-4)))
            scale = a if scale is None else scale * a
            shift = beta - mean * a if shift is None else shift * a + (beta - mean * a)
        elif link.mode == "mul":
            v = _vector(values[0], out, channels_first, dtype)
            scale = v if scale is None else scale * v
            shift = None if shift is None else shift * v
        elif link.mode in ("add", "sub"):
            # BiasAdd's bias is 1-D whatever the data format (it adds along the format's channels)
            bias_add = link.step.op.startswith("BiasAdd")
            v = _vector(values[0], out, channels_first and not bias_add, dtype)
            v = -v if link.mode == "sub" else v
            shift = v if shift is None else shift + v
    if scale is not None:
        weight = weight * scale.reshape(-1, *[1] * (weight.dim() - 1))
    layout = torch.contiguous_format if channels_first else torch.channels_last
    # a scalar or [1] operand is an expanded vector (stride 0): oneDNN and sgemm read a bias as
    # contiguous memory, so `conv + 1.0` added 1.0 to the first channel only and garbage after it
    return weight.contiguous(memory_format=layout), groups, None if shift is None else shift.contiguous()


def _tail(y: torch.Tensor, other: torch.Tensor | None, act: str | None, grad: bool) -> torch.Tensor:
    """The residual sum and activation after a plain convolution (in place on ``y`` without autograd)."""
    if other is not None:
        if torch.broadcast_shapes(y.shape, other.shape) != y.shape:
            raise NotFoldable
        y = y + other if grad else y.add_(other)
    if act == "relu":
        y = torch.relu(y) if grad else y.relu_()
    elif act == "relu6":
        y = y.clamp(0.0, 6.0) if grad else y.clamp_(0.0, 6.0)
    return y


def _pad_input(x: torch.Tensor, pre: Pads, channels_first: bool) -> torch.Tensor:
    """TF's ``Pad`` (zeros) of the spatial dimensions, for an absorbed ``Pad`` on the plain path."""
    flat: list[int] = [0, 0] if not channels_first else []
    for before, after in reversed(pre):
        flat += [before, after]
    return F.pad(x, flat)


def _prepare(conv: Any, x: torch.Tensor, folded: tuple[torch.Tensor, int, torch.Tensor | None], pre: Pads,
             act: str | None, residual: bool) -> Prepared:
    kwargs, op = conv.kwargs, conv.op
    data_format = kwargs.get("data_format", "NHWC")
    weight, groups, bias = folded
    stride = spatial_attr(kwargs["strides"], data_format, "strides", op)
    dilation = spatial_attr(kwargs.get("dilations", _ONES), data_format, "dilations", op)
    xc = to_nchw(x, data_format, op)
    padded = [size + a + b for size, (a, b) in zip(xc.shape[2:], pre, strict=True)]
    own = spatial_pads(padded, weight.shape[2:], stride, dilation, kwargs["padding"],
                       kwargs.get("explicit_paddings", ()), data_format, op)
    pads = tuple((a + c, b + d) for (a, b), (c, d) in zip(pre, own, strict=True))
    nhwc = data_format == "NHWC"
    return Prepared(xc.shape, weight, groups, bias, stride, dilation, pads, act, nhwc, residual)


def fused_conv(conv: Any, links: Sequence[Link], pre: Pads | None = None) -> Callable[..., torch.Tensor]:
    """The step function ``(x, filter, *operands) -> y`` of a convolution chain.

    ``pre``: the spatial (before, after) zero padding of an absorbed ``Pad`` that fed the
    convolution; ``x`` is then the ``Pad``'s input.
    """
    cache = _Cache()
    prepared: dict[Any, Prepared] = {}  # per input shape, for the cached fold
    data_format = str(conv.kwargs.get("data_format", "NHWC"))
    channels_first = data_format.startswith("NC")
    channel = 1 if channels_first else -1
    sums = [link.operands[0] for link in links if link.mode == "sum"]
    vector_at = [i for i in range(links[-1].operands[1] if links else 0) if i not in sums]
    act = links[-1].mode if links and links[-1].mode in ("relu", "relu6") else None
    no_pad = ((0, 0), (0, 0))
    hot: list[Any] = []  # the last fast call: shape, dtype, threads, params, versions, prepared kernel

    def unfused(x: torch.Tensor, filter: torch.Tensor, *operands: torch.Tensor) -> torch.Tensor:
        fused.unfused_calls += 1  # type: ignore[attr-defined]  # tests check the fold did happen
        if pre is not None:
            x = _pad_input(x, pre, channels_first)
        y = conv.func(x, filter, **conv.kwargs)
        for link in links:
            args = list(operands[link.operands[0]:link.operands[1]])
            args.insert(link.chain_pos, y)
            y = link.step.func(*args, **link.step.kwargs)
            y = y[0] if link.mode == "bn" else y
        return y

    def fast(x: torch.Tensor, other: torch.Tensor | None, own: bool) -> torch.Tensor | None:
        """Without autograd, with the fold cached: the prepared kernel for ``x``'s shape."""
        key = (x.shape, x.dtype, torch.get_num_threads())
        run = prepared.get(key)
        if run is None:
            if x.dtype != torch.float32 or x.dim() != 4 or data_format not in ("NHWC", "NCHW"):
                return None
            if len(prepared) >= _PREPARED_SHAPES:
                prepared.pop(next(iter(prepared)))
            run = prepared[key] = _prepare(conv, x, cache.value, pre or no_pad, act, other is not None)
        hot[:] = [x.shape, x.dtype, key[2], cache.params, cache.versions, run]
        return run(x, other, own)

    def is_hot(x: torch.Tensor, filter: torch.Tensor, operands: tuple[torch.Tensor, ...]) -> bool:
        """The last fast call's shape, threads and unchanged parameters (the common case, checked first)."""
        shape, dtype, threads, params, versions, _ = hot
        if x.shape != shape or x.dtype is not dtype or filter is not params[0]:
            return False
        if filter._version != versions[0]:
            return False
        for k, i in enumerate(vector_at, 1):
            if operands[i] is not params[k] or params[k]._version != versions[k]:
                return False
        return torch.get_num_threads() == threads

    def fused(x: torch.Tensor, filter: torch.Tensor, *operands: torch.Tensor) -> torch.Tensor:
        return step(x, filter, operands, 0)

    def overwriting(x: torch.Tensor, filter: torch.Tensor, *operands: torch.Tensor) -> torch.Tensor:
        """``fused`` where the plan knows the residual dies at this step: written in place if private."""
        other = operands[sums[0]]
        refs = _refs(other)  # the statements _count_residual mirrors
        return step(x, filter, operands, refs)

    def step(x: torch.Tensor, filter: torch.Tensor, operands: tuple[torch.Tensor, ...],
             refs: int) -> torch.Tensor:
        other = operands[sums[0]] if sums else None
        plain = PLAIN_OPS.get()
        no_grad = not plain and not torch.is_grad_enabled()
        # a residual nobody else holds (it dies here) takes the result in place: oneDNN's sum
        own = refs > 0 and no_grad and is_private(other, refs, RESIDUAL_REFS)
        if hot and no_grad and is_hot(x, filter, operands):
            y = hot[-1](x, other, own)
            if y is not None:
                fused.overwrites += own  # type: ignore[attr-defined]
                return y
        params = (filter, *[operands[i] for i in vector_at])
        if x.dtype not in _FLOATS or any(p.dtype != x.dtype for p in params):
            return unfused(x, filter, *operands)
        grad = plain or torch.is_grad_enabled() and (any(p.requires_grad for p in params) or x.requires_grad
                                                     or (other is not None and other.requires_grad))
        extra = (x.dtype, x.shape[channel] if x.dim() > 2 else None)
        try:
            if not grad:
                if not cache.hit(params, extra):
                    cache.store(params, extra, _fold(conv, links, x, filter, operands))
                    prepared.clear()
                    hot.clear()
                y = fast(x, other, own)
                if y is not None:
                    fused.overwrites += own  # type: ignore[attr-defined]
                    return y
            if pre is not None:
                x = _pad_input(x, pre, channels_first)
            weight, groups, bias = _fold(conv, links, x, filter, operands) if grad else cache.value
            return _tail(conv_layout(conv.op, x, weight, groups, bias=bias, **conv.kwargs), other, act, grad)
        except NotFoldable:
            return unfused(x, filter, *operands)

    fused.unfused_calls = 0  # type: ignore[attr-defined]
    # calls that found their dying residual private (summed into it where oneDNN's kernel runs)
    fused.overwrites = 0  # type: ignore[attr-defined]
    # the step input that may take the result in place, and the step function that may do so
    fused.residual_at = 2 + sums[0] if sums else None  # type: ignore[attr-defined]
    fused.overwriting = overwriting  # type: ignore[attr-defined]
    fused.prepared = prepared  # type: ignore[attr-defined]  # tests read which kernels ran
    overwriting.prepared = prepared  # type: ignore[attr-defined]  # the same (a module calls either)
    fused.__name__ = fused.__qualname__ = "_".join(
        (["pad"] if pre is not None else []) + [_snake(conv.op)] + [_snake(link.step.op) for link in links]
    ) + "_folded"
    overwriting.__name__ = overwriting.__qualname__ = fused.__name__ + "_into"
    return fused


def _snake(op: str) -> str:
    out = []
    for i, c in enumerate(op):
        out.append("_" + c.lower() if c.isupper() and i and op[i - 1].islower() else c.lower())
    return "".join(out)  # BiasAdd -> bias_add, Conv2D -> conv2d, AddV2 -> add_v2


def _refs(other: torch.Tensor) -> int:
    return sys.getrefcount(other)


def _count_residual(x: torch.Tensor, *operands: torch.Tensor) -> torch.Tensor:
    """A fused step's frame as ``overwriting`` sees its residual: in ``operands``, bound to a local."""
    other = operands[0]
    refs = _refs(other)  # the same statements as in overwriting
    return torch.tensor(refs)


# the references a residual that dies at its fused step has there, from the generated code
RESIDUAL_REFS = refs_when_private(_count_residual, position=1)
