"""Writing many tensors' bytes to a file descriptor, straight from their memory, each piece
checksummed right after it is written, while it is still in this core's cache (the data section of
:func:`~lightning_saver.formats.safetensors_writer.write_to_fd`).

Small tensors (a model of 500 ``Linear(256, 256)`` has 1,000 of 256 KiB and 1 KiB) are gathered
into one ``writev`` of up to ``PIECE`` bytes, and a large tensor goes in ``PIECE``-sized writes;
``write`` has just read those bytes, so the CRC-32C that follows on the same thread finds them in
the cache.

Why one thread: the checksums used to run on the helper thread (each small tensor's inline, before
its write). On the shared 2-core machine (load 3-5) that lost, in one process, same run,
interleaved: at 128 MiB of 256 KiB tensors the helper cost 90 ms over a plain write of the same
bytes against 27-52 ms for this way; at 1 GiB of 64 MiB tensors (4 MiB chunks to the helper)
1.241 s against 1.006 s (medians of 7). The helper competes for the other core with everything
else running, and each hand-off of the GIL waits for the scheduler to wake the other thread. On an
idle machine the helper would hide the CRC pass instead (cache-hot: ~11 ms per 128 MiB in a profile).

Example::

    crcs = write_tensors(fd, tensors, order)   # name -> CRC-32C of its bytes
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping, Sequence

import torch

from lightning_saver.formats import checksum

__all__ = ["CHUNK", "PIECE", "memory_view", "write_all", "writev_all", "write_tensors"]

CHUNK = 4 << 20  # the readers' I/O unit (``write_all`` too)
PIECE = 1 << 20  # written, then checksummed while still in this core's L2 cache (2 MiB here)
_IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16)


def memory_view(address: int, nbytes: int) -> memoryview:
    """A writable byte view of ``nbytes`` of memory at ``address`` (a tensor's storage)."""
    return memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")


def write_all(fd: int, address: int, nbytes: int) -> None:
    """Write ``nbytes`` of memory at ``address`` to ``fd``, however many calls it takes."""
    done = 0
    while done < nbytes:
        done += os.write(fd, memory_view(address + done, min(CHUNK, nbytes - done)))


def writev_all(fd: int, views: Sequence[memoryview]) -> None:
    """``writev`` every view, in order, resuming after a short write."""
    pending = list(views)
    first = 0
    while first < len(pending):
        n = os.writev(fd, pending[first : first + _IOV_MAX])
        while first < len(pending) and n >= len(pending[first]):
            n -= len(pending[first])
            first += 1
        if n:
            pending[first] = pending[first][n:]


class _Writer:
    """Gathers regions (name, address, nbytes) into one ``writev``, then checksums them."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.crcs: dict[str, int] = {}
        self.regions: list[tuple[str, int, int]] = []
        self.nbytes = 0

    def add(self, name: str, address: int, nbytes: int) -> None:
        self.regions.append((name, address, nbytes))
        self.nbytes += nbytes
        if self.nbytes >= PIECE or len(self.regions) >= _IOV_MAX:
            self.flush()

    def flush(self) -> None:
        if not self.regions:
            return
        writev_all(self.fd, [memory_view(address, n) for _, address, n in self.regions])
        crcs = self.crcs
        for name, address, n in self.regions:  # the bytes write() just read, still cached
            crcs[name] = checksum.extend_address(crcs.get(name, 0), address, n)
        self.regions, self.nbytes = [], 0


def write_tensors(fd: int, tensors: Mapping[str, torch.Tensor], order: Sequence[str], *,
                  sizes: Mapping[str, int] | None = None) -> dict[str, int]:
    """Append the bytes of ``tensors[name]`` for each name of ``order`` to ``fd``; return name ->
    CRC-32C (0 for an empty tensor). Only a non-contiguous or non-CPU tensor is copied, one at a
    time.

    Raises:
        ValueError: a tensor's size differs from ``sizes[name]`` (what the header planned for it).
    """
    out = _Writer(fd)
    for name in order:
        tensor = tensors[name]
        nbytes = tensor.numel() * tensor.element_size()
        if sizes is not None and sizes[name] != nbytes:
            raise ValueError(f"tensor {name!r} has {nbytes} bytes, the file's layout planned "
                             f"{sizes[name]}: it changed size while being saved")
        out.crcs[name] = 0
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            copy = tensor.detach().to("cpu").contiguous()  # one tensor at a time: bounded extra memory
            _add_pieces(out, name, copy.data_ptr(), nbytes)
            out.flush()  # before the copy is freed
        else:
            _add_pieces(out, name, tensor.data_ptr(), nbytes)
    out.flush()
    return out.crcs


def _add_pieces(out: _Writer, name: str, address: int, nbytes: int) -> None:
    for start in range(0, nbytes, PIECE):
        out.add(name, address + start, min(PIECE, nbytes - start))
