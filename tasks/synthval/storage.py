"""Every read and write by URI, through fsspec: local paths, file://, gs:// and http(s)://.

Writes are atomic: a local file is written under a temporary name in its own folder and renamed; a
remote object is written to a local temporary file and put as one object, so a reader never sees
half a checkpoint or half a metrics file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from synthval.errors import FetchError

REMOTE_SCHEMES = ("gs", "gcs", "http", "https")


def scheme_of(uri: str) -> str:
    """Return the URI's scheme, "file" for plain paths."""
    if "://" not in uri:
        return "file"
    return uri.split("://", 1)[0].lower()


def is_local(uri: str) -> bool:
    return scheme_of(uri) == "file"


def local_path(uri: str) -> str:
    """Return the filesystem path of a local URI (plain path or file://)."""
    if not is_local(uri):
        raise ValueError(f"not a local URI: {uri}")
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return os.path.abspath(os.path.expanduser(path))


def join_uri(base: str, *parts: str) -> str:
    """Join path parts onto a URI with "/" (local paths keep their own separator rules)."""
    if is_local(base):
        return os.path.join(local_path(base), *parts)
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the fsspec filesystem and the path inside it for a URI."""
    if is_local(uri):
        return fsspec.filesystem("file"), local_path(uri)
    try:
        return url_to_fs(uri)
    except (ImportError, ValueError) as exc:
        raise FetchError(f"{uri}: unsupported URI ({exc})") from exc


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    """Read a whole object; a missing or unreachable one raises FetchError naming it."""
    fs, path = filesystem(uri)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as exc:
        raise FetchError(f"{uri}: no such file or object") from exc
    except OSError as exc:
        raise FetchError(f"{uri}: cannot be read ({exc})") from exc


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str) -> Any:
    """Parse a JSON document; malformed JSON raises FetchError with the position."""
    try:
        return json.loads(read_bytes(uri))
    except json.JSONDecodeError as exc:
        raise FetchError(f"{uri}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    if is_local(uri):
        os.makedirs(path, exist_ok=True)
    else:
        fs.makedirs(path, exist_ok=True)


@contextlib.contextmanager
def atomic_output(uri: str) -> Iterator[str]:
    """Yield a local path to write; on clean exit it becomes `uri` whole, on error nothing appears."""
    if is_local(uri):
        final = local_path(uri)
        folder = os.path.dirname(final) or "."
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(final)}.", suffix=".tmp", dir=folder)
        os.close(fd)
        try:
            yield tmp
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    fs, path = filesystem(uri)
    with tempfile.TemporaryDirectory(prefix="synthval-put-") as tmpdir:
        tmp = os.path.join(tmpdir, "object")
        yield tmp
        fs.put_file(tmp, path)


def write_bytes(uri: str, data: bytes) -> None:
    with atomic_output(uri) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True) + "\n")
