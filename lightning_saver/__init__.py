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
    "load_from_checkpoint": "lightning_saver.integration.loading",
    "latest_checkpoint": "lightning_saver.saving.saver",
    "load": "lightning_saver.saving.saver",
    "import_meta_graph": "lightning_saver.graph.tf_import",
    "compile_module": "lightning_saver.graph.tf_import",
    "export_onnx": "lightning_saver.graph.onnx_export",
    "export_meta_graph": "lightning_saver.graph.tf_export",
}

__all__ = [
    "__version__",
    "Saver",
    "SafetensorsCheckpointIO",
    "load_from_checkpoint",
    "latest_checkpoint",
    "load",
    "import_meta_graph",
    "compile_module",
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


def _bound(name: str) -> Any:
    """``Saver`` / ``SafetensorsCheckpointIO`` bound to the Lightning packages imported so far.

    Not cached: a program that imports Lightning later gets the bound class then (and an instance
    of the plain class binds itself when created). Without Lightning, ``Saver`` is the standalone
    class and nothing imports Lightning.
    """
    # imported by name: the integration layer is outside what mypy checks (all names are literals)
    compat = importlib.import_module("lightning_saver.integration.compat")
    packages = compat.loaded()
    if name == "Saver":
        plain = importlib.import_module("lightning_saver.integration.saver").Saver
        if not packages:
            return plain
        callback = importlib.import_module("lightning_saver.integration.callback")
        return callback.bound_saver_class(plain, packages)
    io = importlib.import_module("lightning_saver.integration.checkpoint_io")
    return io._bind_io(io.SafetensorsCheckpointIO, packages or (compat.default_package(),))


def __getattr__(name: str) -> Any:
    if name in ("Saver", "SafetensorsCheckpointIO"):
        return _bound(name)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_saver' has no attribute {name!r}")
    # module from the fixed _LAZY table, name one of its keys (an attribute access, never a file)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
