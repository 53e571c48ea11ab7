"""TensorFlow import converters: Cast, Select, OneHot, gathers, Range, Fill and the *Like ops.

Registered by :func:`table.load_converters`; converters follow the contract in
:mod:`lightning_saver.graph.tf_import.table`. Example::

    table.call("GatherV2", [params, torch.tensor([2, 0]), torch.tensor(1)], {"batch_dims": 0})
"""

from __future__ import annotations

import math

import torch

from lightning_saver.graph.tf_import.limits import check_size
from lightning_saver.graph.tf_import.table import TF_OPS

Tensor = torch.Tensor

# Cast(Truncate=True) clears the float32 mantissa bits the target type cannot hold, then casts
_TRUNCATE_MASKS = {torch.bfloat16: ~((1 << 16) - 1), torch.float16: ~((1 << 13) - 1)}


@TF_OPS.register("Cast")
def cast(x: Tensor, *, DstT: torch.dtype, Truncate: bool = False) -> Tensor:
    """Convert to ``DstT``: floats to ints truncate toward zero, nonzero to bool is True.

    ``Truncate=True`` rounds float32 to bfloat16/half toward zero instead of to nearest even.
    """
    if Truncate and x.dtype == torch.float32 and DstT in _TRUNCATE_MASKS:
        cut = (x.detach().view(torch.int32) & _TRUNCATE_MASKS[DstT]).view(torch.float32)
        x = x + (cut - x).detach()  # the truncated value, with a plain cast's gradient
    if x.is_complex() and not DstT.is_complex:
        x = x.real  # TF keeps the real part; torch would warn about it
    return x.to(DstT)


