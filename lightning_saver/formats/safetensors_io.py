"""Streaming, checksummed safetensors files: the bytes <-> tensors layer of the Saver.

The file is plain safetensors (``safetensors.torch.load_file`` reads it, every key under its own
name): the header, then every tensor's bytes, packed, largest element size first so that each
tensor is aligned. What we add lives in ``__metadata__`` under one reserved key,
``"lightning_saver"``, as JSON::

    {"format_version": 1,
     "checksum": {"algorithm": "crc32c", "tensors": {"fc.weight": "9a0c31f2", ...}},
     "aliases": {"decoder.weight": "embed.weight"},      # tied keys (each is stored in full)
     "versions": {"lightning_saver": "0.1.0", "torch": "2.13.0", "safetensors": "0.8.0"},
     ...the caller's info, e.g. "global_step": 95, "wall_time": 1764080000.0}

Writing streams each tensor from its own memory, checksumming as it goes; it lives in
:mod:`lightning_saver.formats.safetensors_writer`, whose verbs (``save_file``, ``write_to_fd``,
``planned_nbytes``) are re-exported here so both directions share one import.

Reading copies each tensor's bytes once, from the file into the tensor's memory, and checks the
CRC-32C (``verify=True``), so a changed byte is reported with the tensor's name. Where the optional
C extension is built (x86-64), the file is mapped and each word is checksummed as it is copied, on
two threads; elsewhere two threads pread chunks and checksum each while it is in cache (that
engine is :mod:`lightning_saver.formats.parallel_read`).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from typing import Any

import torch

from lightning_saver.errors import CorruptCheckpointError, StateMismatchError
from lightning_saver.formats import checksum
from lightning_saver.formats.parallel_read import Piece, read_exact, read_parallel, read_unit
from lightning_saver.formats.safetensors_header import (
    FORMAT_VERSION,
    RESERVED_KEY,
    Header,
    TensorInfo,
    read_header,
)
from lightning_saver.formats.safetensors_writer import (
    CHUNK,
    WriteResult,
    planned_nbytes,
    save_file,
    write_image,
    write_to_fd,
    write_to_sink,
)

__all__ = [
    "FORMAT_VERSION", "RESERVED_KEY", "TensorInfo", "Header", "WriteResult",
    "save_file", "write_to_fd", "planned_nbytes", "load_file", "read_into", "read_header",
    "read_index", "read_metadata", "read_info", "verify_file", "load_tensors", "verify_header",
    "write_to_sink", "write_image", "read_exact", "check_crc",
]  # fmt: skip


def read_index(path: str | os.PathLike[str]) -> dict[str, TensorInfo]:
    """Name -> :class:`TensorInfo` (dtype name, shape, nbytes) of every tensor, from the header only."""
    return read_header(path).tensors


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The file's ``__metadata__`` (str -> str), our reserved JSON entry included."""
    return read_header(path).metadata


def read_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Our reserved entry, parsed (format version, global step, wall time, ...); {} for foreign files."""
    return read_header(path).info


def check_crc(header: Header, name: str, computed: int) -> None:
    """Compare tensor ``name``'s stored crc32c (if any) with ``computed``.

    Raises:
        CorruptCheckpointError: naming the file, the tensor, the stored and the computed checksum.
    """
    stored = header.tensors[name].crc32c
    if stored is not None and stored != checksum.format_crc(computed):
        raise CorruptCheckpointError(
            f"{header.path}: checksum mismatch in tensor {name!r}: stored crc32c {stored}, computed "
            f"{checksum.format_crc(computed)}; the file changed after it was written, "
            "restore an older checkpoint"
        )


def _crc_region(fd: int, header: Header, name: str) -> int:
    info = header.tensors[name]
    scratch = torch.empty(min(info.nbytes, CHUNK), dtype=torch.uint8)
    crc = 0
    for start in range(0, info.nbytes, CHUNK):
        size = min(CHUNK, info.nbytes - start)
        read_exact(fd, header.data_start + info.offset + start, scratch.data_ptr(), size, header.path)
        crc = checksum.extend_address(crc, scratch.data_ptr(), size)
    return crc


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (
        a.data_ptr() == b.data_ptr()
        and a.dtype == b.dtype
        and a.device == b.device
        and a.shape == b.shape
        and a.stride() == b.stride()
    )


def _piece(header: Header, name: str, target: torch.Tensor) -> Piece:
    info = header.tensors[name]
    return Piece(name, header.data_start + info.offset, target.data_ptr(), info.nbytes)


def _check_targets(header: Header, targets: Mapping[str, torch.Tensor]) -> None:
    """Each target must be a tensor of the file's dtype and shape: the bytes are copied into its memory."""
    bad: list[str] = []
    for name, target in targets.items():
        info = header.tensors.get(name)
        if info is None:
            bad.append(f"{name!r} is not in the file")
        elif not isinstance(target, torch.Tensor):
            bad.append(f"{name!r}: the target is a {type(target).__name__}, not a tensor")
        elif (target.dtype, tuple(target.shape)) != (info.torch_dtype, info.shape):
            bad.append(f"{name!r}: the file holds {info.dtype} {list(info.shape)}, the target is "
                       f"{target.dtype} {list(target.shape)}")
    if bad:
        raise StateMismatchError(f"{header.path}: cannot read into the given targets: " + "; ".join(bad[:10]))


