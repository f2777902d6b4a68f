"""`synthval fetch`: bring a dataset or a model into a folder, once, whole, and verified.

Sources: http(s):// URLs (retried with exponential backoff, resumed with HTTP Range after a broken
transfer), gs:// objects or prefixes, local paths, usim://PROJECT/RUN_EXECUTION (a Unity Simulation
run, by its manifest), and the named sources below. A single .zip/.tar(.gz) is extracted safely
(see archives.py) unless asked not to.

The destination is written atomically: everything is assembled in a temporary folder beside it and
renamed into place (on gs://, uploaded under a marker that says "incomplete" until the last object
is in). The folder then holds `.synthval-fetch.json`, naming the source and checksum; a later fetch
of the same source and checksum finds it and does nothing, a changed one fetches again.

Downloads use the standard library's urllib rather than fsspec's HTTP filesystem: resuming needs
the raw status (206 or 200) and the Range/If-Range headers per request, fsspec's HTTP file sends a
HEAD before every GET, and its aiohttp session gives up on any transfer longer than five minutes.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import ssl
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from http.client import HTTPException
from typing import Any

from synthval import __version__, storage
from synthval.archives import DEFAULT_MAX_MEMBERS, archive_kind, extract_archive, safe_member_path
from synthval.errors import FetchError

log = logging.getLogger(__name__)

_BUCKET = "https://storage.googleapis.com/datasetinsights"
_CHECKPOINT = "FasterRCNN.estimator"
# Public datasets and models of the SynthDet study (Unity-Technologies/datasetinsights). The crc32
# values are the seed's own (GroceriesReal v3 2322380006, SynthDet v1 390326588) written in hex;
# the seed published no checksums for its models.
NAMED_SOURCES: dict[str, dict[str, Any]] = {
    "groceries-real": {
        "kind": "dataset", "url": f"{_BUCKET}/data/groceries/v3.zip", "checksum": "crc32:8a6cb4e6",
        "description": "UnityGroceries-Real v3: 1267 photographs of 63 grocery products, 2D boxes, splits",
    },
    "synthdet-sample": {
        "kind": "dataset", "url": f"{_BUCKET}/data/synthetic/SynthDet.zip", "checksum": "crc32:1743e93c",
        "description": "UnityGroceries-Synthetic sample (about 5k SynthDet images, Perception 0.0.1)",
    },
    "real-world-760": {
        "kind": "model", "url": f"{_BUCKET}/models/Real-World/{_CHECKPOINT}", "checksum": None,
        "description": "Faster R-CNN trained on 760 real images",
    },
    "synthetic-400k": {
        "kind": "model", "url": f"{_BUCKET}/models/Synthetic/{_CHECKPOINT}", "checksum": None,
        "description": "Faster R-CNN trained on 400,000 SynthDet images",
    },
    "synthetic-and-real-76": {
        "kind": "model", "url": f"{_BUCKET}/models/Synthetic-And-Real-World-76-images/{_CHECKPOINT}",
        "checksum": None, "description": "synthetic-400k fine-tuned on 76 real images",
    },
    "synthetic-and-real-380": {
        "kind": "model", "url": f"{_BUCKET}/models/Synthetic-And-Real-World-380-images/{_CHECKPOINT}",
        "checksum": None, "description": "synthetic-400k fine-tuned on 380 real images",
    },
    "synthetic-and-real-760": {
        "kind": "model", "url": f"{_BUCKET}/models/Synthetic-And-Real-World-760-images/{_CHECKPOINT}",
        "checksum": None, "description": "synthetic-400k fine-tuned on 760 real images",
    },
}

# Unity Simulation REST API; the CLI may point it elsewhere (env SYNTHVAL_USIM_API), tests do.
USIM_API_BASE = "https://api.simulation.unity3d.com"
USIM_COLUMNS = ("run_execution_id", "app_param_id", "instance_id", "attempt_id", "file_name", "download_uri")
USIM_WORKERS = 16

MARKER_NAME = ".synthval-fetch.json"
DEFAULT_RETRY_DELAY_S = 1.0  # first back-off; doubles each retry
MAX_RETRY_DELAY_S = 60.0
SOCKET_TIMEOUT_S = 60.0  # per connect and per read, not per transfer
PROGRESS_INTERVAL_S = 10.0
CHUNK = 1 << 20
_RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_USIM_RE = re.compile(r"^usim://([^/@?#]+)/([^/?#]+)/?$")


# ---------------------------------------------------------------------------------------------
# names and checksums


def resolve_source(name_or_uri: str) -> str:
    """Return the URL of a named source (see NAMED_SOURCES), any other URI unchanged."""
    entry = NAMED_SOURCES.get(name_or_uri)
    return entry["url"] if entry else name_or_uri


def is_named_source(name_or_uri: str) -> bool:
    """Whether the text names a source of NAMED_SOURCES (a dataset or a published model): such names stay
    names wherever they are recorded, never `<cwd>/name`."""
    return name_or_uri in NAMED_SOURCES


def is_named_model(name_or_uri: str) -> bool:
    """Whether the text is a published model's name (a local file of that name is written ./name)."""
    entry = NAMED_SOURCES.get(name_or_uri)
    return entry is not None and entry["kind"] == "model"


