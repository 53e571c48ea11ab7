"""Our storage layer under torch.distributed.checkpoint (DCP): one safetensors file per rank + an index.

DCP does the distributed part: the save plan (which rank writes which piece, replicated tensors
written once), the load plan (which saved pieces overlap which local shard: resharding across world
sizes), and the collectives that carry one rank's failure to every rank. These two classes only say
where the bytes go:

* :class:`SetWriter`: each rank writes its pieces as ONE plain safetensors file with a CRC-32C per
  piece, under a temporary name, fsynced, then renamed; rank 0, after every rank has reported
  success, writes the index and then (``on_commit``) the state file: the commit point.
* :class:`SetReader`: serves DCP's read requests from those files, checking each shard's header
  against the index and each piece's CRC-32C as it is read.

No pickle: DCP's ``BYTE_IO`` items (pickled objects) are refused; callers encode non-tensor state
with ``formats/state_codec.py`` and pass it as string metadata, which goes into the index.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.distributed.checkpoint import StorageReader, StorageWriter
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from lightning_saver.errors import CorruptCheckpointError, EncodingError
from lightning_saver.formats import checksum, safetensors_io
from lightning_saver.formats.safetensors_header import DTYPE_NAMES, DTYPES, Header
from lightning_saver.formats.safetensors_io import check_crc, read_exact
from lightning_saver.formats.safetensors_writer import CHUNK
from lightning_saver.formats.shard_index import Piece, ShardIndex, TensorEntry, dump_index
from lightning_saver.saving import names
from lightning_saver.saving.names import Series
from lightning_saver.saving.store_io import read_header_at
from lightning_saver.storage import Sink, Storage, storage_for

__all__ = ["SetWriter", "SetReader", "Committed"]


@dataclass(frozen=True)
class Committed:
    """What rank 0 hands to ``on_commit`` once the index is durable."""

    index_path: str
    nbytes: int  # all shards plus the index
    checksum: str  # crc32c of the index bytes


@dataclass(frozen=True)
class _Written:
    file: int
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    crc32c: str
    file_bytes: int


def _done(value: Any) -> Future[Any]:
    future: Future[Any] = Future()
    future.set_result(value)
    return future  # DCP waits on torch futures


class SetWriter(StorageWriter):
    """Writes one set: ``<prefix>_<step>-0000R-of-0000W<ext>`` per rank, then the index (rank 0)."""

    def __init__(
        self,
        series: Series,
        step: int | None,
        *,
        info: dict[str, Any],
        metadata: dict[str, str],
        on_commit: Callable[[Committed], None] | None = None,
        before_write: Callable[[int], None] | None = None,
        store: Storage | None = None,
    ) -> None:
        super().__init__()
        self.store = store or storage_for(series.directory)
        self.series, self.step, self.info, self.metadata = series, step, info, metadata
        self.on_commit, self.before_write = on_commit, before_write
        self.rank = 0
        self.world = 1
        self.written: str | None = None  # this rank's shard, once renamed into place

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self.written = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return True

    def storage_meta(self) -> StorageMeta | None:
        return None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        # rank 0, before any rank writes a byte: the place for clean-up of this series
        if self.before_write is not None:
            self.before_write(len(plans))
        return [replace(plan, storage_data=(rank, len(plans))) for rank, plan in enumerate(plans)]

    def shard_path(self, rank: int, world: int) -> str:
        return self.store.join(self.series.directory, names.shard_name(self.series, self.step, rank, world))

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        self.rank, self.world = plan.storage_data
        tensors: dict[str, torch.Tensor] = {}
        chunks: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        for item in plan.items:
            fqn = item.index.fqn
            if item.type == WriteItemType.BYTE_IO or item.tensor_data is None:
                raise EncodingError(f"state entry {fqn!r} is not a tensor; a sharded checkpoint holds "
                                    "tensors only (encode other values with state_codec)")
            if fqn in tensors:
                raise NotImplementedError(f"rank {self.rank} holds two pieces of {fqn!r}; a set stores one "
                                          "piece per tensor per rank (DTensor placements give one)")
            tensors[fqn] = planner.resolve_data(item)  # type: ignore[assignment]
            chunk = item.tensor_data.chunk
            chunks[fqn] = (tuple(chunk.offsets), tuple(chunk.sizes))
        path = self.shard_path(self.rank, self.world)
        info = {"shard": {"rank": self.rank, "world_size": self.world, "global_step": self.step}}
        nbytes = safetensors_io.planned_nbytes(tensors, info=info)
        def produce(sink: Sink) -> safetensors_io.WriteResult:
            fd = sink.fileno()
            if fd is None:
                return safetensors_io.write_to_sink(tensors, sink, info=info)
            return safetensors_io.write_to_fd(tensors, fd, info=info)

        try:
            result = self.store.write_atomic(path, produce, nbytes=nbytes)
        except OSError as exc:
            raise type(exc)(exc.errno, f"rank {self.rank} of {self.world}: {exc.strerror}", path) from exc
        self.written = path
        return _done([
            WriteResult(index=item.index, size_in_bytes=result.nbytes,
                        storage_data=_Written(self.rank, *chunks[item.index.fqn],
                                              result.crcs[item.index.fqn], result.nbytes))
            for item in plan.items
        ])

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        index = self._index(metadata, results)
        data = dump_index(index)
        path = self.store.join(self.series.directory, names.set_index_name(self.series, self.step))
        self.store.write_bytes(path, data)
        sizes = {w.storage_data.file: w.storage_data.file_bytes for rank in results for w in rank}
        import google_crc32c

        done = Committed(path, sum(sizes.values()) + len(data), f"crc32c:{google_crc32c.value(data):08x}")
        if self.on_commit is not None:
            try:
                self.on_commit(done)
            except BaseException:
                self.store.delete(path)  # no state file, no set: every rank then removes its shard
                raise

    def _index(self, metadata: Metadata, results: list[list[WriteResult]]) -> ShardIndex:
        world = len(results)
        pieces: dict[str, list[Piece]] = {}
        for rank_results in results:
            for w in rank_results:
                s: _Written = w.storage_data
                pieces.setdefault(w.index.fqn, []).append(Piece(s.file, s.offsets, s.sizes, s.crc32c))
        tensors: dict[str, TensorEntry] = {}
        for fqn, md in metadata.state_dict_metadata.items():
            if not isinstance(md, TensorStorageMetadata):
                raise EncodingError(f"state entry {fqn!r} is not a tensor; a set holds tensors only")
            dtype = DTYPE_NAMES.get(md.properties.dtype)
            if dtype is None:
                raise TypeError(f"tensor {fqn!r} has dtype {md.properties.dtype}, which safetensors "
                                "cannot store")
            found = sorted(pieces.get(fqn, []), key=lambda p: p.offsets)
            tensors[fqn] = TensorEntry(dtype, tuple(md.size), tuple(found))
        files = [names.shard_name(self.series, self.step, r, world) for r in range(world)]
        info = dict(self.info)
        wall = float(info.pop("wall_time", time.time()))
        step = info.pop("global_step", self.step)
        return ShardIndex(step, wall, world, files, tensors, dict(self.metadata), info)


def metadata_of(index: ShardIndex) -> Metadata:
    """DCP's view of an index: global shapes and the chunks each file holds."""
    state: dict[str, Any] = {}
    storage: dict[MetadataIndex, Piece] = {}
    for fqn, entry in index.tensors.items():
        chunks = []
        for piece in entry.pieces:
            offsets = torch.Size(piece.offsets)
            chunks.append(ChunkStorageMetadata(offsets=offsets, sizes=torch.Size(piece.sizes)))
            storage[MetadataIndex(fqn, offsets)] = piece
        properties = TensorProperties(dtype=DTYPES[entry.dtype])
        state[fqn] = TensorStorageMetadata(properties, torch.Size(entry.shape), chunks)
    return Metadata(state_dict_metadata=state, storage_data=storage)