@TF_OPS.register("Select")
def select(condition: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """``condition ? x : y``; a vector condition picks whole rows of higher-rank ``x``, ``y``."""
    if condition.dim() == 1 and x.dim() > 1:
        condition = condition.reshape((-1,) + (1,) * (x.dim() - 1))
    return torch.where(condition, x, y)


@TF_OPS.register("SelectV2")
def select_v2(condition: Tensor, t: Tensor, e: Tensor) -> Tensor:
    """``condition ? t : e`` with all three broadcast together."""
    return torch.where(condition, t, e)


@TF_OPS.register("OneHot")
def one_hot(indices: Tensor, depth: Tensor, on_value: Tensor, off_value: Tensor, *, axis: int = -1) -> Tensor:
    """A new axis of length ``depth`` at ``axis``; indices outside ``[0, depth)`` give all-off rows.

    Raises:
        ValueError: a negative ``depth``.
    """
    if int(depth) < 0:
        raise ValueError(f"OneHot: depth must be non-negative, found {int(depth)}")
    check_size("OneHot", [*indices.shape, int(depth)], max(on_value.element_size(), 1))
    classes = torch.arange(int(depth), dtype=indices.dtype, device=indices.device)
    hot = indices.unsqueeze(-1) == classes
    if axis != -1:
        hot = hot.movedim(-1, axis)
    return torch.where(hot, on_value, off_value)


def _check_indices(op: str, indices: Tensor, size: int, what: str) -> None:
    bad = (indices < 0) | (indices >= size)
    if bool(bad.any()):
        raise IndexError(
            f"{op}: index {int(indices[bad][0])} is out of range [0, {size}) for {what}; "
            "TF refuses it too (on CPU), so fix the indices feeding this node"
        )


@TF_OPS.register("GatherV2")
def gather_v2(params: Tensor, indices: Tensor, axis: Tensor, *, batch_dims: int = 0) -> Tensor:
    """``params`` sliced along ``axis`` at ``indices``; the first ``batch_dims`` axes are shared.

    The result's shape is ``params.shape[:axis] + indices.shape[batch_dims:] + params.shape[axis+1:]``.

    Raises:
        ValueError: ``axis`` before the batch axes. IndexError: an index outside the gathered axis.
    """
    axis_ = int(axis)
    axis_ += params.dim() if axis_ < 0 else 0
    batch_dims += indices.dim() if batch_dims < 0 else 0
    if not batch_dims <= axis_ < params.dim():
        raise ValueError(
            f"GatherV2: axis {int(axis)} must lie in [{batch_dims}, {params.dim()}) for params of shape "
            f"{list(params.shape)} with batch_dims {batch_dims}"
        )
    _check_indices("GatherV2", indices, params.shape[axis_], f"axis {axis_} of params {list(params.shape)}")
    index = indices.long()
    if batch_dims == 0:
        flat = torch.index_select(params, axis_, index.reshape(-1))
        return flat.reshape(params.shape[:axis_] + index.shape + params.shape[axis_ + 1 :])
    batch = params.shape[:batch_dims]
    pre = params.shape[batch_dims:axis_]
    nb = math.prod(batch)
    flat_params = params.reshape((nb,) + params.shape[batch_dims:]).movedim(axis_ - batch_dims + 1, 1)
    flat_index = index.reshape((nb,) + index.shape[batch_dims:])
    rows = torch.arange(nb, device=params.device).reshape((nb,) + (1,) * (flat_index.dim() - 1))
    picked = flat_params[rows, flat_index]  # (nb, *index_tail, *pre, *post)
    n_tail = flat_index.dim() - 1
    order = [0, *range(1 + n_tail, 1 + n_tail + len(pre)), *range(1, 1 + n_tail)]
    order += range(len(order), picked.dim())
    picked = picked.permute(order)
    return picked.reshape(batch + picked.shape[1:])


@TF_OPS.register("GatherNd")
def gather_nd(params: Tensor, indices: Tensor) -> Tensor:
    """Slices of ``params`` at the index tuples in the last axis of ``indices``."""
    depth = indices.shape[-1]
    lead = indices.shape[:-1]
    if depth == 0:
        return params.expand(lead + params.shape)
    for axis in range(depth):
        _check_indices("GatherNd", indices[..., axis], params.shape[axis], f"axis {axis} of params")
    index = indices.long()
    return params[tuple(index[..., axis] for axis in range(depth))]


def _scatter_nd(op: str, tensor: Tensor, indices: Tensor, updates: Tensor, accumulate: bool) -> Tensor:
    depth = indices.shape[-1]
    for axis in range(depth):
        _check_indices(op, indices[..., axis], tensor.shape[axis], f"axis {axis} of tensor")
    index = tuple(indices.long()[..., axis] for axis in range(depth))
    return tensor.index_put(index, updates.to(tensor.dtype), accumulate=accumulate)


@TF_OPS.register("TensorScatterUpdate")
def tensor_scatter_update(tensor: Tensor, indices: Tensor, updates: Tensor) -> Tensor:
    """``tensor`` with the slices at the index tuples in ``indices``' last axis replaced by ``updates``."""
    return _scatter_nd("TensorScatterUpdate", tensor, indices, updates, accumulate=False)


@TF_OPS.register("TensorScatterAdd")
def tensor_scatter_add(tensor: Tensor, indices: Tensor, updates: Tensor) -> Tensor:
    """``tensor`` with ``updates`` added at the index tuples in ``indices``' last axis."""
    return _scatter_nd("TensorScatterAdd", tensor, indices, updates, accumulate=True)


@TF_OPS.register("Range")
def range_(start: Tensor, limit: Tensor, delta: Tensor) -> Tensor:
    """``start, start + delta, ...`` up to (excluding) ``limit``, in the inputs' dtype.

    Raises:
        ValueError: ``delta`` is 0, or its sign can never reach ``limit``.
    """
    if bool(delta == 0):
        raise ValueError("Range: delta must not be 0")
    if (bool(delta > 0) and bool(start > limit)) or (bool(delta < 0) and bool(start < limit)):
        raise ValueError(
            f"Range: start {start.item()} cannot reach limit {limit.item()} with delta {delta.item()}"
        )
    dtype = start.dtype
    if dtype.is_floating_point:
        # TF counts the elements in the op's own dtype, so edge cases round as it does
        size = int(torch.ceil(torch.abs((limit.to(dtype) - start) / delta.to(dtype))))
    else:
        size = len(range(int(start), int(limit), int(delta)))
    check_size("Range", [size], start.element_size())
    steps = torch.arange(size, dtype=dtype, device=start.device)
    return start + steps * delta.to(dtype)


@TF_OPS.register("Fill")
def fill(dims: Tensor, value: Tensor) -> Tensor:
    shape = [int(d) for d in dims.reshape(-1).tolist()]
    check_size("Fill", shape, value.element_size())
    return value.reshape(()).expand(shape).contiguous()


@TF_OPS.register("ZerosLike")
def zeros_like(x: Tensor) -> Tensor:
    return torch.zeros_like(x)


@TF_OPS.register("OnesLike")
def ones_like(x: Tensor) -> Tensor:
    return torch.ones_like(x)
