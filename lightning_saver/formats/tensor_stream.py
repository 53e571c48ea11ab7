"""Writing many tensors' bytes to a file descriptor, straight from their memory, each piece
checksummed right after it is written, while it is still in this core's cache (the data section of
:func:`~lightning_saver.formats.safetensors_writer.write_to_fd`).

Small tensors (a model of 500 ``Linear(256, 256)`` has 1,000 of 256 KiB and 1 KiB) are gathered
into one ``writev`` of up to ``PIECE`` bytes, and a large tensor goes in ``PIECE``-sized writes;
``write`` has just read those bytes, so the CRC-32C that follows on the same thread finds them in
the cache. Every ``WRITE_BEHIND`` bytes, writeback of what is written is started, as in the C
writer below.

Why one thread: the checksums used to run on the helper thread (each small tensor's inline, before
its write). On the shared 2-core machine (load 3-5) that lost, in one process, same run,
interleaved: at 128 MiB of 256 KiB tensors the helper cost 90 ms over a plain write of the same
bytes against 27-52 ms for this way; at 1 GiB of 64 MiB tensors (4 MiB chunks to the helper)
1.241 s against 1.006 s (medians of 7). The helper competes for the other core with everything
else running, and each hand-off of the GIL waits for the scheduler to wake the other thread. On an
idle machine the helper would hide the CRC pass instead (cache-hot: ~11 ms per 128 MiB in a profile).

With the C extension ``_write_regions`` (built by ``pip install`` where a compiler exists) the
contiguous CPU tensors go to it as one list of (address, length) regions, in one call with the GIL
released: it writes them in the same 1 MiB ``writev`` pieces while a second thread computes each
tensor's CRC-32C, and every ``WRITE_BEHIND`` bytes it starts the disk's writeback of what is
written (``sync_file_range``) so the final fsync has less left to wait for. Measured on the 2-vCPU
VM, 128 MiB in 1,020 tensors (2026-12-06, see ``docs/durability.md``, "Measured cost"). Without
the extension, the Python path above runs (same bytes, same checksums).

Example::

    crcs = write_tensors(fd, tensors, order)   # name -> CRC-32C of its bytes
"""

from __future__ import annotations

import array
import ctypes
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lightning_saver.formats import checksum

try:
    from lightning_saver.formats import _write_regions
except ImportError:  # optional C extension: the Python writer below does the same, slower
    _write_regions = None  # type: ignore[assignment]

__all__ = [
    "CHUNK", "PIECE", "WRITE_BEHIND", "checked_nbytes", "cpu_contiguous", "memory_view", "writev_all",
    "write_tensors",
]

CHUNK = 4 << 20  # the readers' I/O unit
PIECE = 1 << 20  # written, then checksummed while still in this core's L2 cache (2 MiB here)
WRITE_BEHIND = 8 << 20  # the C writer starts writeback of the file every so many bytes
_IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16)


def memory_view(address: int, nbytes: int) -> memoryview:
    """A writable byte view of ``nbytes`` of memory at ``address`` (a tensor's storage)."""
    return memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")


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
        self.behind = _WriteBehind(fd)

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
        self.behind.wrote(self.nbytes)
        self.regions, self.nbytes = [], 0


def _load_sync_file_range() -> Any:
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux: no write-behind
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


class _WriteBehind:
    """The Python writer's copy of the C writer's write-behind: every ``WRITE_BEHIND`` bytes, start
    writeback of what is written (a hint: failures are ignored; the caller's fsync is what counts)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.on = _SYNC_FILE_RANGE is not None
        self.flushed = self.end = 0
        try:
            self.flushed = self.end = os.lseek(fd, 0, os.SEEK_CUR)
        except OSError:  # a pipe: nothing to write back
            self.on = False

    def wrote(self, nbytes: int) -> None:
        self.end += nbytes
        if not self.on or self.end - self.flushed < WRITE_BEHIND:
            return
        _SYNC_FILE_RANGE(self.fd, self.flushed, self.end - self.flushed, _SYNC_FILE_RANGE_WRITE)
        self.flushed = self.end


def write_tensors(fd: int, tensors: Mapping[str, torch.Tensor], order: Sequence[str], *,
                  sizes: Mapping[str, int] | None = None) -> dict[str, int]:
    """Append the bytes of ``tensors[name]`` for each name of ``order`` to ``fd``; return name ->
    CRC-32C (0 for an empty tensor). Only a non-contiguous or non-CPU tensor is copied, one at a
    time.

    Raises:
        ValueError: a tensor's size differs from ``sizes[name]`` (what the header planned for it).
    """
    crc_fn = _native_crc_address()
    if crc_fn is not None:
        return _write_native(fd, tensors, order, sizes, crc_fn)
    out = _Writer(fd)
    for name in order:
        tensor = tensors[name]
        nbytes = checked_nbytes(name, tensor, sizes)
        out.crcs[name] = 0
        data = cpu_contiguous(tensor)  # a copy only where needed, one at a time: bounded extra memory
        _add_pieces(out, name, data.data_ptr(), nbytes)
        if data is not tensor:
            out.flush()  # before the copy is freed
    out.flush()
    return out.crcs


def _add_pieces(out: _Writer, name: str, address: int, nbytes: int) -> None:
    for start in range(0, nbytes, PIECE):
        out.add(name, address + start, min(PIECE, nbytes - start))


def cpu_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself where its bytes can be written from its memory, else a contiguous CPU copy."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        return tensor.detach().to("cpu").contiguous()
    return tensor


def checked_nbytes(name: str, tensor: torch.Tensor, sizes: Mapping[str, int] | None) -> int:
    """The tensor's byte size; ValueError where it differs from ``sizes[name]`` (the planned size)."""
    nbytes = tensor.numel() * tensor.element_size()
    if sizes is not None and sizes[name] != nbytes:
        raise ValueError(f"tensor {name!r} has {nbytes} bytes, the file's layout planned "
                         f"{sizes[name]}: it changed size while being saved")
    return nbytes


def _native_crc_address() -> int | None:
    """The address of google-crc32c's ``crc32c_extend`` when the C writer can use it, else None."""
    if _write_regions is None or not checksum.NATIVE or checksum._NATIVE is None:
        return None
    function: Any = checksum._NATIVE  # a ctypes function pointer, typed as the callable it is
    return ctypes.cast(function, ctypes.c_void_p).value


def _write_native(fd: int, tensors: Mapping[str, torch.Tensor], order: Sequence[str],
                  sizes: Mapping[str, int] | None, crc_fn: int) -> dict[str, int]:
    """:func:`write_tensors` through the C writer: each run of contiguous CPU tensors is one call
    (one list of regions; no per-tensor Python after it is built); any other tensor is copied and
    written alone, in order."""
    crcs: dict[str, int] = {}
    names: list[str] = []
    regions = array.array("Q")
    beside = not checksum.kept_in_this_thread()  # the async writer keeps its work on its own core

    def flush() -> None:
        if names:
            out = array.array("I", bytes(4 * len(names)))
            _write_regions.write_regions(fd, regions, out, crc_fn, PIECE, WRITE_BEHIND, beside)
            crcs.update(zip(names, out, strict=True))
            names.clear()
            del regions[:]

    for name in order:
        tensor = tensors[name]
        nbytes = checked_nbytes(name, tensor, sizes)
        data = cpu_contiguous(tensor)  # a copy only where needed, one at a time: bounded extra memory
        if data is not tensor:
            flush()  # the copy goes in a call of its own
        names.append(name)
        regions.extend((data.data_ptr(), nbytes))
        if data is not tensor:
            flush()  # before the copy is freed
    flush()
    return crcs