class SetReader(StorageReader):
    """Serves DCP's read plan from a set's files (``directory`` holds them), verifying as it reads.

    Local shards are read with ``pread`` (row ranges when resharding); shards in an object store
    by ranged requests of the pieces asked for."""

    def __init__(self, directory: str, index: ShardIndex, *, verify: bool = True,
                 store: Storage | None = None) -> None:
        super().__init__()
        self.directory, self.index, self.verify = directory, index, verify
        self.store = store or storage_for(directory)
        self.storage: dict[MetadataIndex, Piece] = {}

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        pass

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return True

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return metadata_of(self.index)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any,
                              **kwargs: Any) -> None:
        self.storage = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        by_file: dict[int, list[ReadItem]] = {}
        for req in plan.items:
            by_file.setdefault(self.storage[req.storage_index].file, []).append(req)
        for file, reqs in sorted(by_file.items()):
            self._read_file(file, reqs, planner)
        return _done(None)

    def _read_file(self, file: int, reqs: list[ReadItem], planner: LoadPlanner) -> None:
        path = self.store.join(self.directory, self.index.files[file])
        header = read_header_at(self.store, path)
        direct: dict[str, torch.Tensor] = {}
        buffers: dict[str, torch.Tensor] = {}
        rows: list[tuple[ReadItem, torch.Tensor, tuple[int, int]]] = []
        targets = []
        count: dict[str, int] = {}
        for req in reqs:
            count[req.storage_index.fqn] = count.get(req.storage_index.fqn, 0) + 1
        for req in reqs:
            fqn = req.storage_index.fqn
            piece = self.storage[req.storage_index]
            _check_piece(header, fqn, piece, self.index.tensors[fqn])
            target = planner.resolve_tensor(req).detach()
            dtype = DTYPES[self.index.tensors[fqn].dtype]
            whole = tuple(req.lengths) == piece.sizes and not any(req.storage_offsets)
            if (whole and count[fqn] == 1 and target.device.type == "cpu" and target.is_contiguous()
                    and target.dtype == DTYPES[self.index.tensors[fqn].dtype]):
                direct[fqn] = target  # read straight into the destination, no copy
            elif (count[fqn] == 1 and header.source is None
                  and (span := _row_range(req, piece, target, dtype)) is not None):
                rows.append((req, target, span))  # resharding: only its rows, into the destination
                continue
            elif fqn not in buffers:
                buffers[fqn] = torch.empty(piece.sizes, dtype=DTYPES[self.index.tensors[fqn].dtype])
            targets.append((req, target, fqn in direct and direct[fqn] is target))
        safetensors_io.read_into(header, {**buffers, **direct}, verify=self.verify)
        if rows:
            with open(path, "rb", buffering=0) as f:
                for req, target, span in rows:
                    _read_rows(f.fileno(), header, req.storage_index.fqn, span, target, self.verify)
                    planner.commit_tensor(req, target)
        for req, target, was_direct in targets:
            if not was_direct:
                src = buffers[req.storage_index.fqn]
                for dim, (start, length) in enumerate(zip(req.storage_offsets, req.lengths, strict=True)):
                    src = src.narrow(dim, start, length)
                with torch.no_grad():
                    target.copy_(src)
            planner.commit_tensor(req, target)


