"""The one small family of errors lightning_saver raises.

Each error subclasses a built-in one, so ``except FileNotFoundError`` or ``except ValueError`` in
user code keeps working. Messages say what, where, what was expected, what was found, and the fix.
"""

from __future__ import annotations

__all__ = [
    "LightningSaverError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "StateMismatchError",
    "FormatVersionError",
    "EncodingError",
    "DiskFullError",
    "StorageError",
    "BackendNotInstalledError",
    "UnsupportedOpError",
    "CaptureError",
    "GraphImportError",
    "ConcurrentSaverError",
]


class LightningSaverError(Exception):
    """Base class of every error raised by lightning_saver."""


class CheckpointNotFoundError(LightningSaverError, FileNotFoundError):
    """A checkpoint path (or a directory's latest checkpoint) does not exist."""


class CorruptCheckpointError(LightningSaverError, ValueError):
    """A file is not a checkpoint we can read: truncated, damaged, wrong format, bad checksum."""


class StateMismatchError(LightningSaverError, RuntimeError):
    """Checkpoint and target disagree: missing/unexpected keys, shapes or dtypes."""


class FormatVersionError(LightningSaverError, ValueError):
    """The file was written by a newer format version than this library reads."""


class EncodingError(LightningSaverError, TypeError):
    """A value in a training state cannot be encoded without pickle."""


class DiskFullError(LightningSaverError, OSError):
    """The file system ran out of space while writing a checkpoint."""


class StorageError(LightningSaverError, OSError):
    """A store (local or remote) failed: the URL, the operation and the last cause are named."""


class BackendNotInstalledError(LightningSaverError, ImportError):
    """A URL's fsspec backend (``s3fs``, ``gcsfs``, ``adlfs``...) is not installed; names the package."""


class UnsupportedOpError(LightningSaverError, NotImplementedError):
    """An op (TensorFlow or torch) has no converter in the op table."""


class CaptureError(LightningSaverError, RuntimeError):
    """A model could not be captured as a graph."""


class GraphImportError(LightningSaverError, ValueError):
    """A TensorFlow graph is malformed or refers to something that cannot be resolved."""


class ConcurrentSaverError(LightningSaverError, RuntimeError):
    """Another saver is writing the same directory and prefix at the same time."""
