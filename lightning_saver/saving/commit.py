"""The commit protocol: write a temporary file in the same directory, fsync, rename, fsync the directory.

A reader sees either the old file or the complete new one, never a partial one, whatever instant
the writer dies at. Temporary files carry the writer's pid (see ``names.temp_name``); a later
saver removes those whose process is gone (:func:`remove_stale_temps`).

A full disk (``ENOSPC``, or ``EFBIG`` from ``RLIMIT_FSIZE``) becomes :class:`DiskFullError`, saying
how many bytes were needed; the temporary file is removed and nothing else is touched. When the
free space is visibly too small, we fail before writing a byte.
"""

from __future__ import annotations

import errno
import os
import threading
import uuid
from collections.abc import Callable
from typing import TypeVar

from lightning_saver.errors import DiskFullError
from lightning_saver.saving import names

__all__ = ["atomic_write", "atomic_write_bytes", "fsync_directory", "remove_stale_temps", "check_free_space"]

T = TypeVar("T")
_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_active: set[str] = set()  # temp paths this process is writing right now
_active_lock = threading.Lock()


def fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _human(n: int) -> str:
    size = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{n} bytes" if unit == "bytes" else f"{n} bytes ({size:.1f} {unit})"
        size /= 1024
    return f"{n} bytes"


def _disk_full(path: str, needed: int, free: int | None, cause: str) -> DiskFullError:
    free_text = f"; {_human(free)} free" if free is not None else ""
    err = DiskFullError(
        errno.ENOSPC,
        f"not enough space to save checkpoint {path}: it needs {_human(needed)}{free_text} ({cause}). "
        "The partial file was removed; earlier checkpoints and the state file are untouched. "
        "Free some space, lower max_to_keep, or save elsewhere",
        path,
    )
    err.needed_bytes = needed  # type: ignore[attr-defined]
    return err


def _free_bytes(directory: str) -> int | None:
    try:
        st = os.statvfs(directory or ".")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def check_free_space(path: str, needed: int) -> None:
    """Raise :class:`DiskFullError` now when ``path``'s file system visibly lacks ``needed`` bytes."""
    free = _free_bytes(os.path.dirname(path))
    if free is not None and free < needed:
        raise _disk_full(path, needed, free, "checked before writing")


def atomic_write(path: str, write: Callable[[int], T], *, nbytes: int | None = None) -> T:
    """Run ``write(fd)`` on a fresh temporary file next to ``path``, then commit it as ``path``.

    Args:
        path: the final file; its directory must exist.
        write: writes the whole content to the file descriptor it gets; its result is returned.
        nbytes: the expected size, for the free-space check and the disk-full message.

    Returns:
        What ``write`` returned, once the file is durable under its final name.

    Raises:
        DiskFullError: the file system is (or would be) full; no partial file is left.
        OSError: any other I/O error, after removing the temporary file.

    Example:
        >>> atomic_write("d/state.json", lambda fd: os.write(fd, b"{}"))
        2
    """
    directory, final = os.path.split(path)
    if nbytes is not None:
        check_free_space(path, nbytes)
    temp = os.path.join(directory, names.temp_name(final, uuid.uuid4().hex[:8]))
    with _active_lock:
        _active.add(temp)
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            result = write(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException as exc:
        _remove_quietly(temp)
        if isinstance(exc, OSError) and not isinstance(exc, DiskFullError) and exc.errno in _FULL:
            needed = nbytes if nbytes is not None else 0
            raise _disk_full(path, needed, _free_bytes(directory), os.strerror(exc.errno)) from exc
        raise
    finally:
        with _active_lock:
            _active.discard(temp)
    fsync_directory(directory)
    return result


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Commit ``data`` as the content of ``path`` (small files: the state file)."""

    def write(fd: int) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    atomic_write(path, write, nbytes=len(data))


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(directory: str) -> list[str]:
    """Delete our temporary files in ``directory`` whose writer is gone; return what was removed.

    Only names matching our temporary pattern are candidates; files of a live process (another
    saver still writing) and this process's in-flight writes are left alone.
    """
    removed: list[str] = []
    try:
        entries = os.listdir(directory or ".")
    except FileNotFoundError:
        return removed
    for name in entries:
        parsed = names.parse_temp_name(name)
        if parsed is None:
            continue
        path = os.path.join(directory, name)
        with _active_lock:
            busy = path in _active
        if busy or (parsed[1] != os.getpid() and _pid_alive(parsed[1])):
            continue
        _remove_quietly(path)
        removed.append(path)
    return removed
