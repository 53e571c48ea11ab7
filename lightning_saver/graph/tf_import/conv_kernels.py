"""How a folded convolution runs when autograd is off, prepared once per input shape.

Five kernels (and two more for asymmetric padding, below) compute ``act(conv(x, W) + b + other)``
for a float32 4-D convolution:

* ``onednn``: oneDNN's convolution with the bias, the residual sum and the activation inside the
  kernel (``torch.ops.mkldnn._convolution_pointwise``, what ``torch.compile`` emits for CPU
  convolutions), its filter reordered once into oneDNN's blocked layout (given a plain tensor,
  oneDNN reorders it on every call, which at batch 1 costs as much as the convolution);
* ``native``: torch's ``conv2d`` on channels-last tensors, the sum and activation in place after it
  (small convolutions with groups of 1 only). Small convolutions at batch 1 skip oneDNN's per-call
  setup this way: the small CNN's 16x16x16 -> 32 convolution took 35 us against oneDNN's 85 us;
* ``gemm``: a 1x1, stride-1, unpadded convolution on NHWC data is a matrix product of the
  activations viewed as ``[N*H*W, Cin]`` (no copy) with the filter as ``[Cin, Cout]``: one
  ``addmm`` with the bias, the sum and activation in place after it (groups of 1, small ones only).
  MobileNetV2's 1x1 convolutions at batch 1, one thread, inside the network: 7x7 160 -> 960 in
  133 us against conv2d's 190 and oneDNN's 189, 7x7 320 -> 1280 in 372 against 463 and 433, 14x14
  384 -> 64 in 93 against 96 and 115 (but 112x112 16 -> 96 in 872 against oneDNN's 443);
* ``linear``: the same product through oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``,
  filter packed once), the bias and activation inside it. It wins MobileNetV2's large expansions
  with ReLU6 at batch 1 (on a loaded machine: 112x112 16 -> 96 in 623 us against oneDNN's
  convolution's 688, 56x56 24 -> 144 in 320 against 345), where ``gemm`` loses.

* ``dnnl``: oneDNN's convolution through its own C++ API (the optional extension ``_dnnl_conv.cpp``,
  built where Debian's ``libdnnl-dev`` is installed), the primitive and the reordered filter made
  once per shape, so a call only wraps two addresses and executes: torch's oneDNN op rebuilds its
  primitive descriptor on every call (20-40 us hot, 60-160 us inside a network). It takes the
  original filter and TF's asymmetric pads (native to oneDNN: nothing widened, nothing copied), the
  bias, the residual sum (written into a dying residual's buffer, or into a copy of a live one) and
  the activation inside the kernel.

Which one is faster depends on the shapes, the thread count and the CPU, so a prepared shape
times each on its first calls (which still return their results) and keeps the fastest.

TF pads asymmetrically (``SAME`` at stride 2 on even sizes, Keras' ``ZeroPadding2D`` before a
strided convolution, absorbed by ``fuse.py``), torch symmetrically. Copying the input into a padded
tensor cost MobileNetV2 a fifth of its time; instead the padding is made symmetric (the larger
side on both) and the filter is widened by zeros on the short side, which shifts every window back
onto TF's: with pads (0, 1) and a 3x3 filter, a 4x4 filter ``[0, w]`` at padding 1 reads the same
pixels with the same weights. That costs multiply-adds (16/9 of them there; 64/49 for a 7x7 at
pads (2, 3), a TF-style ResNet stem: ``SAME`` at stride 2 on 224x224x3; Keras' ResNet50 pads its
stem symmetrically), so where they are many per input element (``PAD_MIN_MACS_PER_COPIED``) the
``onednn_pad`` and ``native_pad`` kernels are timed too: the original filter on a copy of the
input padded by the asymmetric remainder (``padded_input.py``), the symmetric rest as the
convolution's own padding. The stem ran in 1,799 us in a network against 2,199 widened. A
dilated filter is not widened (its zero taps would land between the pixels): only the ``*_pad``
kernels run it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from math import prod

import torch
import torch.nn.functional as F

from lightning_saver.graph.tf_import.layout import Pads, symmetric
from lightning_saver.graph.tf_import.padded_input import Kernel, PaddedInput

try:
    from lightning_saver.graph.tf_import import _dnnl_conv
except ImportError:  # built only where oneDNN's headers are installed (setup.py)
    _dnnl_conv = None  # type: ignore[assignment]

_MKLDNN = getattr(torch.ops.mkldnn, "_convolution_pointwise", None)
_MKLDNN_INTO = getattr(torch.ops.mkldnn, "_convolution_pointwise_", None)  # the sum written into `other`
_REORDER = getattr(torch.ops.mkldnn, "_reorder_convolution_weight", None)
_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
_REORDER_LINEAR = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
if not torch.backends.mkldnn.is_available() or _REORDER is None:
    _MKLDNN = None
if not torch.backends.mkldnn.is_available() or _REORDER_LINEAR is None:
    _LINEAR = None
_UNARY = {None: ("none", []), "relu": ("relu", []), "relu6": ("hardtanh", [0.0, 6.0])}
TRIALS = 3  # timed calls per kernel (after one untimed) before the fastest is kept
# every kernel a shape may time, in the order they are tried; *_pad only with asymmetric padding
KERNELS = ("onednn", "native", "gemm", "linear", "onednn_pad", "native_pad", "dnnl")
# torch's conv2d is only tried on small convolutions, where oneDNN's fixed cost per call (about
# 30 us) can dominate: the small CNN's (0.4M and 1.2M multiply-adds), MobileNetV2's 1x1 ones at
# 7x7 and 14x14 (7.5M: 161 against 186 us); ResNet50's start at 51M, and timing both on a loaded
# machine there sometimes kept the slower one
NATIVE_MAX_MACS = 1 << 25
# the *_pad kernels are only tried where the widened filter's extra multiply-adds per copied input
# element reach this: in the network, a 7x7 stride-2 stem on 224x224x3 (240 per element) ran in
# 0.82x the widened time on the copy, but MobileNetV2's 3x3 stride-2 first convolution (56)
# ran 5-11% slower (0.84x alone: in the network its input is no longer in cache), and timing a
# few calls on a loaded machine sometimes kept it; strided depthwise convolutions (1.7) lose 1.3-6x
PAD_MIN_MACS_PER_COPIED = 100

_Args = tuple[list[int], list[int], list[int], int]  # padding, stride, dilation, groups


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
    Each kernel takes and returns the caller's layout, so a ``gemm`` on NHWC data permutes nothing
    (a permute costs about 1 us in Python, and the NCHW kernels need four per call).
    The result is a plain tensor (no view), so a following activation can run in place on it.
    With ``overwrite`` (the caller found the residual private and dying) and oneDNN's kernel
    (``onednn``, ``onednn_pad`` or ``dnnl``) or ``gemm`` kept, the result is written into the residual's
    buffer (oneDNN's sum post-op; sgemm accumulating into it, then the bias).
    """

    def __init__(self, x_shape: Sequence[int], weight: torch.Tensor, groups: int, bias: torch.Tensor | None,
                 stride: Sequence[int], dilation: Sequence[int], pads: Pads, act: str | None,
                 nhwc: bool, residual: bool) -> None:
        layout = torch.channels_last if nhwc else torch.contiguous_format
        original = weight  # dnnl's: oneDNN pads asymmetrically itself
        self.nhwc, self.bias, self.act = nhwc, bias, act
        self.stride, self.dilation, self.groups = list(stride), list(dilation), groups
        full = [*x_shape[:2], *[s + a + b for s, (a, b) in zip(x_shape[2:], pads, strict=True)]]
        self.out = out_shape(full, weight.shape, [0 for _ in pads], stride, dilation)
        self.out_size = torch.Size([self.out[0], *self.out[2:], self.out[1]] if nhwc else self.out)
        kernels: dict[str, Kernel] = {}
        self.into: dict[str, Kernel] = {}  # kernels summing into the residual's buffer, by name
        self.padded: PaddedInput | None = None
        narrow: dict[str, Kernel] = {}  # the original filter's kernels, on a padded copy of the input
        narrow_into: dict[str, Kernel] = {}
        padding = symmetric(pads)
        if padding is None:  # the original filter on a padded copy (*_pad), and a widened one
            inside = tuple(min(before, after) for before, after in pads)
            rest = tuple((before - p, after - p) for (before, after), p in zip(pads, inside, strict=True))
            copied = [*x_shape[:2], *[s + a + b for s, (a, b) in zip(x_shape[2:], rest, strict=True)]]
            widened = widen(weight, pads, dilation)
            extra = 0 if widened is None else prod(self.out) * (widened[0][0].numel() - weight[0].numel())
            if widened is None or extra >= PAD_MIN_MACS_PER_COPIED * prod(copied):
                self.padded = PaddedInput(x_shape, rest, nhwc)
                narrow, narrow_into = self._spatial(weight.contiguous(memory_format=layout), inside, copied,
                                                    residual)
            if widened is not None:
                weight, padding = widened
        if padding is not None:
            weight = weight.contiguous(memory_format=layout)
            kernels, self.into = self._spatial(weight, padding, x_shape, residual)
            macs = prod(self.out) * prod(weight.shape[1:])
            if nhwc and groups == 1 and macs <= NATIVE_MAX_MACS and not any(padding) \
                    and all(k == 1 for k in weight.shape[2:]) and all(s == 1 for s in stride):
                # [Cin, Cout] contiguous: sgemm was slower on the transposed view (7x7 960 -> 160: 126 us, 99)
                matrix = weight.reshape(weight.shape[0], -1).t().contiguous()
                kernels["gemm"] = self._gemm(matrix)
                if residual:
                    self.into["gemm"] = self._gemm_into(matrix)
                if _LINEAR is not None:
                    kernels["linear"] = self._linear(weight)
        if self.padded is not None:  # timed after the others
            kernels.update({name + "_pad": self.padded.wrap(k) for name, k in narrow.items()})
            self.into.update({name + "_pad": self.padded.wrap(k) for name, k in narrow_into.items()})
        if _dnnl_conv is not None and weight.dtype == torch.float32 and len(x_shape) == 4:
            self._add_dnnl(kernels, original, x_shape, pads, residual)
        self.kernels = kernels
        self.chosen: str | None = next(iter(kernels)) if len(kernels) == 1 else None
        self.kernel: Kernel | None = kernels[self.chosen] if self.chosen else None
        self.trials: dict[str, list[float]] = {name: [] for name in kernels}

    def _spatial(self, weight: torch.Tensor, padding: Sequence[int], x_shape: Sequence[int],
                 residual: bool) -> tuple[dict[str, Kernel], dict[str, Kernel]]:
        """The ``onednn`` and ``native`` kernels of ``weight`` (in the caller's memory format) at
        symmetric ``padding`` on inputs of ``x_shape`` (NCHW), and those summing into the residual."""
        args = (list(padding), self.stride, self.dilation, self.groups)
        kernels: dict[str, Kernel] = {}
        into: dict[str, Kernel] = {}
        if _MKLDNN is not None:
            packed = _REORDER(weight, *args, list(x_shape))
            kernels["onednn"] = self._in_layout(self._onednn(packed, args))
            if residual and _MKLDNN_INTO is not None:
                into["onednn"] = self._in_layout(self._onednn_into(packed, args))
        macs = prod(self.out) * prod(weight.shape[1:])
        if (self.groups == 1 and macs <= NATIVE_MAX_MACS) or _MKLDNN is None:
            kernels["native"] = self._in_layout(self._native(weight, args))
        return kernels, into

    def _add_dnnl(self, kernels: dict[str, Kernel], weight: torch.Tensor, x_shape: Sequence[int], pads: Pads,
                  residual: bool) -> None:
        """The ``dnnl`` kernel (and its ``into`` variant) of the original ``weight`` at TF's ``pads``."""
        bias = None if self.bias is None else self.bias.detach().contiguous().numpy()
        filter_ = weight.detach().contiguous().numpy()  # OIHW
        before, after = [b for b, _ in pads], [a for _, a in pads]
        try:
            conv = _dnnl_conv.Conv(tuple(x_shape), self.nhwc, filter_, self.groups, bias, self.stride,
                                   self.dilation, before, after, self.act or "none", residual)
        except RuntimeError:  # a convolution this oneDNN cannot make: torch's kernels run it
            return
        if list(conv.out_shape) != self.out:
            return
        run, size = conv.run, self.out_size

        def dnnl(x: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
            if (other is not None) != residual:
                raise ValueError(f"conv_kernels: dnnl kernel made {'with' if residual else 'without'} a "
                                 f"residual sum, called {'without' if other is None else 'with'} one")
            y = torch.empty(size) if other is None else torch.empty(size).copy_(other)  # summed into y
            run(x.data_ptr(), y.data_ptr())  # x and y stay referenced until it returns
            return y

        def dnnl_into(x: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
            assert other is not None  # only called with a residual
            run(x.data_ptr(), other.data_ptr())
            return other

        kernels["dnnl"] = dnnl
        if residual:
            self.into["dnnl"] = dnnl_into

    def _in_layout(self, kernel: Kernel) -> Kernel:
        """A kernel of channels-first tensors, called with the caller's layout."""
        if not self.nhwc:
            return kernel

        def nhwc(x: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
            y = kernel(x.permute(0, 3, 1, 2), None if other is None else other.permute(0, 3, 1, 2))
            return y.permute(0, 2, 3, 1).detach()  # detached: a plain tensor, not a view

        nhwc.__name__ = kernel.__name__
        return nhwc

    def _onednn(self, packed: torch.Tensor, args: _Args) -> Kernel:
        padding, stride, dilation, groups = args
        unary, scalars = _UNARY[self.act]
        bias, act, binary_unary, after = self.bias, self.act, *_after_sum(self.act)

        def onednn(x: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
            if other is None:
                return _MKLDNN(x, packed, bias, padding, stride, dilation, groups, unary, scalars, "")
            y = _MKLDNN.binary(x, other, packed, bias, padding, stride, dilation, groups, "add", None,
                               binary_unary, [], None)
            return _finish(y, None, act) if after else y

        return onednn

    def _onednn_into(self, packed: torch.Tensor, args: _Args) -> Kernel:
        padding, stride, dilation, groups = args
        bias, act, binary_unary, after = self.bias, self.act, *_after_sum(self.act)

        def onednn_into(x: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
            y = _MKLDNN_INTO.binary(other, x, packed, bias, padding, stride, dilation, groups, "add", 1.0,
                                    binary_unary, [], None)
            return _finish(y, None, act) if after else y

        return onednn_into

    def _native(self, weight: torch.Tensor, args: _Args) -> Kernel:
        padding, stride, dilation, groups = args
        bias, act = self.bias, self.act

        def native(x: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
            return _finish(torch.conv2d(x, weight, bias, stride, padding, dilation, groups), other, act)

        return native

    def _gemm(self, w: torch.Tensor) -> Kernel:
        """NHWC data viewed as ``[N*H*W, Cin]`` times the filter as ``w``, ``[Cin, Cout]``."""
        bias, act, size = self.bias, self.act, self.out_size
        cin, cout = w.shape
        rows = size.numel() // cout

        def gemm(x: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
            x2 = x.view(rows, cin)
            y = torch.mm(x2, w) if bias is None else torch.addmm(bias, x2, w)
            return _finish(y, None if other is None else other.view(rows, cout), act).view(size).detach()

        return gemm

    def _gemm_into(self, w: torch.Tensor) -> Kernel:
        """``gemm`` accumulating into the residual's buffer (sgemm with beta 1), then the bias."""
        bias, act, size = self.bias, self.act, self.out_size
        cin, cout = w.shape
        rows = size.numel() // cout

        def gemm_into(x: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
            assert other is not None  # only called with a residual
            y = other.view(rows, cout).addmm_(x.view(rows, cin), w)
            _finish(y, bias, act)
            return other

        return gemm_into

    def _linear(self, weight: torch.Tensor) -> Kernel:
        """The same product as ``gemm`` through oneDNN's matmul, the bias and activation inside it."""
        bias, act, size = self.bias, self.act, self.out_size
        cout, cin = weight.shape[:2]
        rows = size.numel() // cout
        packed = _REORDER_LINEAR(weight.reshape(cout, cin).contiguous(), rows)
        unary, scalars = _UNARY[act]

        def linear(x: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
            x2 = x.view(rows, cin)
            if other is None:
                y = _LINEAR(x2, packed, bias, unary, scalars, "")
            else:  # the sum inside, the activation after it
                y = _finish(_LINEAR.binary(x2, other.view(rows, cout), packed, bias, "add"), None, act)
            return y.view(size).detach()

        return linear

    def __call__(self, x: torch.Tensor, other: torch.Tensor | None,
                 overwrite: bool = False) -> torch.Tensor | None:
        if x.device.type != "cpu" or (other is not None and other.device.type != "cpu"):
            # the kernels are CPU-only; dnnl reads raw addresses, so another device's data must never
            # reach it (a module moved to another device after a CPU call, or mixed devices): the
            # caller's plain ops run it, or raise torch's device error
            return None
        if not x.is_contiguous():  # NHWC (a channels-last view) or NCHW, as the kernels want
            x = x.contiguous()
        if other is not None:
            if other.shape != self.out_size or other.dtype != x.dtype:
                return None
            if not other.is_contiguous():
                other = other.contiguous()
        kernel = self.kernel
        if overwrite and self.chosen is not None:
            kernel = self.into.get(self.chosen, kernel)  # a contiguous copy made above is private too
        return kernel(x, other) if kernel is not None else self._trial(x, other)

    def _trial(self, x: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
        name = min(self.trials, key=lambda k: len(self.trials[k]))
        start = time.perf_counter()
        y = self.kernels[name](x, other)
        self.trials[name].append(time.perf_counter() - start)
        if all(len(t) > TRIALS for t in self.trials.values()):
            self.chosen = fastest(self.trials)
            self.kernel = self.kernels[self.chosen]
            if self.padded is not None and not self.chosen.endswith("_pad"):
                self.padded.release()
        return y


def fastest(trials: dict[str, list[float]]) -> str:
    """The kernel with the shortest timed call; each one's first call (a warm-up) does not count."""
    return min(trials, key=lambda name: min(trials[name][1:]))


def _after_sum(act: str | None) -> tuple[str | None, bool]:
    """The activation oneDNN runs after its residual sum, and whether ours must run after the kernel:
    its binary post-op takes only a ReLU after the sum ("Unary Fusion behavior undefined." for ReLU6)."""
    return ("relu", False) if act == "relu" else (None, act is not None)


def _finish(y: torch.Tensor, other: torch.Tensor | None, act: str | None) -> torch.Tensor:
    """The residual sum and activation, in place on a kernel's fresh output."""
    if other is not None:
        y.add_(other)
    if act == "relu":
        y.relu_()
    elif act == "relu6":
        y.clamp_(0.0, 6.0)
    return y
