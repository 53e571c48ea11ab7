"""Shared by ``inspect`` and ``convert``: tell a safetensors file from a TF V2 checkpoint, and read either."""

from __future__ import annotations

import os
import re
import struct
from typing import Any

from lightning_saver.errors import CheckpointNotFoundError
from lightning_saver.formats import safetensors_io, tf_bundle

SAFETENSORS = "safetensors"
TF = "tensorflow"


def _looks_like_safetensors(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and struct.unpack("<Q", head[:8])[0] > 1 and head[8:9] == b"{"


def detect(path: str) -> tuple[str, str]:
    """(format, resolved path) of an existing checkpoint: a safetensors file, or a TF prefix, its
    ``.index`` file, or a directory holding a TF ``checkpoint`` file or lightning_saver checkpoints.

    Raises:
        CheckpointNotFoundError: nothing readable at ``path``.
    """
    tf_file = path.endswith(".index") or re.search(r"\.data-\d{5}-of-\d{5}$", path)
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
    return SAFETENSORS, latest


def read_index(fmt: str, path: str) -> dict[str, Any]:
    return (safetensors_io if fmt == SAFETENSORS else tf_bundle).read_index(path)


def read_metadata(fmt: str, path: str) -> dict[str, str]:
    return (safetensors_io if fmt == SAFETENSORS else tf_bundle).read_metadata(path)


def load_all(fmt: str, path: str, verify: bool = True) -> dict[str, Any]:
    """Every tensor, as torch tensors (TF string tensors stay numpy object arrays)."""
    if fmt == SAFETENSORS:
        return dict(safetensors_io.load_file(path, verify=verify))
    return tf_bundle.load_file(path, verify=verify, framework="torch")