def _row_range(req: ReadItem, piece: Piece, target: torch.Tensor,
               dtype: torch.dtype) -> tuple[int, int] | None:
    """``(start, length)`` in bytes within the piece when the request is whole rows (a dim-0 slice,
    as resharding FSDP's row shards asks) and the destination can take them as they are."""
    sizes, offsets, lengths = piece.sizes, tuple(req.storage_offsets), tuple(req.lengths)
    if not sizes or any(offsets[1:]) or lengths[1:] != sizes[1:]:
        return None
    if (target.device.type != "cpu" or not target.is_contiguous() or tuple(target.shape) != lengths
            or target.dtype != dtype):
        return None
    row = math.prod(sizes[1:]) * target.element_size()
    return offsets[0] * row, lengths[0] * row


def _read_rows(fd: int, header: Header, name: str, span: tuple[int, int], target: torch.Tensor,
               verify: bool) -> None:
    """Read a piece's bytes ``span`` into ``target``; with ``verify``, checksum the whole piece on the
    way (the span from the target's memory, the rest through a small scratch buffer)."""
    info = header.tensors[name]
    start, length = span
    base = header.data_start + info.offset
    crc = _crc_span(fd, header, base, 0, start) if verify else 0
    read_exact(fd, base + start, target.data_ptr(), length, header.path)
    if verify:
        crc = checksum.extend_address(crc, target.data_ptr(), length)
        crc = _crc_span(fd, header, base, start + length, info.nbytes, crc)
        check_crc(header, name, crc)


def _crc_span(fd: int, header: Header, base: int, begin: int, end: int, crc: int = 0) -> int:
    scratch = torch.empty(min(max(end - begin, 1), CHUNK), dtype=torch.uint8)
    for start in range(begin, end, CHUNK):
        size = min(CHUNK, end - start)
        read_exact(fd, base + start, scratch.data_ptr(), size, header.path)
        crc = checksum.extend_address(crc, scratch.data_ptr(), size)
    return crc


def _check_piece(header: Header, fqn: str, piece: Piece, entry: TensorEntry) -> None:
    """The shard must hold the piece the index was committed with (same shape, dtype and CRC-32C)."""
    info = header.tensors.get(fqn)
    if info is None:
        raise CorruptCheckpointError(f"{header.path}: holds no piece of tensor {fqn!r}, which the set's "
                                     "index places in this file; the shard was replaced or damaged")
    if info.shape != piece.sizes or info.dtype != entry.dtype:
        raise CorruptCheckpointError(
            f"{header.path}: tensor {fqn!r} is {info.dtype}{list(info.shape)} in the file, the index expects "
            f"{entry.dtype}{list(piece.sizes)}; the shard does not belong to this set")
    if info.crc32c is not None and info.crc32c != piece.crc32c:
        raise CorruptCheckpointError(
            f"{header.path}: tensor {fqn!r} has CRC-32C {info.crc32c} in the file, the index recorded "
            f"{piece.crc32c}; the shard was rewritten after the set was committed")
