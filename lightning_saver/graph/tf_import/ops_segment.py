"""TensorFlow import converters: segment reductions, ``Where``, sorted searches, log-cumsum-exp.

The ops our own exporter emits for scatter reductions, embedding bags, boolean masks, sort and
bucketize (``graph/tf_export/ops_segment.py``, ``ops_select.py``), so its graphs import back.
Contract: :mod:`lightning_saver.graph.tf_import.table`.

Example::

    table.call("UnsortedSegmentSum", [torch.tensor([1., 2., 3.]), torch.tensor([1, 1, 0]),
                                      torch.tensor(3)], {})        # tensor([3., 3., 0.])
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lightning_saver.graph.tf_import.table import TF_OPS

Tensor = torch.Tensor


def _empty_segment(dtype: torch.dtype, reduce: str) -> float | int | bool:
    """What TensorFlow gives a segment nothing reached: 0 for sums, 1 for products, the lowest or
    highest value of the dtype for max and min."""
    if reduce in ("sum", "prod"):
        return 0 if reduce == "sum" else 1
    info = torch.finfo(dtype) if dtype.is_floating_point else torch.iinfo(dtype)
    return info.min if reduce == "amax" else info.max


def _unsorted_segment(name: str, reduce: str) -> Callable[..., Tensor]:
    def convert(data: Tensor, segment_ids: Tensor, num_segments: Tensor) -> Tensor:
        count = int(num_segments)
        ids = segment_ids.reshape(-1).long()
        rows = data.reshape(ids.numel(), *data.shape[segment_ids.dim():])
        kept = ids >= 0  # TensorFlow drops negative ids
        if bool((ids >= count).any()):
            raise ValueError(f"{name}: segment ids must lie in [0, {count}), got {int(ids.max())}")
        rows, ids = rows[kept], ids[kept]
        out = torch.full((count, *rows.shape[1:]), _empty_segment(data.dtype, reduce), dtype=data.dtype)
        index = ids.reshape(-1, *[1] * (rows.dim() - 1)).expand_as(rows)
        return out.scatter_reduce(0, index, rows, reduce, include_self=reduce in ("sum", "prod"))

    convert.__name__ = convert.__qualname__ = name
    return convert


for _name, _reduce in (("UnsortedSegmentSum", "sum"), ("UnsortedSegmentProd", "prod"),
                       ("UnsortedSegmentMax", "amax"), ("UnsortedSegmentMin", "amin")):
    TF_OPS.register(_name)(_unsorted_segment(_name.lower(), _reduce))


@TF_OPS.register("Where")
def where(input: Tensor) -> Tensor:
    """The coordinates of the true (non-zero) elements, row-major, as int64 ``[count, rank]``."""
    return torch.nonzero(input)


def _bound(sorted_inputs: Tensor, values: Tensor, right: bool, out_type: torch.dtype) -> Tensor:
    found = torch.searchsorted(sorted_inputs.contiguous(), values.contiguous(), right=right)
    return found.to(out_type)


@TF_OPS.register("LowerBound")
def lower_bound(sorted_inputs: Tensor, values: Tensor, *, out_type: torch.dtype = torch.int32) -> Tensor:
    """Per row, the first position whose element is not less than each value."""
    return _bound(sorted_inputs, values, False, out_type)


@TF_OPS.register("UpperBound")
def upper_bound(sorted_inputs: Tensor, values: Tensor, *, out_type: torch.dtype = torch.int32) -> Tensor:
    """Per row, the first position whose element is greater than each value."""
    return _bound(sorted_inputs, values, True, out_type)


@TF_OPS.register("CumulativeLogsumexp")
def cumulative_logsumexp(x: Tensor, axis: Tensor, *, exclusive: bool = False,
                         reverse: bool = False) -> Tensor:
    """``log(cumsum(exp(x)))`` along ``axis``; ``exclusive`` starts from log(0) = -inf."""
    dim = int(axis)
    source = x.flip(dim) if reverse else x
    out = torch.logcumsumexp(source, dim)
    if exclusive:
        start = torch.full_like(out.narrow(dim, 0, 1), float("-inf"))
        out = torch.cat([start, out.narrow(dim, 0, out.shape[dim] - 1)], dim)
    return out.flip(dim) if reverse else out
