"""The safetensors header: dtype names, the parsed index, and strict validation of untrusted files.

A file is 8 bytes of little-endian header length N, N bytes of JSON, then the packed tensor bytes.
Reading never executes anything from the file; every field is checked before it is used, and a
file that is not safetensors (a pickled ``.ckpt``, text, a truncated copy) is refused with a
:class:`CorruptCheckpointError` naming the file.

Our own fields live in ``__metadata__["lightning_saver"]`` as JSON (see ``safetensors_io``).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import google_crc32c
import torch

from lightning_saver.errors import CheckpointNotFoundError, CorruptCheckpointError, FormatVersionError

__all__ = [
    "FORMAT_VERSION", "RESERVED_KEY", "DTYPES", "DTYPE_NAMES", "TensorInfo", "Header", "read_header",
    "read_header_ranged", "parse_header",
]

FORMAT_VERSION = 1
RESERVED_KEY = "lightning_saver"
MAX_HEADER = 100 << 20

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "C64": torch.complex64, "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16,
}  # fmt: skip
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
_ITEMSIZE = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry: safetensors dtype name, shape, byte size, data offset, stored CRC-32C."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    offset: int = 0
    crc32c: str | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass
class Header:
    """A parsed, validated header. ``info`` is our reserved JSON ({} for foreign files)."""

    path: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    info: dict[str, Any] = field(default_factory=dict)
    data_start: int = 0
    header_crc32c: str = ""  # CRC-32C of the first data_start bytes (what the state file records)
    # where the bytes are when ``path`` is not a local file: an object with ``read(offset, length)``
    source: Any = field(default=None, compare=False, repr=False)

    @property
    def aliases(self) -> dict[str, str]:
        """Tied keys: alias -> the key whose tensor it is the same object as."""
        return dict(self.info.get("aliases", {}))

    @property
    def ours(self) -> bool:
        """True for files written by lightning_saver (they carry checksums)."""
        return bool(self.info)


def _corrupt(path: str, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{path}: not a valid safetensors checkpoint: {what}")


def _sniff(path: str, head: bytes) -> str:
    if head.startswith(b"PK\x03\x04"):
        return (
            "it is a zip archive, the layout of torch.save/.ckpt files; lightning_saver never "
            "unpickles, so convert it once in a trusted process with safetensors.torch.save_file"
        )
    if head[:1] == b"\x80":
        return "it looks like a pickle; lightning_saver never unpickles (re-save it with safetensors)"
    return "the first 8 bytes do not hold a plausible header length"


def _read_raw(path: str) -> tuple[bytes, int]:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise _corrupt(path, f"the file has {size} bytes, fewer than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > MAX_HEADER or n > size - 8:
                raise _corrupt(path, f"{_sniff(path, head)} (header length {n}, file size {size})")
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"checkpoint file not found: {path}") from None
    except IsADirectoryError:
        raise CheckpointNotFoundError(f"{path} is a directory, expected a .safetensors file") from None
    return raw, size


def _parse_entry(path: str, name: str, entry: Any) -> TensorInfo:
    if not isinstance(entry, dict) or entry.keys() != {"dtype", "shape", "data_offsets"}:
        raise _corrupt(path, f"tensor {name!r} has a malformed entry {str(entry)[:120]}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise _corrupt(
            path,
            f"tensor {name!r} has dtype {dtype!r}, which this torch cannot hold (known: {', '.join(DTYPES)})",
        )
    # bool is an int to Python, and a dimension of 2**70 is no tensor torch can hold
    if not (isinstance(shape, list) and all(type(d) is int and 0 <= d < 2**63 for d in shape)):
        raise _corrupt(path, f"tensor {name!r} has an invalid shape {shape!r}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(o) is int for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise _corrupt(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    nbytes = math.prod(shape) * _ITEMSIZE[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise _corrupt(
            path,
            f"tensor {name!r}: dtype {dtype} shape {shape} needs {nbytes} bytes, "
            f"data_offsets span {offsets[1] - offsets[0]}",
        )
    return TensorInfo(dtype, tuple(shape), nbytes, offsets[0])


def _parse_info(path: str, metadata: dict[str, str]) -> dict[str, Any]:
    text = metadata.get(RESERVED_KEY)
    if text is None:
        return {}
    try:
        info = json.loads(text)
    except (ValueError, RecursionError):
        raise _corrupt(path, f"__metadata__[{RESERVED_KEY!r}] is not JSON") from None
    version = info.get("format_version") if isinstance(info, dict) else None
    if type(version) is not int or version < 1:
        raise _corrupt(path, f"__metadata__[{RESERVED_KEY!r}] has no valid format_version ({version!r})")
    if version > FORMAT_VERSION:
        raise FormatVersionError(
            f"{path} was written with lightning_saver format version {version}, but this "
            f"version reads up to {FORMAT_VERSION}; upgrade lightning_saver to load it"
        )
    return info


def _checksums(path: str, info: dict[str, Any], tensors: dict[str, TensorInfo]) -> dict[str, str]:
    """Our files carry a CRC-32C for every tensor: a missing or malformed entry is damage, not a pass."""
    section = info.get("checksum")
    crcs = section.get("tensors") if isinstance(section, dict) else None
    if not isinstance(crcs, dict):
        raise _corrupt(path, "our metadata has no checksum table (edited or damaged file)")
    for name in tensors:
        crc = crcs.get(name)
        if not (isinstance(crc, str) and len(crc) == 8 and all(c in "0123456789abcdef" for c in crc)):
            found = "no checksum" if crc is None else f"checksum {str(crc)[:40]!r}"
            raise _corrupt(path, f"tensor {name!r} has {found}; every tensor of our files has an 8-digit "
                                 "crc32c (edited or damaged file)")
    return crcs


def _check_aliases(path: str, info: dict[str, Any], tensors: dict[str, TensorInfo]) -> None:
    """An alias (tied key) names another tensor of its dtype and shape; the bytes are compared on read."""
    aliases = info.get("aliases", {})
    if not isinstance(aliases, dict):
        raise _corrupt(path, f"aliases is not a name -> name map: {str(aliases)[:120]}")
    for alias, owner in aliases.items():
        a, o = tensors.get(alias), tensors.get(owner) if isinstance(owner, str) else None
        if a is None or o is None or alias == owner:
            raise _corrupt(path, f"alias {alias!r} -> {str(owner)[:80]!r} does not name two of its tensors")
        if (a.dtype, a.shape) != (o.dtype, o.shape):
            raise _corrupt(path, f"alias {alias!r} ({a.dtype} {list(a.shape)}) cannot share the tensor of "
                                 f"{owner!r} ({o.dtype} {list(o.shape)})")


def read_header(path: str | os.PathLike[str]) -> Header:
    """Parse and validate the header of ``path``; nothing beyond the header is read.

    Raises:
        CheckpointNotFoundError: the file does not exist.
        CorruptCheckpointError: not safetensors, malformed, or truncated (names the file).
        FormatVersionError: written by a newer lightning_saver.
    """
    path = os.fspath(path)
    raw, size = _read_raw(path)
    return parse_header(path, raw, size)


_FIRST_READ = 16 << 10  # one ranged request holds the header of a model of ~150 tensors


def read_header_ranged(path: str, size: int, read: Callable[[int, int], bytes]) -> Header:
    """Like :func:`read_header` for a file reached by ranged reads (``read(offset, length)``):
    one request of up to 16 KiB, a second only for a bigger header. ``path`` names it in errors."""
    if size < 8:
        raise _corrupt(path, f"the file has {size} bytes, fewer than the 8-byte header length")
    first = read(0, min(size, _FIRST_READ))
    (n,) = struct.unpack("<Q", first[:8])
    if n == 0 or n > MAX_HEADER or n > size - 8:
        raise _corrupt(path, f"{_sniff(path, first[:8])} (header length {n}, file size {size})")
    raw = first[8 : 8 + n]
    if len(raw) < n:
        raw += read(len(first), n - len(raw))
    return parse_header(path, raw, size)


def parse_header(path: str, raw: bytes, size: int) -> Header:
    """Validate the JSON header ``raw`` of a file of ``size`` bytes (see :func:`read_header`)."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise _corrupt(path, "the header is not UTF-8 JSON") from None
    if not isinstance(doc, dict):
        raise _corrupt(path, "the header is not a JSON object")
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(path, "__metadata__ is not a str -> str map")
    tensors = {name: _parse_entry(path, name, entry) for name, entry in doc.items()}
    data_start = 8 + len(raw)
    end = 0
    for name, t in sorted(tensors.items(), key=lambda kv: (kv[1].offset, kv[1].nbytes)):
        if t.offset != end:
            raise _corrupt(path, f"tensor {name!r} starts at byte {t.offset} of the data, expected {end}")
        end += t.nbytes
    if data_start + end > size:
        raise _corrupt(
            path,
            f"the file is truncated: the header describes {end} bytes of tensor data, "
            f"the file holds {size - data_start}",
        )
    if data_start + end < size:
        raise _corrupt(path, f"{size - data_start - end} unexpected bytes after the tensor data")
    info = _parse_info(path, metadata)
    if info:
        crcs = _checksums(path, info, tensors)
        _check_aliases(path, info, tensors)
        tensors = {
            n: TensorInfo(t.dtype, t.shape, t.nbytes, t.offset, crcs.get(n)) for n, t in tensors.items()
        }
    header_crc = f"{google_crc32c.value(struct.pack('<Q', len(raw)) + raw):08x}"
    return Header(path, tensors, metadata, info, data_start, header_crc)
