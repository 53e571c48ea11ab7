"""Writing checksummed safetensors files, streamed from each tensor's own memory.

The layout and our reserved ``__metadata__`` entry are described in
:mod:`lightning_saver.formats.safetensors_io`, which re-exports these verbs next to the readers.

The header goes first with ``00000000`` placeholders for the checksums, then each tensor straight
from its own memory, its CRC-32C computed on that same memory; then the header is rewritten in
place (the hex fields have a fixed width, so its length cannot change). No whole-file buffer is
built; only a non-contiguous or non-CPU tensor is copied, one at a time.

Example::

    result = save_file({"x": torch.tensor(5.0)}, "x.safetensors")  # result.crcs == {"x": "8d544f80"}
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import google_crc32c
import torch

from lightning_saver.formats import checksum
from lightning_saver.formats.safetensors_header import DTYPE_NAMES, FORMAT_VERSION, RESERVED_KEY

__all__ = [
    "CHUNK", "WriteResult", "memory_view", "planned_nbytes", "save_file", "write_to_fd", "write_to_sink",
]

_PLACEHOLDER = "0" * 8
CHUNK = 4 << 20  # I/O and checksum unit: still in the shared cache when the helper thread reads it


@dataclass(frozen=True)
class WriteResult:
    """What a write produced: total bytes, per-tensor CRC-32C, and a CRC-32C of the final header."""

    nbytes: int
    crcs: dict[str, str]
    checksum: str


def memory_view(address: int, nbytes: int) -> memoryview:
    """A writable byte view of ``nbytes`` of memory at ``address`` (a tensor's storage)."""
    return memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")


def _write_all(fd: int, address: int, nbytes: int) -> None:
    done = 0
    while done < nbytes:
        done += os.write(fd, memory_view(address + done, min(CHUNK, nbytes - done)))


def _write_bytes(fd: int, data: bytes, offset: int | None = None) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset + len(data) - len(view))
        view = view[n:]


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
    for start in range(0, nbytes, CHUNK):
        size = min(CHUNK, nbytes - start)
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


def _cpu_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        return tensor.detach().to("cpu").contiguous()
    return tensor


def write_to_sink(
    tensors: Mapping[str, torch.Tensor],
    sink: Any,
    *,
    metadata: Mapping[str, str] | None = None,
    info: Mapping[str, Any] | None = None,
) -> WriteResult:
    """:func:`write_to_fd` for a sink that only appends (``sink.write``; no seek, no descriptor).

    The checksums are computed in a first pass, so the final header goes first and every byte is
    written once, in order (a stream straight into an upload). Same bytes as :func:`write_to_fd`.
    """
    plan = _Plan(tensors, metadata, info)
    crcs = {}
    for name in plan.order:
        t = _cpu_contiguous(plan.tensors[name])
        crcs[name] = checksum.format_crc(checksum.tensor_crc32c(t) if t.numel() else 0)
    final = plan.header(crcs)
    if len(final) != plan.header_len:
        raise RuntimeError("internal error: the checksummed header changed length")
    sink.write(final)
    for name in plan.order:
        t = _cpu_contiguous(plan.tensors[name])  # one tensor's copy at a time, if any
        nbytes = t.numel() * t.element_size()
        for start in range(0, nbytes, CHUNK):
            sink.write(memory_view(t.data_ptr() + start, min(CHUNK, nbytes - start)))
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
