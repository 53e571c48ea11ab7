"""Shared fixtures: a real S3 server (moto, started once per session on a free port, only when a
test asks for it) and the three places a checkpoint can live (local, ``memory://``, ``s3://``)."""

from __future__ import annotations

import errno
import fcntl
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from s3_helpers import S3, FaultProxy, new_bucket


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """The endpoint URL of a moto S3 server, stopped at the end of the session."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing-key")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing-secret")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server: str) -> S3:
    """A fresh, empty bucket."""
    return new_bucket(s3_server)


@pytest.fixture
def fault_proxy(s3_server: str) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the S3 server (``proxy.inject(...)``)."""
    host, port = s3_server.removeprefix("http://").split(":")
    proxy = FaultProxy((host, int(port)))
    yield proxy
    proxy.stop()


@dataclass
class Place:
    """Where a test's checkpoints live: ``root`` is a folder or URL, ``options`` its storage_options."""

    kind: str
    root: str
    options: dict[str, Any] = field(default_factory=dict)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts]) if self.kind != "local" else os.path.join(self.root, *parts)


@pytest.fixture(params=["local", "memory", "s3"])
def place(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Place]:
    """The same behaviour test on a local folder, ``memory://`` and ``s3://`` (moto)."""
    if request.param == "local":
        yield Place("local", str(tmp_path))
    elif request.param == "memory":
        root = f"memory://t-{uuid.uuid4().hex[:12]}"
        yield Place("memory", root)
        import fsspec

        try:
            fsspec.filesystem("memory").rm(root.removeprefix("memory://"), recursive=True)
        except FileNotFoundError:
            pass
    else:
        bucket = new_bucket(request.getfixturevalue("s3_server"))
        yield Place("s3", bucket.url("ckpts"), bucket.options)


@pytest.fixture
def direct_flags(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each write to the file was an O_DIRECT write (asked of the kernel at the write)."""
    from lightning_saver.formats import direct_write

    seen: list[bool] = []
    real = os.pwrite

    def spy(fd: int, data: Any, offset: int) -> int:
        seen.append(bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT))
        return real(fd, data, offset)

    monkeypatch.setattr(direct_write, "_pwrite", spy)
    return seen


@pytest.fixture
def refused_direct(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """A file system that takes the O_DIRECT flag but refuses its writes (EINVAL): the flag of each write."""
    from lightning_saver.formats import direct_write

    seen: list[bool] = []
    real = os.pwrite

    def refuse(fd: int, data: Any, offset: int) -> int:
        on = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
        seen.append(on)
        if on:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(fd, data, offset)

    monkeypatch.setattr(direct_write, "_pwrite", refuse)
    return seen


@pytest.fixture
def no_direct_fs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system without O_DIRECT: setting the flag with ``fcntl`` fails with EINVAL."""
    from lightning_saver.formats import direct_write

    real = fcntl.fcntl

    def no_direct(fd: int, cmd: int, arg: int = 0) -> Any:
        if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(fd, cmd, arg)

    monkeypatch.setattr(direct_write.fcntl, "fcntl", no_direct)
