"""TensorFlow V2 checkpoints ("tensor bundles"): ``prefix.index`` + ``prefix.data-NNNNN-of-NNNNN``.

The index is a LevelDB table (:mod:`lightning_saver.formats.sstable`) whose empty key holds a
``BundleHeaderProto`` and whose other keys are tensor names mapping to ``BundleEntryProto``
(:mod:`lightning_saver.formats.tf_wire`). Each entry says which data shard holds the tensor, at what
offset, how many bytes, and their masked CRC-32C. Data shards are raw tensor bytes back to back.

The verbs match :mod:`lightning_saver.formats.safetensors_io`: :func:`save_file`, :func:`load_file`,
:func:`read_index`, :func:`read_metadata`. Reading is lazy: only the requested tensors' bytes are read
(positioned reads of 1 MiB chunks), and each is checked against its stored crc.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from lightning_saver.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    FormatVersionError,
    StateMismatchError,
)
from lightning_saver.formats import sstable, tf_bundle_writer, tf_dtypes, tf_slices, tf_tensor_codec
from lightning_saver.formats.tf_bundle_writer import data_path
from lightning_saver.formats.tf_shard import ShardReader
from lightning_saver.formats.tf_wire import (
    BundleEntry,
    BundleHeader,
    decode_entry,
    decode_header,
)

__all__ = [
    "TensorInfo",
    "save_file",
    "load_file",
    "read_index",
    "read_metadata",
    "read_entries",
    "BundleIndex",
    "resolve_prefix",
    "data_path",
]

_DATA_SUFFIX = re.compile(r"\.data-\d{5}-of-\d{5}$")
_BUNDLE_VERSION = 1  # kTensorBundleVersion: the newest layout this reader knows
_MAX_INDEX_BYTES = 1 << 29  # ~5 million tensors' entries; a larger .index is damage


class TensorInfo(NamedTuple):
    """One tensor as the index describes it."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def resolve_prefix(path: str | os.PathLike[str]) -> str:
    """Accept a prefix, its ``.index`` or a ``.data-*`` file, or a directory with a TF ``checkpoint``
    state file; return the prefix.

    Raises:
        CheckpointNotFoundError: no ``.index`` file for the path.
    """
    text = os.fspath(path)
    if text.endswith(".index") and not os.path.exists(text + ".index"):
        text = text[: -len(".index")]
    data_file = _DATA_SUFFIX.search(text)
    if data_file and not os.path.exists(text + ".index"):
        text = text[: data_file.start()]
    if os.path.isdir(text):
        state = os.path.join(text, "checkpoint")
        latest = _latest_from_state(state) if os.path.exists(state) else None
        if latest is None:
            raise CheckpointNotFoundError(
                f"{text} is a directory without a TensorFlow 'checkpoint' file naming the latest checkpoint; "
                "pass the checkpoint prefix instead, e.g. 'dir/model.ckpt-100' for dir/model.ckpt-100.index"
            )
        text = latest if os.path.isabs(latest) else os.path.join(text, latest)
    if not os.path.exists(text + ".index"):
        raise CheckpointNotFoundError(
            f"{text}.index does not exist; pass the checkpoint prefix, e.g. 'model.ckpt-100' for the files "
            "model.ckpt-100.index and model.ckpt-100.data-00000-of-00001"
        )
    return text


def _latest_from_state(state: str) -> str | None:
    # text-format CheckpointState: model_checkpoint_path: "model.ckpt-100"
    for line in Path(state).read_text(errors="replace").splitlines():
        key, _, rest = line.partition(":")
        if key.strip() == "model_checkpoint_path":
            return rest.strip().strip('"')
    return None


class BundleIndex(NamedTuple):
    """A parsed index: the resolved prefix, the header, tensor entries by name (in name order), and
    for each partitioned variable the entries of its slices (in key order)."""

    prefix: str
    header: BundleHeader
    entries: dict[str, BundleEntry]
    parts: dict[str, list[BundleEntry]]


