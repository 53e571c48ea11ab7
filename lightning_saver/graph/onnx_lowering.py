"""Ops lowered before PyTorch's ONNX exporter, where it has no translation or a wrong one.

Found by running model snippets through ``torch.onnx.export(dynamo=True)`` and ONNX Runtime
(torch 2.13, onnxscript's registry):

* ``scatter_reduce(..., "mean")`` exports but computes something else (off by 5 on unit-variance
  inputs, ``include_self`` either way): lowered to sums and a count;
* ``scatter(..., reduce="add"|"multiply")``, ``masked_select``, ``searchsorted``, ``hypot`` and
  ``sort(stable=True)`` have no translation: lowered to ``scatter_reduce``, a boolean-mask index, a
  comparison count, ``sqrt(x^2 + y^2)`` and ``sort`` (ONNX's ``TopK`` keeps ties in index order);
* ``adaptive_max_pool2d`` to sizes that do not divide the input: one max per window;
* ``scaled_dot_product_attention``: ``graph.attention`` (torch.onnx's own fails on GPT-2/T5).

A lowering returns ``NotImplemented`` to keep the op as it is (the other ``scatter_reduce``
reductions, which export right). An op left without a translation is reported by ``export_onnx``
as ``UnsupportedOpError`` naming it.

Example::

    program = lower_for_onnx(capture(model, args, decompose=False).program)
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_saver.graph.attention import SDPA_OPS, sdpa

aten = torch.ops.aten


def scatter_reduce(x: torch.Tensor, dim: int, index: torch.Tensor, src: torch.Tensor, reduce: str, *,
                   include_self: bool = True) -> Any:
    if reduce != "mean":
        return NotImplemented
    total = aten.scatter_reduce.two(x, dim, index, src, "sum", include_self=include_self)
    start = torch.ones_like(x) if include_self else torch.zeros_like(x)
    count = aten.scatter_reduce.two(start, dim, index, torch.ones_like(src), "sum").clamp_min(1)
    if x.is_floating_point():
        return total / count
    return torch.div(total, count, rounding_mode="floor")


def scatter_with_reduce(x: torch.Tensor, dim: int, index: torch.Tensor, src: Any, *, reduce: str) -> Any:
    if reduce not in ("add", "multiply"):
        return NotImplemented
    if not isinstance(src, torch.Tensor):  # scatter.value_reduce: one value everywhere
        src = torch.full_like(index, src, dtype=x.dtype)
    return aten.scatter_reduce.two(x, dim, index, src, "sum" if reduce == "add" else "prod")


def masked_select(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    values, where = torch.broadcast_tensors(x, mask)
    return values[where]


def hypot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(x * x + y * y)


def searchsorted(sorted_sequence: torch.Tensor, values: torch.Tensor, *, out_int32: bool = False,
                 right: bool = False, side: str | None = None, sorter: torch.Tensor | None = None) -> Any:
    if sorter is not None:
        return NotImplemented
    # the insertion point is how many boundaries lie before the value
    bounds, points = sorted_sequence.unsqueeze(-2), values.unsqueeze(-1)
    before = bounds <= points if (right or side == "right") else bounds < points
    return before.sum(-1).to(torch.int32 if out_int32 else torch.int64)


def sort_stable(x: torch.Tensor, *, stable: bool | None = None, dim: int = -1,
                descending: bool = False) -> Any:
    # ONNX's TopK (what torch.onnx makes of sort) keeps equal elements in index order: stable
    return aten.sort.default(x, dim, descending)


def argsort_stable(x: torch.Tensor, *, stable: bool, dim: int = -1, descending: bool = False) -> Any:
    return aten.sort.default(x, dim, descending)[1]


def adaptive_max_pool2d(x: torch.Tensor, output_size: list[int]) -> Any:
    (height, width), (out_h, out_w) = x.shape[-2:], output_size
    if height % out_h == 0 and width % out_w == 0:
        return NotImplemented  # a MaxPool, which torch.onnx translates
    values, indices = [], []
    for i in range(out_h):  # torch's windows: floor(i * n / m) .. ceil((i + 1) * n / m)
        top, bottom = i * height // out_h, -(-(i + 1) * height // out_h)
        for j in range(out_w):
            left, right = j * width // out_w, -(-(j + 1) * width // out_w)
            window = x[..., top:bottom, left:right].flatten(-2)
            value, where = window.max(-1)  # the first maximum, as torch's kernel picks
            span = right - left
            values.append(value)
            indices.append((top + where // span) * width + left + where % span)
    shape = (*x.shape[:-2], out_h, out_w)
    return torch.stack(values, -1).reshape(shape), torch.stack(indices, -1).reshape(shape)


def adaptive_max_pool1d(x: torch.Tensor, output_size: list[int]) -> Any:
    if x.shape[-1] % output_size[0] == 0:
        return NotImplemented
    values, indices = adaptive_max_pool2d(x.unsqueeze(-2), [1, output_size[0]])
    return values.squeeze(-2), indices.squeeze(-2)


def onnx_lowerings() -> dict[Any, Any]:
    table: dict[Any, Any] = dict.fromkeys(SDPA_OPS, sdpa)
    table.update({
        aten.scatter_reduce.two: scatter_reduce,
        aten.scatter.reduce: scatter_with_reduce,
        aten.scatter.value_reduce: scatter_with_reduce,
        aten.masked_select.default: masked_select,
        aten.hypot.default: hypot,
        aten.searchsorted.Tensor: searchsorted,
        aten.sort.stable: sort_stable,
        aten.argsort.stable: argsort_stable,
        aten.adaptive_max_pool2d.default: adaptive_max_pool2d,
        aten.adaptive_max_pool1d.default: adaptive_max_pool1d,
    })
    return table


def lower_for_onnx(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``program`` with only the ops above lowered (torch.onnx decomposes the rest itself)."""
    table = onnx_lowerings()
    if not any(node.target in table for node in program.graph.nodes):
        return program
    return program.run_decompositions(table)
