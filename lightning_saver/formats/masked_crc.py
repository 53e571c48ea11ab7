"""CRC-32C over any buffer, and the "masked" form LevelDB and TensorFlow store on disk.

The zero-copy hardware CRC itself lives in ``formats/checksum.py``; this module adapts it to
buffers and adds TensorFlow's masking.

Masking (LevelDB ``crc32c::Mask``): rotate right by 15 bits and add a constant, so that a crc
stored inside checksummed data does not checksum to something trivial.
"""

from __future__ import annotations

import google_crc32c
import numpy as np

from lightning_saver.formats.checksum import extend_address

__all__ = ["extend", "value", "mask", "unmask", "masked"]

_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF


def extend(crc: int, data: bytes | bytearray | memoryview | np.ndarray) -> int:
    """Extend a CRC-32C with ``data`` (any C-contiguous buffer), without copying it."""
    if isinstance(data, bytes):
        return int(google_crc32c.extend(crc, data))
    array = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    if array.nbytes == 0:
        return crc
    return extend_address(crc, array.ctypes.data, array.nbytes)


def value(data: bytes | bytearray | memoryview | np.ndarray) -> int:
    """The CRC-32C of ``data``."""
    return extend(0, data)


def mask(crc: int) -> int:
    """LevelDB/TensorFlow masking of a CRC before it is stored."""
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & _U32


def unmask(masked_crc: int) -> int:
    """Inverse of :func:`mask`."""
    rot = (masked_crc - _MASK_DELTA) & _U32
    return ((rot >> 17) | (rot << 15)) & _U32


def masked(data: bytes | bytearray | memoryview | np.ndarray) -> int:
    """The masked CRC-32C of ``data``, as TensorFlow stores it."""
    return mask(value(data))
