"""The read side of checkpoints: find the newest, load its tensors, read its metadata, restore it.

Module-level functions that need no saver (a new process resumes with them); ``saver.py``
re-exports them, so ``from lightning_saver.saving.saver import latest_checkpoint`` keeps working.

Example::

    path = latest_checkpoint("ckpts", verify=True)
    tensors = load(path)
    meta = read_metadata(path)["lightning_saver"]
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import torch

from lightning_saver.errors import CorruptCheckpointError, FormatVersionError
from lightning_saver.formats import safetensors_io
from lightning_saver.saving import names, rotation, state_file, tf_restore
from lightning_saver.saving.loading import RestoreResult, restore_into
from lightning_saver.saving.names import Series
from lightning_saver.saving.store_io import read_header_at, resolve, store_of
from lightning_saver.storage import Storage

__all__ = ["latest_checkpoint", "load", "read_metadata", "restore_path", "RestoreResult"]

log = logging.getLogger("lightning_saver")


def latest_checkpoint(
    directory: str | os.PathLike[str], prefix: str | None = None, *, verify: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> str | None:
    """The newest checkpoint in ``directory`` (optionally of one prefix), or ``None``.

    Reads the state file, falling back to scanning the directory when it is missing or damaged.
    With ``verify=True`` a corrupt newest checkpoint is skipped (with a warning naming it) in favour
    of the newest valid one.

    Example:
        >>> latest_checkpoint("ckpts")
        'ckpts/variable_file_95.safetensors'
    """
    store, directory = store_of(directory, storage_options)
    tried: set[str] = set()
    present = set(store.listdir(directory))
    for record in _newest_first(store, directory):
        if record.name in tried or not _matches_prefix(record.name, prefix):
            continue
        tried.add(record.name)
        path = store.join(directory, record.name)
        if record.name not in present:
            continue
        if verify:
            try:
                _verify_record(store, path, record)
            except (CorruptCheckpointError, FormatVersionError, OSError) as exc:
                log.warning("skipping corrupt checkpoint %s: %s", path, exc)
                continue
        return path
    return None


def _matches_prefix(name: str, prefix: str | None) -> bool:
    if prefix is None:
        return True
    name = names.set_stem(name)
    stem, ext = os.path.splitext(name)
    return stem == prefix or Series("", prefix, ext).parse(name) is not None


def _verify_record(store: Storage, path: str, record: rotation.Record) -> None:
    """Every tensor's checksum, and the header against the checksum the state file recorded."""
    if names.is_set_index(path):
        from lightning_saver.saving import sharded

        sharded.verify_set(path, store)
        return
    header = safetensors_io.verify_header(read_header_at(store, path))
    expected = record.checksum
    if expected and expected.startswith("crc32c:") and expected != f"crc32c:{header.header_crc32c}":
        raise CorruptCheckpointError(
            f"{path}: its header changed after it was saved (state file records {expected}, the file has "
            f"crc32c:{header.header_crc32c})"
        )


def _newest_first(store: Storage, directory: str) -> Iterator[rotation.Record]:
    """Recorded checkpoints (the state file's latest first), then, only if needed, a directory scan."""
    whole = state_file.load_state(directory, store)
    records = whole.all_records() if whole else []
    if whole and whole.latest:
        records.sort(key=lambda r: r.name == whole.latest)
    yield from reversed(records)
    yield from reversed(state_file.scan_checkpoints(directory, store=store))


def load(
    path: str | os.PathLike[str], *, verify: bool = True, device: str = "cpu",
    keys: Collection[str] | None = None, storage_options: Mapping[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint, checksums checked; tied keys share one tensor.

    Example:
        >>> load("ckpts/variable_file_95.safetensors")["x"]
        tensor(5.)
    """
    store, text = store_of(path, storage_options)
    if tf_restore.is_tf_prefix(text):  # a TF checkpoint of one of our exported graphs
        tensors = tf_restore.load_tf(text)
        tensors = tensors if keys is None else {k: tensors[k] for k in keys}
    else:
        header = read_header_at(store, resolve(store, text))
        tensors = safetensors_io.load_tensors(header, names=keys, verify=verify)
    if torch.device(device).type == "cpu":
        return tensors
    moved: dict[int, torch.Tensor] = {}
    return {k: moved.setdefault(id(t), t.to(device)) for k, t in tensors.items()}


def read_metadata(
    path: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """The checkpoint's safetensors ``__metadata__``; our own entry is JSON under ``"lightning_saver"``."""
    store, text = store_of(path, storage_options)
    return dict(read_header_at(store, resolve(store, text)).metadata)


def restore_path(
    model: Any, store: Storage, path: str, *, strict: bool, verify: bool,
    dtype: torch.dtype | None = None, map_location: str | torch.device | None = None,
) -> RestoreResult:
    """Restore ``path`` of ``store`` into ``model``: a TF checkpoint prefix of one of our exported
    graphs, a sharded set's index, or one safetensors file (``CheckpointSaver.restore`` documents
    the arguments and errors)."""
    if tf_restore.is_tf_prefix(path):
        return tf_restore.restore_tf(model, path, strict=strict)
    path = resolve(store, path)
    if names.is_set_index(path):
        from lightning_saver.saving import sharded

        missing, unexpected = sharded.restore_set(model, path, strict=strict, store=store, verify=verify)
        return RestoreResult(missing, unexpected)
    header = read_header_at(store, path)
    return restore_into(model, header, strict=strict, verify=verify, dtype=dtype, map_location=map_location)
