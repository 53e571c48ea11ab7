"""Shared by ``inspect`` and ``convert``: tell a safetensors file from a TF V2 checkpoint, and read either."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import struct
from collections.abc import Mapping
from typing import Any

from lightning_saver.errors import CheckpointNotFoundError
from lightning_saver.formats import safetensors_io, tf_bundle
from lightning_saver.formats.safetensors_header import DTYPES, TensorInfo
from lightning_saver.saving.names import INDEX_SUFFIX
from lightning_saver.storage import is_url

SAFETENSORS = "safetensors"
TF = "tensorflow"
SET = "sharded"  # a set: one safetensors file per rank + an index (saving/sharded.py)


def _looks_like_safetensors(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and struct.unpack("<Q", head[:8])[0] > 1 and head[8:9] == b"{"


def storage_options_arg(parser: argparse.ArgumentParser) -> None:
    """``--storage-options JSON``: fsspec options for URL paths (``s3://...``)."""
    parser.add_argument("--storage-options", type=_json_object, default=None, metavar="JSON",
                        help="fsspec options for s3:// (or any fsspec) URLs, as a JSON object, "
                             'e.g. {"endpoint_url": "http://127.0.0.1:9000"}')


def _json_object(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--storage-options must be a JSON object, found {text!r}")
    return value


def _detect_url(path: str, options: Mapping[str, Any] | None) -> tuple[str, str]:
    from lightning_saver.saving.saver import latest_checkpoint
    from lightning_saver.saving.store_io import store_of

    store, path = store_of(path, options)
    if store.exists(path):
        if path.endswith(".index") or re.search(r"\.data-\d{5}-of-\d{5}$", path):
            raise CheckpointNotFoundError(f"{path}: TF checkpoints are read from local paths only; "
                                          "download the .index and .data files first")
        return (SET if path.endswith(INDEX_SUFFIX) else SAFETENSORS), path
    latest = latest_checkpoint(path, storage_options=options)
    if latest is None:
        raise CheckpointNotFoundError(f"{path}: no such object, and no lightning_saver checkpoints under it")
    return (SET if latest.endswith(INDEX_SUFFIX) else SAFETENSORS), latest


def _header(path: str, options: Mapping[str, Any] | None) -> Any:
    from lightning_saver.saving.store_io import read_header_at, store_of

    store, path = store_of(path, options)
    return read_header_at(store, path)


def detect(path: str, options: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """(format, resolved path) of an existing checkpoint: a safetensors file, or a TF prefix, its
    ``.index`` file, or a directory holding a TF ``checkpoint`` file or lightning_saver checkpoints.
    A URL (``s3://``) names a safetensors object or a folder of them (read by ranged requests).

    Raises:
        CheckpointNotFoundError: nothing readable at ``path``.
    """
    if is_url(path):
        return _detect_url(path, options)
    if path.endswith(INDEX_SUFFIX) and os.path.isfile(path):
        return SET, path
    tf_file = path.endswith(".index") or re.search(r"\.data-\d{5}-of-\d{5}$", path)
    _refuse_non_checkpoints(path)
    if os.path.isfile(path) and not tf_file and (
        _looks_like_safetensors(path) or not os.path.exists(path + ".index")
    ):
        return SAFETENSORS, path  # any other file is read as safetensors: its reader says what is wrong
    try:
        return TF, tf_bundle.resolve_prefix(path)
    except CheckpointNotFoundError:
        if not os.path.isdir(path):
            raise
    from lightning_saver.saving.saver import latest_checkpoint

    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointNotFoundError(
            f"{path} holds neither a TensorFlow 'checkpoint' file nor lightning_saver checkpoints; "
            "pass a .safetensors file or a TF checkpoint prefix"
        )
    return (SET if latest.endswith(INDEX_SUFFIX) else SAFETENSORS), latest


def _set_index(path: str) -> dict[str, Any]:
    from lightning_saver.saving import sharded

    index = sharded.read_index(path)
    return {name: TensorInfo(e.dtype, e.shape, math.prod(e.shape) * DTYPES[e.dtype].itemsize)
            for name, e in index.tensors.items()}


def _refuse_non_checkpoints(path: str) -> None:
    """Say what was given and what is expected, for paths that are no checkpoint of either format."""
    ext = os.path.splitext(path)[1]
    if ext == ".meta":
        prefix = path[: -len(ext)]
        hint = (f"; its checkpoint is the prefix {prefix!r}" if os.path.exists(prefix + ".index")
                else "; pass the checkpoint prefix saved with it (the name before .index)")
        raise CheckpointNotFoundError(f"{path} is a TensorFlow MetaGraph (the graph, no tensors), not a "
                                      f"checkpoint{hint}, or use `lightning-saver export`/import_meta_graph "
                                      "for graphs")
    if ext == ".safetensors" and not os.path.exists(path):
        raise CheckpointNotFoundError(f"{path} does not exist; expected an existing .safetensors file "
                                      "(or a directory of checkpoints, or a TF checkpoint prefix)")


def read_index(fmt: str, path: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    if is_url(path) and fmt == SAFETENSORS:
        return dict(_header(path, options).tensors)
    if fmt == SET:
        return _set_index(path)
    return (safetensors_io if fmt == SAFETENSORS else tf_bundle).read_index(path)


def read_metadata(fmt: str, path: str, options: Mapping[str, Any] | None = None) -> dict[str, str]:
    if is_url(path) and fmt == SAFETENSORS:
        return dict(_header(path, options).metadata)
    if fmt == SET:
        from lightning_saver.saving import sharded

        return sharded.read_index(path).metadata
    return (safetensors_io if fmt == SAFETENSORS else tf_bundle).read_metadata(path)


def load_all(fmt: str, path: str, verify: bool = True, options: Mapping[str, Any] | None = None
             ) -> dict[str, Any]:
    """Every tensor, as torch tensors (TF string tensors stay numpy object arrays)."""
    if is_url(path) and fmt == SAFETENSORS:
        return dict(safetensors_io.load_tensors(_header(path, options), verify=verify))
    if fmt == SAFETENSORS:
        return dict(safetensors_io.load_file(path, verify=verify))
    if fmt == SET:
        from lightning_saver.saving import sharded

        return sharded.load_set(path, verify=verify)
    return tf_bundle.load_file(path, verify=verify, framework="torch")
