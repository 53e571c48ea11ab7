"""TensorFlow import converters that move blocks between space, batch and depth, and ReverseV2.

Keras emits SpaceToBatchND / BatchToSpaceND around dilated depthwise and separable convolutions,
and DepthToSpace for sub-pixel upsampling. All are reshapes and permutes, so they stay
differentiable. Registered by :func:`table.load_converters`. Example::

    y = table.call("SpaceToBatchND", [x, torch.tensor([2, 2]), torch.zeros(2, 2, dtype=torch.int32)], {})
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lightning_saver.errors import GraphImportError
from lightning_saver.graph.tf_import.layout import check_data_format
from lightning_saver.graph.tf_import.table import TF_OPS


def _blocks(block_shape: torch.Tensor, pads: torch.Tensor, op: str) -> tuple[list[int], list[list[int]]]:
    blocks = [int(b) for b in block_shape.reshape(-1).tolist()]
    pairs = [[int(v) for v in row] for row in pads.reshape(-1, 2).tolist()]
    if len(pairs) != len(blocks) or min(blocks, default=1) < 1:
        raise GraphImportError(f"{op}: block_shape {blocks} needs positive entries and one pad row each")
    return blocks, pairs


@TF_OPS.register("SpaceToBatchND")
def space_to_batch_nd(input: torch.Tensor, block_shape: torch.Tensor, paddings: torch.Tensor) -> torch.Tensor:
    blocks, pairs = _blocks(block_shape, paddings, "SpaceToBatchND")
    m = len(blocks)
    flat = [v for before, after in reversed(pairs) for v in (before, after)]
    x = F.pad(input, [0, 0] * (input.dim() - 1 - m) + flat)
    batch, rest = x.shape[0], list(x.shape[1 + m:])
    split: list[int] = []
    for size, block in zip(x.shape[1:1 + m], blocks, strict=True):
        if size % block:
            raise GraphImportError(f"SpaceToBatchND: padded size {size} is not a multiple of block {block}")
        split += [size // block, block]
    x = x.reshape([batch, *split, *rest])
    order = [2 + 2 * i for i in range(m)] + [0] + [1 + 2 * i for i in range(m)]
    x = x.permute(order + list(range(1 + 2 * m, x.dim())))
    return x.reshape([batch * math.prod(blocks), *split[0::2], *rest])


@TF_OPS.register("BatchToSpaceND")
def batch_to_space_nd(input: torch.Tensor, block_shape: torch.Tensor, crops: torch.Tensor) -> torch.Tensor:
    blocks, pairs = _blocks(block_shape, crops, "BatchToSpaceND")
    m, count = len(blocks), math.prod(blocks)
    if input.shape[0] % count:
        raise GraphImportError(f"BatchToSpaceND: batch {input.shape[0]} is not a multiple of {count}")
    spatial, rest = list(input.shape[1:1 + m]), list(input.shape[1 + m:])
    x = input.reshape([*blocks, input.shape[0] // count, *spatial, *rest])
    order = [m]
    for i in range(m):
        order += [m + 1 + i, i]
    x = x.permute(order + list(range(1 + 2 * m, x.dim())))
    x = x.reshape([input.shape[0] // count, *(s * b for s, b in zip(spatial, blocks, strict=True)), *rest])
    index = tuple(slice(before, x.shape[1 + i] - after) for i, (before, after) in enumerate(pairs))
    return x[(slice(None), *index)]


def _channels_last(x: torch.Tensor, data_format: str, op: str) -> tuple[torch.Tensor, bool]:
    first = check_data_format(data_format, op)
    return (x.movedim(1, -1) if first else x), first


@TF_OPS.register("DepthToSpace")
def depth_to_space(input: torch.Tensor, *, block_size: int, data_format: str = "NHWC") -> torch.Tensor:
    x, first = _channels_last(input, data_format, "DepthToSpace")
    n, h, w, c = x.shape
    if c % (block_size * block_size):
        raise GraphImportError(f"DepthToSpace: {c} channels do not divide by block_size**2 = {block_size**2}")
    # TF reads channel (i * block + j) * out_channels + c as pixel (i, j) of channel c
    x = x.reshape(n, h, w, block_size, block_size, c // block_size**2).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(n, h * block_size, w * block_size, c // block_size**2)
    return x.movedim(-1, 1) if first else x


@TF_OPS.register("SpaceToDepth")
def space_to_depth(input: torch.Tensor, *, block_size: int, data_format: str = "NHWC") -> torch.Tensor:
    x, first = _channels_last(input, data_format, "SpaceToDepth")
    n, h, w, c = x.shape
    if h % block_size or w % block_size:
        raise GraphImportError(f"SpaceToDepth: {h}x{w} image does not divide by block_size {block_size}")
    x = x.reshape(n, h // block_size, block_size, w // block_size, block_size, c).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(n, h // block_size, w // block_size, c * block_size**2)
    return x.movedim(-1, 1) if first else x


@TF_OPS.register("ReverseV2")
def reverse_v2(tensor: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    dims = [int(a) % max(tensor.dim(), 1) for a in axis.reshape(-1).tolist()]
    return tensor.flip(dims) if dims else tensor
