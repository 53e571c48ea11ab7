"""Flush a file or directory to disk by its path, for writers that no longer hold its descriptor.

Example::

    os.replace(temp, final)
    fsync_path(os.path.dirname(final) or ".")   # the rename itself is durable now
"""

from __future__ import annotations

import os

__all__ = ["fsync_path"]


def fsync_path(path: str) -> None:
    """Open ``path`` (a file or a directory) read-only and fsync it.

    Raises:
        OSError: the path cannot be opened or synced.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
