"""How a folded convolution runs when autograd is off, prepared once per input shape.

Two kernels compute ``act(conv(x, W) + b + other)`` for a float32 4-D convolution:

* ``onednn``: oneDNN's convolution with the bias, the residual sum and the activation inside the
  kernel (``torch.ops.mkldnn._convolution_pointwise``, what ``torch.compile`` emits for CPU
  convolutions), its filter reordered once into oneDNN's blocked layout (given a plain tensor,
  oneDNN reorders it on every call, which at batch 1 costs as much as the convolution);
* ``native``: torch's ``conv2d`` on channels-last tensors, the sum and activation in place after it
  (small convolutions with groups of 1 only). Small convolutions at batch 1 skip oneDNN's per-call
  setup this way: the small CNN's 16x16x16 -> 32 convolution took 35 us against oneDNN's 85 us.

Which one is faster depends on the shapes, the thread count and the CPU, so a prepared shape
times both on its first calls (which still return their results) and keeps the faster one.

TF pads asymmetrically (``SAME`` at stride 2 on even sizes, Keras' ``ZeroPadding2D`` before a
strided convolution, absorbed by ``fuse.py``), torch symmetrically. Copying the input into a padded
tensor cost MobileNetV2 a fifth of its time; instead the padding is made symmetric (the larger
side on both) and the filter is widened by zeros on the short side, which shifts every window back
onto TF's: with pads (0, 1) and a 3x3 filter, a 4x4 filter ``[0, w]`` at padding 1 reads the same
pixels with the same weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from math import prod

import torch
import torch.nn.functional as F

from lightning_saver.graph.tf_import.layout import Pads, pad_spatial, symmetric

_MKLDNN = getattr(torch.ops.mkldnn, "_convolution_pointwise", None)
_REORDER = getattr(torch.ops.mkldnn, "_reorder_convolution_weight", None)
if not torch.backends.mkldnn.is_available() or _REORDER is None:
    _MKLDNN = None
_UNARY = {None: ("none", []), "relu": ("relu", []), "relu6": ("hardtanh", [0.0, 6.0])}
TRIALS = 3  # timed calls per kernel (after one untimed) before the faster is kept
# torch's conv2d is only tried on small convolutions, where oneDNN's fixed cost per call (about
# 30 us) can dominate: the small CNN's (0.4M and 1.2M multiply-adds), MobileNetV2's 1x1 ones at
# 7x7 and 14x14 (7.5M: 161 against 186 us); ResNet50's start at 51M, and timing both on a loaded
# machine there sometimes kept the slower one
NATIVE_MAX_MACS = 1 << 25

Kernel = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def widen(weight: torch.Tensor, pads: Pads,
          dilation: Sequence[int]) -> tuple[torch.Tensor, tuple[int, ...]] | None:
    """``(weight, padding)`` with symmetric padding that computes the same as asymmetric ``pads``.

    Each dimension pads ``max(before, after)`` on both sides; the filter gets ``|after - before|``
    zero taps before (or after) its own, so windows start where TF's do. None for dilated filters.
    """
    spec: list[int] = []
    for (before, after), d in zip(reversed(pads), reversed(dilation), strict=True):
        if before != after and d != 1:
            return None
        spec += [max(after - before, 0), max(before - after, 0)]
    return F.pad(weight, spec), tuple(max(before, after) for before, after in pads)


def out_shape(x_shape: Sequence[int], weight_shape: Sequence[int], padding: Sequence[int],
              stride: Sequence[int], dilation: Sequence[int]) -> list[int]:
    spatial = [(size + 2 * p - d * (k - 1) - 1) // s + 1 for size, p, d, k, s in
               zip(x_shape[2:], padding, dilation, weight_shape[2:], stride, strict=True)]
    return [x_shape[0], weight_shape[0], *spatial]


class Prepared:
    """A convolution with its filter, bias, padding and kernel fixed for one input shape.

    ``x_shape`` is channels-first (NCHW); called with NHWC tensors when ``nhwc`` (else NCHW), it
    returns the result in the same layout, or None when the residual's shape does not match (the
    caller then runs the plain ops). NHWC data is a channels-last NCHW view: nothing is copied.
    The result is a plain tensor (no view), so a following activation can run in place on it.
    """

    def __init__(self, x_shape: Sequence[int], weight: torch.Tensor, groups: int, bias: torch.Tensor | None,
                 stride: Sequence[int], dilation: Sequence[int], pads: Pads, act: str | None,
                 nhwc: bool, residual: bool) -> None:
        layout = torch.channels_last if nhwc else torch.contiguous_format
        self.layout, self.nhwc, self.prepad = layout, nhwc, None
        padding = symmetric(pads)
        if padding is None:
            widened = widen(weight, pads, dilation)
            if widened is None:
                self.prepad, padding = pads, tuple(0 for _ in pads)
                x_shape = [*x_shape[:2], *[s + a + b for s, (a, b) in zip(x_shape[2:], pads, strict=True)]]
            else:
                weight, padding = widened
        weight = weight.contiguous(memory_format=layout)
        self.out = out_shape(x_shape, weight.shape, padding, stride, dilation)
        self.args = (list(padding), list(stride), list(dilation), groups)
        self.bias, self.act = bias, act
        kernels: dict[str, Kernel] = {}
        if _MKLDNN is not None:
            packed = _REORDER(weight, list(padding), list(stride), list(dilation), groups, list(x_shape))
            kernels["onednn"] = self._onednn(packed, residual)
        macs = prod(self.out) * prod(weight.shape[1:])
        if (groups == 1 and macs <= NATIVE_MAX_MACS) or _MKLDNN is None:
            kernels["native"] = self._native(weight)
        self.kernels = kernels
        self.kernel: Kernel | None = next(iter(kernels.values())) if len(kernels) == 1 else None
        self.trials: dict[str, list[float]] = {name: [] for name in kernels}

    def _onednn(self, packed: torch.Tensor, residual: bool) -> Kernel:
        padding, stride, dilation, groups = self.args
        unary, scalars = _UNARY[self.act]
        bias, binary_unary = self.bias, (unary if self.act else None)

        def onednn(x: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
            if other is None:
                return _MKLDNN(x, packed, bias, padding, stride, dilation, groups, unary, scalars, "")
            return _MKLDNN.binary(x, other, packed, bias, padding, stride, dilation, groups, "add", None,
                                  binary_unary, scalars, None)

        return onednn

    def _native(self, weight: torch.Tensor) -> Kernel:
        padding, stride, dilation, groups = self.args
        bias, act = self.bias, self.act

        def native(x: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
            y = torch.conv2d(x, weight, bias, stride, padding, dilation, groups)
            if other is not None:
                y.add_(other)
            if act == "relu":
                y.relu_()
            elif act == "relu6":
                y.clamp_(0.0, 6.0)
            return y

        return native

    def __call__(self, x: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor | None:
        if self.nhwc:
            x = x.permute(0, 3, 1, 2)
            other = None if other is None else other.permute(0, 3, 1, 2)
        if self.prepad is not None:
            x = pad_spatial(x, self.prepad)
        if not x.is_contiguous(memory_format=self.layout):
            x = x.contiguous(memory_format=self.layout)
        if other is not None:
            if list(other.shape) != self.out or other.dtype != x.dtype:
                return None
            if not other.is_contiguous(memory_format=self.layout):
                other = other.contiguous(memory_format=self.layout)
        y = self.kernel(x, other) if self.kernel is not None else self._trial(x, other)
        # detached: a plain tensor, not a view of the kernel's buffer
        return y.permute(0, 2, 3, 1).detach() if self.nhwc else y

    def _trial(self, x: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
        name = min(self.trials, key=lambda k: len(self.trials[k]))
        start = time.perf_counter()
        y = self.kernels[name](x, other)
        self.trials[name].append(time.perf_counter() - start)
        if all(len(t) > TRIALS for t in self.trials.values()):  # the first call of each is not timed
            best = min(self.trials, key=lambda k: min(self.trials[k][1:]))
            self.kernel = self.kernels[best]
            self.chosen = best
        return y
