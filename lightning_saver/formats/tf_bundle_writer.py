"""Write a TF V2 bundle: data shards first, the index last, each through a ``commit`` handed in.

The bytes match what TensorFlow's ``BundleWriter`` produces for the same tensors added in the same
order: data shards hold tensors back to back in that order, the index lists them sorted by name.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from lightning_saver.formats import sstable
from lightning_saver.formats.tf_tensor_codec import Encoded
from lightning_saver.formats.tf_wire import BundleEntry, BundleHeader, encode_entry, encode_header

__all__ = ["data_path", "plan_shards", "write_bundle", "plain_commit", "stale_data_files", "Commit"]

_CHUNK = 8 << 20


def data_path(prefix: str, shard: int, num_shards: int) -> str:
    """``model.ckpt`` -> ``model.ckpt.data-00000-of-00001``."""
    return f"{prefix}.data-{shard:05d}-of-{num_shards:05d}"


def plan_shards(sizes: list[int], max_shard_bytes: int | None) -> list[int]:
    """The shard of each tensor, in order: a new shard starts when the next tensor would push the
    current one past ``max_shard_bytes`` (a tensor larger than that gets a shard of its own)."""
    shards: list[int] = []
    shard, used = 0, 0
    for size in sizes:
        if max_shard_bytes is not None and used and used + size > max_shard_bytes:
            shard, used = shard + 1, 0
        shards.append(shard)
        used += size
    return shards


class Sink(Protocol):
    """Where one file's bytes go (a storage sink, or any binary file object)."""

    def write(self, data: bytes | bytearray | memoryview) -> Any: ...


Commit = Callable[[str, Callable[[Any], Any]], Any]
"""``commit(path, produce)``: run ``produce(sink)`` and make its bytes appear under ``path`` whole
(``Storage.write_atomic``). The writer never knows which store is behind it."""


def plain_commit(path: str, produce: Callable[[Any], Any]) -> Any:
    """Write ``path`` in place and fsync it (not atomic: for callers without a store)."""
    with open(path, "wb") as f:
        result = produce(f)
        f.flush()
        os.fsync(f.fileno())
    return result


def _entries(
    names: list[str], encoded: Mapping[str, Encoded], shard_of: list[int]
) -> list[tuple[bytes, bytes]]:
    """Index entries: each tensor's shard, offset in it, size and checksum (offsets are known upfront)."""
    entries = []
    offsets: dict[int, int] = {}
    for name, shard in zip(names, shard_of, strict=True):
        enc = encoded[name]
        offset = offsets.get(shard, 0)
        entry = BundleEntry(enc.dtype, enc.shape, shard, offset, enc.data.nbytes, enc.crc32c)
        entries.append((name.encode("utf-8", errors="surrogateescape"), encode_entry(entry)))
        offsets[shard] = offset + enc.data.nbytes
    return entries


def _shard_writer(items: list[Encoded]) -> Callable[[Sink], None]:
    def produce(sink: Sink) -> None:
        for enc in items:
            view = memoryview(enc.data.data).cast("B")
            for start in range(0, len(view), _CHUNK):  # sinks may copy what they get: bounded pieces
                sink.write(view[start : start + _CHUNK])

    return produce


def write_bundle(
    prefix: str, encoded: Mapping[str, Encoded], *, max_shard_bytes: int | None = None,
    commit: Commit = plain_commit,
) -> list[str]:
    """Write the bundle through ``commit``; returns the paths written (data shards, then the index).

    Each data shard is committed first, the index last, so a reader that finds the index finds
    complete data. With ``storage_for(prefix).write_atomic`` as ``commit`` each file is atomic and
    durable (``lightning_saver.tf.write_checkpoint`` does this and removes stale shards).

    Raises:
        DiskFullError: from ``commit``, when the disk fills up (nothing was replaced).
    """
    names = list(encoded)
    shard_of = plan_shards([encoded[n].data.nbytes for n in names], max_shard_bytes)
    num_shards = (shard_of[-1] + 1) if names else 1
    finals = [data_path(prefix, s, num_shards) for s in range(num_shards)] + [prefix + ".index"]
    for shard in range(num_shards):
        items = [encoded[n] for n, s in zip(names, shard_of, strict=True) if s == shard]
        commit(finals[shard], _shard_writer(items))
    header = encode_header(BundleHeader(num_shards=num_shards))
    table = sstable.build_table([(b"", header)] + sorted(_entries(names, encoded, shard_of)))
    commit(finals[-1], lambda sink: sink.write(table))
    return finals


def stale_data_files(prefix_name: str, listing: list[str], written: list[str]) -> list[str]:
    """Names in ``listing`` (one directory's file names) that are data shards of ``prefix_name``
    with another shard count than the bundle just ``written`` (names, not paths)."""
    pattern = re.compile(re.escape(prefix_name) + r"\.data-\d{5}-of-\d{5}$")
    keep = set(written)
    return sorted(n for n in listing if pattern.match(n) and n not in keep)
