"""The index of a sharded checkpoint (a *set*): which file holds which piece of which tensor.

A set is one plain safetensors file per rank plus this small JSON file, written last by rank 0
(its presence commits the set). For each tensor it records the global shape and dtype and, for
each piece, the file (an index into ``files``), the piece's offsets and sizes in the global tensor
and its CRC-32C, which must match the CRC-32C in that file's own header::

    {
      "format": "lightning_saver.shard_index",
      "version": 1,
      "global_step": 95, "wall_time": 1764080000.5, "world_size": 2,
      "files": ["model_95-00000-of-00002.safetensors", "model_95-00001-of-00002.safetensors"],
      "tensors": {
        "layer.weight": {"dtype": "F32", "shape": [8, 4], "pieces": [
          {"file": 0, "offsets": [0, 0], "sizes": [4, 4], "crc32c": "8d544f80"},
          {"file": 1, "offsets": [4, 0], "sizes": [4, 4], "crc32c": "0c1d2e3f"}]}
      },
      "metadata": {"lightning_saver.training_state": "..."},
      "info": {"metric": 0.5, "versions": {...}}
    }

Inside each shard a piece is stored under the tensor's own name (one piece per tensor per rank,
as DTensor shards are), so ``safetensors.torch.load_file`` on a shard gives that rank's pieces.

Parsing checks every field before anything is allocated (STYLE rule 13): plain file names, known
dtypes, pieces inside their tensor, and pieces that cover the tensor exactly once.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from lightning_saver.errors import CorruptCheckpointError, FormatVersionError
from lightning_saver.formats.safetensors_header import DTYPES

__all__ = ["INDEX_FORMAT", "INDEX_VERSION", "Piece", "TensorEntry", "ShardIndex", "parse_index", "dump_index"]

INDEX_FORMAT = "lightning_saver.shard_index"
INDEX_VERSION = 1
_CRC = re.compile(r"^[0-9a-f]{8}$")
_MAX_RANK = 1 << 24
_MAX_DIMS = 64


@dataclass(frozen=True)
class Piece:
    """One rank's piece of a tensor: ``files[file]`` holds ``tensor[offsets : offsets + sizes]``."""

    file: int
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    crc32c: str

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


@dataclass(frozen=True)
class TensorEntry:
    dtype: str  # safetensors dtype name, e.g. "F32"
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]


@dataclass
class ShardIndex:
    """A parsed index; ``files`` are names relative to the index's directory."""

    global_step: int | None
    wall_time: float
    world_size: int
    files: list[str]
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> str:
        """How a tensor is split, for ``inspect``: ``"2 pieces along dim 0 (4+4)"``."""
        entry = self.tensors[name]
        if len(entry.pieces) == 1:
            return "whole"
        dims = [d for d in range(len(entry.shape)) if len({p.offsets[d] for p in entry.pieces}) > 1]
        if len(dims) == 1:
            d = dims[0]
            sizes = "+".join(str(p.sizes[d]) for p in sorted(entry.pieces, key=lambda p: p.offsets[d]))
            return f"{len(entry.pieces)} pieces along dim {d} ({sizes})"
        return f"{len(entry.pieces)} pieces along dims {dims}"


def dump_index(index: ShardIndex) -> bytes:
    """The index as JSON bytes, one tensor per line (readable, diffable)."""
    head = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "global_step": index.global_step,
        "wall_time": index.wall_time,
        "world_size": index.world_size,
        "files": index.files,
        "metadata": index.metadata,
        "info": index.info,
    }
    lines = ["{"] + [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()] + ['  "tensors": {']
    names = sorted(index.tensors)
    for i, name in enumerate(names):
        e = index.tensors[name]
        doc = {"dtype": e.dtype, "shape": list(e.shape), "pieces": [
            {"file": p.file, "offsets": list(p.offsets), "sizes": list(p.sizes), "crc32c": p.crc32c}
            for p in e.pieces]}
        lines.append(f"    {json.dumps(name)}: {json.dumps(doc)}{',' if i < len(names) - 1 else ''}")
    lines += ["  }", "}", ""]
    return "\n".join(lines).encode("utf-8")


