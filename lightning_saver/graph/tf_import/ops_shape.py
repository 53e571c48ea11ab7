"""TensorFlow import converters: reshaping, joining, splitting, slicing, padding and shape queries.

Every converter follows the contract in :mod:`lightning_saver.graph.tf_import.table`. Inputs TF
reads statically (shapes, axes, sizes, paddings) arrive as tensors and are read with ``.tolist()``.
Example::

    parts = table.call("SplitV", [x, torch.tensor([2, -1]), torch.tensor(1)], {"num_split": 2})
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lightning_saver.errors import GraphImportError
from lightning_saver.graph.tf_import.limits import check_size
from lightning_saver.graph.tf_import.table import TF_OPS


def _ints(t: torch.Tensor | Sequence[int] | int) -> list[int]:
    if isinstance(t, torch.Tensor):
        values = t.tolist()
        return [int(v) for v in values] if isinstance(values, list) else [int(values)]
    if isinstance(t, int):
        return [t]
    return [int(v) for v in t]


def _int(t: torch.Tensor | int) -> int:
    return int(t.item()) if isinstance(t, torch.Tensor) else int(t)


def _axis(axis: int, rank: int, op: str) -> int:
    if not -rank <= axis < rank:
        raise GraphImportError(f"{op}: axis {axis} is out of range for a rank-{rank} tensor")
    return axis % rank


@TF_OPS.register("Reshape")
def reshape(tensor: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(_ints(shape))


@TF_OPS.register("Transpose")
def transpose(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    return x.permute(_ints(perm))


@TF_OPS.register("ConcatV2")
def concat_v2(*values_and_axis: torch.Tensor) -> torch.Tensor:
    *values, axis = values_and_axis
    return torch.cat(values, _axis(_int(axis), values[0].dim(), "ConcatV2"))


@TF_OPS.register("Concat")
def concat(concat_dim: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
    return torch.cat(values, _axis(_int(concat_dim), values[0].dim(), "Concat"))


@TF_OPS.register("Pack")
def pack(*values: torch.Tensor, axis: int = 0) -> torch.Tensor:
    return torch.stack(values, _axis(axis, values[0].dim() + 1, "Pack"))


@TF_OPS.register("Unpack")
def unpack(value: torch.Tensor, *, num: int | None = None, axis: int = 0) -> tuple[torch.Tensor, ...]:
    return torch.unbind(value, _axis(axis, value.dim(), "Unpack"))


@TF_OPS.register("Split")
def split(split_dim: torch.Tensor, value: torch.Tensor, *, num_split: int) -> tuple[torch.Tensor, ...]:
    dim = _axis(_int(split_dim), value.dim(), "Split")
    if value.shape[dim] % num_split:
        raise GraphImportError(
            f"Split: dimension {dim} of size {value.shape[dim]} does not split into {num_split} equal parts"
        )
    return torch.split(value, value.shape[dim] // num_split, dim)


@TF_OPS.register("SplitV")
def split_v(
    value: torch.Tensor, size_splits: torch.Tensor, split_dim: torch.Tensor, *, num_split: int | None = None
) -> tuple[torch.Tensor, ...]:
    dim = _axis(_int(split_dim), value.dim(), "SplitV")
    sizes = _ints(size_splits)
    if sizes.count(-1) == 1:
        sizes[sizes.index(-1)] = value.shape[dim] - (sum(sizes) + 1)
    if sum(sizes) != value.shape[dim] or min(sizes, default=0) < 0:
        raise GraphImportError(
            f"SplitV: size_splits {_ints(size_splits)} do not add up to dimension {dim} "
            f"of size {value.shape[dim]}"
        )
    return torch.split(value, sizes, dim)


@TF_OPS.register("Squeeze")
def squeeze(input: torch.Tensor, *, squeeze_dims: Sequence[int] = ()) -> torch.Tensor:
    if not squeeze_dims:
        return input.squeeze()
    dims = tuple(_axis(d, input.dim(), "Squeeze") for d in squeeze_dims)
    wrong = [d for d in dims if input.shape[d] != 1]
    if wrong:
        raise GraphImportError(
            f"Squeeze: dimension {wrong[0]} of shape {list(input.shape)} "
            f"has size {input.shape[wrong[0]]}, not 1"
        )
    return input.squeeze(dims)


@TF_OPS.register("ExpandDims")
def expand_dims(input: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    return input.unsqueeze(_axis(_int(axis), input.dim() + 1, "ExpandDims"))


@TF_OPS.register("Slice")
def slice_op(input: torch.Tensor, begin: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    begins, sizes = _ints(begin), _ints(size)
    if len(begins) != input.dim() or len(sizes) != input.dim():
        raise GraphImportError(
            f"Slice: begin {begins} and size {sizes} need {input.dim()} entries for shape {list(input.shape)}"
        )
    return input[tuple(slice(b, None if s == -1 else b + s) for b, s in zip(begins, sizes, strict=True))]


def _strided_index(
    shape: Sequence[int], begins: list[int], ends: list[int], steps: list[int], masks: dict[str, int]
) -> tuple[list[int | slice | None], list[int]]:
    """TF's sparse slice spec as a torch basic index, plus the dims to flip for negative strides.

    After flipping, element ``j`` of a dim of size ``n`` sits at ``n - 1 - j``, so a negative-stride
    slice becomes a positive one that torch can index.
    """
    bit = {name: [bool(m >> i & 1) for i in range(len(begins) + 1)] for name, m in masks.items()}
    ellipses = [i for i in range(len(begins)) if bit["ellipsis_mask"][i]]
    if len(ellipses) > 1:
        raise GraphImportError(f"StridedSlice: ellipsis_mask {masks['ellipsis_mask']} has more than one bit")
    # no ellipsis means an implicit one after the last entry
    ellipsis = ellipses[0] if ellipses else len(begins)
    count = len(begins) + (0 if ellipses else 1)
    new_after = sum(bit["new_axis_mask"][i] for i in range(ellipsis + 1, count))
    consumed_after = count - ellipsis - 1 - new_after
    index: list[int | slice | None] = []
    flips: list[int] = []
    dim = 0
    for i in range(count):
        if i == ellipsis:
            fill = max(len(shape) - consumed_after - dim, 0)
            index += [slice(None)] * fill
            dim += fill
            continue
        if bit["new_axis_mask"][i]:
            index.append(None)
            continue
        if dim >= len(shape):
            raise GraphImportError(f"StridedSlice: the slice spec indexes more than the {len(shape)} dims")
        n, b, step = shape[dim], begins[i], steps[i]
        if step == 0:
            raise GraphImportError(f"StridedSlice: stride {i} is zero")
        if bit["shrink_axis_mask"][i]:
            if step < 0:
                raise GraphImportError(f"StridedSlice: entry {i} shrinks an axis with negative stride {step}")
            if not -n <= b < n:
                raise GraphImportError(f"StridedSlice: index {b} is out of range for dim {dim} of size {n}")
            index.append(b % n)
        else:
            start, stop, step = slice(
                None if bit["begin_mask"][i] else b, None if bit["end_mask"][i] else ends[i], step
            ).indices(n)
            if step < 0:
                flips.append(dim)
                start, stop, step = n - 1 - start, n - 1 - stop, -step
            index.append(slice(start, max(start, stop), step))
        dim += 1
    return index, flips


@TF_OPS.register("StridedSlice")
def strided_slice(
    input: torch.Tensor,
    begin: torch.Tensor,
    end: torch.Tensor,
    strides: torch.Tensor,
    *,
    begin_mask: int = 0,
    end_mask: int = 0,
    ellipsis_mask: int = 0,
    new_axis_mask: int = 0,
    shrink_axis_mask: int = 0,
) -> torch.Tensor:
    begins, ends, steps = _ints(begin), _ints(end), _ints(strides)
    if not len(begins) == len(ends) == len(steps):
        raise GraphImportError(
            f"StridedSlice: begin {begins}, end {ends} and strides {steps} differ in length"
        )
    masks = {"begin_mask": begin_mask, "end_mask": end_mask, "ellipsis_mask": ellipsis_mask,
             "new_axis_mask": new_axis_mask, "shrink_axis_mask": shrink_axis_mask}
    index, flips = _strided_index(list(input.shape), begins, ends, steps, masks)
    x = input.flip(flips) if flips else input
    return x[tuple(index)]


def _paddings(paddings: torch.Tensor, rank: int, op: str) -> list[int]:
    """TF's [rank, 2] paddings as F.pad's flat list, last dimension first."""
    pairs = paddings.reshape(-1, 2).tolist()
    if len(pairs) != rank:
        raise GraphImportError(f"{op}: paddings has {len(pairs)} rows for a rank-{rank} input")
    return [int(v) for pair in reversed(pairs) for v in pair]


@TF_OPS.register("Pad")
def pad(input: torch.Tensor, paddings: torch.Tensor) -> torch.Tensor:
    return F.pad(input, _paddings(paddings, input.dim(), "Pad"))


@TF_OPS.register("PadV2")
def pad_v2(input: torch.Tensor, paddings: torch.Tensor, constant_values: torch.Tensor) -> torch.Tensor:
    return F.pad(input, _paddings(paddings, input.dim(), "PadV2"), value=constant_values.item())


@TF_OPS.register("MirrorPad")
def mirror_pad(input: torch.Tensor, paddings: torch.Tensor, *, mode: str) -> torch.Tensor:
    if mode not in ("REFLECT", "SYMMETRIC"):
        raise GraphImportError(f"MirrorPad: mode {mode!r} is not 'REFLECT' or 'SYMMETRIC'")
    # REFLECT mirrors around the edge element, SYMMETRIC repeats it
    edge = 1 if mode == "REFLECT" else 0
    out = input
    for dim, (before, after) in enumerate(paddings.reshape(-1, 2).tolist()):
        if not before and not after:
            continue
        n = input.shape[dim]
        if before > n - edge or after > n - edge:
            raise GraphImportError(
                f"MirrorPad: padding ({before}, {after}) of dimension {dim} exceeds {n - edge} in {mode} mode"
            )
        index = list(range(before - 1 + edge, edge - 1, -1)) + list(range(n))
        index += list(range(n - 1 - edge, n - 1 - edge - after, -1))
        out = out.index_select(dim, torch.tensor(index, device=input.device))
    return out


@TF_OPS.register("Tile")
def tile(input: torch.Tensor, multiples: torch.Tensor) -> torch.Tensor:
    times = _ints(multiples)
    dims = [1] * (len(times) - input.dim()) + list(input.shape)
    check_size("Tile", [d * m for d, m in zip(dims, times, strict=False)], input.element_size())
    return input.repeat(times)


@TF_OPS.register("BroadcastTo")
def broadcast_to(input: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    return torch.broadcast_to(input, _ints(shape))


@TF_OPS.register("Shape")
def shape(input: torch.Tensor, *, out_type: torch.dtype = torch.int32) -> torch.Tensor:
    return torch.tensor(list(input.shape), dtype=out_type)


@TF_OPS.register("ShapeN")
def shape_n(*input: torch.Tensor, out_type: torch.dtype = torch.int32) -> tuple[torch.Tensor, ...]:
    return tuple(shape(x, out_type=out_type) for x in input)


@TF_OPS.register("Size")
def size(input: torch.Tensor, *, out_type: torch.dtype = torch.int32) -> torch.Tensor:
    return torch.tensor(input.numel(), dtype=out_type)


@TF_OPS.register("Rank")
def rank(input: torch.Tensor) -> torch.Tensor:
    return torch.tensor(input.dim(), dtype=torch.int32)


@TF_OPS.register("MatrixBandPart")
def matrix_band_part(input: torch.Tensor, num_lower: torch.Tensor, num_upper: torch.Tensor) -> torch.Tensor:
    rows, cols = input.shape[-2:]
    below = torch.arange(rows, device=input.device)[:, None] - torch.arange(cols, device=input.device)
    lower, upper = _int(num_lower), _int(num_upper)
    # a negative bound keeps that whole triangle (Keras' causal masks use num_upper = 0)
    keep = ((below <= lower) | (lower < 0)) & ((-below <= upper) | (upper < 0))
    return torch.where(keep, input, torch.zeros((), dtype=input.dtype, device=input.device))
