"""The local storage's lock verb: an exclusive advisory ``flock``, on a lock file or on a directory.

``LocalStorage.lock`` is this (``storage/local.py``); the Saver holds ``lock(directory)`` while it
reads and rewrites the directory's state file. The kernel drops a lock when its holder dies, so a
killed saver never leaves a directory locked. Where ``flock`` is not available (Windows) or the
directory cannot be opened, the block runs unguarded.

Example::

    with LocalStorage().lock("ckpts", timeout_s=60):   # the directory itself: no file left behind
        state = load_state("ckpts")
        ...                       # no other saver reads or writes the state file meanwhile
        save_state("ckpts", state)
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from lightning_saver.errors import ConcurrentSaverError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["flock"]

_POLL_S = 0.005
_held_lock = threading.Lock()
_held: set[str] = set()  # what this process holds (flock is per open file, not per process)


@contextmanager
def flock(directory: str, name: str | None = None, *, timeout_s: float = 0.0) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``directory/.name.lock``, or on ``directory`` itself when
    ``name`` is None, for the ``with`` block; wait up to ``timeout_s`` for another holder.

    Raises:
        ConcurrentSaverError: another process (or another saver in this one) held it for longer
            than ``timeout_s`` (0: at once).
    """
    path = os.path.abspath(directory or ".") if name is None else os.path.abspath(
        os.path.join(directory, f".{name}.lock"))
    fd = _open(path, name is None)
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
                if time.monotonic() >= deadline:
                    raise _locked(directory, timeout_s, path) from None
                time.sleep(_POLL_S)
        with _held_lock:
            _held.add(path)
        try:
            yield
        finally:
            with _held_lock:
                _held.discard(path)
    finally:
        os.close(fd)  # also releases the lock


def _open(path: str, is_directory: bool) -> int | None:
    if fcntl is None:
        return None
    if not is_directory:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None


def _locked(directory: str, timeout_s: float, path: str) -> ConcurrentSaverError:
    if timeout_s > 0:
        return ConcurrentSaverError(
            f"the checkpoint directory {directory or '.'} stayed locked by another saver for "
            f"{timeout_s:.0f} s; is another process saving there?"
        )
    with _held_lock:
        holder = "another saver in this process" if path in _held else "another process"
    return ConcurrentSaverError(
        f"{path} is locked by {holder}: two savers writing the same directory and prefix would "
        "overwrite each other's state file. Use another directory or prefix, or close the other saver"
    )
