"""Async snapshots copied straight into the file's image: one copy per save, checksummed on the way.

:func:`snapshot_image` copies each tensor to its offset in a page-aligned image of the safetensors
file (:mod:`lightning_saver.formats.file_image`) and computes its CRC-32C in the same pass
(:func:`~lightning_saver.formats.memcopy.copy_crc32c`, GIL released); the writer then only puts the
header in front and writes the image with ``O_DIRECT``. Before, the snapshot went to a dense arena
(:mod:`lightning_saver.saving.snapshot_arena`, still used for object stores and sharded sets) and
the writer copied it a second time, with the checksums, into its ``O_DIRECT`` buffer.

The copies that may wait for the optimizer's step (``defer``) go to a
:class:`~lightning_saver.saving.deferred_copy.DeferredCopy` in pieces of at most
``memcopy.PIECE`` bytes, each with a checksum slot of its own, so the writer thread and a training
thread at the fence (with the helper beside it) can share them; the slots are joined per tensor
when the header is made. Tensors torch has to copy (strided, or on a device: the CUDA copies go
on a side stream into pinned memory, as the arena's) are checksummed by the writer, from the image.

The image's memory comes from the caller's reusable arenas (``take_buffer``), so an async saver
pays page faults for its first save only.

Example::

    image, deferred = snapshot_image(state, ImagePlan(layout, header_len), take_buffer, defer=names)
    ...                      # forward, backward
    deferred.wait()          # before optimizer.step()
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from functools import partial

import torch

from lightning_saver.formats import memcopy
from lightning_saver.formats.direct_write import ALIGN
from lightning_saver.formats.file_image import FileImage, ImagePlan
from lightning_saver.saving.deferred_copy import DeferredCopy, defer_copies

__all__ = ["ENABLED", "snapshot_image"]

ENABLED = True  # False: local async saves snapshot into the arena and the writer copies again

_Piece = tuple[int, int, int, int]  # (checksum slot, dst address, src address, nbytes)


class _Copies:
    """The copies of one snapshot's part (now, or deferred): memory pieces and tensor copies."""

    def __init__(self) -> None:
        self.pieces: list[_Piece] = []
        self.tensors: list[tuple[torch.Tensor, torch.Tensor]] = []  # (dst, src)
        self.sources: list[torch.Tensor] = []  # what the pieces' source addresses point into


def _aligned(take_buffer: Callable[[int, bool], torch.Tensor], nbytes: int, pinned: bool) -> torch.Tensor:
    raw = take_buffer(nbytes + ALIGN, pinned)  # CPU allocations are 64-aligned: room to move up
    skew = -raw.data_ptr() % ALIGN
    return raw[skew : skew + nbytes]


def _plan(image: FileImage, tensors: Mapping[str, torch.Tensor],
          deferred: Callable[[str], bool]) -> tuple[_Copies, _Copies]:
    now, later = _Copies(), _Copies()
    for name in image.plan.layout.order:  # file order: the copies go forward through the image
        src = tensors[name].detach().resolve_conj().resolve_neg()  # lazy bits: copy what they mean
        dst = image.view(name, src)
        image.tensors[name] = dst
        nbytes = dst.numel() * dst.element_size()
        if nbytes == 0:
            continue
        copies = later if deferred(name) else now
        if src.device.type == "cpu" and src.is_contiguous():
            copies.sources.append(src)
            address, source = dst.data_ptr(), src.data_ptr()
            for start in range(0, nbytes, memcopy.PIECE):
                size = min(memcopy.PIECE, nbytes - start)
                copies.pieces.append((image.add_piece(name, size), address + start, source + start, size))
        else:
            copies.tensors.append((dst, src))
            image.checksum_later(name)
    return now, later


# streaming stores: the image is read next by the disk's DMA, not by this CPU; measured for 38.7 MB
# of copy_crc32c, 4.3 ms of CPU with them against 7.0 ms through the cache (commit 109424a)
NONTEMPORAL = True


def _copy_piece(image: FileImage, slot: int, dst: int, src: int, nbytes: int) -> None:
    image.piece_crcs[slot] = memcopy.copy_crc32c(dst, src, nbytes, nontemporal=NONTEMPORAL)


def snapshot_image(
    tensors: Mapping[str, torch.Tensor],
    plan: ImagePlan,
    take_buffer: Callable[[int, bool], torch.Tensor],
    defer: Collection[str] | bool = (),
) -> tuple[FileImage, DeferredCopy | None]:
    """Copy ``tensors`` into a file image laid out by ``plan``; the copies of the tensors named in
    ``defer`` (``True``: all) are left to the returned :class:`DeferredCopy` (``None``: none).

    Args:
        tensors: name -> tensor, the names and sizes ``plan.layout`` was made for.
        plan: where each tensor's bytes go in the file.
        take_buffer: ``take_buffer(nbytes, pinned)`` -> a uint8 CPU tensor to copy into (used while
            the image or one of its tensors lives).
        defer: the names whose copy may wait; the caller calls ``DeferredCopy.wait()`` before
            anything changes them, and ``DeferredCopy.complete()`` before the image is written.

    Returns:
        The :class:`FileImage` (its ``tensors``: views in the caller's order) and the deferred copy.
    """
    plan.layout.check(tensors)
    pinned = torch.cuda.is_available() and any(t.is_cuda for t in tensors.values())
    image = FileImage(plan, _aligned(take_buffer, plan.buffer_nbytes, pinned))
    names = None if isinstance(defer, bool) else set(defer)
    now, later = _plan(image, tensors, lambda name: bool(defer) if names is None else name in names)
    crcs = memcopy.copy_crc_regions([(d, s, n) for _, d, s, n in now.pieces], nontemporal=NONTEMPORAL)
    for (slot, _, _, _), crc in zip(now.pieces, crcs, strict=True):
        image.piece_crcs[slot] = crc
    for dst, src in now.tensors:
        dst.copy_(src, non_blocking=pinned)
    if pinned and now.tensors:
        torch.cuda.synchronize()  # non_blocking device->host copies must land before we go on
    image.tensors = {name: image.tensors[name] for name in tensors}
    if not later.pieces and not later.tensors:
        return image, None
    pieces = [partial(_copy_piece, image, *piece) for piece in later.pieces]
    # the pieces go by address: keep their sources alive until they ran
    return image, defer_copies(pieces, later.tensors, pinned, (image.buffer, later.sources))
