"""An advisory lock on a checkpoint directory, held while a saver reads and rewrites its state file.

``fcntl.flock`` on the directory itself (no lock file is left behind). The kernel drops the lock
when its holder dies, so a killed saver never leaves the directory locked. Where ``flock`` is not
available (Windows, object stores), :func:`locked` does nothing; the storage layer can offer its own.

Example::

    with locked("ckpts"):
        state = load_state("ckpts")
        ...                       # no other saver reads or writes the state file meanwhile
        save_state("ckpts", state)
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from lightning_saver.errors import ConcurrentSaverError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["locked"]

_POLL_S = 0.005


@contextmanager
def locked(directory: str, *, timeout_s: float = 60.0) -> Iterator[None]:
    """Hold the directory's advisory lock for the ``with`` block.

    Raises:
        ConcurrentSaverError: another process held it for longer than ``timeout_s``.
    """
    fd = _open(directory)
    if fd is None:
        yield
        return
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ConcurrentSaverError(
                        f"the checkpoint directory {directory or '.'} stayed locked by another saver for "
                        f"{timeout_s:.0f} s; is another process saving there?"
                    ) from None
                time.sleep(_POLL_S)
        yield
    finally:
        os.close(fd)  # also releases the lock


def _open(directory: str) -> int | None:
    if fcntl is None:
        return None
    try:
        return os.open(directory or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None
