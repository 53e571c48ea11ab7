"""TensorFlow layouts and padding rules, computed in one place for every NN converter.

TF image ops speak ``data_format`` ("NHWC" default, or "NCHW") and pad by name: ``VALID`` (none),
``SAME`` (output size ``ceil(in / stride)``, the odd pixel at the bottom/right) or ``EXPLICIT``
(``explicit_paddings``, ``2 * rank`` ints in ``data_format`` order). torch works channels-first
and pads symmetrically, so converters move to NCHW, ask :func:`spatial_pads` for the per-side
amounts and either hand symmetric ones to torch or call :func:`pad_spatial` first.

Example::

    x = to_nchw(images, "NHWC")                        # [N, C, H, W]
    pads = spatial_pads(x.shape[2:], (3, 3), (2, 2), (1, 1), "SAME", [], "NHWC", "Conv2D")
    # ((0, 1), (0, 1)) for a 4x4 image: TF puts the odd pixel after
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lightning_saver.errors import GraphImportError, UnsupportedOpError

Pads = tuple[tuple[int, int], ...]


def check_data_format(data_format: str, op: str) -> bool:
    """True for a channels-first format (NCHW, NCDHW), False for channels-last; else an error."""
    if data_format in ("NHWC", "NDHWC", "NWC"):
        return False
    if data_format in ("NCHW", "NCDHW", "NCW"):
        return True
    raise UnsupportedOpError(
        f"{op}: data_format {data_format!r} is not supported; expected 'NHWC' or 'NCHW'"
    )


def to_nchw(x: torch.Tensor, data_format: str, op: str = "op") -> torch.Tensor:
    """``x`` moved to channels-first (a view; nothing is copied for NCHW)."""
    if check_data_format(data_format, op):
        return x
    return x.movedim(-1, 1)


def from_nchw(x: torch.Tensor, data_format: str, op: str = "op") -> torch.Tensor:
    """A channels-first result moved back to ``data_format``."""
    if check_data_format(data_format, op):
        return x
    return x.movedim(1, -1)


def spatial_attr(values: Sequence[int], data_format: str, name: str, op: str) -> tuple[int, ...]:
    """The spatial entries of a per-dimension attr (strides, ksize, dilations) of a 4-D/5-D op.

    TF's CPU kernels refuse a stride or window over the batch or channel dimension, and so do we.
    """
    values = [int(v) for v in values]
    if len(values) not in (4, 5):
        raise GraphImportError(f"{op}: attr {name} must have 4 (or 5) entries, found {values}")
    if check_data_format(data_format, op):
        outer, spatial = (values[0], values[1]), values[2:]
    else:
        outer, spatial = (values[0], values[-1]), values[1:-1]
    if outer != (1, 1):
        raise UnsupportedOpError(
            f"{op}: {name}={values} acts on the batch or channel dimension ({data_format}); "
            "only spatial strides/windows are supported"
        )
    return tuple(spatial)


def same_pads(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TF SAME padding of one dimension as (before, after); the odd pixel goes after."""
    effective = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


def spatial_pads(
    sizes: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    padding: str,
    explicit_paddings: Sequence[int],
    data_format: str,
    op: str,
) -> Pads:
    """Per spatial dimension (before, after) padding for TF's ``padding`` attr."""
    if padding == "VALID":
        return tuple((0, 0) for _ in sizes)
    if padding == "SAME":
        return tuple(same_pads(*args) for args in zip(sizes, kernel, strides, dilations, strict=True))
    if padding == "EXPLICIT":
        flat = [int(p) for p in explicit_paddings]
        if len(flat) != 2 * (len(sizes) + 2):
            raise GraphImportError(
                f"{op}: explicit_paddings must hold {2 * (len(sizes) + 2)} ints, found {flat}"
            )
        pairs = [(flat[2 * i], flat[2 * i + 1]) for i in range(len(flat) // 2)]
        outer = (pairs[0], pairs[1]) if check_data_format(data_format, op) else (pairs[0], pairs[-1])
        if outer != ((0, 0), (0, 0)):
            raise GraphImportError(f"{op}: explicit_paddings={flat} pads the batch or channel dimension")
        return tuple(pairs[2:] if check_data_format(data_format, op) else pairs[1:-1])
    raise GraphImportError(f"{op}: padding {padding!r} is not one of 'SAME', 'VALID', 'EXPLICIT'")


def symmetric(pads: Pads) -> tuple[int, ...] | None:
    """The torch ``padding=`` tuple when every dimension pads both sides alike, else None."""
    if all(before == after for before, after in pads):
        return tuple(before for before, _ in pads)
    return None


def pad_spatial(x: torch.Tensor, pads: Pads, value: float = 0.0) -> torch.Tensor:
    """Pad the trailing spatial dimensions of a channels-first tensor (negative amounts crop)."""
    flat: list[int] = []
    for before, after in reversed(pads):
        flat += [before, after]
    if not any(flat):
        return x
    return F.pad(x, flat, value=value)


# the same few geometries come back call after call (graph.run per batch): the answers are kept
@functools.lru_cache(maxsize=512)
def torch_pool_padding(
    sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int], pads: Pads
) -> tuple[tuple[int, ...], bool] | None:
    """Symmetric torch pooling ``padding`` and ``ceil_mode`` that reproduce TF's ``pads``, else None.

    torch pools pad implicitly (-inf for max, excluded from an average's divisor with
    ``count_include_pad=False``). Symmetric pads map directly; in ceil mode torch lets the last
    window hang past the end, which is TF's extra SAME pixel after. Either way the input is not
    copied into a padded tensor. Arguments must be hashable (tuples, ``torch.Size``): answers are cached.
    """
    befores = tuple(before for before, _ in pads)
    if any(before > k // 2 for before, k in zip(befores, kernel, strict=True)):
        return None
    if all(before == after for before, after in pads):
        return befores, False
    for size, k, s, (before, after) in zip(sizes, kernel, strides, pads, strict=True):
        tf_out = (size + before + after - k) // s + 1
        torch_out = -(-(size + 2 * before - k) // s) + 1
        if (torch_out - 1) * s >= size + before:
            torch_out -= 1
        if after < before or torch_out != tf_out:
            return None
    return befores, True
