"""lightning_saver: TensorFlow-style checkpointing on safetensors for PyTorch Lightning.

The public API only. Names load lazily so that ``import lightning_saver`` stays light: the
format-level functions do not pull in Lightning, TensorFlow protos or ONNX until used.
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_saver.errors import (
    CaptureError,
    CheckpointNotFoundError,
    ConcurrentSaverError,
    CorruptCheckpointError,
    DiskFullError,
    EncodingError,
    FormatVersionError,
    GraphImportError,
    LightningSaverError,
    StateMismatchError,
    UnsupportedOpError,
)

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "Saver": "lightning_saver.integration.callback",
    "SafetensorsCheckpointIO": "lightning_saver.integration.checkpoint_io",
    "latest_checkpoint": "lightning_saver.saving.saver",
    "load": "lightning_saver.saving.saver",
    "import_meta_graph": "lightning_saver.graph.tf_import",
    "export_onnx": "lightning_saver.graph.onnx_export",
    "export_meta_graph": "lightning_saver.graph.tf_export",
}

__all__ = [
    "__version__",
    "Saver",
    "SafetensorsCheckpointIO",
    "latest_checkpoint",
    "load",
    "import_meta_graph",
    "export_onnx",
    "export_meta_graph",
    "LightningSaverError",
    "CheckpointNotFoundError",
    "ConcurrentSaverError",
    "CorruptCheckpointError",
    "StateMismatchError",
    "FormatVersionError",
    "EncodingError",
    "DiskFullError",
    "UnsupportedOpError",
    "CaptureError",
    "GraphImportError",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_saver' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
