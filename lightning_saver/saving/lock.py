"""Compatibility shim: the directory lock is the storage layer's lock verb (``storage/local_lock.py``).

``locked(directory)`` is ``LocalStorage().lock(directory, timeout_s=...)``: an advisory ``flock`` on
the directory itself, waited for up to ``timeout_s``. The Saver calls it through its store.

Example::

    with locked("ckpts"):
        state = load_state("ckpts")
        ...                       # no other saver reads or writes the state file meanwhile
        save_state("ckpts", state)
"""

from __future__ import annotations

from contextlib import AbstractContextManager

from lightning_saver.storage.local_lock import flock

__all__ = ["locked"]


def locked(directory: str, *, timeout_s: float = 60.0) -> AbstractContextManager[None]:
    """Hold the directory's advisory lock for the ``with`` block.

    Raises:
        ConcurrentSaverError: another process held it for longer than ``timeout_s``.
    """
    return flock(directory, timeout_s=timeout_s)
