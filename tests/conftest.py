"""Shared fixtures: real servers on loopback, never mocks of the clients.

- `http_server`: a threaded HTTP/1.1 server serving byte strings you register, with Range
  requests, ETags, and failures you can inject: a connection dropped mid-body, 5xx answers before
  success, a bearer token check, a server that ignores Range. Every request is recorded.
- `gcs_emulator`: the `gcp-storage-emulator` package in-process (one per session, in memory), a
  fresh bucket per test, and STORAGE_EMULATOR_HOST set so gcsfs (and synthval.io.storage) talk to it.
  Subprocesses get the emulator from `gcs_emulator.env`.
"""

from __future__ import annotations

import os

# As the CLI does (synthval/cli.py): idle OpenMP threads must not spin while tests share 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hashlib
import logging
import re
import socket
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


@dataclass
class Route:
    body: bytes
    content_type: str = "application/octet-stream"
    token: str | None = None  # require "Authorization: Bearer <token>", else 401
    fail: list[int] = field(default_factory=list)  # statuses to answer first, one per request
    drop_after: int | None = None  # send this many body bytes of the next full answer, then hang up (once)
    ignore_range: bool = False  # always answer 200 with the whole body
    status: int = 200

    @property
    def etag(self) -> str:
        return '"' + hashlib.sha1(self.body).hexdigest() + '"'


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


class LocalHTTPServer:
    """State of the `http_server` fixture; `serve()` registers a path and returns its URL."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.state = self  # type: ignore[attr-defined]
        self.port = self._httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="test-http", daemon=True)
        self._thread.start()

    def serve(self, path: str, body: bytes | str, **options) -> str:
        if isinstance(body, str):
            body = body.encode("utf-8")
        self.routes[path] = Route(body=body, **options)
        return self.url(path)

    def url(self, path: str) -> str:
        return self.base_url + path

    def requests_for(self, path: str) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.path.split("?", 1)[0] == path]

    def record(self, rec: Recorded) -> None:
        with self._lock:
            self.requests.append(rec)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - keep test output quiet
        pass

    def do_HEAD(self):
        self._answer(head=True)

    def do_GET(self):
        self._answer(head=False)

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None, head: bool = False):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _answer(self, head: bool) -> None:
        state: LocalHTTPServer = self.server.state  # type: ignore[attr-defined]
        state.record(Recorded(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
        route = state.routes.get(self.path.split("?", 1)[0])
        if route is None:
            self._send(404, b"not found\n", head=head)
            return
        if route.token is not None and self.headers.get("Authorization") != f"Bearer {route.token}":
            self._send(401, b"unauthorized\n", {"WWW-Authenticate": "Bearer"}, head=head)
            return
        if route.fail:
            status = route.fail.pop(0)
            self._send(status, b"try again later\n", {"Retry-After": "0"}, head=head)
            return
        if route.status != 200:
            self._send(route.status, b"", head=head)
            return
        body, total = route.body, len(route.body)
        headers = {"Content-Type": route.content_type, "ETag": route.etag, "Accept-Ranges": "bytes"}
        status, start = 200, 0
        match = _RANGE.match(self.headers.get("Range", ""))
        if_range = self.headers.get("If-Range")
        if match and not route.ignore_range and (if_range is None or if_range == route.etag):
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else total - 1
            if start >= total:
                self._send(416, b"", {"Content-Range": f"bytes */{total}"}, head=head)
                return
            end = min(end, total - 1)
            body = body[start:end + 1]
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
        if route.drop_after is not None and not head:
            cut, route.drop_after = route.drop_after, None
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._send(status, body, headers, head=head)


@pytest.fixture
def http_server():
    """A fresh loopback HTTP server per test (see LocalHTTPServer)."""
    server = LocalHTTPServer()
    try:
        yield server
    finally:
        server.close()


@dataclass
class GcsEmulator:
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str

    def uri(self, path: str = "") -> str:
        return f"gs://{self.bucket}/{path}".rstrip("/") if path else f"gs://{self.bucket}"

    @property
    def env(self) -> dict[str, str]:
        """Environment for a subprocess that should use the emulator."""
        return {"STORAGE_EMULATOR_HOST": self.endpoint}


@pytest.fixture(scope="session")
def _gcs_emulator_endpoint():
    from gcp_storage_emulator.server import create_server

    logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)
    # Port 0: the kernel picks a free port, so there is no window for another process to take it.
    server = create_server("127.0.0.1", 0, in_memory=True)
    server.start()
    try:
        port = server._api._httpd.server_address[1]
    except AttributeError as exc:  # the emulator's internals moved: fail loudly rather than guess a port
        server.stop()
        raise RuntimeError("cannot read the storage emulator's port; update tests/conftest.py") from exc
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def gcs_emulator(_gcs_emulator_endpoint, monkeypatch):
    """A new, empty bucket on the session's storage emulator; gs:// URIs in this test go there."""
    from gcsfs.core import GCSFileSystem

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", _gcs_emulator_endpoint)
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    GCSFileSystem(token="anon", project="synthval-test").mkdir(bucket)
    return GcsEmulator(endpoint=_gcs_emulator_endpoint, bucket=bucket)
