"""One data shard of a TF V2 bundle (``prefix.data-00000-of-00001``): raw tensor bytes back to back.

Reading takes one tensor at a time, either with one seek + one read into fresh memory (the default),
or as a copy-on-write memory map of the file (``mmap=True``): no copy and no fresh pages, the kernel's
page-cache pages are shared until the array is written to. Either way only the requested tensor's
bytes are touched, and its masked CRC-32C is checked before the bytes are returned.
"""

from __future__ import annotations

import mmap as _mmap
import os
from typing import BinaryIO

import numpy as np

from lightning_saver.errors import CorruptCheckpointError
from lightning_saver.formats import masked_crc, tf_dtypes
from lightning_saver.formats.tf_wire import BundleEntry

__all__ = ["ShardReader"]


_BIG = 4 << 20


def _buffer(size: int) -> np.ndarray:
    """Fresh writable memory for one tensor's bytes.

    numpy asks for transparent huge pages for arrays of 4 MiB and more; on a busy machine the kernel
    then stalls compacting memory (measured: reads 3-4x slower than TensorFlow's, whose buffers use
    plain pages). An anonymous mapping of plain pages avoids that and is freed with the array.
    """
    if size < _BIG:
        return np.empty(size, dtype=np.uint8)
    return np.frombuffer(_mmap.mmap(-1, size), dtype=np.uint8)


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
        if self._map is not None and entry.size:
            buf = np.frombuffer(self._map, dtype=np.uint8, count=entry.size, offset=entry.offset)
        else:
            buf = _buffer(entry.size)
            self._file.seek(entry.offset)
            if self._file.readinto(buf) != entry.size:  # type: ignore[attr-defined]
                raise CorruptCheckpointError(
                    f"{self.path}: short read for tensor {name!r}; the file is truncated"
                )
        is_string = tf_dtypes.base_dtype(entry.dtype) == tf_dtypes.DT_STRING
        if verify and not is_string and masked_crc.masked(buf) != entry.crc32c:
            raise CorruptCheckpointError(
                f"{self.path}: checksum mismatch for tensor {name!r} "
                f"(offset {entry.offset}, {entry.size} bytes); the checkpoint is damaged"
            )
        return buf
