"""The input of a convolution copied into a zero-bordered tensor, for the ``*_pad`` kernels.

TF pads asymmetrically and torch's convolutions symmetrically. ``conv_kernels.py`` either widens
the filter with zero taps (no copy, more multiply-adds) or, with the ``*_pad`` kernels, copies the
input into a tensor padded by the asymmetric remainder and runs the original filter with the
symmetric rest as its padding: a 7x7 stride-2 ``SAME`` stem on 224x224x3 (pads (2, 3)) reads a
225x225 copy at padding 2 instead of an 8x8 filter at padding 3, 1,499 us against 1,887 alone (one
thread, batch 1). A strided depthwise convolution on a large image loses the other way
(112x112x96: the copy alone 346 us, the widened convolution 320).

The padded tensor is kept between calls, its border zeroed once: only the interior is copied
(38 us for 224x224x3, against 52 for ``F.pad``, which fills the whole tensor first). One call at a
time may use it: a call that finds it taken (another thread inside the same convolution) pads a
fresh copy instead. Tensors over ``KEEP_MAX_BYTES`` are not kept, and neither is one whose
convolution kept another kernel (:meth:`PaddedInput.release`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from math import prod

import torch
import torch.nn.functional as F

from lightning_saver.graph.tf_import.layout import Pads

Kernel = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
KEEP_MAX_BYTES = 16 << 20  # a padded tensor larger than this is allocated and filled on each call


class PaddedInput:
    """Copies of an NCHW or NHWC input (the caller's layout) padded by ``pads`` (spatial, before/after)."""

    def __init__(self, x_shape: Sequence[int], pads: Pads, nhwc: bool) -> None:
        spatial = [size + a + b for size, (a, b) in zip(x_shape[2:], pads, strict=True)]
        self.shape = [x_shape[0], *spatial, x_shape[1]] if nhwc else [*x_shape[:2], *spatial]
        self.flat: list[int] = [0, 0] if nhwc else []  # F.pad's order: the last dimension first
        for before, after in reversed(pads):
            self.flat += [before, after]
        inner = [slice(a, a + size) for size, (a, _) in zip(x_shape[2:], pads, strict=True)]
        everything = slice(None)
        self.index = (everything, *inner, everything) if nhwc else (everything, everything, *inner)
        self.lock = threading.Lock()
        self.buffer: torch.Tensor | None = None
        self.inner: torch.Tensor | None = None
        self.keep = True  # False once released: a trial call still in flight then pads a fresh copy

    def wrap(self, kernel: Kernel) -> Kernel:
        """``kernel`` (of a padded input, the caller's layout) called with the unpadded input."""

        def padded(x: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
            if not self.lock.acquire(blocking=False):  # another thread is copying into the kept tensor
                return kernel(F.pad(x, self.flat), other)
            try:
                return kernel(self._copy(x), other)
            finally:
                self.lock.release()

        padded.__name__ = kernel.__name__ + "_pad"
        return padded

    def _copy(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` padded, in the kept tensor (made on first use); the caller holds the lock."""
        buffer, inner = self.buffer, self.inner
        if buffer is None or inner is None or buffer.dtype != x.dtype or buffer.device != x.device:
            if not self.keep or prod(self.shape) * x.element_size() > KEEP_MAX_BYTES:
                return F.pad(x, self.flat)
            # a normal tensor even under inference_mode: an inference tensor refuses in-place copies
            # outside it, so a later call under no_grad would fail
            with torch.inference_mode(False):
                buffer = torch.zeros(self.shape, dtype=x.dtype, device=x.device)
                inner = buffer[self.index]
            self.buffer, self.inner = buffer, inner
        inner.copy_(x)
        return buffer

    def release(self) -> None:
        """Drop the kept tensor for good (its convolution kept a kernel that reads the input as it is)."""
        with self.lock:
            self.keep = False
            self.buffer = self.inner = None
