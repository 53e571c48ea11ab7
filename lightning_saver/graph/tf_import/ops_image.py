"""TensorFlow import converters for image resizing: ResizeBilinear and ResizeNearestNeighbor.

Images are NHWC. TF has three coordinate rules: half-pixel centers (TF2 / Keras), align_corners,
and the legacy TF1 default ``src = dst * in / out``. All bilinear ones and two nearest ones map
onto torch's own kernels, which run on the channels-last view directly; nearest with
align_corners (C ``roundf``) gathers rows and columns here. Registered by
:func:`table.load_converters`. Example::

    y = table.call("ResizeBilinear", [images, torch.tensor([64, 64])], {"half_pixel_centers": True})
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_saver.errors import GraphImportError
from lightning_saver.graph.tf_import.table import TF_OPS


def _resize_scale(in_size: int, out_size: int, align_corners: bool) -> torch.Tensor:
    # float32 division, as TF computes it, so nearest-neighbour picks the same pixels
    if align_corners and out_size > 1:
        return torch.tensor(in_size - 1, dtype=torch.float32) / (out_size - 1)
    return torch.tensor(in_size, dtype=torch.float32) / out_size


def _torch_resize(
    images: torch.Tensor, size: tuple[int, int], mode: str, align_corners: bool | None
) -> torch.Tensor:
    # the NCHW view of an NHWC tensor is channels-last memory, which torch resizes without a copy
    y = F.interpolate(images.movedim(-1, 1), size=size, mode=mode, align_corners=align_corners)
    return y.movedim(1, -1)


def _resize_size(size: torch.Tensor, op: str) -> tuple[int, int]:
    values = [int(v) for v in size.tolist()]
    if len(values) != 2 or min(values) <= 0:
        raise GraphImportError(f"{op}: size must be 2 positive ints [new_height, new_width], found {values}")
    return values[0], values[1]


@TF_OPS.register("ResizeBilinear")
def resize_bilinear(
    images: torch.Tensor, size: torch.Tensor, *, align_corners: bool = False, half_pixel_centers: bool = False
) -> torch.Tensor:
    out_h, out_w = _resize_size(size, "ResizeBilinear")
    x = images.float()
    if align_corners or half_pixel_centers:
        return _torch_resize(x, (out_h, out_w), "bilinear", align_corners)
    # TF1's legacy rule src = dst * in / out is torch's align-corners rule (dst * (in' - 1) / (out' - 1))
    # on the image with its last row and column repeated (in' = in + 1), asked for one more output
    # row and column (out' = out + 1), which is dropped; the repeat is TF's clamp at the far edge
    x = F.pad(x.movedim(-1, 1), [0, 1, 0, 1], mode="replicate")
    y = F.interpolate(x, size=(out_h + 1, out_w + 1), mode="bilinear", align_corners=True)
    return y[:, :, :-1, :-1].movedim(1, -1)


def _nearest_index(
    in_size: int, out_size: int, align_corners: bool, half_pixel_centers: bool, device: torch.device
) -> torch.Tensor:
    scale = _resize_scale(in_size, out_size, align_corners).to(device)
    dst = torch.arange(out_size, dtype=torch.float32, device=device)
    src = (dst + 0.5) * scale if half_pixel_centers else dst * scale
    floor = torch.floor(src)
    if align_corners:  # C roundf: halves go up for these non-negative coordinates
        floor = floor + (src - floor >= 0.5).float()
    return floor.clamp(0, in_size - 1).long()


@TF_OPS.register("ResizeNearestNeighbor")
def resize_nearest_neighbor(
    images: torch.Tensor, size: torch.Tensor, *, align_corners: bool = False, half_pixel_centers: bool = False
) -> torch.Tensor:
    out_h, out_w = _resize_size(size, "ResizeNearestNeighbor")
    if images.is_floating_point() and not align_corners:
        # torch's "nearest" is TF's legacy floor(dst * scale), "nearest-exact" its half-pixel rule
        mode = "nearest-exact" if half_pixel_centers else "nearest"
        return _torch_resize(images, (out_h, out_w), mode, None)
    rows = _nearest_index(images.shape[1], out_h, align_corners, half_pixel_centers, images.device)
    cols = _nearest_index(images.shape[2], out_w, align_corners, half_pixel_centers, images.device)
    return images.index_select(1, rows).index_select(2, cols)
