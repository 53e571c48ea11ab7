"""Local files: the one atomic-write implementation (temp file, fsync, rename, fsync the directory).

A reader sees either the old file or the complete new one, never a partial one, whatever instant
the writer dies at. Temporary files are hidden names in the same directory carrying the writer's
pid, ``.<final name>.<pid>.<token>.tmp``; a later writer removes those whose process is gone
(:meth:`LocalStorage.remove_incomplete`).

A full disk (``ENOSPC``, ``EDQUOT``, or ``EFBIG`` from ``RLIMIT_FSIZE``) becomes
:class:`DiskFullError`, saying how many bytes were needed; the temporary file is removed and
nothing else is touched. When the free space is visibly too small, we fail before writing a byte.

Example::

    store = LocalStorage()
    store.write_atomic("ckpts/m_95.safetensors", lambda sink: os.write(sink.fileno(), b"..."))
"""

from __future__ import annotations

import errno
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import BinaryIO, TypeVar

from lightning_saver.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DiskFullError,
    StorageError,
)
from lightning_saver.storage import local_lock

__all__ = [
    "LocalStorage",
    "FdSink",
    "temp_name",
    "parse_temp_name",
    "fsync_directory",
    "check_free_space",
    "human_bytes",
]

T = TypeVar("T")
_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_TEMP = re.compile(r"^\.(?P<final>.+)\.(?P<pid>\d+)\.(?P<token>[0-9a-f]{8})\.tmp$")
_NAME_MAX = 255  # bytes in one file name (ext4, xfs, btrfs, APFS)
_active: set[str] = set()  # temp paths this process is writing right now
_active_lock = threading.Lock()


def temp_name(final_name: str, token: str) -> str:
    """Hidden temporary name next to ``final_name`` (no directory), tagged with our pid.

    A final name close to the 255-byte limit of a file name is shortened here (the token keeps the
    temporary name unique), so any legal checkpoint name can be written.
    """
    tail = f".{os.getpid()}.{token}.tmp"
    short = final_name.encode()[: _NAME_MAX - 1 - len(tail)].decode("utf-8", errors="ignore")
    return f".{short}{tail}"


def parse_temp_name(name: str) -> tuple[str, int] | None:
    """``(final name, pid)`` for one of our temporary files, ``None`` for anything else."""
    match = _TEMP.match(name)
    return (match["final"], int(match["pid"])) if match else None


# where a directory cannot be opened or fsynced at all (Windows: EACCES/EISDIR on open; some network
# and FUSE file systems: EINVAL/ENOTSUP on fsync), a rename is as durable as that platform makes it
_NO_DIRECTORY_FSYNC = frozenset(
    {errno.EACCES, errno.EISDIR, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM}
)


def fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable.

    Platforms and file systems that cannot open or fsync a directory (the errnos in
    ``_NO_DIRECTORY_FSYNC``) are skipped; any other failure (a missing directory, an I/O error) is
    raised, since the rename it should make durable may then not survive a crash.

    Raises:
        OSError: the directory is missing, is not a directory, or the fsync failed.
    """
    try:
        fd = os.open(directory or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        if exc.errno in _NO_DIRECTORY_FSYNC:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NO_DIRECTORY_FSYNC:
            raise
    finally:
        os.close(fd)


def human_bytes(n: int) -> str:
    """``1536`` -> ``'1536 bytes (1.5 KiB)'``."""
    size = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{n} bytes" if unit == "bytes" else f"{n} bytes ({size:.1f} {unit})"
        size /= 1024
    return f"{n} bytes"


def _disk_full(path: str, needed: int, free: int | None, cause: str) -> DiskFullError:
    free_text = f"; {human_bytes(free)} free" if free is not None else ""
    err = DiskFullError(
        errno.ENOSPC,
        f"not enough space to save checkpoint {path}: it needs {human_bytes(needed)}{free_text} ({cause}). "
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


class FdSink:
    """A :class:`~lightning_saver.storage.base.Sink` over an OS file descriptor at offset 0."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        while view:
            view = view[os.write(self._fd, view) :]
        return total

    def fileno(self) -> int:
        return self._fd


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


def _not_found(path: str, what: str = "checkpoint") -> CheckpointNotFoundError:
    return CheckpointNotFoundError(errno.ENOENT, f"{what} {path} does not exist", path)


