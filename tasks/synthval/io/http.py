"""HTTP(S) downloads that survive real networks: retries with backoff, resume by Range, no secrets in logs.

Downloads use the standard library's urllib rather than fsspec's HTTP filesystem: resuming needs
the raw status (206 or 200) and the Range/If-Range headers per request, fsspec's HTTP file sends a
HEAD before every GET, and its aiohttp session gives up on any transfer longer than five minutes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from http.client import HTTPException
from typing import Any

from synthval.errors import FetchError
from synthval.humanize import format_duration, format_size

log = logging.getLogger(__name__)

DEFAULT_RETRY_DELAY_S = 1.0  # first back-off; doubles each retry
MAX_RETRY_DELAY_S = 60.0
SOCKET_TIMEOUT_S = 60.0  # per connect and per read, not per transfer
PROGRESS_INTERVAL_S = 10.0
CHUNK = 1 << 20
_RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})



def redact(url: str) -> str:
    """A URL fit for logs and errors: no user:password, no query string (signed URLs carry secrets there)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.scheme not in ("http", "https"):
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "..." if parts.query else "", ""))


class _NoCredentialsAcrossHosts(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but never carry the Authorization header to another host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            for key in [k for k in new.headers if k.lower() == "authorization"]:
                del new.headers[key]
            new.unredirected_hdrs.pop("Authorization", None)
        return new


_OPENER = urllib.request.build_opener(_NoCredentialsAcrossHosts())


class _Retry(Exception):
    """A transient failure: the transfer may be tried again (resuming where it stopped)."""


class HTTPStatusError(FetchError):
    """The server answered with a status that retrying will not change (401, 403, 404, ...)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class _Progress:
    """Log lines with bytes, rate and ETA, at most one per PROGRESS_INTERVAL_S."""

    def __init__(self, label: str, start: int, total: int | None) -> None:
        self.label, self.start, self.total = label, start, total
        self.began = self.last = time.monotonic()
        self.logged = False

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < PROGRESS_INTERVAL_S:
            return
        self.last, self.logged = now, True
        rate = (done - self.start) / max(now - self.began, 1e-6)
        if self.total:
            eta = (self.total - done) / rate if rate > 0 else float("inf")
            log.info("%s: %s of %s (%.1f%%), %s/s, ETA %s", self.label, format_size(done), format_size(self.total),
                     100.0 * done / self.total, format_size(rate), format_duration(eta))
        else:
            log.info("%s: %s, %s/s", self.label, format_size(done), format_size(rate))


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total) of `bytes A-B/T` or `bytes */T`; None where absent."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not match:
        return None, None
    first = int(match.group(1)) if match.group(1) is not None else None
    total = int(match.group(2)) if match.group(2) != "*" else None
    return first, total


def _load_state(path: str, url: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        return state if state.get("url") == url else {}
    except (OSError, ValueError):
        return {}


def _transfer(url: str, part: str, state_path: str, headers: dict[str, str], label: str) -> None:
    """One attempt: continue `part` from its current size, or restart it; raise _Retry on transient failure."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    state = _load_state(state_path, url) if have else {}
    if have and not state:
        have = 0  # a partial file whose origin is unknown cannot be continued
    request = urllib.request.Request(url, headers=dict(headers))
    if have:
        request.add_header("Range", f"bytes={have}-")
        etag = state.get("etag") or ""
        validator = etag if etag and not etag.startswith("W/") else state.get("last_modified")
        if validator:
            request.add_header("If-Range", validator)  # changed upstream -> the server sends it whole
    try:
        response = _OPENER.open(request, timeout=SOCKET_TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        with exc:
            if exc.code == 416 and have:
                _, total = _content_range(exc.headers.get("Content-Range"))
                if total == have:
                    return  # the partial file is already whole
                os.unlink(part)
                raise _Retry("the server refused the resume point; starting over") from exc
            if exc.code in _RETRY_STATUSES or exc.code >= 500:
                raise _Retry(f"HTTP {exc.code} {exc.reason}") from exc
            raise HTTPStatusError(f"{redact(url)}: HTTP {exc.code} {exc.reason}", exc.code) from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLCertVerificationError):
            raise FetchError(f"{redact(url)}: TLS certificate not trusted ({exc.reason})") from exc
        raise _Retry(f"cannot connect ({exc.reason})") from exc
    except (OSError, HTTPException) as exc:
        raise _Retry(f"{type(exc).__name__}: {exc}") from exc

    with response:
        status = response.status
        if status == 206 and have:
            first, total = _content_range(response.headers.get("Content-Range"))
            if first != have:
                os.unlink(part)
                raise _Retry(f"the server resumed at byte {first}, not {have}; starting over")
            mode = "ab"
            log.info("%s: resuming at %s", label, format_size(have))
        elif status == 200:
            if have:
                log.info("%s: the server ignored the resume request; starting over", label)
            have, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            state = {"url": url, "etag": response.headers.get("ETag"),
                     "last_modified": response.headers.get("Last-Modified"), "total": total}
            with open(state_path, "w", encoding="utf-8") as f:
                json.dump(state, f)
        else:
            raise FetchError(f"{redact(url)}: unexpected HTTP {status} {response.reason}")
        progress = _Progress(label, have, total)
        done = have
        with open(part, mode) as out:
            while True:
                try:
                    chunk = response.read(CHUNK)
                except (OSError, HTTPException) as exc:
                    raise _Retry(f"connection lost after {format_size(done)} ({type(exc).__name__}: {exc})") from exc
                if not chunk:
                    break
                try:
                    out.write(chunk)
                except OSError as exc:  # a full disk is not transient
                    raise FetchError(f"{redact(url)}: cannot write {part} ({exc})") from exc
                done += len(chunk)
                progress.update(done)
        # http.client returns a short body without complaint when the peer closes early.
        if total is not None and done != total:
            raise _Retry(f"connection closed after {format_size(done)} of {format_size(total)}")
        if progress.logged:
            progress.update(done, force=True)


def download_http(url: str, dest: str, *, retries: int = 5, retry_delay: float | None = None,
                  headers: dict[str, str] | None = None, label: str | None = None) -> int:
    """Download `url` to the local file `dest` (renamed into place when whole); return its size.

    Transient failures (connection refused or reset, timeouts, 408/429/5xx) are retried `retries`
    times with exponential backoff from `retry_delay` seconds, resuming with HTTP Range from the
    bytes already in `dest + ".part"`, which also survives a crash for the next run to continue.
    Anything else, or running out of retries, raises FetchError naming the URL and the status.
    `headers` (e.g. Authorization) are sent but never logged.
    """
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchError(f"{redact(url)}: only http and https URLs can be downloaded")
    delay = DEFAULT_RETRY_DELAY_S if retry_delay is None else retry_delay
    label = label or redact(url)
    part, state_path = dest + ".part", dest + ".part.json"
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    attempt = 0
    while True:
        try:
            _transfer(url, part, state_path, headers or {}, label)
            break
        except _Retry as exc:
            attempt += 1
            if attempt > retries:
                raise FetchError(f"{redact(url)}: {exc} (gave up after {retries} retries)") from exc
            wait_s = min(delay * 2 ** (attempt - 1), MAX_RETRY_DELAY_S)
            log.warning("%s: %s; retry %d of %d in %.1fs", label, exc, attempt, retries, wait_s)
            time.sleep(wait_s)
    os.replace(part, dest)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(state_path)
    return os.path.getsize(dest)

