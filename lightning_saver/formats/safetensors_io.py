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
two threads; elsewhere two threads pread chunks and checksum each while it is in cache.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

from lightning_saver.errors import CorruptCheckpointError, StateMismatchError
from lightning_saver.formats import checksum, memcopy
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
    memory_view,
    planned_nbytes,
    save_file,
    write_to_fd,
    write_to_sink,
)

# Reading maps the file and copies + checksums in one pass where the C extension is built; elsewhere
# pread + google-crc32c, with the same results.
_ONE_PASS = memcopy.ONE_PASS

__all__ = [
    "FORMAT_VERSION", "RESERVED_KEY", "TensorInfo", "Header", "WriteResult",
    "save_file", "write_to_fd", "planned_nbytes", "load_file", "read_into", "read_header",
    "read_index", "read_metadata", "read_info", "verify_file", "load_tensors", "verify_header",
    "write_to_sink", "read_exact", "check_crc",
]  # fmt: skip


def read_exact(fd: int, offset: int, address: int, nbytes: int, path: str) -> None:
    """Read ``nbytes`` at ``offset`` of ``fd`` into memory at ``address``.

    Raises:
        CorruptCheckpointError: the file (``path``) ends first.
    """
    done = 0
    while done < nbytes:
        got = os.preadv(fd, [memory_view(address + done, min(CHUNK, nbytes - done))], offset + done)
        if got == 0:
            raise CorruptCheckpointError(f"{path}: the file is truncated (ended while reading tensor data)")
        done += got


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


_READ_CHUNK = 1 << 20  # read, then checksum while the chunk is still in this core's cache
_UNIT = 8 << 20  # the share one thread takes at a time; a tensor's unit CRCs are joined by combine
_SPLIT_MIN = 2 * _UNIT  # below this, a second thread costs more than it saves
_NONTEMPORAL_MIN = 64 << 20  # one-pass reads this large use streaming stores (the cache cannot hold them)


@dataclass(frozen=True)
class _Piece:
    name: str
    offset: int  # in the file
    address: int
    nbytes: int


def _units(pieces: list[_Piece], size: int) -> list[_Piece]:
    """Cut pieces into units of at most ``size`` bytes, in file order (an empty piece stays one unit)."""
    out: list[_Piece] = []
    for p in pieces:
        starts = range(0, p.nbytes, size) if p.nbytes else range(1)
        out += [_Piece(p.name, p.offset + s, p.address + s, min(size, p.nbytes - s)) for s in starts]
    return out


def _read_unit(fd: int, path: str, unit: _Piece, verify: bool) -> int:
    crc = 0
    for start in range(0, unit.nbytes, _READ_CHUNK):
        size = min(_READ_CHUNK, unit.nbytes - start)
        read_exact(fd, unit.offset + start, unit.address + start, size, path)
        if verify:
            crc = checksum.extend_address(crc, unit.address + start, size)
    return crc


def _copy_mapped(base: int, nontemporal: bool, unit: _Piece) -> int:
    """Copy a unit out of the mapped file and checksum it in the same pass (the C extension)."""
    return memcopy.copy_crc32c(unit.address, base + unit.offset, unit.nbytes, nontemporal=nontemporal)


@contextmanager
def _mapped(fd: int, path: str, pieces: list[_Piece]) -> Iterator[int | None]:
    """The address of the whole file mapped read-only; None where the one-pass copy is unavailable.

    The file's size is checked first: touching a mapped page past the end would kill the process
    (SIGBUS) instead of raising. Our checkpoint files are never shortened in place (a save writes a
    new file and renames it), so the size cannot change under the mapping. While mapped, the file's
    pages count in the process's resident set (as with ``torch.load(mmap=True)``): they are the
    page cache, shared, not memory we allocate. Mapping the file piece by piece instead keeps the
    resident set flat but was 20% slower (each unmap interrupts the other core to flush its TLB).
    """
    end = max((p.offset + p.nbytes for p in pieces), default=0)
    if not _ONE_PASS or end == 0:
        yield None
        return
    size = os.fstat(fd).st_size
    if size < end:
        raise CorruptCheckpointError(
            f"{path}: the file is truncated: tensor data runs to byte {end}, the file has {size}"
        )
    try:
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):  # a file system that cannot map files: read with pread instead
        yield None
        return
    view = np.frombuffer(mm, dtype=np.uint8)
    try:
        yield int(view.ctypes.data)
    finally:
        del view  # the mapping cannot close while an exported buffer lives
        mm.close()


def _read_units(
    read: Callable[[_Piece], int], units: list[_Piece], todo: Iterator[int], crcs: list[int]
) -> None:
    for i in todo:  # shared by both threads: whichever is free (the other core may be busy) takes the next
        crcs[i] = read(units[i])


def _wait_quietly(future: Future[None]) -> None:
    try:
        future.result()
    except BaseException:  # noqa: BLE001 - the caller's error is the one being raised
        pass


def _read_parallel(fd: int, path: str, pieces: list[_Piece], verify: bool) -> dict[str, int]:
    """Read pieces into memory on this thread and the helper; name -> CRC-32C (0 when not verifying).

    With the C extension, both threads copy from the mapped file and checksum in the same pass (the
    CRC comes free with the copy, so it is computed even when not verifying); stores bypass the
    cache when the whole read is much larger than it. Without it, each thread reads a chunk with
    pread and checksums it while it is hot in its own cache. Units of one tensor may run on either
    thread; their CRCs are joined in file order by :func:`checksum.combine`.
    """
    units = _units(pieces, _UNIT)
    crcs = [0] * len(units)
    todo = iter(range(len(units)))  # next() on a range iterator is atomic under the GIL
    total = sum(p.nbytes for p in pieces)
    with _mapped(fd, path, pieces) as base:
        read: Callable[[_Piece], int] = partial(_read_unit, fd, path, verify=verify)
        if base is not None:
            read = partial(_copy_mapped, base, total >= _NONTEMPORAL_MIN)
        future = None
        if total >= _SPLIT_MIN:
            future = checksum.run_beside(partial(_read_units, read, units, todo, crcs))
        try:
            _read_units(read, units, todo, crcs)
        except BaseException:
            if future is not None:
                _wait_quietly(future)  # it writes into the targets: never return while it runs
            raise
        if future is not None:
            future.result()
    computed: dict[str, int] = {}
    for unit, crc in zip(units, crcs, strict=True):
        head = computed.get(unit.name)
        computed[unit.name] = crc if head is None else checksum.combine(head, crc, unit.nbytes)
    return computed


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (
        a.data_ptr() == b.data_ptr()
        and a.dtype == b.dtype
        and a.device == b.device
        and a.shape == b.shape
        and a.stride() == b.stride()
    )


def _piece(header: Header, name: str, target: torch.Tensor) -> _Piece:
    info = header.tensors[name]
    return _Piece(name, header.data_start + info.offset, target.data_ptr(), info.nbytes)


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
    in_place: list[_Piece] = []
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
        computed = _read_parallel(fd, header.path, in_place, verify)
        tied = []
        for name in others:
            target = targets[name]
            if aliases.get(name) in targets and _same_memory(targets[aliases[name]], target):
                tied.append(name)
                continue
            tmp = torch.empty(target.shape, dtype=target.dtype)
            computed[name] = _read_unit(fd, header.path, _piece(header, name, tmp), verify)
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
