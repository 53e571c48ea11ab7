"""Partitioned variables (TF1 ``partitioner=``): one full-tensor entry listing its slices, and one
entry per slice holding the bytes.

A slice's index key is TensorFlow's ``EncodeTensorNameSlice``: ``OrderedCode`` of the number 0 (one
``\\x00`` byte), the escaped name (``\\x00`` -> ``\\x00\\xff``, ``\\xff`` -> ``\\xff\\x00``, ended by
``\\x00\\x01``), the rank, then each dimension's start and length as order-preserving signed numbers.
Because that encoding preserves numeric order, a variable's slice keys sort exactly as its
``(start, length)`` extents do, so we pair keys and extents by sorting both instead of decoding numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from lightning_saver.errors import CorruptCheckpointError
from lightning_saver.formats import tf_dtypes
from lightning_saver.formats.tf_wire import BundleEntry

__all__ = ["slice_key_name", "assemble"]


def slice_key_name(key: bytes) -> str | None:
    """The variable name in a slice key; None when ``key`` is a plain tensor name.

    Raises:
        CorruptCheckpointError: the key starts like a slice key but its name is not properly escaped.
    """
    if not key.startswith(b"\x00"):
        return None
    name = bytearray()
    i = 1
    while i + 1 < len(key):
        byte, following = key[i], key[i + 1]
        if byte == 0x00 and following == 0x01:
            return name.decode("utf-8", errors="surrogateescape")
        if byte == 0x00 and following == 0xFF:
            name.append(0x00)
            i += 2
        elif byte == 0xFF and following == 0x00:
            name.append(0xFF)
            i += 2
        elif byte in (0x00, 0xFF):
            break
        else:
            name.append(byte)
            i += 1
    raise CorruptCheckpointError(f"malformed tensor-slice key {key[:40]!r}")


def _region(name: str, extents: tuple[tuple[int, int], ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    if len(extents) != len(shape):
        raise CorruptCheckpointError(
            f"slice {extents} of tensor {name!r} does not match its rank {len(shape)}"
        )
    region = []
    for (start, length), dim in zip(extents, shape, strict=True):
        stop = dim if length == -1 else start + length
        if not 0 <= start <= stop <= dim:
            raise CorruptCheckpointError(f"slice {extents} lies outside tensor {name!r} of shape {shape}")
        region.append(slice(start, stop))
    return tuple(region)


def assemble(
    name: str,
    entry: BundleEntry,
    parts: list[BundleEntry],
    read: Callable[[BundleEntry], np.ndarray],
) -> np.ndarray:
    """The full tensor of a partitioned variable, from its slices' entries (in key order).

    ``read`` returns one slice's stored bytes (bounds and checksum already checked).

    Raises:
        CorruptCheckpointError: slices and entries disagree in count, rank, shape, dtype or size.
    """
    if tf_dtypes.base_dtype(entry.dtype) == tf_dtypes.DT_STRING:
        raise CorruptCheckpointError(f"tensor {name!r}: partitioned string tensors are not supported")
    try:
        dtype = tf_dtypes.to_numpy(entry.dtype)
    except ValueError as err:
        raise CorruptCheckpointError(f"tensor {name!r}: {err}") from None
    extents = sorted(entry.slices)
    if len(extents) != len(parts):
        raise CorruptCheckpointError(
            f"tensor {name!r} lists {len(extents)} slices but {len(parts)} are stored"
        )
    regions = [_region(name, ext, entry.shape) for ext in extents]
    total = 0
    for region, part in zip(regions, parts, strict=True):
        lengths = tuple(r.stop - r.start for r in region)
        if part.shape != lengths or tf_dtypes.base_dtype(part.dtype) != tf_dtypes.base_dtype(entry.dtype):
            raise CorruptCheckpointError(
                f"tensor {name!r}: slice at {[r.start for r in region]} holds {part.shape} "
                f"{tf_dtypes.dtype_name(part.dtype)}, expected {lengths} {tf_dtypes.dtype_name(entry.dtype)}"
            )
        total += math.prod(lengths) * dtype.itemsize
    if total != math.prod(entry.shape) * dtype.itemsize:  # also bounds the allocation below
        raise CorruptCheckpointError(f"tensor {name!r}: its slices do not cover shape {entry.shape} exactly")
    # equal volumes are not enough: a slice listed twice would leave a hole of uninitialised memory.
    # Disjoint slices of the right total volume tile the tensor exactly.
    covered = np.zeros(entry.shape, dtype=np.bool_)
    for region in regions:
        if covered[region].any():
            starts = [r.start for r in region]
            raise CorruptCheckpointError(f"tensor {name!r}: the slice at {starts} overlaps another slice")
        covered[region] = True
    full = np.empty(entry.shape, dtype=dtype)
    for region, part in zip(regions, parts, strict=True):
        full[region] = read(part).view(dtype).reshape(part.shape)
    return full