def local_model_file(name: str) -> str:
    """The local path of a published model, downloaded once (resumable, verified where a checksum is
    published) into the local cache; every later call finds it there."""
    if not is_named_model(name):
        raise FetchError(f"{name!r} is not a published model; known: "
                         + ", ".join(sorted(k for k, v in NAMED_SOURCES.items() if v["kind"] == "model")))
    return materialize(resolve_source(name), DATA_CACHE_ROOT, checksum=NAMED_SOURCES[name]["checksum"])


_ALGORITHMS: dict[str, Callable[[], Any]] = {"md5": hashlib.md5, "sha256": hashlib.sha256}


class _Crc32:
    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


@dataclass(frozen=True)
class Checksum:
    """An expected digest, written `crc32:HEX`, `md5:HEX` or `sha256:HEX`."""

    algorithm: str
    hexdigest: str

    @classmethod
    def parse(cls, text: str) -> Checksum:
        algorithm, sep, value = text.strip().partition(":")
        algorithm, value = algorithm.lower(), value.strip().lower()
        lengths = {"crc32": (1, 8), "md5": (32, 32), "sha256": (64, 64)}
        if not sep or algorithm not in lengths:
            raise FetchError(f"checksum {text!r}: expected ALGO:HEX with ALGO one of crc32, md5, sha256")
        low, high = lengths[algorithm]
        if not re.fullmatch(r"[0-9a-f]+", value) or not low <= len(value) <= high:
            raise FetchError(f"checksum {text!r}: {algorithm} needs {high} hex digits")
        if algorithm == "crc32":
            value = f"{int(value, 16):08x}"
        return cls(algorithm, value)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hexdigest}"

    def compute(self, path: str) -> str:
        digest = _Crc32() if self.algorithm == "crc32" else _ALGORITHMS[self.algorithm]()
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        return f"{self.algorithm}:{digest.hexdigest()}"

    def verify(self, path: str, uri: str) -> None:
        got = self.compute(path)
        if got != str(self):
            raise FetchError(f"{redact(uri)}: checksum mismatch: expected {self}, got {got}")


# ---------------------------------------------------------------------------------------------
# http(s)


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
            log.info("%s: %s of %s (%.1f%%), %s/s, ETA %s", self.label, _size(done), _size(self.total),
                     100.0 * done / self.total, _size(rate), _duration(eta))
        else:
            log.info("%s: %s, %s/s", self.label, _size(done), _size(rate))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "unknown"
    whole = int(seconds)
    if whole >= 3600:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 60}m{whole % 60:02d}s"


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
            log.info("%s: resuming at %s", label, _size(have))
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
                    raise _Retry(f"connection lost after {_size(done)} ({type(exc).__name__}: {exc})") from exc
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
            raise _Retry(f"connection closed after {_size(done)} of {_size(total)}")
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


# ---------------------------------------------------------------------------------------------
# sources into a local staging folder


def _file_name(uri: str, fallback: str = "download") -> str:
    name = urllib.parse.unquote(storage.basename(uri))
    return name if name and name not in (".", "..") and "/" not in name and "\x00" not in name else fallback


def _fetch_http(url: str, download_dir: str, retries: int, retry_delay: float | None) -> str:
    dest = os.path.join(download_dir, _file_name(url))
    download_http(url, dest, retries=retries, retry_delay=retry_delay)
    return dest


