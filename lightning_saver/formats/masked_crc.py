"""CRC-32C over any buffer, and the "masked" form LevelDB and TensorFlow store on disk.

``google_crc32c.extend`` only takes ``bytes``, which would force a copy of every tensor. Its wheel
ships the C library with a plain ``crc32c_extend`` symbol, so we call that through ctypes on the
buffer's address (zero copy, GIL released); when the library cannot be found we fall back to
``google_crc32c`` on a ``bytes`` copy.

Masking (LevelDB ``crc32c::Mask``): rotate right by 15 bits and add a constant, so that a crc
stored inside checksummed data does not checksum to something trivial.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path

import google_crc32c
import numpy as np

__all__ = ["extend", "value", "mask", "unmask", "masked"]

_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF


def _load_native() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    here = Path(google_crc32c.__file__).resolve().parent
    candidates = sorted((here.parent / "google_crc32c.libs").glob("libcrc32c*.so*"))
    system = ctypes.util.find_library("crc32c")
    paths = [str(p) for p in candidates] + ([system] if system else [])
    for path in paths:
        try:
            func = ctypes.CDLL(path).crc32c_extend
        except (OSError, AttributeError):
            continue
        func.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
        func.restype = ctypes.c_uint32
        return func
    return None


_NATIVE = _load_native()


def extend(crc: int, data: bytes | bytearray | memoryview | np.ndarray) -> int:
    """Extend a CRC-32C with ``data`` (any C-contiguous buffer), without copying it."""
    if isinstance(data, bytes):
        return int(google_crc32c.extend(crc, data))
    array = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    if array.nbytes == 0:
        return crc
    if _NATIVE is None:
        return int(google_crc32c.extend(crc, array.tobytes()))
    return int(_NATIVE(crc, array.ctypes.data, array.nbytes))


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