def _check_alias_bytes(fd: int, header: Header, name: str, owner: torch.Tensor) -> None:
    """An alias is returned as its owner's tensor only when its own bytes in the file are the same."""
    info = header.tensors[name]
    source = owner.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    scratch = torch.empty(min(info.nbytes, CHUNK), dtype=torch.uint8)
    for start in range(0, info.nbytes, CHUNK):
        size = min(CHUNK, info.nbytes - start)
        read_exact(fd, header.data_start + info.offset + start, scratch.data_ptr(), size, header.path)
        if not torch.equal(scratch[:size], source[start : start + size]):
            raise CorruptCheckpointError(
                f"{header.path}: tensor {name!r} is recorded as an alias of {header.aliases[name]!r}, but "
                "its bytes differ (edited or damaged file)"
            )


def read_into(header: Header, targets: Mapping[str, torch.Tensor], *, verify: bool = True) -> None:
    """Copy the named tensors' bytes from the file straight into ``targets`` (same dtype and shape).

    Contiguous CPU targets are filled in place with no intermediate buffer, by two threads sharing
    the reading and checksumming; others go one by one via a temporary.
    Tied keys (aliases) whose owner is also a target are not read twice: their bytes in the file
    are compared with the owner's (and checksummed when ``verify``).

    Raises:
        StateMismatchError: a target is not in the file, or differs from it in dtype or shape
            (nothing is read).
        CorruptCheckpointError: a checksum differs, or an alias's bytes differ from its owner's.
    """
    _check_targets(header, targets)
    if header.source is not None:  # not a local file: ranged requests, several in flight
        from lightning_saver.formats.safetensors_ranged import read_into_ranged

        read_into_ranged(header, targets, verify=verify)
        return
    aliases = header.aliases
    in_place: list[Piece] = []
    others: list[str] = []
    for name in sorted(targets, key=lambda n: header.tensors[n].offset):
        target = targets[name]
        if aliases.get(name) in targets and _same_memory(targets[aliases[name]], target):
            others.append(name)
        elif target.device.type == "cpu" and target.is_contiguous():
            in_place.append(_piece(header, name, target))
        else:
            others.append(name)
    with open(header.path, "rb", buffering=0) as f:
        fd = f.fileno()
        computed = read_parallel(fd, header.path, in_place, verify)
        tied = []
        for name in others:
            target = targets[name]
            if aliases.get(name) in targets and _same_memory(targets[aliases[name]], target):
                tied.append(name)
                continue
            tmp = torch.empty(target.shape, dtype=target.dtype)
            computed[name] = read_unit(fd, header.path, _piece(header, name, tmp), verify)
            with torch.no_grad():
                target.copy_(tmp)
        for name in tied:  # after every owner is read
            _check_alias_bytes(fd, header, name, targets[name])
            if verify:
                check_crc(header, name, _crc_region(fd, header, name))
    if verify:
        for name, value in computed.items():
            check_crc(header, name, value)


def load_file(
    path: str | os.PathLike[str], *, names: Collection[str] | None = None, verify: bool = True
) -> dict[str, torch.Tensor]:
    """Load tensors (CPU) from a safetensors file, checking CRC-32C checksums when present.

    Args:
        path: the file.
        names: load only these keys (default: all).
        verify: check each tensor's checksum (files not written by lightning_saver have none).

    Returns:
        name -> tensor; tied keys come back as the same tensor object.

    Raises:
        CheckpointNotFoundError, CorruptCheckpointError (names the file and the tensor),
        FormatVersionError, StateMismatchError (a requested name is not in the file).

    Example:
        >>> load_file("x.safetensors")["x"]
        tensor(5.)
    """
    return load_tensors(read_header(path), names=names, verify=verify)


def load_tensors(
    header: Header, *, names: Collection[str] | None = None, verify: bool = True
) -> dict[str, torch.Tensor]:
    """:func:`load_file` for a header already read (a local file, or one read by ranged requests)."""
    wanted = list(header.tensors) if names is None else list(names)
    missing = [n for n in wanted if n not in header.tensors]
    if missing:
        raise StateMismatchError(
            f"{header.path}: no tensor named {', '.join(map(repr, missing))}; "
            f"the file holds {', '.join(map(repr, list(header.tensors)[:20]))}"
        )
    out: dict[str, torch.Tensor] = {}
    aliases = header.aliases
    owners_first = sorted(wanted, key=lambda n: n in aliases and aliases[n] in wanted)
    for name in owners_first:
        owner = aliases.get(name)
        if owner in out and out[owner].shape == header.tensors[name].shape:
            out[name] = out[owner]
        else:
            info = header.tensors[name]
            out[name] = torch.empty(info.shape, dtype=info.torch_dtype)
    read_into(header, out, verify=verify)
    return {name: out[name] for name in wanted}


def verify_file(path: str | os.PathLike[str]) -> Header:
    """Check every tensor's CRC-32C with constant memory; return the header.

    Raises:
        CorruptCheckpointError: a checksum differs (names the tensor) or the file has none.
    """
    return verify_header(read_header(path))


def verify_header(header: Header) -> Header:
    """:func:`verify_file` for a header already read (local, or with a ranged ``source``)."""
    if not header.ours:
        raise CorruptCheckpointError(
            f"{header.path}: has no lightning_saver checksums to verify "
            "(it was not written by lightning_saver)"
        )
    if header.source is not None:
        from lightning_saver.formats.safetensors_ranged import check_all

        check_all(header)
        return header
    with open(header.path, "rb", buffering=0) as f:
        for name in header.tensors:
            check_crc(header, name, _crc_region(f.fileno(), header, name))
    return header