def _fetch_gcs(uri: str, download_dir: str, tree_dir: str) -> str | None:
    """A single object into `download_dir` (returns its path), or a whole prefix into `tree_dir` (None)."""
    fs, path = storage.filesystem(uri)
    try:
        fs.invalidate_cache(path)
        info = fs.info(path)
    except FileNotFoundError as exc:
        raise FetchError(f"{uri}: no such object or prefix") from exc
    except OSError as exc:
        raise FetchError(f"{uri}: cannot be reached ({exc})") from exc
    try:
        if info["type"] == "directory":
            count = storage.copy_tree(uri, tree_dir)
            if count == 0:
                raise FetchError(f"{uri}: the prefix holds no objects")
            log.info("fetched %d objects from %s", count, uri)
            return None
        dest = os.path.join(download_dir, _file_name(uri, "object"))
        log.info("fetching %s (%s)", uri, _size(info.get("size") or 0))
        fs.get_file(path, dest + ".part")
        os.replace(dest + ".part", dest)
        return dest
    except FetchError:
        raise
    except OSError as exc:
        raise FetchError(f"{uri}: cannot be fetched ({exc})") from exc


def _fetch_local(uri: str, download_dir: str, tree_dir: str) -> str | None:
    path = storage.local_path(uri)
    if os.path.isdir(path):
        storage.copy_tree(path, tree_dir)
        return None
    if not os.path.isfile(path):
        names = ", ".join(sorted(NAMED_SOURCES))
        raise FetchError(f"{uri}: no such file or folder, and not a named source ({names})")
    dest = os.path.join(download_dir, os.path.basename(path))
    shutil.copyfile(path, dest)
    return dest


def _parse_usim(uri: str) -> tuple[str, str]:
    if "@" in uri.split("://", 1)[1].split("/", 1)[0]:
        # The seed allowed usim://TOKEN@PROJECT/RUN; a token on a command line ends up in process
        # lists and logs, so it is refused without echoing the URI.
        raise FetchError("usim:// URIs must not carry the access token; pass it in USIM_ACCESS_TOKEN or a "
                         "token file (--usim-token-file / USIM_ACCESS_TOKEN_FILE)")
    match = _USIM_RE.match(uri)
    if not match:
        raise FetchError(f"{uri}: expected usim://PROJECT_ID/RUN_EXECUTION_ID")
    return match.group(1), match.group(2)


def _usim_rows(manifest_path: str, uri: str) -> dict[str, str]:
    """{file_name: download_uri} of a run manifest, keeping only each instance's last attempt."""
    with open(manifest_path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in USIM_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise FetchError(f"{uri}: the run manifest lacks the columns {', '.join(missing)}")
        rows = list(reader)
    if not rows:
        raise FetchError(f"{uri}: the run manifest lists no files")

    def attempt(row: dict[str, str]) -> tuple[int, str]:
        value = row["attempt_id"].strip()
        return (int(value), "") if value.isdigit() else (-1, value)

    # A retried instance leaves the files of its failed attempts in the manifest too.
    last: dict[tuple[str, str], tuple[int, str]] = {}
    for row in rows:
        key = (row["app_param_id"], row["instance_id"])
        last[key] = max(last.get(key, attempt(row)), attempt(row))
    files: dict[str, str] = {}
    for row in rows:
        if attempt(row) != last[(row["app_param_id"], row["instance_id"])]:
            continue
        rel = safe_member_path(row["file_name"], f"{uri} manifest")
        if rel is None:
            raise FetchError(f"{uri}: the run manifest has an empty file_name")
        if urllib.parse.urlsplit(row["download_uri"]).scheme.lower() not in ("http", "https"):
            raise FetchError(f"{uri}: the run manifest's download_uri for {rel!r} is not an http(s) URL")
        files[rel] = row["download_uri"]
    return files


def _fetch_usim(uri: str, token: str | None, api_base: str, tree_dir: str, work_dir: str, retries: int,
                retry_delay: float | None) -> int:
    project, run = _parse_usim(uri)
    if not token:
        raise FetchError(f"{uri}: a Unity Simulation access token is needed: set USIM_ACCESS_TOKEN, "
                         f"USIM_ACCESS_TOKEN_FILE or --usim-token-file")
    manifest_url = (f"{api_base.rstrip('/')}/v1/projects/{urllib.parse.quote(project, safe='')}"
                    f"/runs/{urllib.parse.quote(run, safe='')}/data")
    manifest = os.path.join(work_dir, "usim-manifest.csv")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(manifest)  # signed URLs expire: always ask for a fresh manifest
    try:
        download_http(manifest_url, manifest, retries=retries, retry_delay=retry_delay,
                      headers={"Authorization": f"Bearer {token}", "Accept": "text/csv"},
                      label=f"{uri} manifest")
    except HTTPStatusError as exc:
        if exc.status in (401, 403):
            raise FetchError(f"{uri}: the Unity Simulation API refused the access token ({exc}); check "
                             f"USIM_ACCESS_TOKEN and that it can read project {project}") from exc
        raise
    try:
        files = _usim_rows(manifest, uri)
    finally:
        os.unlink(manifest)  # its pre-signed URLs are credentials of a kind: keep them no longer than needed
    log.info("%s: %d files in the run manifest", uri, len(files))
    done = 0
    last_log = time.monotonic()
    with ThreadPoolExecutor(max_workers=USIM_WORKERS, thread_name_prefix="usim") as pool:
        # The download URIs are pre-signed: the access token is never sent to them.
        futures = {pool.submit(download_http, url, os.path.join(tree_dir, *rel.split("/")), retries=retries,
                               retry_delay=retry_delay, label=f"{uri}/{rel}"): rel
                   for rel, url in files.items()}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=PROGRESS_INTERVAL_S, return_when=FIRST_EXCEPTION)
            for future in finished:
                error = future.exception()
                if error is not None:
                    for other in pending:
                        other.cancel()
                    if isinstance(error, FetchError):
                        raise FetchError(f"{uri}: {futures[future]}: {error}") from error
                    raise error
                done += 1
            if time.monotonic() - last_log >= PROGRESS_INTERVAL_S:
                last_log = time.monotonic()
                log.info("%s: %d of %d files", uri, done, len(files))
    return len(files)