def read_entries(path: str | os.PathLike[str]) -> BundleIndex:
    """The prefix, header and every entry of a bundle's index.

    Raises:
        CheckpointNotFoundError: no such checkpoint.
        CorruptCheckpointError: the index is damaged or not a bundle index.
        FormatVersionError: the bundle needs a newer reader.
    """
    prefix = resolve_prefix(path)
    index_file = prefix + ".index"
    with open(index_file, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size >= sstable.FOOTER_SIZE:  # the footer first: a large file that is no index is never read
            f.seek(size - sstable.FOOTER_SIZE)
            sstable.check_footer(f.read(sstable.FOOTER_SIZE), source=index_file)
            if size > _MAX_INDEX_BYTES:
                raise CorruptCheckpointError(
                    f"{index_file}: {size} bytes is larger than any checkpoint index we read "
                    f"({_MAX_INDEX_BYTES}); is it damaged?"
                )
            f.seek(0)
        buf = f.read(_MAX_INDEX_BYTES)
    items = sstable.read_table(buf, source=index_file)
    if not items or items[0][0] != b"":
        raise CorruptCheckpointError(
            f"{index_file}: no bundle header under the empty key; not a TF V2 checkpoint"
        )
    try:
        header = decode_header(items[0][1])
    except CorruptCheckpointError as err:
        raise CorruptCheckpointError(f"{index_file}: bundle header: {err}") from None
    _check_header(header, index_file)
    entries: dict[str, BundleEntry] = {}
    parts: dict[str, list[BundleEntry]] = {}
    for key, value in items[1:]:
        try:
            sliced = tf_slices.slice_key_name(key)
            name = key.decode("utf-8", errors="surrogateescape") if sliced is None else sliced
            entry = decode_entry(value)
        except CorruptCheckpointError as err:
            shown = key[:80].decode("utf-8", errors="backslashreplace")
            raise CorruptCheckpointError(f"{index_file}: entry for tensor {shown!r}: {err}") from None
        if sliced is None:
            entries[name] = entry
        else:
            parts.setdefault(name, []).append(entry)
    return BundleIndex(prefix, header, entries, parts)


def _check_header(header: BundleHeader, index_file: str) -> None:
    if header.min_consumer > _BUNDLE_VERSION or _BUNDLE_VERSION in header.bad_consumers:
        raise FormatVersionError(
            f"{index_file}: bundle needs reader version >= {header.min_consumer} "
            f"(producer {header.producer}); "
            f"this library reads version {_BUNDLE_VERSION}. Re-save it with an older TensorFlow"
        )
    if header.endianness != 0:
        raise CorruptCheckpointError(f"{index_file}: big-endian bundles are not supported")
    if header.num_shards < 1:
        raise CorruptCheckpointError(f"{index_file}: header says {header.num_shards} data shards")


def _info(entry: BundleEntry, parts: list[BundleEntry]) -> TensorInfo:
    nbytes = sum(p.size for p in parts) if entry.slices else entry.size
    return TensorInfo(tf_dtypes.dtype_name(entry.dtype), entry.shape, nbytes)


def read_index(path: str | os.PathLike[str]) -> dict[str, TensorInfo]:
    """Name -> (dtype name, shape, stored bytes) of every tensor, without reading any tensor data.

    Example:
        >>> read_index("model.ckpt")["dense/kernel"]
        TensorInfo(dtype='float32', shape=(784, 10), nbytes=31360)
    """
    index = read_entries(path)
    return {name: _info(entry, index.parts.get(name, [])) for name, entry in index.entries.items()}


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The bundle header as strings: ``format``, ``num_shards``, ``version``, ``min_consumer``."""
    header = read_entries(path).header
    return {
        "format": "tensorflow-v2-checkpoint",
        "num_shards": str(header.num_shards),
        "version": str(header.producer),
        "min_consumer": str(header.min_consumer),
    }


def _check_entry(name: str, entry: BundleEntry, header: BundleHeader, where: str) -> None:
    if entry.unknown_rank or any(d < 0 for d in entry.shape):
        raise CorruptCheckpointError(f"{where}: tensor {name!r} has an invalid shape {entry.shape}")
    if not 0 <= entry.shard_id < header.num_shards or entry.offset < 0 or entry.size < 0:
        raise CorruptCheckpointError(
            f"{where}: tensor {name!r} points at shard {entry.shard_id} of {header.num_shards}, "
            f"offset {entry.offset}, size {entry.size}"
        )
    if entry.slices or tf_dtypes.base_dtype(entry.dtype) == tf_dtypes.DT_STRING:
        return  # a partitioned variable's checks are in tf_slices.assemble; strings in their decoder
    try:
        itemsize = tf_dtypes.to_numpy(entry.dtype).itemsize
    except ValueError as err:
        raise CorruptCheckpointError(f"{where}: tensor {name!r}: {err}") from None
    expected = tf_tensor_codec.element_count(entry.shape) * itemsize
    if expected != entry.size:
        raise CorruptCheckpointError(
            f"{where}: tensor {name!r} of shape {entry.shape} and dtype {tf_dtypes.dtype_name(entry.dtype)} "
            f"needs {expected} bytes but the index says {entry.size}"
        )


def load_file(
    path: str | os.PathLike[str],
    *,
    names: Iterable[str] | None = None,
    verify: bool = True,
    framework: str = "torch",
    mmap: bool = False,
) -> dict[str, Any]:
    """Read tensors of a TF V2 checkpoint (all of them, or only ``names``).

    Args:
        path: the checkpoint prefix (``model.ckpt-100``), its ``.index`` file, or a directory
            holding a TF ``checkpoint`` state file.
        names: read only these tensors; the others' bytes are never read.
        verify: check each tensor's stored CRC-32C.
        framework: ``"torch"`` (torch tensors; bfloat16 -> ``torch.bfloat16``) or ``"numpy"``
            (bfloat16 -> ``ml_dtypes.bfloat16``). String tensors are numpy object arrays of ``bytes``
            in both cases.
        mmap: map the data files copy-on-write instead of reading them: no copy, and pages are
            shared with the page cache until written. Do not overwrite the files in place (``cp``
            over them) while the tensors are alive; TF's savers and ours write new files and rename.

    Returns:
        name -> tensor, in name order.

    Raises:
        CheckpointNotFoundError: no such checkpoint or data shard.
        CorruptCheckpointError: damaged index or data; the message names the file and the tensor.
        StateMismatchError: a requested name is not in the checkpoint.

    Example:
        >>> load_file("model.ckpt", names=["dense/kernel"], framework="numpy")["dense/kernel"].shape
        (784, 10)
    """
    if framework not in ("torch", "numpy"):
        raise ValueError(f"framework must be 'torch' or 'numpy', got {framework!r}")
    index = read_entries(path)
    prefix, header, entries = index.prefix, index.header, index.entries
    wanted = list(entries) if names is None else _check_names(list(names), entries, prefix)
    out: dict[str, Any] = {}
    by_shard: dict[int, list[str]] = {}
    for name in wanted:
        if entries[name].slices:
            out[name] = _read_partitioned(index, name, framework=framework, verify=verify, mmap=mmap)
        else:
            by_shard.setdefault(entries[name].shard_id, []).append(name)
    for shard_id, shard_names in sorted(by_shard.items()):
        for name in shard_names:
            _check_entry(name, entries[name], header, prefix + ".index")
        shard = data_path(prefix, shard_id, header.num_shards)
        if not os.path.exists(shard):
            raise CheckpointNotFoundError(f"{shard} is missing; the checkpoint {prefix} is incomplete")
        with ShardReader(shard, mmap=mmap) as reader:
            for name in sorted(shard_names, key=lambda n: entries[n].offset):
                buf = reader.read(name, entries[name], verify=verify)
                out[name] = _decode(buf, name, entries[name], shard, framework, verify)
    return {name: out[name] for name in wanted}


def _read_partitioned(index: BundleIndex, name: str, *, framework: str, verify: bool, mmap: bool) -> Any:
    entry, parts = index.entries[name], index.parts.get(name, [])
    where = index.prefix + ".index"
    _check_entry(name, entry, index.header, where)
    shards = []
    for part in parts:
        _check_entry(name, part, index.header, where)
        shard = data_path(index.prefix, part.shard_id, index.header.num_shards)
        if not os.path.exists(shard):
            raise CheckpointNotFoundError(f"{shard} is missing; the checkpoint {index.prefix} is incomplete")
        if part.offset + part.size > os.path.getsize(shard):  # before assemble allocates the whole
            raise CorruptCheckpointError(f"{shard}: a slice of tensor {name!r} lies past the end of the file")
        shards.append(shard)
    paths = {id(part): shard for part, shard in zip(parts, shards, strict=True)}

    def read(part: BundleEntry) -> np.ndarray:
        with ShardReader(paths[id(part)], mmap=mmap) as reader:
            return reader.read(name, part, verify=verify)

    try:
        full = tf_slices.assemble(name, entry, parts, read)
    except CorruptCheckpointError as err:
        if str(err).startswith(index.prefix):
            raise
        raise CorruptCheckpointError(f"{where}: {err}") from None
    if framework == "numpy":
        return full
    return tf_tensor_codec.bytes_to_torch(full.reshape(-1).view(np.uint8), entry.dtype, entry.shape)


def _check_names(names: list[str], entries: Mapping[str, BundleEntry], prefix: str) -> list[str]:
    missing = [n for n in names if n not in entries]
    if missing:
        sample = ", ".join(list(entries)[:5])
        raise StateMismatchError(
            f"{prefix}: no tensor named {missing[0]!r} (the checkpoint has {len(entries)}: {sample}, ...)"
        )
    return names


def _decode(buf: np.ndarray, name: str, entry: BundleEntry, shard: str, framework: str, verify: bool) -> Any:
    if tf_dtypes.base_dtype(entry.dtype) == tf_dtypes.DT_STRING:
        crc = entry.crc32c if verify else None
        return tf_tensor_codec.decode_strings(buf, entry.shape, f"{shard}: tensor {name!r}", crc)
    if framework == "numpy":
        return tf_tensor_codec.bytes_to_numpy(buf, entry.dtype, entry.shape)
    return tf_tensor_codec.bytes_to_torch(buf, entry.dtype, entry.shape)


def save_file(
    tensors: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
    max_shard_bytes: int | None = None,
    commit: tf_bundle_writer.Commit | None = None,
) -> str:
    """Write a TF V2 checkpoint that TensorFlow reads (data shards first, the index last).

    Each file goes through ``commit(path, produce)`` (a store's ``write_atomic``: temp file, fsync,
    rename locally; one complete upload remotely), index last, so a crash never leaves an index
    without its data. Without ``commit`` the files are written in place and fsynced (not atomic);
    ``lightning_saver.tf.write_checkpoint`` passes the store's atomic commit. The files are
    byte-identical to TensorFlow's for the same tensors in the same order.

    Args:
        tensors: name -> torch tensor, numpy array, or bytes/str (or arrays of them) for string tensors.
        path: the checkpoint prefix; ``prefix.index`` and ``prefix.data-00000-of-00001`` are written.
        metadata: must be empty: a TF bundle has no place for free-form metadata.
        max_shard_bytes: split the data into shards of at most this many bytes (a bigger tensor
            gets a shard of its own): ``prefix.data-00000-of-00003`` ... Default: one shard.
        commit: ``commit(path, produce(sink))`` writing one file atomically (default: in place).

    Returns:
        The prefix.

    Raises:
        EncodingError: a value is not a tensor or has a dtype TensorFlow lacks.
        ValueError: an empty tensor name, or metadata given.
        DiskFullError: the disk filled up; nothing was replaced.
    """
    if metadata:
        raise ValueError(
            f"{os.fspath(path)}: a TensorFlow checkpoint cannot store metadata ({sorted(metadata)}); "
            "use a safetensors file to keep it"
        )
    prefix = os.fspath(path)
    encoded = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{prefix}: tensor names must be non-empty strings, got {name!r}")
        encoded[name] = tf_tensor_codec.encode_value(value, name)
    if commit is None:
        if os.path.dirname(prefix):
            os.makedirs(os.path.dirname(prefix), exist_ok=True)
        commit = tf_bundle_writer.plain_commit
    tf_bundle_writer.write_bundle(prefix, encoded, max_shard_bytes=max_shard_bytes, commit=commit)
    return prefix
