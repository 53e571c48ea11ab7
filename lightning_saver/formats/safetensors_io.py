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

Writing streams: the header goes first with ``00000000`` placeholders for the checksums, then each
tensor straight from its own memory, its CRC-32C computed on that same memory; then the header is
rewritten in place (the hex fields have a fixed width, so its length cannot change). No whole-file
buffer is built; only a non-contiguous or non-CPU tensor is copied, one at a time.

Reading copies each tensor's bytes once, from the file into the tensor's memory, and checks the
CRC-32C there (``verify=True``), so a changed byte is reported with the tensor's name.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import google_crc32c
import torch

from lightning_saver.errors import CorruptCheckpointError, StateMismatchError
from lightning_saver.formats import checksum
from lightning_saver.formats.safetensors_header import (
    DTYPE_NAMES,
    FORMAT_VERSION,
    RESERVED_KEY,
    Header,
    TensorInfo,
    read_header,
)

__all__ = [
    "FORMAT_VERSION", "RESERVED_KEY", "TensorInfo", "Header", "WriteResult",
    "save_file", "write_to_fd", "planned_nbytes", "load_file", "read_into", "read_header",
    "read_index", "read_metadata", "read_info", "verify_file",
]  # fmt: skip

_PLACEHOLDER = "0" * 8
_CHUNK = 4 << 20  # I/O and checksum unit: still in the shared cache when the helper thread reads it


@dataclass(frozen=True)
class WriteResult:
    """What a write produced: total bytes, per-tensor CRC-32C, and a CRC-32C of the final header."""

    nbytes: int
    crcs: dict[str, str]
    checksum: str


# ---------------------------------------------------------------- raw file I/O on tensor memory


def _view(address: int, nbytes: int) -> memoryview:
    return memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")


def _write_all(fd: int, address: int, nbytes: int) -> None:
    done = 0
    while done < nbytes:
        done += os.write(fd, _view(address + done, min(_CHUNK, nbytes - done)))


def _write_bytes(fd: int, data: bytes, offset: int | None = None) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset + len(data) - len(view))
        view = view[n:]


def _read_exact(fd: int, offset: int, address: int, nbytes: int, path: str) -> None:
    done = 0
    while done < nbytes:
        got = os.preadv(fd, [_view(address + done, min(_CHUNK, nbytes - done))], offset + done)
        if got == 0:
            raise CorruptCheckpointError(f"{path}: the file is truncated (ended while reading tensor data)")
        done += got


# ---------------------------------------------------------------- writing


def _dtype_name(name: str, tensor: Any) -> str:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor {name!r}: expected a torch.Tensor, found {type(tensor).__name__}")
    if tensor.dtype not in DTYPE_NAMES:
        supported = ", ".join(str(d).replace("torch.", "") for d in DTYPE_NAMES)
        raise TypeError(
            f"tensor {name!r}: dtype {tensor.dtype} cannot be stored in safetensors "
            f"(supported: {supported}); convert it first, e.g. tensor.float()"
        )
    return DTYPE_NAMES[tensor.dtype]