# ---------------------------------------------------------------------------------------------
# the destination: lock, marker, atomic publication


def _marker_identity(source: str, checksum: Checksum | None, extract: bool) -> dict[str, Any]:
    return {"source": source, "checksum": str(checksum) if checksum else None, "extract": extract}


def _read_marker(out_uri: str) -> dict[str, Any] | None:
    marker_uri = storage.join_uri(out_uri, MARKER_NAME)
    try:
        if not storage.exists(marker_uri):
            return None
        data = storage.read_json(marker_uri)
    except FetchError:
        return None
    return data if isinstance(data, dict) else None


def _same_fetch(marker: dict[str, Any] | None, identity: dict[str, Any]) -> bool:
    return bool(marker and marker.get("complete") and all(marker.get(k) == v for k, v in identity.items()))


@contextlib.contextmanager
def _lock(path: str) -> Iterator[None]:
    """One fetch per destination at a time (two ranks, two retried tasks); the second then finds it done."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _result(out_uri: str, marker: dict[str, Any], cached: bool) -> dict[str, Any]:
    result: dict[str, Any] = {"dataset_uri": out_uri, "files": marker.get("files", 0), "cached": cached}
    if marker.get("file"):
        result["file_uri"] = storage.join_uri(out_uri, marker["file"])
    return result


def _check_destination(out_uri: str, marker: dict[str, Any] | None) -> None:
    """Refuse to replace a folder this tool did not write: it may be someone's data."""
    if marker is not None:
        return
    if storage.is_local(out_uri):
        path = storage.local_path(out_uri)
        if os.path.isfile(path):
            raise FetchError(f"{out_uri}: the destination is a file, not a folder")
        if os.path.isdir(path) and os.listdir(path):
            raise FetchError(f"{out_uri}: the destination folder is not empty and was not written by synthval "
                             f"fetch; choose a new folder or empty it")
    elif storage.isdir(out_uri):
        raise FetchError(f"{out_uri}: objects already exist under the destination prefix and were not written "
                         f"by synthval fetch; choose a new prefix or delete them")


