"""Write a TF V2 bundle atomically: data shards and index to temporary names, fsync, rename, index last.

The bytes match what TensorFlow's ``BundleWriter`` produces for the same tensors added in the same
order: data shards hold tensors back to back in that order, the index lists them sorted by name.
"""

from __future__ import annotations

import errno
import glob
import os
import uuid
from collections.abc import Mapping

from lightning_saver.errors import DiskFullError
from lightning_saver.formats import sstable
from lightning_saver.formats.durable import fsync_path
from lightning_saver.formats.tf_tensor_codec import Encoded
from lightning_saver.formats.tf_wire import BundleEntry, BundleHeader, encode_entry, encode_header

__all__ = ["data_path", "plan_shards", "write_bundle"]


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


def _write_data(path: str, items: list[tuple[str, Encoded]], shard: int) -> list[tuple[bytes, bytes]]:
    entries = []
    with open(path, "wb") as f:
        offset = 0
        for name, enc in items:
            f.write(enc.data.data)
            entry = BundleEntry(enc.dtype, enc.shape, shard, offset, enc.data.nbytes, enc.crc32c)
            entries.append((name.encode("utf-8", errors="surrogateescape"), encode_entry(entry)))
            offset += enc.data.nbytes
        f.flush()
        os.fsync(f.fileno())
    return entries


def write_bundle(
    prefix: str, encoded: Mapping[str, Encoded], *, max_shard_bytes: int | None = None
) -> list[str]:
    """Write the bundle; returns the paths written (data shards, then the index).

    Data files of an older checkpoint under the same prefix with another shard count are removed
    after the new index is in place.

    Raises:
        DiskFullError: the disk filled up; the temporary files are removed and nothing was replaced.
    """
    names = list(encoded)
    shard_of = plan_shards([encoded[n].data.nbytes for n in names], max_shard_bytes)
    num_shards = (shard_of[-1] + 1) if names else 1
    finals = [data_path(prefix, s, num_shards) for s in range(num_shards)] + [prefix + ".index"]
    tag = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temps = [final + tag for final in finals]
    try:
        entries: list[tuple[bytes, bytes]] = []
        for shard in range(num_shards):
            items = [(n, encoded[n]) for n, s in zip(names, shard_of, strict=True) if s == shard]
            entries += _write_data(temps[shard], items, shard)
        header = encode_header(BundleHeader(num_shards=num_shards))
        with open(temps[-1], "wb") as f:
            f.write(sstable.build_table([(b"", header)] + sorted(entries)))
            f.flush()
            os.fsync(f.fileno())
        for temp, final in zip(temps, finals, strict=True):
            os.replace(temp, final)
        fsync_path(os.path.dirname(prefix) or ".")
    except BaseException as err:
        for temp in temps:
            if os.path.exists(temp):
                os.remove(temp)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise DiskFullError(
                errno.ENOSPC, f"disk full while writing checkpoint {prefix}; nothing replaced"
            ) from err
        raise
    stale = set(
        glob.glob(glob.escape(prefix) + ".data-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]")
    )
    for path in sorted(stale - set(finals)):
        os.remove(path)
    return finals
