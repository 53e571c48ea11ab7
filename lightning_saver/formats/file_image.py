"""A safetensors file laid out in memory byte for byte as it will be on disk: the async saver's
snapshot (issue #17).

An async save used to copy its state twice: into a dense snapshot arena (at the optimizer's fence),
then from there, with the checksums, into the writer's page-aligned ``O_DIRECT`` buffer. Here the
snapshot *is* the file: one page-aligned buffer whose byte X is the file's byte X. The snapshot
copies each tensor straight to its file offset and checksums it in the same pass
(:func:`~lightning_saver.formats.memcopy.copy_crc32c`); the writer then only puts the header in
front and hands the buffer to the kernel (:func:`~lightning_saver.formats.direct_write.write_image`),
with no CPU pass over the data.

The data starts right after the header, so the header's length is fixed before the copy: the
caller plans it with every field the final header will hold (the checksums are fixed-width hex). A
final header that comes out shorter is padded with spaces (JSON allows trailing whitespace, and
safetensors pads its header with spaces already); one that comes out longer does not fit, and the
caller writes the snapshot's tensors (views of the image) the ordinary way instead.

Tied keys each get their own bytes, as in any safetensors file: the image holds what a buffered
write would write, never shared memory (the ties are recorded from the caller's tensors).

Example::

    plan = ImagePlan(layout, header_len)
    image = FileImage(plan, buffer)        # buffer: uint8, page-aligned, plan.buffer_nbytes long
    slot = image.add_piece("w", nbytes)    # then copy_crc32c(image.address + plan.start("w"), ...)
    image.piece_crcs[slot] = crc
    image.put_header(header)               # len(header) == plan.header_len
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lightning_saver.formats import checksum
from lightning_saver.formats.direct_write import ALIGN

if TYPE_CHECKING:  # safetensors_writer writes images: a runtime import would be circular
    from lightning_saver.formats.safetensors_writer import Layout

__all__ = ["FileImage", "ImagePlan"]


class ImagePlan:
    """Where each tensor's bytes go in the file: ``start(name)``, the header's ``header_len`` bytes
    first; ``nbytes`` the file's length, ``buffer_nbytes`` the image's (rounded up to ``ALIGN``)."""

    def __init__(self, layout: Layout, header_len: int) -> None:
        if header_len < 8 or header_len % 8:
            raise ValueError(f"ImagePlan: header_len must be a positive multiple of 8, found {header_len}")
        self.layout = layout
        self.header_len = header_len
        self.nbytes = header_len + layout.data_nbytes
        self.buffer_nbytes = -(-self.nbytes // ALIGN) * ALIGN

    def start(self, name: str) -> int:
        return self.header_len + self.layout.offsets[name][0]


class FileImage:
    """The file's bytes in ``buffer`` (uint8, page-aligned, ``plan.buffer_nbytes`` long), and what
    is needed for each tensor's checksum: the CRC-32C of each copied piece (``piece_crcs``), or,
    for a tensor that torch copied (strided, or from a device), a pass over its bytes later.

    ``tensors`` holds the snapshot's tensors, views of the image (for writers that take tensors).
    """

    def __init__(self, plan: ImagePlan, buffer: torch.Tensor) -> None:
        if buffer.dtype != torch.uint8 or buffer.numel() < plan.buffer_nbytes or buffer.data_ptr() % ALIGN:
            raise ValueError(
                f"FileImage: expected a uint8 buffer of at least {plan.buffer_nbytes} bytes aligned to "
                f"{ALIGN}, found {buffer.dtype} of {buffer.numel()} at address {buffer.data_ptr():#x}"
            )
        self.plan = plan
        self.buffer = buffer
        self.address = buffer.data_ptr()
        self.nbytes = plan.nbytes
        self.header_len = plan.header_len
        self.tensors: dict[str, torch.Tensor] = {}
        self.piece_crcs: list[int] = []
        self._piece_sizes: list[int] = []
        self._pieces: dict[str, list[int]] = {}
        self._unchecked: list[str] = []

    def view(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The image's bytes of ``name`` as a contiguous tensor of ``like``'s dtype and shape."""
        start = self.plan.start(name)
        nbytes = self.plan.layout.sizes[name]
        return self.buffer[start : start + nbytes].view(like.dtype).view(like.shape)

    def add_piece(self, name: str, nbytes: int) -> int:
        """Reserve the checksum slot of the next ``nbytes`` of ``name`` (copied in file order)."""
        self._pieces.setdefault(name, []).append(len(self.piece_crcs))
        self.piece_crcs.append(0)
        self._piece_sizes.append(nbytes)
        return len(self.piece_crcs) - 1

    def checksum_later(self, name: str) -> None:
        """``name`` is copied without a checksum: :meth:`crcs` reads its bytes in the image."""
        self._unchecked.append(name)

    def crcs(self) -> dict[str, int]:
        """Name -> CRC-32C of its bytes (0 for an empty tensor), once every copy has landed."""
        out = dict.fromkeys(self.plan.layout.order, 0)
        for name, slots in self._pieces.items():
            crc = self.piece_crcs[slots[0]]
            for slot in slots[1:]:
                crc = checksum.combine(crc, self.piece_crcs[slot], self._piece_sizes[slot])
            out[name] = crc
        for name in self._unchecked:
            out[name] = checksum.extend_address(0, self.address + self.plan.start(name),
                                                self.plan.layout.sizes[name])
        return out

    def put_header(self, header: bytes) -> None:
        """Write the final header in front of the data.

        Raises:
            ValueError: ``header`` is not exactly ``header_len`` bytes long.
        """
        if len(header) != self.header_len:
            raise ValueError(f"FileImage: the header has {len(header)} bytes, {self.header_len} planned")
        self.buffer[: self.header_len] = torch.frombuffer(bytearray(header), dtype=torch.uint8)
