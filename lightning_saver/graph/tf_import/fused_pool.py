"""The step a zero ``Pad`` feeding only a ``MaxPool`` becomes (Keras' ``ZeroPadding2D`` before
``MaxPooling2D``, ResNet's ``pool1_pad``; :mod:`fuse` finds the pair).

Materialising the padded tensor cost as much as the pooling itself (ResNet50 at batch 8: 8.5 ms
for the ``Pad`` of 8x112x112x64, 7.5 ms for the pooling). Instead torch pools the unpadded input
with implicit padding, which never wins a max, and the windows that reach into TF's zero padding
then take ``max(value, 0)``, which is what a zero cell adds to a max: the same result, whatever
the sign of the data. With autograd recording, the original ops run (TF's gradient of a tie
between a padded zero and a zero value goes to one cell; only the ops themselves say which).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from lightning_saver.graph.tf_import.layout import Pads, from_nchw, to_nchw, torch_pool_padding
from lightning_saver.graph.tf_import.ops_nn import pool_geometry, tiled_max_pool, tiled_max_pool_views


def _windows_at_pads(n: int, size: int, k: int, s: int, before: int) -> tuple[int, int]:
    """How many of the ``n`` windows start in the padding before, and where those that reach the
    padding after start."""
    first = min(n, -(-before // s))  # windows i with i * s < before
    last = max(first, -(-(before + size - k + 1) // s))  # i * s + k - 1 >= before + size
    return first, min(last, n)


def fused_pad_max_pool(pad: Any, pool: Any, pre: Pads,
                       nonnegative: bool = False) -> Callable[..., torch.Tensor]:
    """The step ``(x, *operands) -> MaxPool(Pad(x, *operands))`` for a VALID 2-D ``MaxPool`` and
    the spatial zero pads ``pre`` (what the constant operands of the ``Pad``/``PadV2`` say).

    ``nonnegative``: ``x`` comes from a ``Relu``/``Relu6`` (ResNet's ``conv1_relu``), so a zero
    cell never beats a value and the border windows need no ``max(value, 0)``. The geometry is
    worked out once per input shape: recomputing it each call, and the two border passes, cost
    ResNet50's pooling of 1x112x112x64 right after its first convolution 130 us of 700.
    """
    kwargs = pool.kwargs
    data_format = str(kwargs.get("data_format", "NHWC"))
    shapes: dict[tuple[int, ...], Any] = {}  # input shape -> (kernel, stride, padding, ceil, borders) or None

    def plain(x: torch.Tensor, *operands: torch.Tensor) -> torch.Tensor:
        return pool.func(pad.func(x, *operands, **pad.kwargs), **kwargs)

    def geometry(xc: torch.Tensor) -> Any:
        sizes = tuple(size + a + b for size, (a, b) in zip(xc.shape[2:], pre, strict=True))
        kernel, stride, own = pool_geometry(
            "MaxPool", sizes, tuple(kwargs["ksize"]), tuple(kwargs["strides"]), str(kwargs["padding"]),
            tuple(kwargs.get("explicit_paddings", ())), data_format)
        torch_args = torch_pool_padding(tuple(xc.shape[2:]), kernel, stride, pre)
        if any(a or b for a, b in own) or torch_args is None:
            return None
        borders = []  # (dim, start, length) of the output windows that reach into the zero padding
        # TF's VALID output sizes over the padded input (torch_pool_padding matched torch's to them)
        out_sizes = [(size - k) // s + 1 for size, k, s in zip(sizes, kernel, stride, strict=True)]
        geometry = zip(xc.shape[2:], kernel, stride, pre, out_sizes, strict=True)
        for dim, (size, k, s, (before, _), n) in enumerate(geometry, 2):
            first, last = _windows_at_pads(n, size, k, s, before)
            borders += [(dim, 0, first)] if first else []
            borders += [(dim, last, n - last)] if last < n else []
        return kernel, stride, torch_args[0], torch_args[1], () if nonnegative else tuple(borders)

    def fused(x: torch.Tensor, *operands: torch.Tensor) -> torch.Tensor:
        if (x.dim() != 4 or not x.is_floating_point() or (torch.is_grad_enabled() and x.requires_grad)
                or data_format not in ("NHWC", "NCHW")):
            return plain(x, *operands)
        xc = to_nchw(x, data_format, pool.op)
        key = tuple(xc.shape)
        if key not in shapes:
            shapes[key] = geometry(xc)
        found = shapes[key]
        if found is None:
            return plain(x, *operands)
        kernel, stride, padding, ceil, borders = found
        y = F.max_pool2d(xc, kernel, stride, padding, ceil_mode=ceil)
        for dim, start, length in borders:
            y.narrow(dim, start, length).clamp_(min=0)
        return from_nchw(y, data_format, pool.op)

    fused.__name__ = fused.__qualname__ = "pad_max_pool_folded"
    fused.nonnegative = nonnegative  # type: ignore[attr-defined]
    return fused


def prepared_max_pool(pool: Any) -> Callable[..., torch.Tensor]:
    """The step for a plain 2-D ``MaxPool`` (the plan rewrite in :mod:`fuse`): how to pool is
    decided once per input shape, then each call goes straight to it.

    The converter :func:`ops_nn.max_pool` re-resolved its attrs on every call: paired on the small
    CNN's pools right after their convolutions (1 thread), 25 us for 1x32x32x16 where torch's
    pooling alone takes 20, 70 us for 8x32x32x16 where the maxima of strided views take 51. The
    choice is the converter's (strided views for non-overlapping windows on inputs of at least
    ``_TILED_MIN_SIZE`` elements, else torch's pooling with TF's padding); with autograd recording,
    or for anything else, the converter runs.
    """
    kwargs = pool.kwargs
    data_format = str(kwargs.get("data_format", "NHWC"))
    ksize, strides = tuple(int(k) for k in kwargs["ksize"]), tuple(int(s) for s in kwargs["strides"])
    shapes: dict[tuple[int, ...], Any] = {}  # input shape -> ("tiles", kh, kw), ("torch", ...) or None

    def how(x: torch.Tensor) -> Any:
        if data_format not in ("NHWC", "NCHW") or len(ksize) != 4:
            return None
        if data_format == "NHWC" and ksize == strides and kwargs["padding"] in ("VALID", "SAME") \
                and ksize[0] == ksize[3] == 1 and tiled_max_pool(x, ksize[1], ksize[2]) is not None:
            return "tiles", ksize[1], ksize[2]
        xc = to_nchw(x, data_format, pool.op)
        kernel, stride, pads = pool_geometry(
            "MaxPool", tuple(xc.shape[2:]), ksize, strides, str(kwargs["padding"]),
            tuple(kwargs.get("explicit_paddings", ())), data_format)
        torch_args = torch_pool_padding(tuple(xc.shape[2:]), kernel, stride, pads)
        return None if torch_args is None else ("torch", kernel, stride, *torch_args)

    def max_pool_prepared(input: torch.Tensor, **attrs: Any) -> torch.Tensor:
        if input.dim() != 4 or not input.is_floating_point() or (
                torch.is_grad_enabled() and input.requires_grad):
            return pool.func(input, **attrs)
        key = tuple(input.shape)
        if key not in shapes:
            shapes[key] = how(input)
        found = shapes[key]
        if found is None or (found[0] == "tiles" and not input.is_contiguous()):
            return pool.func(input, **attrs)
        if found[0] == "tiles":
            return tiled_max_pool_views(input, found[1], found[2])
        _, kernel, stride, padding, ceil = found
        y = F.max_pool2d(to_nchw(input, data_format, pool.op), kernel, stride, padding, ceil_mode=ceil)
        return from_nchw(y, data_format, pool.op)

    max_pool_prepared.decided = shapes  # type: ignore[attr-defined]  # what each shape took, for tests
    return max_pool_prepared
