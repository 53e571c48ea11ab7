"""The LevelDB table ("sstable") format that TensorFlow uses for a bundle's ``.index`` file.

Layout, as TensorFlow's ``tensorflow/core/lib/io/table_builder.cc`` writes it (uncompressed)::

    data block 0 .. data block n-1 | metaindex block (empty) | index block | footer (48 bytes)

A block is a run of entries ``varint32 shared | varint32 non_shared | varint32 value_len |
key[shared:] | value`` with prefix compression restarted every 16 entries (every entry in the index
block), then the restart offsets as fixed32 and their count as fixed32. Each block is followed by a
5-byte trailer: the compression type (0 = none) and the masked CRC-32C of block + type byte. The index
block maps a separator key (>= every key of a block, < every key of the next) to that block's handle
``varint64 offset | varint64 size``. The footer holds the metaindex and index handles, zero padding
to 40 bytes, and the magic number 0xdb4775248b80fb57 as a little-endian fixed64.

Reading is bounded by the buffer: every handle, length and count is checked before use, so a
damaged file raises :class:`CorruptCheckpointError`, never an IndexError, a hang or a huge allocation.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from lightning_saver.errors import CorruptCheckpointError
from lightning_saver.formats import masked_crc
from lightning_saver.formats.tf_wire import decode_varint, encode_varint

__all__ = [
    "build_table", "read_table", "check_footer", "MAGIC", "FOOTER_SIZE", "BLOCK_SIZE", "RESTART_INTERVAL",
]  # fmt: skip

MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
_HANDLES_SIZE = 40  # two BlockHandles at their maximal 10 + 10 bytes
BLOCK_SIZE = 262144  # TensorFlow's table::Options default
RESTART_INTERVAL = 16
_TRAILER_SIZE = 5
_NO_COMPRESSION = 0
_SNAPPY = 1


class _BlockBuilder:
    def __init__(self, restart_interval: int) -> None:
        self.interval = restart_interval
        self.buffer = bytearray()
        self.restarts = [0]
        self.counter = 0
        self.last_key = b""
        self.empty = True

    def add(self, key: bytes, value: bytes) -> None:
        shared = 0
        if self.counter < self.interval:
            limit = min(len(key), len(self.last_key))
            while shared < limit and key[shared] == self.last_key[shared]:
                shared += 1
        else:
            self.restarts.append(len(self.buffer))
            self.counter = 0
        self.buffer += encode_varint(shared) + encode_varint(len(key) - shared) + encode_varint(len(value))
        self.buffer += key[shared:] + value
        self.last_key = key
        self.counter += 1
        self.empty = False

    def size_estimate(self) -> int:
        return len(self.buffer) + 4 * len(self.restarts) + 4

    def finish(self) -> bytes:
        restarts = struct.pack(f"<{len(self.restarts)}I", *self.restarts)
        return bytes(self.buffer) + restarts + struct.pack("<I", len(self.restarts))


def _shortest_separator(start: bytes, limit: bytes) -> bytes:
    """A short key k with start <= k < limit (LevelDB's BytewiseComparator rule)."""
    common = 0
    min_len = min(len(start), len(limit))
    while common < min_len and start[common] == limit[common]:
        common += 1
    if common < min_len:
        byte = start[common]
        if byte < 0xFF and byte + 1 < limit[common]:
            return start[:common] + bytes([byte + 1])
    return start


def _short_successor(key: bytes) -> bytes:
    """A short key >= ``key``: the first byte that is not 0xff, incremented, and nothing after it."""
    for i, byte in enumerate(key):
        if byte != 0xFF:
            return key[:i] + bytes([byte + 1])
    return key


def _handle(offset: int, size: int) -> bytes:
    return encode_varint(offset) + encode_varint(size)


def build_table(
    items: Iterable[tuple[bytes, bytes]],
    *,
    block_size: int = BLOCK_SIZE,
    restart_interval: int = RESTART_INTERVAL,
) -> bytes:
    """Serialize sorted (key, value) pairs as a table, byte for byte as TensorFlow's TableBuilder.

    Raises:
        ValueError: keys are not strictly increasing.
    """
    out = bytearray()
    index = _BlockBuilder(1)
    block = _BlockBuilder(restart_interval)
    pending: bytes | None = None  # handle of the last flushed block, waiting for the next key
    last_key: bytes | None = None

    def write_block(builder: _BlockBuilder) -> bytes:
        contents = builder.finish()
        handle = _handle(len(out), len(contents))
        crc = masked_crc.extend(masked_crc.value(contents), bytes([_NO_COMPRESSION]))
        out.extend(contents + struct.pack("<BI", _NO_COMPRESSION, masked_crc.mask(crc)))
        return handle

    for key, value in items:
        if last_key is not None and key <= last_key:
            raise ValueError(f"table keys must be strictly increasing: {key!r} after {last_key!r}")
        if pending is not None:
            index.add(_shortest_separator(last_key or b"", key), pending)
            pending = None
        last_key = key
        block.add(key, value)
        if block.size_estimate() >= block_size:
            pending = write_block(block)
            block = _BlockBuilder(restart_interval)
    if not block.empty:
        pending = write_block(block)
    meta_handle = write_block(_BlockBuilder(restart_interval))
    if pending is not None:
        index.add(_short_successor(last_key or b""), pending)
    index_handle = write_block(index)
    footer = (meta_handle + index_handle).ljust(_HANDLES_SIZE, b"\0") + struct.pack("<Q", MAGIC)
    return bytes(out + footer)


def _read_handle(buf: bytes, pos: int, end: int, source: str) -> tuple[int, int, int]:
    offset, pos = decode_varint(buf, pos, end)
    size, pos = decode_varint(buf, pos, end)
    return offset, size, pos


def _read_block(buf: bytes, offset: int, size: int, source: str, what: str) -> bytes:
    end = offset + size
    if end + _TRAILER_SIZE > len(buf) - FOOTER_SIZE:
        raise CorruptCheckpointError(
            f"{source}: {what} at offset {offset} with {size} bytes runs past the end of the file "
            f"({len(buf)} bytes); the file is truncated or damaged"
        )
    contents = buf[offset:end]
    kind, stored = struct.unpack_from("<BI", buf, end)
    actual = masked_crc.mask(masked_crc.extend(masked_crc.value(contents), bytes([kind])))
    if actual != stored:
        raise CorruptCheckpointError(
            f"{source}: checksum mismatch in {what} at offset {offset} "
            f"(stored {stored:#010x}, computed {actual:#010x}); the file is damaged"
        )
    if kind != _NO_COMPRESSION:
        name = "snappy" if kind == _SNAPPY else f"type {kind}"
        raise CorruptCheckpointError(f"{source}: {what} uses {name} compression, which is not supported")
    return contents


def _block_entries(block: bytes, source: str, what: str) -> list[tuple[bytes, bytes]]:
    if len(block) < 4:
        raise CorruptCheckpointError(f"{source}: {what} is {len(block)} bytes, too short for a block")
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    if num_restarts > (len(block) - 4) // 4:
        raise CorruptCheckpointError(f"{source}: {what} claims {num_restarts} restart points")
    limit = len(block) - 4 - 4 * num_restarts
    entries: list[tuple[bytes, bytes]] = []
    key = b""
    pos = 0
    while pos < limit:
        shared, pos = decode_varint(block, pos, limit)
        unshared, pos = decode_varint(block, pos, limit)
        value_len, pos = decode_varint(block, pos, limit)
        if shared > len(key) or unshared + value_len > limit - pos:
            raise CorruptCheckpointError(f"{source}: {what} has a malformed entry at byte {pos}")
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        entries.append((key, block[pos : pos + value_len]))
        pos += value_len
    return entries


def check_footer(footer: bytes, *, source: str = "<table>") -> None:
    """Check the magic number of a table's last ``FOOTER_SIZE`` bytes (read them before the rest).

    Raises:
        CorruptCheckpointError: a short footer or a wrong magic number (names ``source``).
    """
    if len(footer) != FOOTER_SIZE:
        raise CorruptCheckpointError(f"{source}: the {FOOTER_SIZE}-byte footer is cut short (truncated file)")
    (magic,) = struct.unpack_from("<Q", footer, _HANDLES_SIZE)
    if magic != MAGIC:
        raise CorruptCheckpointError(
            f"{source}: wrong magic number {magic:#018x} (expected {MAGIC:#018x}); "
            "this is not a TensorFlow checkpoint index, or it is truncated"
        )


def read_table(buf: bytes, *, source: str = "<table>") -> list[tuple[bytes, bytes]]:
    """Every (key, value) of a table, in key order, after checking every block's checksum.

    Args:
        buf: the whole table file.
        source: the file name, used in error messages.

    Raises:
        CorruptCheckpointError: truncated file, wrong magic number, bad checksum, malformed block or
            keys out of order; the message names ``source``.
    """
    if len(buf) < FOOTER_SIZE:
        raise CorruptCheckpointError(
            f"{source}: {len(buf)} bytes is too short for a table ({FOOTER_SIZE}-byte footer); "
            "the file is truncated"
        )
    footer = len(buf) - FOOTER_SIZE
    check_footer(buf[footer:], source=source)
    try:
        _, _, pos = _read_handle(buf, footer, footer + _HANDLES_SIZE, source)
        index_offset, index_size, _ = _read_handle(buf, pos, footer + _HANDLES_SIZE, source)
        index = _block_entries(
            _read_block(buf, index_offset, index_size, source, "index block"), source, "index"
        )
        items: list[tuple[bytes, bytes]] = []
        for separator, handle in index:
            offset, size, _ = _read_handle(handle, 0, len(handle), source)
            what = f"data block at offset {offset}"
            for key, value in _block_entries(_read_block(buf, offset, size, source, what), source, what):
                if (items and key <= items[-1][0]) or key > separator:
                    raise CorruptCheckpointError(f"{source}: key {key!r} is out of order")
                items.append((key, value))
    except CorruptCheckpointError as err:
        if str(err).startswith(source):
            raise
        raise CorruptCheckpointError(f"{source}: {err}") from None
    return items
