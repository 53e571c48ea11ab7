"""Tensor values <-> the bytes a TF V2 bundle stores for them.

Numeric tensors are their raw little-endian bytes. A string tensor (``DT_STRING``) is laid out as in
TensorFlow's ``WriteStringTensor``::

    varint64 len_0 ... varint64 len_{n-1} | fixed32 masked crc of the lengths | bytes_0 ... bytes_{n-1}

where the lengths' crc runs over each length as a little-endian uint32 (uint64 when it does not fit),
and the entry's crc covers the lengths' crc, the stored length checksum and the string bytes.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
import torch

from lightning_saver.errors import CorruptCheckpointError, EncodingError
from lightning_saver.formats import masked_crc, tf_dtypes
from lightning_saver.formats.tf_wire import decode_varint, encode_varint

__all__ = ["Encoded", "encode_value", "decode_strings", "bytes_to_numpy", "bytes_to_torch"]

_U32_MAX = 0xFFFFFFFF


@dataclass
class Encoded:
    """One tensor ready to write: its DataType, shape and the bytes (one buffer, zero copy if possible)."""

    dtype: int
    shape: tuple[int, ...]
    data: np.ndarray  # uint8, C-contiguous
    crc32c: int = 0  # masked, filled by encode_value


def _string_bytes(items: list[object], name: str) -> Encoded:
    chunks: list[bytes] = []
    for item in items:
        if isinstance(item, str):
            chunks.append(item.encode("utf-8"))
        elif isinstance(item, (bytes, bytearray, np.bytes_)):
            chunks.append(bytes(item))
        else:
            raise EncodingError(
                f"tensor {name!r}: a string tensor may hold only bytes or str, found {type(item).__name__}"
            )
    lengths = b"".join(encode_varint(len(c)) for c in chunks)
    crc = 0
    for chunk in chunks:
        fmt = "<I" if len(chunk) <= _U32_MAX else "<Q"
        crc = masked_crc.extend(crc, struct.pack(fmt, len(chunk)))
    length_crc = struct.pack("<I", masked_crc.mask(crc))
    payload = b"".join(chunks)
    crc = masked_crc.extend(masked_crc.extend(crc, length_crc), payload)
    data = np.frombuffer(lengths + length_crc + payload, dtype=np.uint8)
    return Encoded(tf_dtypes.DT_STRING, (), data, masked_crc.mask(crc))


def _encode_strings(array: np.ndarray, name: str) -> Encoded:
    encoded = _string_bytes(list(array.reshape(-1)), name)
    encoded.shape = tuple(int(d) for d in array.shape)
    return encoded


def encode_value(value: object, name: str) -> Encoded:
    """A torch tensor, numpy array/scalar, bytes or str as the bytes a bundle stores.

    Raises:
        EncodingError: the value is not a tensor, or its dtype has no TensorFlow DataType.
    """
    if isinstance(value, torch.Tensor):
        try:
            dtype = tf_dtypes.from_torch(value.dtype)
        except ValueError as err:
            raise EncodingError(f"tensor {name!r}: {err}") from None
        flat = value.detach().to("cpu").contiguous().reshape(-1)
        data = flat.view(torch.uint8).numpy() if flat.numel() else np.empty(0, np.uint8)
        shape = tuple(int(d) for d in value.shape)
    elif isinstance(value, (str, bytes)):
        return _encode_strings(np.array(value, dtype=object), name)
    elif isinstance(value, (np.ndarray, np.generic)):
        array = np.asarray(value)
        if array.dtype.kind in "SUO":
            return _encode_strings(array, name)
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        try:
            dtype = tf_dtypes.from_numpy(array.dtype)
        except ValueError as err:
            raise EncodingError(f"tensor {name!r}: {err}") from None
        shape = tuple(int(d) for d in array.shape)
        data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    else:
        raise EncodingError(
            f"tensor {name!r}: expected a torch.Tensor or numpy.ndarray, found {type(value).__name__}"
        )
    return Encoded(dtype, shape, data, masked_crc.masked(data))


def element_count(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def decode_strings(buf: np.ndarray, shape: tuple[int, ...], where: str, crc32c: int | None) -> np.ndarray:
    """Parse a string tensor's stored bytes into a numpy object array of ``bytes``.

    ``crc32c`` is the entry's masked checksum to verify, or None to skip that check.

    Raises:
        CorruptCheckpointError: lengths or checksum do not add up; the message starts with ``where``.
    """
    raw = buf.tobytes()
    count = element_count(shape)
    if count > len(raw):  # every length takes at least one byte
        raise CorruptCheckpointError(f"{where}: {count} strings cannot fit in {len(raw)} bytes")
    lengths: list[int] = []
    pos = 0
    crc = 0
    try:
        for _ in range(count):
            length, pos = decode_varint(raw, pos)
            lengths.append(length)
            crc = masked_crc.extend(crc, struct.pack("<I" if length <= _U32_MAX else "<Q", length))
    except CorruptCheckpointError as err:
        raise CorruptCheckpointError(f"{where}: bad string length: {err}") from None
    if pos + 4 > len(raw) or pos + 4 + sum(lengths) != len(raw):
        raise CorruptCheckpointError(
            f"{where}: string lengths add up to {sum(lengths)} bytes "
            f"but {max(len(raw) - pos - 4, 0)} are stored"
        )
    (stored,) = struct.unpack_from("<I", raw, pos)
    if stored != masked_crc.mask(crc):
        raise CorruptCheckpointError(f"{where}: checksum mismatch in the string lengths; the file is damaged")
    if crc32c is not None:
        total = masked_crc.extend(masked_crc.extend(crc, raw[pos : pos + 4]), raw[pos + 4 :])
        if masked_crc.mask(total) != crc32c:
            raise CorruptCheckpointError(
                f"{where}: checksum mismatch in the string bytes; the checkpoint is damaged"
            )
    pos += 4
    out = np.empty(count, dtype=object)
    for i, length in enumerate(lengths):
        out[i] = raw[pos : pos + length]
        pos += length
    return out.reshape(shape)


def bytes_to_numpy(buf: np.ndarray, dtype: int, shape: tuple[int, ...]) -> np.ndarray:
    """View raw uint8 bytes as a numpy array of the TF dtype (bfloat16 -> ``ml_dtypes.bfloat16``)."""
    return buf.view(tf_dtypes.to_numpy(dtype)).reshape(shape)


def bytes_to_torch(buf: np.ndarray, dtype: int, shape: tuple[int, ...]) -> torch.Tensor:
    """View raw uint8 bytes as a torch tensor of the TF dtype (bfloat16 -> ``torch.bfloat16``)."""
    torch_dtype = tf_dtypes.to_torch(dtype)
    if buf.size == 0:  # numpy gives a zero-size array stride 0, which torch's view refuses
        return torch.empty(shape, dtype=torch_dtype)
    return torch.from_numpy(buf).view(torch_dtype).reshape(shape)
