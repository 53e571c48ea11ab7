"""Where the bytes live: the one small interface every checkpoint byte goes through.

STYLE rule 14. Local disks, object stores (``s3://``, ``gs://``, ``memory://`` through fsspec) and
per-rank shards all use these verbs; formats write to and read from the file-like objects handed
to them and never know which store is behind them. Two implementations: ``local.LocalStorage``
(temp file, fsync, rename, fsync the directory; ``pread``/``mmap`` fast paths) and
``remote.FsspecStorage`` (bytes spooled locally, then one upload that makes the object appear whole
under its final name; a failed upload is aborted, so nothing is left under that name).

Paths are strings: a local path, or a URL (``s3://bucket/dir/name``). ``storage_for(path)`` picks
the implementation; a URL is never turned into a local folder.

Example::

    store = storage_for("s3://bucket/run/ckpts", storage_options={"endpoint_url": url})
    store.write_atomic(store.join(d, "m_95.safetensors"), lambda sink: write_stream(tensors, sink))
    names = store.listdir(d)                       # plain names, no temporaries
    head = store.read_range(path, 0, 8)          # ranged read (one HTTP range request remotely)
    store.delete(path)                           # a missing file is not an error
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import BinaryIO, Protocol, TypeVar, runtime_checkable

__all__ = ["Sink", "Storage"]

T = TypeVar("T")


@runtime_checkable
class Sink(Protocol):
    """What a format writer writes one object through: sequential writes, nothing else required.

    ``fileno()`` returns an OS descriptor positioned at 0 where the store is a local file (the fast
    path: ``pwrite``, ``os.write``, header rewritten in place), and ``None`` for an upload, where the
    writer must produce its bytes strictly in order (header first: compute checksums before).
    """

    def write(self, data: bytes | bytearray | memoryview) -> int: ...

    def fileno(self) -> int | None: ...


@runtime_checkable
class Storage(Protocol):
    """The verbs. Each raises an error of our family naming the path (or URL) on failure."""

    # -- naming (URL-aware; never os.path on a URL)
    def join(self, directory: str, name: str) -> str: ...

    def split(self, path: str) -> tuple[str, str]:
        """``(directory, name)``, like ``os.path.split`` for both paths and URLs."""
        ...

    # -- writing
    def makedirs(self, directory: str) -> None:
        """Create the directory (a no-op on object stores)."""
        ...

    def write_atomic(self, path: str, produce: Callable[[Sink], T], *, nbytes: int | None = None,
                     sync_directory: bool = True) -> T:
        """Run ``produce(sink)`` and make its bytes appear under ``path`` whole, or not at all.

        Local: temp file in the same directory, fsync, rename, fsync the directory (not with
        ``sync_directory=False``: the caller's next commit in that directory makes the name
        durable); ENOSPC/EFBIG become ``DiskFullError`` naming ``path`` and the bytes needed.
        Remote: a (multipart) upload under the final name, aborted on any error; transient errors
        retried with bounded backoff. Returns what ``produce`` returned once durable.
        """
        ...

    def write_bytes(self, path: str, data: bytes) -> None:
        """``write_atomic`` for small objects (the state file, an index)."""
        ...

    def delete(self, path: str) -> None:
        """Remove one object; a missing one is not an error."""
        ...

    # -- reading
    def exists(self, path: str) -> bool: ...

    def size(self, path: str) -> int:
        """Bytes in the object; ``CheckpointNotFoundError`` naming ``path`` when missing."""
        ...

    def listdir(self, directory: str) -> list[str]:
        """Names (not paths) of the committed objects directly in ``directory``; [] when missing.

        Never lists our own in-progress temporaries."""
        ...

    def read_range(self, path: str, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset``; a short read is ``CorruptCheckpointError``."""
        ...

    def read_bytes(self, path: str) -> bytes: ...

    def open_read(self, path: str) -> AbstractContextManager[BinaryIO]:
        """A seekable binary stream (remote: ranged reads under the hood)."""
        ...

    def local_path(self, path: str) -> str | None:
        """The OS path when the object is a local file (for mmap/pread fast paths), else None."""
        ...

    # -- housekeeping
    def remove_incomplete(self, directory: str) -> list[str]:
        """Remove what crashed writers left (local temporaries of dead pids, aborted uploads)."""
        ...

    def probe(self, directory: str) -> None:
        """Fail now (at set-up, not at the first save an hour in) when ``directory`` cannot be
        written: missing or wrong credentials, a missing bucket, a read-only folder."""
        ...

    def lock(self, directory: str, name: str | None = None, *, timeout_s: float = 0.0,
             ) -> AbstractContextManager[None]:
        """An exclusive advisory lock held by one saver of ``directory``/``name`` (``name`` None: of
        the whole directory), waiting up to ``timeout_s`` for another holder (local: flock on a lock
        file or the directory; remote: best effort, may be a no-op). A second holder past the
        timeout gets a clear error (``ConcurrentSaverError``)."""
        ...


def iter_chunks(data: memoryview, size: int = 8 << 20) -> Iterator[memoryview]:
    """``data`` in pieces of at most ``size`` bytes (for sinks that copy what they are given)."""
    for start in range(0, len(data), size):
        yield data[start : start + size]
