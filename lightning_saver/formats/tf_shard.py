"""One data shard of a TF V2 bundle (``prefix.data-00000-of-00001``): raw tensor bytes back to back.

Reading takes one tensor at a time, either with positioned reads into fresh memory (the default),
or as a copy-on-write memory map of the file (``mmap=True``): no copy and no fresh pages, the kernel's
page-cache pages are shared until the array is written to. Either way only the requested tensor's
bytes are touched, and its masked CRC-32C is checked before the bytes are returned.

Fresh reads go in 1 MiB chunks, each checksummed right after it lands, while it is still in the CPU
cache (one pass over memory instead of two). Reading the tensors on two threads was measured too
and bought nothing once the buffers are prefaulted (see ``_buffer``): the copy out of the page cache
and the page zeroing share the same memory bandwidth, and a second busy core made the times noisier.
"""

from __future__ import annotations

import mmap as _mmap
import os
from typing import BinaryIO

import numpy as np

from lightning_saver.errors import CorruptCheckpointError
from lightning_saver.formats import masked_crc, tf_dtypes
from lightning_saver.formats.checksum import extend_address
from lightning_saver.formats.tf_wire import BundleEntry

__all__ = ["ShardReader"]


_BIG = 4 << 20
# POSIX only; elsewhere (Windows) big buffers fall back to np.empty
_ANON_FLAGS: int | None = (
    _mmap.MAP_PRIVATE | _mmap.MAP_ANONYMOUS | getattr(_mmap, "MAP_POPULATE", 0)
    if hasattr(_mmap, "MAP_ANONYMOUS") and hasattr(_mmap, "MAP_PRIVATE")
    else None
)
_CHUNK = 1 << 20  # fits in L2 with room to spare: the CRC reads it back from cache


def _buffer(size: int) -> np.ndarray:
    """Fresh writable memory for one tensor's bytes.

    numpy asks for transparent huge pages for arrays of 4 MiB and more; on a busy machine the kernel
    then stalls compacting memory (measured: reads 3-4x slower than TensorFlow's, whose buffers use
    plain pages). An anonymous mapping of plain pages avoids that and is freed with the array.
    ``MAP_POPULATE`` faults all its pages in one system call (GIL released) instead of one trap per
    4 KiB page during the reads: measured on 2 busy cores, 1 GiB read in 0.61 s instead of 0.99 s.
    """
    if size < _BIG or _ANON_FLAGS is None:
        return np.empty(size, dtype=np.uint8)
    return np.frombuffer(_mmap.mmap(-1, size, flags=_ANON_FLAGS), dtype=np.uint8)


class ShardReader:
    """Reads tensors' bytes from one data shard; use as a context manager."""

    def __init__(self, path: str, *, mmap: bool = False) -> None:
        self.path = path
        self._file: BinaryIO = open(path, "rb")
        self.size = os.fstat(self._file.fileno()).st_size
        # mmap refuses empty files; nothing can be read from one anyway
        self._map = (
            _mmap.mmap(self._file.fileno(), 0, access=_mmap.ACCESS_COPY) if mmap and self.size else None
        )

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()  # a mapping stays valid (and alive) while arrays refer to it

    def read(self, name: str, entry: BundleEntry, *, verify: bool) -> np.ndarray:
        """The tensor's stored bytes as a writable uint8 array, checksum checked (not for strings,
        whose checksum covers their parsed layout).

        Raises:
            CorruptCheckpointError: the bytes lie past the end of the file, or the checksum differs.
        """
        end = entry.offset + entry.size
        if end > self.size:
            raise CorruptCheckpointError(
                f"{self.path}: tensor {name!r} needs bytes {entry.offset}..{end} but the file "
                f"has {self.size}; the data file is truncated"
            )
        check = verify and tf_dtypes.base_dtype(entry.dtype) != tf_dtypes.DT_STRING
        if self._map is not None and entry.size:
            buf = np.frombuffer(self._map, dtype=np.uint8, count=entry.size, offset=entry.offset)
            crc = masked_crc.value(buf) if check else 0
        else:
            buf, crc = self._read_fresh(name, entry, check)
        if check and masked_crc.mask(crc) != entry.crc32c:
            raise CorruptCheckpointError(
                f"{self.path}: checksum mismatch for tensor {name!r} "
                f"(offset {entry.offset}, {entry.size} bytes); the checkpoint is damaged"
            )
        return buf

    def _read_fresh(self, name: str, entry: BundleEntry, check: bool) -> tuple[np.ndarray, int]:
        buf = _buffer(entry.size)
        view = buf.data
        fd, address, crc = self._file.fileno(), buf.ctypes.data, 0
        for start in range(0, entry.size, _CHUNK):
            stop = min(start + _CHUNK, entry.size)
            got = os.preadv(fd, [view[start:stop]], entry.offset + start)
            if got != stop - start:  # a file shrinking under us; a short read is never retried
                raise CorruptCheckpointError(
                    f"{self.path}: short read for tensor {name!r}; the file is truncated"
                )
            if check:
                crc = extend_address(crc, address + start, got)
        return buf, crc