def _bad(path: str, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{path}: not a valid sharded-checkpoint index: {what}")


def _ints(path: str, where: str, raw: Any, n: int | None = None) -> tuple[int, ...]:
    if not isinstance(raw, list) or len(raw) > _MAX_DIMS or (n is not None and len(raw) != n):
        expected = f"a list of {n} ints" if n is not None else "a list of ints"
        raise _bad(path, f"{where}: expected {expected}, found {raw!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in raw):
        raise _bad(path, f"{where}: expected non-negative ints, found {raw!r}")
    return tuple(raw)


def _piece(path: str, name: str, raw: Any, shape: tuple[int, ...], nfiles: int) -> Piece:
    if not isinstance(raw, dict):
        raise _bad(path, f"tensor {name!r}: a piece is {type(raw).__name__}, expected an object")
    where = f"tensor {name!r} piece"
    file = raw.get("file")
    if not isinstance(file, int) or isinstance(file, bool) or not 0 <= file < nfiles:
        raise _bad(path, f"{where}: file {file!r} is not one of the {nfiles} files")
    offsets = _ints(path, f"{where} offsets", raw.get("offsets"), len(shape))
    sizes = _ints(path, f"{where} sizes", raw.get("sizes"), len(shape))
    if any(o + s > d for o, s, d in zip(offsets, sizes, shape, strict=True)):
        raise _bad(path, f"{where}: offsets {list(offsets)} + sizes {list(sizes)} exceed the shape "
                         f"{list(shape)}")
    crc = raw.get("crc32c")
    if not isinstance(crc, str) or not _CRC.match(crc):
        raise _bad(path, f"{where}: crc32c {crc!r} is not 8 hex digits")
    return Piece(file, offsets, sizes, crc)


def _entry(path: str, name: str, raw: Any, nfiles: int) -> TensorEntry:
    if not isinstance(raw, dict):
        raise _bad(path, f"tensor {name!r}: expected an object, found {type(raw).__name__}")
    dtype = raw.get("dtype")
    if dtype not in DTYPES:
        raise _bad(path, f"tensor {name!r}: unknown dtype {dtype!r} (expected one of {sorted(DTYPES)})")
    shape = _ints(path, f"tensor {name!r} shape", raw.get("shape"))
    pieces_raw = raw.get("pieces")
    if not isinstance(pieces_raw, list) or len(pieces_raw) > _MAX_RANK:
        raise _bad(path, f"tensor {name!r}: pieces must be a list")
    pieces = tuple(_piece(path, name, p, shape, nfiles) for p in pieces_raw)
    covered = sum(p.numel for p in pieces)
    if covered != math.prod(shape):
        raise _bad(path, f"tensor {name!r} of shape {list(shape)}: its pieces hold {covered} elements, "
                         f"expected {math.prod(shape)} (a piece is missing or listed twice)")
    return TensorEntry(str(dtype), shape, pieces)


def parse_index(path: str, data: bytes) -> ShardIndex:
    """Parse and validate an index read from ``path`` (the name is for messages only).

    Raises:
        CorruptCheckpointError: not JSON, not an index, or an inconsistent field (named).
        FormatVersionError: written by a newer lightning_saver.
    """
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad(path, f"not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT:
        raise _bad(path, f"the format field is {doc.get('format') if isinstance(doc, dict) else None!r}, "
                         f"expected {INDEX_FORMAT!r}")
    version = doc.get("version")
    if not isinstance(version, int) or version > INDEX_VERSION:
        raise FormatVersionError(f"{path}: index format version {version!r} is newer than the "
                                 f"{INDEX_VERSION} this lightning_saver reads; upgrade lightning_saver")
    files = doc.get("files")
    if not isinstance(files, list) or not files or len(files) > _MAX_RANK or not all(
        isinstance(f, str) and f and os.path.basename(f) == f and f not in (".", "..") for f in files
    ):
        raise _bad(path, f"files must be a non-empty list of plain file names, found {files!r:.200}")
    world = doc.get("world_size")
    if not isinstance(world, int) or world < 1:
        raise _bad(path, f"world_size {world!r} is not a positive int")
    step = doc.get("global_step")
    if step is not None and (not isinstance(step, int) or step < 0):
        raise _bad(path, f"global_step {step!r} is not a non-negative int")
    wall = doc.get("wall_time")
    if not isinstance(wall, (int, float)):
        raise _bad(path, f"wall_time {wall!r} is not a number")
    tensors_raw = doc.get("tensors")
    if not isinstance(tensors_raw, dict):
        raise _bad(path, "tensors must be an object")
    metadata = doc.get("metadata") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad(path, "metadata must map str to str")
    info = doc.get("info") or {}
    if not isinstance(info, dict):
        raise _bad(path, "info must be an object")
    tensors = {str(n): _entry(path, str(n), raw, len(files)) for n, raw in tensors_raw.items()}
    return ShardIndex(step, float(wall), world, list(files), tensors, dict(metadata), dict(info))
