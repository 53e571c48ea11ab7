"""Reading tensors' bytes from a local safetensors file straight into their memory, checksummed.

The engine under :func:`lightning_saver.formats.safetensors_io.read_into`: the pieces to read are
cut into units that this thread and a helper take in turn. Where the optional C extension is built
(x86-64), the file is mapped and each word is checksummed as it is copied (one pass); elsewhere
each thread preads a chunk and checksums it while it is in cache. The CRCs of one tensor's units
are joined in file order, so the result does not depend on which thread read what.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import numpy as np

from lightning_saver.errors import CorruptCheckpointError
from lightning_saver.formats import checksum, memcopy
from lightning_saver.formats.safetensors_writer import CHUNK, memory_view

__all__ = ["Piece", "read_exact", "read_parallel", "read_unit"]

# Reading maps the file and copies + checksums in one pass where the C extension is built; elsewhere
# pread + google-crc32c, with the same results.
_ONE_PASS = memcopy.ONE_PASS


def read_exact(fd: int, offset: int, address: int, nbytes: int, path: str) -> None:
    """Read ``nbytes`` at ``offset`` of ``fd`` into memory at ``address``.

    Raises:
        CorruptCheckpointError: the file (``path``) ends first.
    """
    done = 0
    while done < nbytes:
        got = os.preadv(fd, [memory_view(address + done, min(CHUNK, nbytes - done))], offset + done)
        if got == 0:
            raise CorruptCheckpointError(f"{path}: the file is truncated (ended while reading tensor data)")
        done += got


_READ_CHUNK = 1 << 20  # read, then checksum while the chunk is still in this core's cache
_UNIT = 8 << 20  # the share one thread takes at a time; a tensor's unit CRCs are joined by combine
_SPLIT_MIN = 2 * _UNIT  # below this, a second thread costs more than it saves
_NONTEMPORAL_MIN = 64 << 20  # one-pass reads this large use streaming stores (the cache cannot hold them)


@dataclass(frozen=True)
class Piece:
    name: str
    offset: int  # in the file
    address: int
    nbytes: int


def _units(pieces: list[Piece], size: int) -> list[Piece]:
    """Cut pieces into units of at most ``size`` bytes, in file order (an empty piece stays one unit)."""
    out: list[Piece] = []
    for p in pieces:
        starts = range(0, p.nbytes, size) if p.nbytes else range(1)
        out += [Piece(p.name, p.offset + s, p.address + s, min(size, p.nbytes - s)) for s in starts]
    return out


def read_unit(fd: int, path: str, unit: Piece, verify: bool) -> int:
    crc = 0
    for start in range(0, unit.nbytes, _READ_CHUNK):
        size = min(_READ_CHUNK, unit.nbytes - start)
        read_exact(fd, unit.offset + start, unit.address + start, size, path)
        if verify:
            crc = checksum.extend_address(crc, unit.address + start, size)
    return crc


def _copy_mapped(base: int, nontemporal: bool, unit: Piece) -> int:
    """Copy a unit out of the mapped file and checksum it in the same pass (the C extension)."""
    return memcopy.copy_crc32c(unit.address, base + unit.offset, unit.nbytes, nontemporal=nontemporal)


@contextmanager
def _mapped(fd: int, path: str, pieces: list[Piece]) -> Iterator[int | None]:
    """The address of the whole file mapped read-only; None where the one-pass copy is unavailable.

    The file's size is checked first: touching a mapped page past the end would kill the process
    (SIGBUS) instead of raising. Our checkpoint files are never shortened in place (a save writes a
    new file and renames it), so the size cannot change under the mapping. While mapped, the file's
    pages count in the process's resident set (as with ``torch.load(mmap=True)``): they are the
    page cache, shared, not memory we allocate. Mapping the file piece by piece instead keeps the
    resident set flat but was 20% slower (each unmap interrupts the other core to flush its TLB).
    """
    end = max((p.offset + p.nbytes for p in pieces), default=0)
    if not _ONE_PASS or end == 0:
        yield None
        return
    size = os.fstat(fd).st_size
    if size < end:
        raise CorruptCheckpointError(
            f"{path}: the file is truncated: tensor data runs to byte {end}, the file has {size}"
        )
    try:
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):  # a file system that cannot map files: read with pread instead
        yield None
        return
    view = np.frombuffer(mm, dtype=np.uint8)
    try:
        yield int(view.ctypes.data)
    finally:
        del view  # the mapping cannot close while an exported buffer lives
        mm.close()


def _read_units(
    read: Callable[[Piece], int], units: list[Piece], todo: Iterator[int], crcs: list[int]
) -> None:
    for i in todo:  # shared by both threads: whichever is free (the other core may be busy) takes the next
        crcs[i] = read(units[i])


def _wait_quietly(future: Future[None]) -> None:
    try:
        future.result()
    except BaseException:  # noqa: BLE001 - the caller's error is the one being raised
        pass


def read_parallel(fd: int, path: str, pieces: list[Piece], verify: bool) -> dict[str, int]:
    """Read pieces into memory on this thread and the helper; name -> CRC-32C (0 when not verifying).

    With the C extension, both threads copy from the mapped file and checksum in the same pass (the
    CRC comes free with the copy, so it is computed even when not verifying); stores bypass the
    cache when the whole read is much larger than it. Without it, each thread reads a chunk with
    pread and checksums it while it is hot in its own cache. Units of one tensor may run on either
    thread; their CRCs are joined in file order by :func:`checksum.combine`.
    """
    units = _units(pieces, _UNIT)
    crcs = [0] * len(units)
    todo = iter(range(len(units)))  # next() on a range iterator is atomic under the GIL
    total = sum(p.nbytes for p in pieces)
    with _mapped(fd, path, pieces) as base:
        read: Callable[[Piece], int] = partial(read_unit, fd, path, verify=verify)
        if base is not None:
            read = partial(_copy_mapped, base, total >= _NONTEMPORAL_MIN)
        future = None
        if total >= _SPLIT_MIN:
            future = checksum.run_beside(partial(_read_units, read, units, todo, crcs))
        try:
            _read_units(read, units, todo, crcs)
        except BaseException:
            if future is not None:
                _wait_quietly(future)  # it writes into the targets: never return while it runs
            raise
        if future is not None:
            future.result()
    computed: dict[str, int] = {}
    for unit, crc in zip(units, crcs, strict=True):
        head = computed.get(unit.name)
        computed[unit.name] = crc if head is None else checksum.combine(head, crc, unit.nbytes)
    return computed
