"""Compatibility shim: the commit protocol now lives in ``storage/local.py`` (``LocalStorage``).

``atomic_write(path, write(fd))`` keeps its old fd-based signature for existing callers; new code
calls ``storage_for(path).write_atomic(path, produce(sink))``, which works for URLs too.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

from lightning_saver.storage.local import LocalStorage, check_free_space, fsync_directory

__all__ = ["atomic_write", "atomic_write_bytes", "fsync_directory", "remove_stale_temps", "check_free_space"]

T = TypeVar("T")
_LOCAL = LocalStorage()


def atomic_write(path: str, write: Callable[[int], T], *, nbytes: int | None = None) -> T:
    """``LocalStorage().write_atomic`` with the writer given the file descriptor."""
    return _LOCAL.write_atomic(path, lambda sink: write(sink.fileno()), nbytes=nbytes)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Commit ``data`` as the content of ``path`` (small files: the state file)."""
    _LOCAL.write_bytes(path, data)


def remove_stale_temps(directory: str) -> list[str]:
    """Delete our temporary files in ``directory`` whose writer is gone; return what was removed."""
    return _LOCAL.remove_incomplete(directory)


def remove_quietly(path: str) -> None:
    """Remove ``path``; a missing file is fine."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
