"""Deleting the checkpoints rotation drops, off the caller's path.

Unlinking a large file frees its blocks inside the ``unlink`` call: 0.15 s for 1 GiB measured on
one machine, inside a sync ``save()``. :func:`discard` therefore only renames the file to a hidden
temporary name of this process (a metadata operation, microseconds) and leaves the unlink to one
background thread. The saver calls it only after the new checkpoint and the state file are durable,
so the order of the commit protocol is unchanged; the file's name is gone when ``discard`` returns,
so a listing right after ``save()`` shows what rotation kept.

Under a kill the guarantees stay those of an in-line delete: a renamed file that was not unlinked
yet carries this process's pid in the temporary pattern of :mod:`lightning_saver.saving.names`, and
the next saver removes it (``commit.remove_stale_temps``) as it removes any temporary file whose
writer is gone. A kill before the rename leaves the dropped checkpoint under its own name,
unrecorded in the state file; the next saver adopts it and its rotation deletes it again.

:func:`wait` blocks until every queued unlink is done (``Saver.wait()`` calls it; so does
interpreter exit).

Example::

    discard("ckpts/model_5.safetensors")   # returns at once; the name is gone
    wait()                                  # the blocks are freed
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import uuid
from collections import deque

from lightning_saver.saving import names

__all__ = ["discard", "wait"]

log = logging.getLogger("lightning_saver")

_cond = threading.Condition()
_queue: deque[str] = deque()
_busy = 0  # queued + being unlinked
_thread: threading.Thread | None = None
_unlink = os.remove  # the slow part; a module attribute so that tests can hold it


def discard(path: str) -> None:
    """Delete ``path``: rename it to a hidden temporary name now, unlink it in the background.

    A missing file is fine (someone deleted it already); other errors are logged, never raised:
    a checkpoint that could not be deleted is a leftover, not a failed save.
    """
    directory, name = os.path.split(path)
    trash = os.path.join(directory, names.temp_name(name, uuid.uuid4().hex[:8]))
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    except OSError as exc:  # e.g. a read-only directory: try the plain delete, inline
        trash = path
        log.debug("could not rename %s before deleting it: %s", path, exc)
    global _busy
    with _cond:
        _queue.append(trash)
        _busy += 1
        _start()
        _cond.notify_all()


def wait() -> None:
    """Block until every file handed to :func:`discard` is unlinked."""
    with _cond:
        while _busy:
            if _thread is None or not _thread.is_alive():
                _start()
            _cond.wait(0.5)


def _start() -> None:
    global _thread
    if _thread is None or not _thread.is_alive():
        _thread = threading.Thread(target=_run, name="lightning-saver-deleter", daemon=True)
        _thread.start()


def _run() -> None:
    global _busy
    while True:
        with _cond:
            while not _queue:
                _cond.wait()
            path = _queue.popleft()
        try:
            _unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not delete old checkpoint %s: %s", path, exc)
        finally:
            with _cond:
                _busy -= 1
                _cond.notify_all()


def _reset_after_fork() -> None:
    # the child has no deleter thread: it unlinks what the parent queued (names are unique, and a
    # file unlinked twice is FileNotFoundError, ignored), so nothing is left behind either way
    global _cond, _thread, _busy
    _cond = threading.Condition()
    _thread = None
    _busy = len(_queue)  # a file the parent's thread was unlinking is the parent's business
    if _queue:
        _start()


atexit.register(wait)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)
