"""TensorFlow import converters: reductions (Sum, Mean, Max, Min, Prod, All, Any, ArgMax, ArgMin).

Converters follow the contract in :mod:`lightning_saver.graph.tf_import.table`. The axis input is
a scalar or a vector, negative axes count from the end, an axis named twice is an error (as in
TF), and an empty axis list reduces nothing (the input comes back unchanged). Results keep the input's dtype
(TF's int32 Sum is int32, where torch would widen it to int64). Example::

    table.call("Sum", [x, torch.tensor([0, -1])], {"keep_dims": True})
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lightning_saver.graph.tf_import.table import TF_OPS

Tensor = torch.Tensor


def reduction_axes(op: str, x: Tensor, axis: Tensor) -> list[int]:
    """The non-negative axes named by ``axis`` (a scalar or vector), sorted.

    Raises:
        ValueError: an axis outside ``[-rank, rank)``, or one axis named twice.
    """
    rank = x.dim()
    axes = axis.reshape(-1).tolist()
    bad = [a for a in axes if not -rank <= a < rank]
    if bad:
        raise ValueError(
            f"{op}: reduction axis {bad[0]} is out of range for an input of rank {rank} "
            f"(shape {list(x.shape)}); axes must lie in [{-rank}, {rank})"
        )
    normal = sorted(a % rank for a in axes)
    if len(set(normal)) != len(normal):
        raise ValueError(f"{op}: reduction axes {axes} name one axis twice (input of rank {rank})")
    return normal


def _reduce(
    op: str, x: Tensor, axis: Tensor, keep_dims: bool, one_axis: Callable[[Tensor, int], Tensor]
) -> Tensor:
    """Apply ``one_axis(t, dim)`` (keeping the axis) over every reduced axis, then drop them."""
    axes = reduction_axes(op, x, axis)
    out = x
    for dim in axes:
        out = one_axis(out, dim)
    if not keep_dims and axes:
        out = out.squeeze(axes)
    return out.to(x.dtype)


@TF_OPS.register("Sum")
def sum_(input: Tensor, axis: Tensor, *, keep_dims: bool = False) -> Tensor:
    axes = reduction_axes("Sum", input, axis)
    if not axes:
        return input
    return torch.sum(input, dim=axes, keepdim=keep_dims).to(input.dtype)


@TF_OPS.register("Mean")
def mean(input: Tensor, axis: Tensor, *, keep_dims: bool = False) -> Tensor:
    """The mean; integer inputs divide their (exact) sum by the count, truncating like TF."""
    axes = reduction_axes("Mean", input, axis)
    if not axes:
        return input
    if input.is_floating_point() or input.is_complex():
        return torch.mean(input, dim=axes, keepdim=keep_dims)
    count = 1
    for dim in axes:
        count *= input.shape[dim]
    total = torch.sum(input, dim=axes, keepdim=keep_dims, dtype=torch.int64)
    return torch.div(total, max(count, 1), rounding_mode="trunc").to(input.dtype)


def mean_over_constant_axes() -> Callable[..., Tensor]:
    """``Mean`` for a node whose ``axis`` is a constant (the plan rewrite in :mod:`fuse` installs it in
    ``run`` and ``to_module`` alike): the axes are read from the tensor once per input rank, not on
    every call, and a float input goes straight to ``torch.mean``.

    Reading the axis tensor each call was most of the cost of a global average pool in a network:
    MobileNetV2's Mean of 1x7x7x1280 right after its last convolution took 42 us this way against
    16 us with the axes known (paired, 1 thread); at batch 8, 273 against 193 us. Other inputs
    (integers, an empty axis list) take :func:`mean`, whose errors are unchanged.
    """
    by_rank: dict[int, tuple[int, ...]] = {}

    def mean_constant_axes(input: Tensor, axis: Tensor, *, keep_dims: bool = False) -> Tensor:
        axes = by_rank.get(input.dim())
        if axes is None:
            axes = by_rank[input.dim()] = tuple(reduction_axes("Mean", input, axis))
        if not axes or not (input.is_floating_point() or input.is_complex()):
            return mean(input, axis, keep_dims=keep_dims)
        return torch.mean(input, axes, keep_dims)

    return mean_constant_axes


def _extreme(t: Tensor, dim: int, largest: bool) -> Tensor:
    if t.shape[dim] == 0:
        # TF reduces an empty axis to the reduction's identity; torch.amax refuses it
        if t.is_floating_point():
            start = -torch.inf if largest else torch.inf
        else:
            info = torch.iinfo(t.dtype)
            start = info.min if largest else info.max
        return torch.full(t.shape[:dim] + (1,) + t.shape[dim + 1 :], start, dtype=t.dtype, device=t.device)
    return torch.amax(t, dim=dim, keepdim=True) if largest else torch.amin(t, dim=dim, keepdim=True)


@TF_OPS.register("Max")
def max_(input: Tensor, axis: Tensor, *, keep_dims: bool = False) -> Tensor:
    """The largest value; an empty axis gives ``-inf`` (the lowest integer for ints), as in TF."""
    return _reduce("Max", input, axis, keep_dims, lambda t, d: _extreme(t, d, largest=True))


@TF_OPS.register("Min")
def min_(input: Tensor, axis: Tensor, *, keep_dims: bool = False) -> Tensor:
    """The smallest value; an empty axis gives ``inf`` (the highest integer for ints), as in TF."""
    return _reduce("Min", input, axis, keep_dims, lambda t, d: _extreme(t, d, largest=False))


@TF_OPS.register("Prod")
def prod(input: Tensor, axis: Tensor, *, keep_dims: bool = False) -> Tensor:
    return _reduce("Prod", input, axis, keep_dims, lambda t, d: torch.prod(t, dim=d, keepdim=True))


@TF_OPS.register("All")
def all_(input: Tensor, axis: Tensor, *, keep_dims: bool = False) -> Tensor:
    return _reduce("All", input, axis, keep_dims, lambda t, d: torch.all(t, dim=d, keepdim=True))


@TF_OPS.register("Any")
def any_(input: Tensor, axis: Tensor, *, keep_dims: bool = False) -> Tensor:
    return _reduce("Any", input, axis, keep_dims, lambda t, d: torch.any(t, dim=d, keepdim=True))


def _arg_reduce(op: str, x: Tensor, dimension: Tensor, output_type: torch.dtype, largest: bool) -> Tensor:
    if dimension.numel() != 1:
        raise ValueError(f"{op}: dimension must be a scalar, found shape {list(dimension.shape)}")
    (dim,) = reduction_axes(op, x, dimension)
    if x.is_floating_point():
        # TF's comparisons never pick a NaN; torch's would pick the first one
        x = torch.where(torch.isnan(x), -torch.inf if largest else torch.inf, x)
    # torch returns the first index among ties, as TF does
    index = torch.argmax(x, dim=dim) if largest else torch.argmin(x, dim=dim)
    return index.to(output_type)


@TF_OPS.register("ArgMax")
def arg_max(input: Tensor, dimension: Tensor, *, output_type: torch.dtype = torch.int64) -> Tensor:
    return _arg_reduce("ArgMax", input, dimension, output_type, largest=True)


@TF_OPS.register("ArgMin")
def arg_min(input: Tensor, dimension: Tensor, *, output_type: torch.dtype = torch.int64) -> Tensor:
    return _arg_reduce("ArgMin", input, dimension, output_type, largest=False)


@TF_OPS.register("L2Loss")
def l2_loss(t: Tensor) -> Tensor:
    """``sum(t ** 2) / 2`` over every element (TF1's weight decay term), a scalar."""
    return (t * t).sum() / 2


def _scan(
    op: str, x: Tensor, axis: Tensor, exclusive: bool, reverse: bool, product: bool
) -> Tensor:
    (dim,) = reduction_axes(op, x, axis.reshape(1))
    if reverse:
        x = x.flip(dim)
    out = torch.cumprod(x, dim) if product else torch.cumsum(x, dim)
    if exclusive:
        # shift by one along dim and start from the identity (0 for sums, 1 for products)
        first = torch.ones_like(x.narrow(dim, 0, 1)) if product else torch.zeros_like(x.narrow(dim, 0, 1))
        out = torch.cat([first, out.narrow(dim, 0, x.shape[dim] - 1)], dim)
    if reverse:
        out = out.flip(dim)
    return out.to(x.dtype)


@TF_OPS.register("Cumsum")
def cumsum(x: Tensor, axis: Tensor, *, exclusive: bool = False, reverse: bool = False) -> Tensor:
    """Running sums along ``axis``; ``exclusive`` leaves each element out of its own sum."""
    return _scan("Cumsum", x, axis, exclusive, reverse, product=False)


@TF_OPS.register("Cumprod")
def cumprod(x: Tensor, axis: Tensor, *, exclusive: bool = False, reverse: bool = False) -> Tensor:
    """Running products along ``axis``; ``exclusive`` leaves each element out of its own product."""
    return _scan("Cumprod", x, axis, exclusive, reverse, product=True)


@TF_OPS.register("TopKV2", "TopK")
def top_k(
    input: Tensor, k: Tensor | None = None, *, sorted: bool = True,
    index_type: torch.dtype = torch.int32, **attrs: object,
) -> tuple[Tensor, Tensor]:
    """The ``k`` largest entries of the last axis and their indices; ties go to the lower index, as in TF.

    TopK (v1) carries ``k`` as an attr instead of an input.
    """
    count = int(k.item()) if k is not None else int(attrs["k"])  # type: ignore[call-overload]
    if not 0 <= count <= input.shape[-1]:
        raise ValueError(
            f"TopKV2: k={count} must lie in [0, {input.shape[-1]}] for an input of shape {list(input.shape)}"
        )
    # a stable descending sort keeps equal values in index order; torch.topk does not promise that
    values, indices = torch.sort(input, dim=-1, descending=True, stable=True)
    return values[..., :count], indices[..., :count].to(index_type)
