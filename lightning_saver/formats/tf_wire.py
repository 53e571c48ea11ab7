"""The few protobuf messages of a TF V2 bundle index, encoded and decoded by hand.

The ``tensorboard`` package's compiled protos lack ``tensor_bundle.proto``, so the fields we need are
written out here (field numbers from ``tensorflow/core/protobuf/tensor_bundle.proto``)::

    BundleHeaderProto { int32 num_shards = 1; Endianness endianness = 2; VersionDef version = 3; }
    VersionDef        { int32 producer = 1; int32 min_consumer = 2; repeated int32 bad_consumers = 3; }
    BundleEntryProto  { DataType dtype = 1; TensorShapeProto shape = 2; int32 shard_id = 3;
                        int64 offset = 4; int64 size = 5; fixed32 crc32c = 6;
                        repeated TensorSliceProto slices = 7; }
    TensorShapeProto  { repeated Dim dim = 2; bool unknown_rank = 3; }
    Dim               { int64 size = 1; string name = 2; }

Encoding follows proto3 as TensorFlow's C++ emits it: fields in number order, zero scalars omitted,
the shape sub-message always present. Decoding is bounded: a varint longer than 10 bytes, a length
running past the buffer or an unknown wire type raises :class:`CorruptCheckpointError`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from lightning_saver.errors import CorruptCheckpointError

__all__ = [
    "BundleHeader",
    "BundleEntry",
    "encode_varint",
    "decode_varint",
    "encode_header",
    "decode_header",
    "encode_entry",
    "decode_entry",
]

_MAX_VARINT_BYTES = 10
_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5
_MAX_DIMS = 254  # TensorShape's own limit on rank


@dataclass
class BundleHeader:
    num_shards: int = 1
    endianness: int = 0  # 0 little, 1 big
    producer: int = 1  # kTensorBundleVersion
    min_consumer: int = 0
    bad_consumers: list[int] = field(default_factory=list)


@dataclass
class BundleEntry:
    dtype: int = 0
    shape: tuple[int, ...] = ()
    shard_id: int = 0
    offset: int = 0
    size: int = 0
    crc32c: int = 0  # masked
    # partitioned variables: one (start, length) per dimension for each slice; length -1 = all of it
    slices: list[tuple[tuple[int, int], ...]] = field(default_factory=list)
    unknown_rank: bool = False


def encode_varint(value: int) -> bytes:
    """Base-128 varint; negative values as their 64-bit two's complement (10 bytes), like protobuf."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_varint(buf: bytes | memoryview, pos: int, end: int | None = None) -> tuple[int, int]:
    """Decode one varint of at most 10 bytes at ``buf[pos:end]``; returns (value, next position)."""
    end = len(buf) if end is None else end
    result = 0
    for i in range(_MAX_VARINT_BYTES):
        if pos + i >= end:
            raise CorruptCheckpointError(f"truncated varint at byte {pos}")
        byte = buf[pos + i]
        result |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            return result & ((1 << 64) - 1), pos + i + 1
    raise CorruptCheckpointError(f"varint at byte {pos} is longer than {_MAX_VARINT_BYTES} bytes")


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _fields(buf: bytes | memoryview) -> Iterator[tuple[int, int, int | bytes]]:
    """Yield (field number, wire type, value) for each field of one serialized message."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = decode_varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise CorruptCheckpointError(f"protobuf field number 0 at byte {pos}")
        value: int | bytes
        if wire == _VARINT:
            value, pos = decode_varint(buf, pos, end)
        elif wire == _FIXED64 or wire == _FIXED32:
            width = 8 if wire == _FIXED64 else 4
            if pos + width > end:
                raise CorruptCheckpointError(f"truncated fixed-width field {number}")
            value = int.from_bytes(buf[pos : pos + width], "little")
            pos += width
        elif wire == _LEN:
            length, pos = decode_varint(buf, pos, end)
            if length > end - pos:
                raise CorruptCheckpointError(
                    f"field {number} claims {length} bytes but only {end - pos} remain"
                )
            value = bytes(buf[pos : pos + length])
            pos += length
        else:
            raise CorruptCheckpointError(f"unsupported protobuf wire type {wire} for field {number}")
        yield number, wire, value


def _want(number: int, wire: int, expected: int, value: int | bytes, message: str) -> None:
    if wire != expected:
        raise CorruptCheckpointError(f"{message} field {number} has wire type {wire}, expected {expected}")


def _payload(number: int, wire: int, value: int | bytes, message: str) -> bytes:
    _want(number, wire, _LEN, value, message)
    return value if isinstance(value, bytes) else b""


def _int_field(number: int, value: int) -> bytes:
    return encode_varint(number << 3 | _VARINT) + encode_varint(value) if value else b""


def _len_field(number: int, payload: bytes) -> bytes:
    return encode_varint(number << 3 | _LEN) + encode_varint(len(payload)) + payload


def encode_header(header: BundleHeader) -> bytes:
    """Serialize a BundleHeaderProto."""
    version = _int_field(1, header.producer) + _int_field(2, header.min_consumer)
    for bad in header.bad_consumers:
        version += encode_varint(3 << 3 | _VARINT) + encode_varint(bad)
    return _int_field(1, header.num_shards) + _int_field(2, header.endianness) + _len_field(3, version)


def decode_header(buf: bytes | memoryview) -> BundleHeader:
    """Parse a BundleHeaderProto; unknown fields are skipped."""
    header = BundleHeader(num_shards=0, producer=0)
    for number, wire, value in _fields(buf):
        if number in (1, 2):
            _want(number, wire, _VARINT, value, "BundleHeaderProto")
            setattr(header, "num_shards" if number == 1 else "endianness", _signed64(int(value)))
        elif number == 3:
            for vnum, vwire, vval in _fields(_payload(number, wire, value, "BundleHeaderProto")):
                if vnum in (1, 2, 3) and vwire == _VARINT:
                    as_int = _signed64(int(vval))
                    if vnum == 1:
                        header.producer = as_int
                    elif vnum == 2:
                        header.min_consumer = as_int
                    else:
                        header.bad_consumers.append(as_int)
    return header


def _encode_shape(shape: tuple[int, ...]) -> bytes:
    return b"".join(_len_field(2, _int_field(1, dim)) for dim in shape)


def _decode_slice(buf: bytes) -> tuple[tuple[int, int], ...]:
    # TensorSliceProto { repeated Extent extent = 1; }  Extent { int64 start = 1; int64 length = 2; }
    extents: list[tuple[int, int]] = []
    for number, wire, value in _fields(buf):
        if number != 1:
            continue
        if len(extents) >= _MAX_DIMS:
            raise CorruptCheckpointError(f"tensor slice has more than {_MAX_DIMS} dimensions")
        start, length = 0, -1
        for enum, ewire, evalue in _fields(_payload(number, wire, value, "TensorSliceProto")):
            if enum in (1, 2):
                _want(enum, ewire, _VARINT, evalue, "TensorSliceProto.Extent")
                if enum == 1:
                    start = _signed64(int(evalue))
                else:
                    length = _signed64(int(evalue))
        extents.append((start, length))
    return tuple(extents)


def encode_entry(entry: BundleEntry) -> bytes:
    """Serialize a BundleEntryProto (no slices: we never write partitioned variables)."""
    return (
        _int_field(1, entry.dtype)
        + _len_field(2, _encode_shape(entry.shape))
        + _int_field(3, entry.shard_id)
        + _int_field(4, entry.offset)
        + _int_field(5, entry.size)
        + (struct.pack("<BI", 6 << 3 | _FIXED32, entry.crc32c) if entry.crc32c else b"")
    )


def _decode_shape(buf: bytes, entry: BundleEntry) -> None:
    dims: list[int] = []
    for number, wire, value in _fields(buf):
        if number == 2:
            if len(dims) >= _MAX_DIMS:
                raise CorruptCheckpointError(f"tensor shape has more than {_MAX_DIMS} dimensions")
            size = 0
            for dnum, dwire, dval in _fields(_payload(number, wire, value, "TensorShapeProto")):
                if dnum == 1:
                    _want(dnum, dwire, _VARINT, dval, "TensorShapeProto.Dim")
                    size = _signed64(int(dval))
            dims.append(size)
        elif number == 3 and wire == _VARINT:
            entry.unknown_rank = bool(value)
    entry.shape = tuple(dims)


def decode_entry(buf: bytes | memoryview) -> BundleEntry:
    """Parse a BundleEntryProto; unknown fields are skipped."""
    entry = BundleEntry()
    for number, wire, value in _fields(buf):
        if number == 2:
            _decode_shape(_payload(number, wire, value, "BundleEntryProto"), entry)
        elif number == 6:
            _want(number, wire, _FIXED32, value, "BundleEntryProto")
            entry.crc32c = int(value)
        elif number == 7:
            entry.slices.append(_decode_slice(_payload(number, wire, value, "BundleEntryProto")))
        elif number in (1, 3, 4, 5):
            _want(number, wire, _VARINT, value, "BundleEntryProto")
            name = {1: "dtype", 3: "shard_id", 4: "offset", 5: "size"}[number]
            setattr(entry, name, _signed64(int(value)))
    return entry
