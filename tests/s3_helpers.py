"""A real S3 API for tests: moto's ThreadedMotoServer on a free port, s3fs pointed at it.

Also a fault-injecting HTTP proxy in front of it (fail the n-th matching request with a 503, or
drop the connection mid-request): the real client and server, with the network made unreliable.
"""

from __future__ import annotations

import http.client
import socket
import socketserver
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

KEY, SECRET = "testing-key", "testing-secret"


def options_for(endpoint: str, **extra: Any) -> dict[str, Any]:
    """storage_options for s3fs against ``endpoint`` (no retries inside botocore: ours are tested)."""
    return {
        "endpoint_url": endpoint,
        "key": KEY,
        "secret": SECRET,
        "client_kwargs": {"region_name": "us-east-1"},
        "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}},
        "skip_instance_cache": True,
        **extra,
    }


@dataclass
class Faults:
    """What the proxy breaks: requests whose method and path match, counted from 1."""

    method: str | None = None  # "PUT", "GET", ... or None for any
    path_contains: str = ""
    fail_numbers: set[int] = field(default_factory=set)  # which matching requests fail
    mode: str = "503"  # "503" or "drop" (close the connection without answering)
    seen: int = 0
    failed: int = 0
    sent: int = 0  # response body bytes of every request (what a client downloaded)
    requests: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def hit(self, method: str, path: str) -> str | None:
        with self.lock:
            self.requests.append(f"{method} {path}")
        if self.method is not None and method != self.method:
            return None
        if self.path_contains not in path:
            return None
        with self.lock:
            self.seen += 1
            if self.seen in self.fail_numbers:
                self.failed += 1
                return self.mode
        return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ProxyServer

    def log_message(self, *args: Any) -> None:
        pass

    def _relay(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = self._read_chunked()
        action = self.server.faults.hit(self.command, self.path)
        if action == "drop":
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        if action == "403":
            msg = b"<Error><Code>AccessDenied</Code><Message>injected: bad key</Message></Error>"
            self.send_response(403)
            self.send_header("Content-Length", str(len(msg)))
            self.end_headers()
            self.wfile.write(msg)
            return
        if action == "503":
            msg = b"<Error><Code>ServiceUnavailable</Code><Message>injected</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Length", str(len(msg)))
            self.end_headers()
            self.wfile.write(msg)
            return
        conn = http.client.HTTPConnection(*self.server.upstream, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
        headers["Content-Length"] = str(len(body))
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(k, v)
        length = resp.getheader("Content-Length") if self.command == "HEAD" else None
        self.send_header("Content-Length", length or str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
            with self.server.faults.lock:
                self.server.faults.sent += len(data)
        conn.close()

    def _read_chunked(self) -> bytes:
        out = b""
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                self.rfile.readline()
                return out
            out += self.rfile.read(size)
            self.rfile.readline()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay


class _ProxyServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream = upstream
        self.faults = Faults()


class FaultProxy:
    """An HTTP proxy in front of the S3 server; set ``faults`` to break requests."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self._server = _ProxyServer(upstream)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def faults(self) -> Faults:
        return self._server.faults

    def inject(self, **kwargs: Any) -> Faults:
        self._server.faults = Faults(**kwargs)
        return self._server.faults

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass
class S3:
    """One fresh bucket on the test server: ``url("ckpts")`` -> ``s3://bucket/ckpts``."""

    endpoint: str
    bucket: str
    options: dict[str, Any]

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def fs(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(**self.options)


def new_bucket(endpoint: str) -> S3:
    import s3fs

    options = options_for(endpoint)
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**options).call_s3("create_bucket", Bucket=bucket)
    return S3(endpoint, bucket, options)