def _publish_local(staging: str, final: str) -> None:
    if os.path.isdir(final):
        retired = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.synthval-old-", dir=os.path.dirname(final))
        os.rename(final, os.path.join(retired, "data"))
        os.rename(staging, final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.rename(staging, final)


def _publish_remote(staging: str, out_uri: str, marker: dict[str, Any], existing: bool) -> None:
    marker_uri = storage.join_uri(out_uri, MARKER_NAME)
    if existing:
        storage.remove(out_uri, recursive=True)  # a stale or half upload of an earlier fetch
    # Object stores cannot rename a folder: the marker says "incomplete" until the last object is in.
    storage.write_json(marker_uri, {**marker, "complete": False})
    storage.copy_tree(staging, out_uri, exclude=(MARKER_NAME,))
    storage.write_json(marker_uri, marker)


# ---------------------------------------------------------------------------------------------
# the step


def run_fetch(source: str, out_uri: str, checksum: str | None = None, extract: bool = True,
              max_extract_bytes: int = 64 * 2**30, retries: int = 5, usim_token: str | None = None, *,
              retry_delay: float | None = None, max_extract_members: int = DEFAULT_MAX_MEMBERS,
              usim_api: str | None = None) -> dict[str, Any]:
    """Fetch `source` into the folder `out_uri`; return {"dataset_uri", "files", "cached"[, "file_uri"]}.

    `source` is an http(s):// URL, gs:// object or prefix, local path, usim://PROJECT/RUN or a name
    from NAMED_SOURCES (whose published checksum applies unless `checksum` is given). A single
    archive is extracted unless `extract` is False; a single other file keeps its name, and its
    URI comes back as "file_uri". A destination already holding this same fetch is left as it is.
    """
    if storage.scheme_of(source) == "generate":
        return _generate_source(source, out_uri)
    named = NAMED_SOURCES.get(source)
    url = resolve_source(source)
    if checksum is None and named:
        checksum = named.get("checksum")
    expected = Checksum.parse(checksum) if checksum else None
    scheme = storage.scheme_of(url)
    if scheme == "usim":
        _parse_usim(url)
        if expected:
            raise FetchError(f"{url}: --checksum applies to a single file, not a Unity Simulation run")
    elif scheme not in ("file", "http", "https", "gs", "gcs"):
        raise FetchError(f"{redact(url)}: unsupported source; expected http(s)://, gs://, usim://, a local "
                         f"path or one of {', '.join(sorted(NAMED_SOURCES))}")
    if scheme == "file":
        url = storage.local_path(url)
    out_uri = storage.local_path(out_uri) if storage.is_local(out_uri) else out_uri.rstrip("/")
    identity = _marker_identity(url, expected, extract)

    local_out = storage.is_local(out_uri)
    if local_out:
        parent, name = os.path.split(out_uri)
        work_root = os.path.join(parent, f".{name}.synthval-fetch")
    else:
        digest = hashlib.sha256(out_uri.encode()).hexdigest()[:16]
        work_root = os.path.join(tempfile.gettempdir(), f"synthval-fetch-{digest}")
    download_dir = os.path.join(work_root, "download")  # kept after a failure, so the next run resumes

    with _lock(work_root + ".lock"):
        marker = _read_marker(out_uri)
        if _same_fetch(marker, identity):
            log.info("%s already holds %s (%d files); nothing to fetch", out_uri, redact(url),
                     marker.get("files", 0))  # type: ignore[union-attr]
            return _result(out_uri, marker, cached=True)  # type: ignore[arg-type]
        _check_destination(out_uri, marker)
        os.makedirs(download_dir, exist_ok=True)
        staging = tempfile.mkdtemp(prefix="staging-", dir=work_root)
        try:
            single = _fetch_into(url, scheme, staging, download_dir, work_root, retries, retry_delay,
                                 usim_token, usim_api)
            kept_file = None
            if single is None and expected:
                raise FetchError(f"{redact(url)}: --checksum applies to a single file, not a folder or prefix")
            if single is not None:
                try:
                    if expected:
                        expected.verify(single, url)
                    if extract and archive_kind(os.path.basename(single)):
                        extract_archive(single, staging, max_bytes=max_extract_bytes,
                                        max_members=max_extract_members, label=redact(url))
                        os.unlink(single)
                except FetchError:
                    os.unlink(single)  # a wrong or hostile file is not kept for the next run to "resume"
                    raise
                if os.path.exists(single):
                    kept_file = os.path.basename(single)
                    os.replace(single, os.path.join(staging, kept_file))
            files = len(storage.relative_files(staging))
            new_marker = {**identity, "complete": True, "files": files, "file": kept_file,
                          "fetched_at": datetime.now(UTC).isoformat(timespec="seconds"),
                          "synthval_version": __version__}
            storage.write_json(os.path.join(staging, MARKER_NAME), new_marker)
            if local_out:
                _publish_local(staging, out_uri)
            else:
                _publish_remote(staging, out_uri, new_marker, existing=marker is not None)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.rmdir(download_dir)  # empty unless a partial download waits to be resumed
            with contextlib.suppress(OSError):
                os.rmdir(work_root)
        shutil.rmtree(work_root, ignore_errors=True)
    log.info("fetched %s into %s: %d files", redact(url), out_uri, files)
    return _result(out_uri, new_marker, cached=False)


GENERATE_PARAMS = {"num_images": int, "image_size": int, "seed": int, "format": str}


def _generate_source(source: str, out_uri: str) -> dict[str, Any]:
    """`generate://KIND?num_images=N&image_size=S&seed=K&format=F`: make procedural demo data.

    Lets every recipe's fetch step, and so its default params, work with no network (the embedded
    default and CI): the data are drawn by `synthval.generate`, NOT real images.
    """
    from synthval.generate import run_generate

    parts = urllib.parse.urlsplit(source)
    kind = parts.netloc
    options: dict[str, Any] = {}
    for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if key not in GENERATE_PARAMS:
            raise FetchError(f"{source}: unknown parameter {key!r}; accepted: {', '.join(GENERATE_PARAMS)}")
        try:
            options[key] = GENERATE_PARAMS[key](value)
        except ValueError as exc:
            raise FetchError(f"{source}: parameter {key}={value!r} is not a whole number") from exc
    if "num_images" not in options:
        raise FetchError(f"{source}: num_images is required, e.g. generate://synthetic?num_images=400")
    result = run_generate(kind=kind, out_uri=out_uri, num_images=options["num_images"],
                          image_size=options.get("image_size", 256), seed=options.get("seed", 0),
                          layout=options.get("format", "perception"))
    return {"dataset_uri": result["dataset_uri"], "files": result["num_images"], "cached": False}


def _fetch_into(url: str, scheme: str, staging: str, download_dir: str, work_root: str, retries: int,
                retry_delay: float | None, usim_token: str | None, usim_api: str | None) -> str | None:
    """Bring the source in: a whole tree straight into `staging` (None), or one file (its local path)."""
    if scheme in ("http", "https"):
        return _fetch_http(url, download_dir, retries, retry_delay)
    if scheme in ("gs", "gcs"):
        return _fetch_gcs(url, download_dir, staging)
    if scheme == "usim":
        _fetch_usim(url, usim_token, usim_api or USIM_API_BASE, staging, work_root, retries, retry_delay)
        return None
    return _fetch_local(url, download_dir, staging)


DATA_CACHE_ROOT = os.path.join(tempfile.gettempdir(), "synthval-data")


def local_dataset(uri: str) -> str:
    """A local path for a dataset URI; a remote one is fetched once into the shared local cache."""
    if storage.is_local(uri):
        return storage.local_path(uri)
    return materialize(uri, DATA_CACHE_ROOT)


def materialize(uri: str, cache_root: str, *, checksum: str | None = None, retries: int = 5,
                retry_delay: float | None = None) -> str:
    """Return a local path for a dataset or file URI, fetching a remote one once into `cache_root`.

    Local paths and file:// come back as they are. gs:// and http(s):// are fetched (archives
    extracted) into a subfolder of `cache_root` named after the URI's hash, and reused by later
    calls: the path of the single file for a file URI, of the folder for a prefix or an archive.
    Named sources (see NAMED_SOURCES) resolve to their URLs.
    """
    named = NAMED_SOURCES.get(uri) if not os.path.exists(uri) else None
    if named:
        uri, checksum = resolve_source(uri), checksum or named["checksum"]
    scheme = storage.scheme_of(uri)
    if scheme == "file":
        return storage.local_path(uri)
    if scheme not in ("gs", "gcs", "http", "https"):
        raise FetchError(f"{redact(uri)}: cannot be read directly; fetch it first (synthval fetch)")
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", _file_name(uri, "data"))[:64]
    dest = os.path.join(storage.local_path(cache_root), f"{digest}-{name}")
    result = run_fetch(uri, dest, checksum=checksum, retries=retries, retry_delay=retry_delay)
    return storage.local_path(result["file_uri"]) if "file_uri" in result else dest
