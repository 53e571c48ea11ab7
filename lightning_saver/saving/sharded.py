"""Sharded checkpoints (*sets*): save on every rank, commit across ranks, restore with resharding.

A set of step 95 written by 2 processes (names built in ``names.py``)::

    ckpts/model_95-00000-of-00002.safetensors    rank 0's pieces, plain safetensors
    ckpts/model_95-00001-of-00002.safetensors    rank 1's pieces
    ckpts/model_95.safetensors.index.json        written last by rank 0: the set exists from here on

The commit protocol across ranks: every rank writes and fsyncs its shard (temp name, rename; in an
object store: one complete upload under the final name, aborted on failure, through the same
``Storage.write_atomic``); DCP
gathers every rank's outcome on rank 0; only when all succeeded does rank 0 write the index and
then the state file (``on_commit``); the outcome is broadcast, so a failure on any rank fails
``save`` on every rank, and each rank removes its own shard. Shards without an index are leftovers
of a killed save; rank 0 removes them before the next save of the series writes anything.

Resharding is DCP's: its load planner intersects the saved pieces with the shards the restoring
process holds (any world size, or a plain unsharded module), and :class:`SetReader` serves the
reads.

Example (on every rank of a ``torch.distributed`` job whose parameters are DTensors)::

    saver.save(model, "ckpts/model", global_step=95)          # -> 'ckpts/model_95.safetensors.index.json'
    saver.restore(model, latest_checkpoint("ckpts"))           # same or another world size
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.tensor import DTensor

from lightning_saver.errors import CheckpointNotFoundError, LightningSaverError, StateMismatchError
from lightning_saver.formats import safetensors_io
from lightning_saver.formats.safetensors_header import DTYPE_NAMES
from lightning_saver.formats.shard_index import ShardIndex, parse_index
from lightning_saver.saving import names
from lightning_saver.saving.dcp_storage import Committed, SetReader, SetWriter, _check_piece
from lightning_saver.saving.names import Series
from lightning_saver.saving.store_io import read_header_at
from lightning_saver.storage import Storage, storage_for

__all__ = [
    "has_dtensors",
    "save_set",
    "read_index",
    "restore_set",
    "load_set",
    "check_fits",
    "load_into",
    "verify_set",
    "delete_set",
    "remove_orphans",
    "set_files",
]

log = logging.getLogger("lightning_saver")


def has_dtensors(tensors: Mapping[str, Any]) -> bool:
    """Whether any value is a DTensor (then ``save`` writes a set)."""
    return any(isinstance(t, DTensor) for t in tensors.values())


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # DCP warns whenever it runs in one process, which is what a restore into a plain module means
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _world(group: Any) -> int:
    return dist.get_world_size(group) if _distributed() else 1


def save_set(
    tensors: Mapping[str, torch.Tensor],
    series: Series,
    step: int | None,
    *,
    info: dict[str, Any],
    metadata: Mapping[str, str] | None = None,
    on_commit: Callable[[Committed], None] | None = None,
    process_group: Any = None,
    store: Storage | None = None,
) -> str:
    """Write ``tensors`` (DTensors and plain tensors) as one set; call on every rank.

    ``store`` holds ``series.directory`` (a local folder every rank sees, or an object store: each
    rank then uploads its shard as one complete object under its final name).

    Returns:
        The index path (the set's name), e.g. ``"ckpts/model_95.safetensors.index.json"``.

    Raises:
        DiskFullError / OSError: a rank could not write its shard; raised on every rank, naming the
            failing rank and its file. Nothing of this set is left; earlier sets are untouched.
    """
    store = store or storage_for(series.directory)
    index_path = store.join(series.directory, names.set_index_name(series, step))
    writer = SetWriter(series, step, info=info, metadata=dict(metadata or {}), on_commit=on_commit,
                       before_write=lambda world: _before_write(store, series, step), store=store)
    try:
        with _quiet():
            dcp.save(dict(tensors), storage_writer=writer, planner=DefaultSavePlanner(),
                     process_group=process_group, no_dist=not _distributed())
    except CheckpointException as exc:
        if writer.written:
            _remove(store, writer.written)
        raise _translate(exc, f"sharded save of {index_path}", _world(process_group)) from None
    except BaseException:
        if writer.written:
            _remove(store, writer.written)
        raise
    return index_path


def _before_write(store: Storage, series: Series, step: int | None) -> None:
    """Rank 0, before any rank writes: un-commit a set of the same step, remove leftovers."""
    index = store.join(series.directory, names.set_index_name(series, step))
    if store.exists(index):
        log.warning("replacing the existing sharded checkpoint %s", index)
        _remove(store, index)
    for temp in store.remove_incomplete(series.directory):
        log.info("removed leftover temporary file %s", temp)
    for path in remove_orphans(series.directory, series, store=store):
        log.info("removed a shard of an uncommitted set: %s", path)


def _translate(exc: CheckpointException, what: str, world: int) -> BaseException:
    """One error of the failing rank's type, naming the rank (its message names the file)."""
    failures = sorted(exc.failures.items())
    rank, (err, _trace) = failures[0]
    text = f"{what} failed on rank {rank} of {world}"
    if len(failures) > 1:
        text += f" (and on ranks {[r for r, _ in failures[1:]]})"
    text += f": {getattr(err, 'strerror', None) or err}"
    try:
        if isinstance(err, OSError):
            new: BaseException = type(err)(err.errno or errno.EIO, text, err.filename)
        else:
            new = type(err)(text)
    except Exception:
        new = LightningSaverError(text)
    new.__cause__ = err
    return new


def _remove(store: Storage, path: str) -> None:
    store.delete(path)  # a missing one is not an error


def snapshot(writer: Any, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's pieces copied by the async writer (its reused CPU arena), DTensors re-wrapped
    around their copies with the same mesh, placements and global shape: no communication."""
    local = {k: v.to_local() if isinstance(v, DTensor) else v for k, v in tensors.items()}
    frozen = writer.snapshot(local)
    out: dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        if isinstance(value, DTensor):
            out[name] = DTensor.from_local(frozen[name], value.device_mesh, value.placements, run_check=False,
                                           shape=value.shape, stride=value.stride())
        else:
            out[name] = frozen[name]
    return out


def new_group() -> Any:
    """A gloo group of every rank for background saves (None outside a distributed job)."""
    return dist.new_group(backend="gloo") if _distributed() else None


# ---------------------------------------------------------------- reading


def read_index(path: str | os.PathLike[str], store: Storage | None = None) -> ShardIndex:
    """Parse a set's index (a local file, or an object of ``store``).

    Raises:
        CheckpointNotFoundError: no such file.
        CorruptCheckpointError / FormatVersionError: not a valid index.
    """
    path = os.fspath(path)
    store = store or storage_for(path)
    try:
        data = store.read_bytes(path)
    except (FileNotFoundError, CheckpointNotFoundError):
        raise CheckpointNotFoundError(f"sharded checkpoint index {path!r} does not exist") from None
    return parse_index(path, data)


def check_fits(path: str, index: ShardIndex, targets: Mapping[str, Any], *, strict: bool = True,
               unexpected_ok: bool = False) -> tuple[list[str], list[str]]:
    """``(missing, unexpected)`` keys; raise one error listing every key, shape and dtype that differs.

    Shapes are global (a DTensor's ``shape``). ``strict`` makes missing and unexpected keys errors
    (unexpected ones not when ``unexpected_ok``)."""
    missing = [k for k in targets if k not in index.tensors]
    unexpected = [k for k in index.tensors if k not in targets]
    lines = []
    if strict:
        lines += [f"  missing in the checkpoint: {k!r}" for k in missing]
        if not unexpected_ok:
            lines += [f"  unexpected in the checkpoint: {k!r}" for k in unexpected]
    for k, t in targets.items():
        entry = index.tensors.get(k)
        if entry is None:
            continue
        found = (DTYPE_NAMES.get(t.dtype, str(t.dtype)), tuple(t.shape))
        if found != (entry.dtype, entry.shape):
            lines.append(f"  {k!r}: the checkpoint has {entry.dtype}{list(entry.shape)}, the target "
                         f"{found[0]}{list(found[1])}")
    if lines:
        raise StateMismatchError(f"sharded checkpoint {path} does not fit the target "
                                 f"({len(lines)} problem(s)):\n" + "\n".join(lines[:30]))
    return missing, unexpected


def load_into(path: str, index: ShardIndex, targets: dict[str, Any], *, verify: bool,
              collective: bool, store: Storage | None = None) -> None:
    """Fill ``targets`` (DTensors: this rank's shards; plain tensors: whole) from the set at ``path``.

    ``collective``: every rank calls it (a failure on one rank then fails it on all). Shards in an
    object store are read by ranged requests (only the pieces this process needs)."""
    store = store or storage_for(path)
    reader = SetReader(store.split(path)[0], index, verify=verify, store=store)
    try:
        with _quiet():
            dcp.load(targets, storage_reader=reader, planner=DefaultLoadPlanner(allow_partial_load=True),
                     no_dist=not (collective and _distributed()))
    except CheckpointException as exc:
        raise _translate(exc, f"restore from {path}", _world(None)) from None


def restore_set(target: Any, path: str | os.PathLike[str], *, strict: bool = True,
                verify: bool = True, store: Storage | None = None) -> tuple[list[str], list[str]]:
    """Load a set into ``target``: a module (sharded with DTensors, or plain) or a mapping of tensors.

    A module with DTensor parameters must be restored on every rank (the load is collective); a
    plain module or mapping gets the full tensors, gathered from every shard, in this process alone.

    Returns:
        ``(missing_keys, unexpected_keys)``.
    """
    path = os.fspath(path)
    store = store or storage_for(path)
    index = read_index(path, store)
    if isinstance(target, nn.Module):
        sharded = any(isinstance(p, DTensor) for p in target.parameters())
        state: dict[str, Any]
        if sharded:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            state = get_model_state_dict(target)
        else:
            state = target.state_dict()
        result = check_fits(path, index, state, strict=strict)
        common = {k: v for k, v in state.items() if k in index.tensors}
        load_into(path, index, common, verify=verify, collective=sharded, store=store)
        if sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(target, common, options=StateDictOptions(strict=False))
        else:
            target.load_state_dict(common, strict=False)
        return result
    if isinstance(target, MutableMapping):
        if not target:
            target.update(load_set(path, verify=verify, store=store))
            return [], []
        result = check_fits(path, index, target, strict=strict)
        common = {k: v for k, v in target.items() if k in index.tensors}
        load_into(path, index, common, verify=verify, collective=has_dtensors(common), store=store)
        return result
    raise TypeError(f"restore target must be an nn.Module or a mutable mapping of tensors, "
                    f"found {type(target).__name__}")


def load_set(path: str | os.PathLike[str], *, names_: list[str] | None = None,
             verify: bool = True, store: Storage | None = None) -> dict[str, torch.Tensor]:
    """Full (gathered) CPU tensors of a set, in this process alone.

    Example:
        >>> load_set("ckpts/model_95.safetensors.index.json")["layer.weight"].shape
        torch.Size([8, 4])
    """
    from lightning_saver.formats.safetensors_header import DTYPES

    path = os.fspath(path)
    store = store or storage_for(path)
    index = read_index(path, store)
    wanted = list(index.tensors) if names_ is None else names_
    missing = [n for n in wanted if n not in index.tensors]
    if missing:
        raise StateMismatchError(f"{path}: no tensor named {', '.join(map(repr, missing[:10]))}")
    out = {n: torch.empty(index.tensors[n].shape, dtype=DTYPES[index.tensors[n].dtype]) for n in wanted}
    load_into(path, index, out, verify=verify, collective=False, store=store)
    return out


def verify_set(path: str | os.PathLike[str], store: Storage | None = None) -> ShardIndex:
    """Check that every shard is the one the index was committed with, and every piece's CRC-32C.

    Raises:
        CheckpointNotFoundError: the index or a shard is missing (named).
        CorruptCheckpointError: a shard differs from the index, or a checksum differs.
    """
    path = os.fspath(path)
    store = store or storage_for(path)
    index = read_index(path, store)
    directory = store.split(path)[0]
    headers = {}
    for i, name in enumerate(index.files):
        headers[i] = read_header_at(store, store.join(directory, name))
    for fqn, entry in index.tensors.items():
        for piece in entry.pieces:
            _check_piece(headers[piece.file], fqn, piece, entry)
    for header in headers.values():
        safetensors_io.verify_header(header)
    return index


def _ours(store: Storage, path: str) -> bool:
    """A shard written by lightning_saver (never delete another tool's ``-0000N-of-0000M`` file)."""
    try:
        return isinstance(read_header_at(store, path).info.get("shard"), dict)
    except (LightningSaverError, OSError):
        return False


def set_files(index_path: str, store: Storage | None = None) -> list[str]:
    """The shard paths of the set named by ``index_path`` found beside it (read from the listing)."""
    store = store or storage_for(index_path)
    directory, name = store.split(index_path)
    stem = names.set_stem(name)
    out = []
    for entry in store.listdir(directory):
        parsed = names.parse_shard_name(entry)
        if parsed is not None and parsed[0] == stem and _ours(store, store.join(directory, entry)):
            out.append(store.join(directory, entry))
    return sorted(out)


def delete_set(index_path: str, *, discard: Callable[[str], None] | None = None,
               store: Storage | None = None) -> None:
    """Delete a set: the index first (un-committing it), then its shards (through ``discard``,
    e.g. the saver's background deleter, when given; else the store's delete)."""
    store = store or storage_for(index_path)
    shards = set_files(index_path, store)
    _remove(store, index_path)
    for shard in shards:
        (discard or store.delete)(shard)


def remove_orphans(directory: str, series: Series | None = None, *,
                   store: Storage | None = None) -> list[str]:
    """Delete shards whose set has no index (a save killed before its commit); return them.

    With ``series``, only that series' shards: another run saving another prefix into the same
    folder may be between renaming its shards and writing its index."""
    store = store or storage_for(directory)
    entries = store.listdir(directory)
    present = set(entries)
    removed = []
    for entry in entries:
        parsed = names.parse_shard_name(entry)
        path = store.join(directory, entry)
        if parsed is None or parsed[0] + names.INDEX_SUFFIX in present:
            continue
        if series is not None and series.parse(parsed[0]) is None and parsed[0] != series.name(None):
            continue
        if _ours(store, path):
            _remove(store, path)
            removed.append(path)
    return removed
