"""The write side of a save: which tensors, one file or a sharded set, how the bytes reach the
sink, and removing what a save leaves behind (helpers of ``saver.py``'s commit).

Example::

    tensors = tensors_of(model)
    if not sharded(tensors):
        store.write_atomic(path, partial(write_safetensors, tensors, None, info))
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from lightning_saver.formats import safetensors_io
from lightning_saver.formats.file_image import FileImage, ImagePlan
from lightning_saver.formats.safetensors_writer import Layout
from lightning_saver.saving import names
from lightning_saver.storage import Sink, Storage

__all__ = [
    "tensors_of", "sharded", "Layout", "FileImage", "ImagePlan", "write_safetensors", "delete_dropped",
    "remove_quietly", "delete_remote_set", "delete_object",
]

log = logging.getLogger("lightning_saver")


def tensors_of(model: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors to save: a module's ``state_dict()`` or a checked mapping of str -> tensor."""
    if isinstance(model, nn.Module):
        return dict(model.state_dict())
    if isinstance(model, Mapping):
        for key, value in model.items():
            if not isinstance(key, str) or not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"save expects a mapping of str to torch.Tensor; entry {key!r} is "
                    f"{type(key).__name__} -> {type(value).__name__}"
                )
        return dict(model)
    raise TypeError(f"save expects an nn.Module or a mapping of tensors, found {type(model).__name__}")


def sharded(tensors: Mapping[str, torch.Tensor]) -> bool:
    """DTensors are saved as a set (one file per rank); anything else as one file."""
    # no import here: importing torch.distributed.tensor took ~1 s in a process's first save, and
    # where it was never imported no value can be a DTensor
    module = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(module, "DTensor", None)
    return dtensor is not None and any(isinstance(t, dtensor) for t in tensors.values())


def remove_quietly(store: Storage, path: str) -> None:
    """Remove a new file the state file never recorded; a failure is logged, not raised."""
    try:
        store.delete(path)
    except OSError as exc:
        log.warning("could not remove the unrecorded checkpoint %s: %s", path, exc)


def delete_remote_set(store: Storage, index_path: str) -> None:
    """A whole old set in an object store: its index (un-committing it), then its shards."""
    from lightning_saver.saving import sharded

    try:
        sharded.delete_set(index_path, store=store)
    except OSError as exc:
        log.warning("could not delete old sharded checkpoint %s: %s", index_path, exc)


def delete_object(store: Storage, path: str) -> None:
    """One DELETE request; a failure leaves a leftover, never fails the save."""
    try:
        store.delete(path)
    except OSError as exc:
        log.warning("could not delete old checkpoint %s: %s", path, exc)


def delete_dropped(store: Storage, directory: str, dropped: list[str],
                   delete_local: Callable[[str], None]) -> None:
    """Delete the checkpoints rotation dropped (names in ``directory``), once the state file no
    longer records them: a local file by ``delete_local``, an object or a remote set here."""
    for name in dropped:
        path = store.join(directory, name)
        if store.local_path(path) is not None:
            delete_local(path)
        elif names.is_set_index(path):
            delete_remote_set(store, path)
        else:
            delete_object(store, path)


def write_safetensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None,
                       info: Mapping[str, Any], sink: Sink, *, layout: Layout | None = None,
                       direct: bool = False, image: FileImage | None = None) -> safetensors_io.WriteResult:
    """The in-place fast path when the sink has a descriptor (local file, spool), else a stream
    (``layout``: the tensors' :class:`Layout`, when the caller computed it to check the size;
    ``direct``: past the page cache where the file system allows it, see ``formats/direct_write.py``;
    ``image``: the file already laid out in memory, ``tensors`` being its views, written as it is
    where its header fits, see ``formats/file_image.py``)."""
    fd = sink.fileno()
    if fd is None:
        return safetensors_io.write_to_sink(tensors, sink, metadata=metadata, info=info)
    if image is not None:
        result = safetensors_io.write_image(image, fd, metadata=metadata, info=info, direct=direct)
        if result is not None:
            return result
    return safetensors_io.write_to_fd(tensors, fd, metadata=metadata, info=info, layout=layout, direct=direct)