class LocalStorage:
    """The local file system behind the :class:`~lightning_saver.storage.base.Storage` verbs."""

    def __repr__(self) -> str:
        return "LocalStorage()"

    # -- naming
    def join(self, directory: str, name: str) -> str:
        return os.path.join(directory, name)

    def split(self, path: str) -> tuple[str, str]:
        return os.path.split(path)

    # -- writing
    def makedirs(self, directory: str) -> None:
        if directory:
            os.makedirs(directory, exist_ok=True)

    def write_atomic(self, path: str, produce: Callable[[FdSink], T], *, nbytes: int | None = None,
                     sync_directory: bool = True) -> T:
        """Run ``produce(sink)`` on a fresh temporary file next to ``path``, then commit it as ``path``.

        Args:
            path: the final file; its directory must exist.
            produce: writes the whole content through the sink it gets (``sink.fileno()`` is the
                descriptor, for ``pwrite``); its result is returned.
            nbytes: the expected size, for the free-space check and the disk-full message.
            sync_directory: fsync the directory after the rename. ``False`` leaves the rename's
                durability to the caller's next fsync of the same directory (the Saver's state file
                commit): the file's bytes are durable either way, its name not until then.

        Returns:
            What ``produce`` returned, once the file is durable under its final name (with
            ``sync_directory=False``: its bytes durable, its name visible).

        Raises:
            DiskFullError: the file system is (or would be) full; no partial file is left.
            OSError: any other I/O error, after removing the temporary file.

        Example:
            >>> LocalStorage().write_atomic("d/state.json", lambda sink: sink.write(b"{}"))
            2
        """
        directory, final = os.path.split(path)
        if nbytes is not None:
            check_free_space(path, nbytes)
        temp = os.path.join(directory, temp_name(final, uuid.uuid4().hex[:8]))
        with _active_lock:
            _active.add(temp)
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                result = produce(FdSink(fd))
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
        if sync_directory:
            fsync_directory(directory)
        return result

    def write_bytes(self, path: str, data: bytes) -> None:
        self.write_atomic(path, lambda sink: sink.write(data), nbytes=len(data))

    def delete(self, path: str) -> None:
        _remove_quietly(path)

    # -- reading
    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def size(self, path: str) -> int:
        try:
            return os.path.getsize(path)
        except FileNotFoundError:
            raise _not_found(path) from None

    def listdir(self, directory: str) -> list[str]:
        try:
            entries = os.listdir(directory or ".")
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(n for n in entries if parse_temp_name(n) is None)

    def read_range(self, path: str, offset: int, length: int) -> bytes:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise _not_found(path) from None
        try:
            data = os.pread(fd, length, offset)
            while len(data) < length:
                more = os.pread(fd, length - len(data), offset + len(data))
                if not more:
                    raise CorruptCheckpointError(
                        f"{path}: expected {length} bytes at offset {offset}, the file ends after "
                        f"{len(data)} (truncated?)"
                    )
                data += more
            return data
        finally:
            os.close(fd)

    def read_bytes(self, path: str) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise _not_found(path) from None

    @contextmanager
    def open_read(self, path: str) -> Iterator[BinaryIO]:
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise _not_found(path) from None
        with f:
            yield f

    def local_path(self, path: str) -> str | None:
        return path

    # -- housekeeping
    def remove_incomplete(self, directory: str) -> list[str]:
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
            parsed = parse_temp_name(name)
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

    def probe(self, directory: str) -> None:
        """Create ``directory`` and check that we may write there.

        Raises:
            StorageError: the directory cannot be created or is not writable.
        """
        try:
            self.makedirs(directory)
        except OSError as exc:
            raise StorageError(exc.errno or errno.EACCES, f"cannot create checkpoint directory {directory}: "
                               f"{exc.strerror or exc}", directory) from exc
        if not os.access(directory or ".", os.W_OK | os.X_OK):
            raise StorageError(errno.EACCES, f"checkpoint directory {directory} is not writable", directory)

    def lock(self, directory: str, name: str | None = None, *, timeout_s: float = 0.0,
             ) -> AbstractContextManager[None]:
        """Hold an exclusive ``flock`` on ``directory/.name.lock`` (or on ``directory`` itself when
        ``name`` is None: no file is left behind), waiting up to ``timeout_s`` for another holder;
        a no-op where flock is missing (``local_lock.py``).

        Raises:
            ConcurrentSaverError: another process (or another saver in this one) holds it.
        """
        return local_lock.flock(directory, name, timeout_s=timeout_s)