def _find_aliases(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Keys that are the very same view of memory as an earlier key (tied weights)."""
    owners: dict[tuple[Any, ...], str] = {}
    aliases: dict[str, str] = {}
    for name, t in tensors.items():
        if t.numel() == 0:
            continue
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
        if key in owners:
            aliases[name] = owners[key]
        else:
            owners[key] = name
    return aliases


def _user_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    out = {"format": "pt"}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(
                f"metadata entry {key!r}: safetensors metadata maps str to str, found "
                f"{type(key).__name__} -> {type(value).__name__}; convert it with str() or json"
            )
        if key == RESERVED_KEY:
            raise ValueError(
                f"metadata key {RESERVED_KEY!r} is reserved by lightning_saver; "
                "store your entry under another key"
            )
        out[key] = value
    return out


def _versions() -> dict[str, str]:
    import safetensors

    from lightning_saver import __version__

    return {
        "lightning_saver": __version__,
        "torch": torch.__version__.split("+")[0],
        "safetensors": safetensors.__version__,
    }


class _Plan:
    """Layout of a file to write: order, offsets and the header (with placeholder checksums)."""

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str] | None,
        info: Mapping[str, Any] | None,
    ) -> None:
        self.tensors = dict(tensors)
        self.dtypes = {name: _dtype_name(name, t) for name, t in self.tensors.items()}
        self.metadata = _user_metadata(metadata)
        self.order = sorted(self.tensors, key=lambda n: (-self.tensors[n].element_size(), n))
        self.offsets: dict[str, tuple[int, int]] = {}
        end = 0
        for name in self.order:
            size = self.tensors[name].numel() * self.tensors[name].element_size()
            self.offsets[name] = (end, end + size)
            end += size
        self.info = dict(info or {})
        self.info.update(
            format_version=FORMAT_VERSION, aliases=_find_aliases(self.tensors), versions=_versions()
        )
        self.header_len = len(self.header(dict.fromkeys(self.order, _PLACEHOLDER)))
        self.nbytes = self.header_len + end

    def header(self, crcs: Mapping[str, str]) -> bytes:
        ours = dict(self.info, checksum={"algorithm": checksum.ALGORITHM, "tensors": dict(crcs)})
        doc: dict[str, Any] = {"__metadata__": dict(self.metadata, **{RESERVED_KEY: json.dumps(ours)})}
        for name in self.order:
            doc[name] = {
                "dtype": self.dtypes[name],
                "shape": list(self.tensors[name].shape),
                "data_offsets": list(self.offsets[name]),
            }
        raw = json.dumps(doc, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # tensor data starts 8-aligned
        return struct.pack("<Q", len(raw)) + raw


def planned_nbytes(
    tensors: Mapping[str, torch.Tensor],
    *,
    metadata: Mapping[str, str] | None = None,
    info: Mapping[str, Any] | None = None,
) -> int:
    """The exact size in bytes of the file :func:`save_file` would write for these arguments."""
    return _Plan(tensors, metadata, info).nbytes


def _write_tensor(fd: int, name: str, tensor: torch.Tensor, crc: checksum.CrcPipeline) -> None:
    copied = tensor.device.type != "cpu" or not tensor.is_contiguous()
    if copied:
        tensor = tensor.detach().to("cpu").contiguous()  # one tensor at a time: bounded extra memory
    nbytes = tensor.numel() * tensor.element_size()
    address = tensor.data_ptr()
    for start in range(0, nbytes, _CHUNK):
        size = min(_CHUNK, nbytes - start)
        crc.add(name, address + start, size, total=nbytes)  # checksummed while the chunk is written
        _write_all(fd, address + start, size)
    if copied:
        crc.wait()  # the copy is freed on return


def write_to_fd(
    tensors: Mapping[str, torch.Tensor],
    fd: int,
    *,
    metadata: Mapping[str, str] | None = None,
    info: Mapping[str, Any] | None = None,
) -> WriteResult:
    """Stream a checksummed safetensors file to ``fd`` (an empty file at offset 0; no fsync).

    Args:
        tensors: name -> tensor, any device and layout; tied keys are detected and recorded.
        fd: an open, writable file descriptor positioned at 0.
        metadata: extra ``__metadata__`` entries, str -> str; ``"lightning_saver"`` is reserved.
        info: extra JSON-able fields stored under the reserved key (e.g. ``global_step``).

    Returns:
        A :class:`WriteResult`: bytes written, per-tensor CRC-32C, CRC-32C of the final header.

    Raises:
        TypeError: a value is not a tensor, or has a dtype safetensors cannot store.
        ValueError: the metadata uses the reserved key.
        OSError: from the file system (the saver turns ENOSPC/EFBIG into ``DiskFullError``).
    """
    plan = _Plan(tensors, metadata, info)
    placeholder = plan.header(dict.fromkeys(plan.order, _PLACEHOLDER))
    _write_bytes(fd, placeholder)
    crc = checksum.CrcPipeline()
    try:
        for name in plan.order:
            _write_tensor(fd, name, plan.tensors[name], crc)
        values = crc.results()
    finally:
        crc.drain()  # never leave the helper reading memory the caller may free
    crcs = {name: checksum.format_crc(values.get(name, 0)) for name in plan.order}
    final = plan.header(crcs)
    if len(final) != plan.header_len:
        raise RuntimeError("internal error: the checksummed header changed length")
    _write_bytes(fd, final, offset=0)
    return WriteResult(plan.nbytes, crcs, checksum.format_crc(google_crc32c.value(final)))


def save_file(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
    info: Mapping[str, Any] | None = None,
) -> WriteResult:
    """Write ``tensors`` to ``path`` as a checksummed safetensors file, fsynced (not atomic).

    ``CheckpointSaver.save`` writes through ``saving/commit.py`` instead, which adds the
    temp-file-then-rename protocol; this is the plain format-level verb.

    Example:
        >>> save_file({"x": torch.tensor(5.0)}, "x.safetensors").crcs
        {'x': '8d544f80'}
    """
    fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        result = write_to_fd(tensors, fd, metadata=metadata, info=info)
        os.fsync(fd)
    finally:
        os.close(fd)
    return result


# ---------------------------------------------------------------- reading


def read_index(path: str | os.PathLike[str]) -> dict[str, TensorInfo]:
    """Name -> :class:`TensorInfo` (dtype name, shape, nbytes) of every tensor, from the header only."""
    return read_header(path).tensors


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The file's ``__metadata__`` (str -> str), our reserved JSON entry included."""
    return read_header(path).metadata


def read_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Our reserved entry, parsed (format version, global step, wall time, ...); {} for foreign files."""
    return read_header(path).info


def _check_crc(header: Header, name: str, computed: int) -> None:
    stored = header.tensors[name].crc32c
    if stored is not None and stored != checksum.format_crc(computed):
        raise CorruptCheckpointError(
            f"{header.path}: checksum mismatch in tensor {name!r}: stored crc32c {stored}, computed "
            f"{checksum.format_crc(computed)}; the file changed after it was written, "
            "restore an older checkpoint"
        )


def _crc_region(fd: int, header: Header, name: str) -> int:
    info = header.tensors[name]
    scratch = torch.empty(min(info.nbytes, _CHUNK), dtype=torch.uint8)
    crc = 0
    for start in range(0, info.nbytes, _CHUNK):
        size = min(_CHUNK, info.nbytes - start)
        _read_exact(fd, header.data_start + info.offset + start, scratch.data_ptr(), size, header.path)
        crc = checksum.extend_address(crc, scratch.data_ptr(), size)
    return crc


def _fill(fd: int, header: Header, name: str, target: torch.Tensor, crc: checksum.CrcPipeline | None) -> None:
    info = header.tensors[name]
    address = target.data_ptr()
    for start in range(0, info.nbytes, _CHUNK):
        size = min(_CHUNK, info.nbytes - start)
        _read_exact(fd, header.data_start + info.offset + start, address + start, size, header.path)
        if crc is not None:
            crc.add(name, address + start, size, total=info.nbytes)  # overlaps the next read


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (
        a.data_ptr() == b.data_ptr()
        and a.dtype == b.dtype
        and a.device == b.device
        and a.shape == b.shape
        and a.stride() == b.stride()
    )


def read_into(header: Header, targets: Mapping[str, torch.Tensor], *, verify: bool = True) -> None:
    """Copy the named tensors' bytes from the file straight into ``targets`` (same dtype and shape).

    Contiguous CPU targets are filled in place with no intermediate buffer; others via one temporary.
    Tied keys (aliases) whose owner is also a target are only checksummed, not read twice.
    """
    aliases = header.aliases
    crc = checksum.CrcPipeline() if verify else None
    try:
        with open(header.path, "rb", buffering=0) as f:
            fd = f.fileno()
            for name in sorted(targets, key=lambda n: header.tensors[n].offset):
                target = targets[name]
                if aliases.get(name) in targets and _same_memory(targets[aliases[name]], target):
                    if verify:
                        _check_crc(header, name, _crc_region(fd, header, name))
                    continue
                if target.device.type == "cpu" and target.is_contiguous():
                    _fill(fd, header, name, target, crc)
                    continue
                tmp = torch.empty(target.shape, dtype=target.dtype)
                _fill(fd, header, name, tmp, crc)
                if crc is not None:
                    crc.wait()  # before tmp is freed
                with torch.no_grad():
                    target.copy_(tmp)
        computed = crc.results() if crc is not None else {}
    finally:
        if crc is not None:
            crc.drain()
    for name, value in computed.items():
        _check_crc(header, name, value)
    for name in targets:  # empty tensors never reach the pipeline
        if verify and name not in computed and header.tensors[name].nbytes == 0:
            _check_crc(header, name, 0)


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
    header = read_header(path)
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
    header = read_header(path)
    if not header.ours:
        raise CorruptCheckpointError(
            f"{header.path}: has no lightning_saver checksums to verify "
            "(it was not written by lightning_saver)"
        )
    with open(header.path, "rb", buffering=0) as f:
        for name in header.tensors:
            _check_crc(header, name, _crc_region(f.fileno(), header, name))
    return header
