"""Reading checkpoints from any store: headers and tensors of local files or of objects (URLs).

Local files keep their fast paths (``pread``/``mmap`` in ``safetensors_io``); an object is read by
ranged requests: the header with one request, each tensor in 8 MiB ranges several at a time, so
``inspect`` or loading one tensor downloads the header and that tensor, not the whole file.

Example::

    store = storage_for("s3://bucket/ckpts", {"endpoint_url": url})
    header = read_header_at(store, "s3://bucket/ckpts/model_95.safetensors")
    tensors = safetensors_io.load_tensors(header, names=["fc.weight"])
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from lightning_saver.formats.safetensors_header import Header, read_header, read_header_ranged
from lightning_saver.saving import names
from lightning_saver.storage import Storage, storage_for

__all__ = ["read_header_at", "resolve", "store_of", "ObjectSource"]


class ObjectSource:
    """Ranged reads of one object: what ``Header.source`` holds for a checkpoint that is not local."""

    def __init__(self, store: Storage, path: str) -> None:
        self.store, self.path = store, path

    def read(self, offset: int, length: int) -> bytes:
        return self.store.read_range(self.path, offset, length)


def store_of(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None,
             ) -> tuple[Storage, str]:
    """The store holding ``path`` and ``path`` as that store spells it (``file://`` stripped)."""
    from lightning_saver.storage import local_form

    text = local_form(path)
    return storage_for(text, storage_options), text


def read_header_at(store: Storage, path: str) -> Header:
    """The validated header of ``path`` in ``store`` (ranged reads when it is not a local file)."""
    local = store.local_path(path)
    if local is not None:
        return read_header(local)
    header = read_header_ranged(path, store.size(path), ObjectSource(store, path).read)
    header.source = ObjectSource(store, path)
    return header


def resolve(store: Storage, path: str) -> str:
    """``path``, or ``path`` + ``.safetensors`` (or a set's index) when only that exists."""
    directory, base = store.split(path)
    if os.path.splitext(base)[1] or store.exists(path):
        return path
    for with_ext in (path + names.DEFAULT_EXT, path + names.DEFAULT_EXT + names.INDEX_SUFFIX):
        if store.exists(with_ext):
            return with_ext
    return path
