"""Every read and write by URI, through fsspec: local paths, file://, gs:// and http(s)://.

Writes are atomic: a local file is written under a temporary name in its own folder and renamed; a
remote object is written to a local temporary file and put as one object, so a reader never sees
half a checkpoint or half a metrics file.

gs:// goes through gcsfs's JSON-API filesystem (`gcsfs.core.GCSFileSystem`), not the gRPC-backed
class gcsfs registers by default: that one asks the Storage Control API for every bucket's layout
(zonal or hierarchical buckets), which the storage emulator cannot answer and which retries for a
minute wherever gRPC egress is blocked. Standard buckets need nothing more than the JSON API.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import fsspec
import numpy as np
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from synthval.errors import FetchError, OutputError, SynthvalError

_UMASK = os.umask(0)
os.umask(_UMASK)

REMOTE_SCHEMES = ("gs", "gcs", "http", "https")
GCS_SCHEMES = ("gs", "gcs")
HTTP_SCHEMES = ("http", "https")

# Extra keyword arguments for gcsfs (project, token, endpoint_url, ...); empty means gcsfs's own
# defaults: Application Default Credentials, i.e. Workload Identity on GKE.
GCS_OPTIONS: dict[str, Any] = {}
# gcsfs itself sends every request to this endpoint when the variable is set (the storage emulator);
# the emulator accepts no real credentials, so its presence also means anonymous access.
EMULATOR_ENV = "STORAGE_EMULATOR_HOST"


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


def basename(uri: str) -> str:
    """Last path component of a URI, without query or fragment ("" for a bucket or site root)."""
    if is_local(uri):
        return os.path.basename(local_path(uri).rstrip(os.sep))
    rest = uri.split("://", 1)[1].split("?", 1)[0].split("#", 1)[0]
    parts = rest.rstrip("/").split("/")
    return parts[-1] if len(parts) > 1 else ""


def gcs_options() -> dict[str, Any]:
    """Keyword arguments for gcsfs: anonymous against the emulator, then GCS_OPTIONS on top."""
    options: dict[str, Any] = {}
    if os.environ.get(EMULATOR_ENV, "") not in ("", "default"):
        options["token"] = "anon"
    options.update(GCS_OPTIONS)
    return options


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the fsspec filesystem and the path inside it for a URI."""
    scheme = scheme_of(uri)
    if scheme == "file":
        return fsspec.filesystem("file"), local_path(uri)
    if scheme in GCS_SCHEMES:
        from gcsfs.core import GCSFileSystem

        fs = GCSFileSystem(**gcs_options())
        return fs, fs._strip_protocol(uri)
    try:
        return url_to_fs(uri)
    except (ImportError, ValueError) as exc:
        raise FetchError(f"{uri}: unsupported URI ({exc})") from exc


def _uri_of(fs: fsspec.AbstractFileSystem, path: str, like: str) -> str:
    """Turn a path fsspec returned back into a URI of the same scheme as `like`."""
    scheme = scheme_of(like)
    if scheme == "file":
        return path
    if scheme in GCS_SCHEMES:
        return f"{scheme}://{path}"
    return path


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    if not is_local(uri):
        fs.invalidate_cache(path)  # another process may have written it since this one last looked
    return fs.exists(path)


def isdir(uri: str) -> bool:
    """True for a local folder or a remote prefix holding at least one object."""
    fs, path = filesystem(uri)
    if not is_local(uri):
        fs.invalidate_cache(path)
    return fs.isdir(path)


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
    """Read a whole UTF-8 text; other bytes raise FetchError naming the file and the byte."""
    data = read_bytes(uri)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FetchError(f"{uri}: not UTF-8 text at byte {exc.start} ({data[exc.start:exc.start + 4]!r})") from exc


def read_json(uri: str) -> Any:
    """Parse a JSON document; anything `decode_json` refuses raises FetchError naming the file."""
    return decode_json(read_bytes(uri), uri)


# Unity's COCO export writes 128-bit image ids (39 digits), so integers may be long; one of a hundred
# digits is no id or coordinate, and refusing it at parse time keeps Python from printing (or failing to
# print: 4,300 digits is its limit) such a number in an error.
MAX_JSON_INT_DIGITS = 100


class _Refused(ValueError):
    """A value the JSON parser hooks refuse: its text, and why."""

    def __init__(self, text: str, why: str) -> None:
        super().__init__(why)
        self.text, self.why = text, why


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(text, "is out of range for a 64-bit float")
    return value


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_JSON_INT_DIGITS:
        raise _Refused(text, f"is out of range (more than {MAX_JSON_INT_DIGITS} digits)")
    return int(text)


def _parse_constant(text: str) -> Any:
    raise _Refused(text, "is not a JSON number (JSON has no NaN or Infinity; write a finite number)")


def decode_json(data: bytes, where: str, error: type[SynthvalError] = FetchError, *,
                check_numbers: bool = True) -> Any:
    """Parse JSON bytes (UTF-8, or UTF-16/32 with its BOM) strictly; `error` names `where` on anything else.

    Refused with the line and column: malformed JSON, text that is not UTF-8, NaN and Infinity (not
    JSON, though Python reads them), floats that overflow to infinity (1e400), integers of more than 100
    digits (10**400), and nesting deeper than Python's parser can follow (10,000 levels).
    `check_numbers=False` leaves NaN, infinities and long integers to a caller that checks its numbers
    column by column (a results file of half a million detections parses ~2x faster without the hooks).
    """
    hooks = dict(parse_float=_parse_float, parse_int=_parse_int, parse_constant=_parse_constant) if check_numbers else {}
    try:
        return json.loads(data, **hooks)
    except json.JSONDecodeError as exc:
        raise error(f"{where}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise error(f"{where}: not UTF-8 text at byte {exc.start} ({data[exc.start:exc.start + 4]!r}); "
                    "expected a JSON file") from None
    except _Refused as exc:
        shown = exc.text if len(exc.text) <= 24 else f"{exc.text[:20]}... ({len(exc.text)} characters)"
        raise error(f"{where}: {_position(data, exc.text)}number {shown} {exc.why}") from None
    except RecursionError:
        raise error(f"{where}: JSON nested deeper than {sys.getrecursionlimit()} levels "
                    f"({_deep_position(data)}); not a dataset, predictions or metrics file") from None
    except ValueError as exc:  # unchecked numbers: an integer of more digits than Python converts
        raise error(f"{where}: unreadable JSON ({exc})") from None


def _position(data: bytes, text: str) -> str:
    """"line L column C, field 'k': " of the first place `text` stands as a value in the JSON `data`
    (best effort: the field is the last key written before it)."""
    found = re.search(rb"(?<![\w.\"])" + re.escape(text.encode()) + rb"(?![\w.\"])", data)
    if not found:
        return ""
    line = data.count(b"\n", 0, found.start()) + 1
    column = found.start() - (data.rfind(b"\n", 0, found.start()) + 1) + 1
    keys = re.findall(rb'"([^"\\]{1,64})"\s*:', data[max(0, found.start() - 400):found.start()])
    field = f", field {keys[-1].decode(errors='replace')!r}" if keys else ""
    return f"line {line} column {column}{field}: "


def _deep_position(data: bytes, limit: int = 1000) -> str:
    """Where the nesting of `data` first passes `limit` levels, outside strings."""
    depth, in_string, escaped, line, column = 0, False, False, 1, 0
    for byte in data:
        column += 1
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return f"level {limit + 1} at line {line} column {column}"
        elif byte in (0x5D, 0x7D):
            depth -= 1
        if byte == 0x0A:
            line, column = line + 1, 0
    return f"at most {depth} open levels at the end"


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    if is_local(uri):
        with _output_errors(uri):
            os.makedirs(path, exist_ok=True)
    else:
        fs.makedirs(path, exist_ok=True)


# What a write can fail with because of where it goes, not what is written (a read error elsewhere in
# the same block is not the output's fault, and stays what it is).
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM,
                           errno.EISDIR, errno.ENOTDIR})


@contextlib.contextmanager
def _output_errors(uri: str, *, only_write_errnos: bool = False) -> Iterator[None]:
    """Turn an OSError writing `uri` into OutputError (exit code 2) naming it."""
    try:
        yield
    except OSError as exc:
        if only_write_errnos and exc.errno not in _WRITE_ERRNOS:
            raise
        raise OutputError(f"{uri}: cannot be written ({exc.strerror or exc})") from exc


def check_output(uri: str, *, folder: bool, what: str = "") -> None:
    """Before a step starts: can `uri` (a folder, or a file if not `folder`) be written? OutputError if not.

    Local only (a bucket's permissions show on the first write). An existing output of the wrong kind
    (a file where a folder goes, or the reverse) is refused; otherwise a probe file is created and
    removed in the output folder, or in its nearest existing ancestor: a read-only or full disk, or a
    file in the way, shows here rather than after hours of training. An output written in place (a
    device, a FIFO, a file mounted on its own: `_written_in_place`) is not probed: writing to it is not
    free, and its folder (/dev for Kubernetes' termination log) need not be writable.
    """
    if not is_local(uri):
        return
    label = f"{uri} ({what})" if what else uri
    path = local_path(uri)
    if os.path.exists(path):
        if folder and not os.path.isdir(path):
            raise OutputError(f"{label}: is a file, not a folder; remove it or choose another folder")
        if not folder and os.path.isdir(path):
            raise OutputError(f"{label}: is a folder, not a file")
        if not folder and _written_in_place(path):
            if not os.access(path, os.W_OK):
                raise OutputError(f"{label}: cannot be written (permission denied)")
            return
    probe_in = path if folder and os.path.isdir(path) else os.path.dirname(path)
    while not os.path.exists(probe_in):
        probe_in = os.path.dirname(probe_in)
    if not os.path.isdir(probe_in):
        raise OutputError(f"{label}: {probe_in} is a file, so no folder can be created below it")
    try:
        fd, probe = tempfile.mkstemp(prefix=".synthval-probe-", dir=probe_in)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{label}: cannot write in {probe_in} ({exc.strerror or exc})") from exc


@contextlib.contextmanager
def atomic_output(uri: str) -> Iterator[str]:
    """Yield a local path to write; on clean exit it becomes `uri` whole, on error nothing appears.

    A write that fails because of where it goes (no space, read-only, a file in the way) raises
    OutputError naming `uri`.
    """
    if is_local(uri):
        final = local_path(uri)
        if _written_in_place(final):
            with _output_errors(uri, only_write_errnos=True):
                yield final
            return
        folder = os.path.dirname(final) or "."
        with _output_errors(uri):
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(final)}.", suffix=".tmp", dir=folder)
            os.close(fd)
        try:
            with _output_errors(uri, only_write_errnos=True):
                yield tmp
            with _output_errors(uri):
                # mkstemp makes the file 0600; give it the mode a plain open() would (0666 less the umask).
                os.chmod(tmp, 0o666 & ~_UMASK)
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


def _written_in_place(path: str) -> bool:
    """Whether a local output is written through rather than renamed into place: a device or FIFO
    (--xcom-file /dev/null, a pipe), where a rename would replace the node with a plain file, or a file
    mounted on its own, such as Kubernetes' /dev/termination-log, where a rename fails (EBUSY)."""
    return os.path.exists(path) and not os.path.isdir(path) and (not os.path.isfile(path) or _is_mount(path))


def _is_mount(path: str) -> bool:
    """Whether `path` is a mount point (Linux's mount table; False where there is none)."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            points = {line.split()[4] for line in f if len(line.split()) > 4}
    except OSError:
        return False
    # mountinfo escapes space, tab, newline and backslash in octal
    escaped = os.path.realpath(path).translate({32: "\\040", 9: "\\011", 10: "\\012", 92: "\\134"})
    return escaped in points


def write_bytes(uri: str, data: bytes) -> None:
    with atomic_output(uri) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def json_safe(obj: Any) -> Any:
    """`obj` as strict JSON can hold it: NaN and infinities become None, numpy scalars plain numbers, keys
    strings (JSON has no NaN, and browsers' JSON.parse rejects Python's NaN spelling)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    return obj


def absolute_uri(uri: str) -> str:
    """A local path made absolute (so a record does not hang on a working directory); other URIs as they are."""
    return local_path(uri) if is_local(uri) else uri


def list_files(uri: str, recursive: bool = True) -> list[str]:
    """Return the sorted URIs of the files under a folder or prefix (a single file lists itself).

    Folders themselves are not listed. A missing folder raises FetchError naming it.
    """
    fs, path = filesystem(uri)
    if scheme_of(uri) in HTTP_SCHEMES:
        raise FetchError(f"{uri}: http(s) locations cannot be listed")
    if is_local(uri):
        if os.path.isfile(path):
            return [path]
        if not os.path.isdir(path):
            raise FetchError(f"{uri}: no such folder")
        found = []
        for folder, dirs, files in os.walk(path):
            found.extend(os.path.join(folder, name) for name in files)
            if not recursive:
                dirs.clear()
        return sorted(found)
    fs.invalidate_cache(path)
    try:
        info = fs.info(path)
    except FileNotFoundError as exc:
        raise FetchError(f"{uri}: no such object or prefix") from exc
    if info["type"] != "directory":
        return [_uri_of(fs, path, uri)]
    entries = fs.find(path, maxdepth=None if recursive else 1, withdirs=False)
    return sorted(_uri_of(fs, p, uri) for p in entries if not p.endswith("/"))


def relative_files(uri: str) -> list[str]:
    """Return the "/"-separated paths of every file under a folder or prefix, relative to it."""
    base = local_path(uri) if is_local(uri) else uri.rstrip("/")
    out = []
    for file_uri in list_files(uri, recursive=True):
        if is_local(uri):
            out.append(os.path.relpath(file_uri, base).replace(os.sep, "/"))
        else:
            out.append(file_uri[len(base):].lstrip("/"))
    return out


def copy_tree(src_uri: str, dst_uri: str, exclude: tuple[str, ...] = ()) -> int:
    """Copy every file under `src_uri` to the same relative path under `dst_uri`; return the count.

    Works between any two of local, file:// and gs:// (remote to remote of the same kind copies
    inside the store). Each file is copied whole; `exclude` names relative paths to leave out.
    Remote transfers go as one batched call, which gcsfs runs concurrently and retries.
    """
    rels = [r for r in relative_files(src_uri) if r not in exclude]
    if not rels:
        return 0
    src_fs, src_root = filesystem(src_uri)
    dst_fs, dst_root = filesystem(dst_uri)
    sources = [_join_path(src_fs, src_root, r) for r in rels]
    targets = [_join_path(dst_fs, dst_root, r) for r in rels]
    if is_local(dst_uri):
        for target in targets:
            os.makedirs(os.path.dirname(target), exist_ok=True)
    if is_local(src_uri) and is_local(dst_uri):
        for source, target in zip(sources, targets, strict=True):
            shutil.copyfile(source, target)
    elif is_local(src_uri):
        dst_fs.put(sources, targets)
    elif is_local(dst_uri):
        src_fs.get(sources, targets)
    elif type(src_fs) is type(dst_fs):
        src_fs.copy(sources, targets)
    else:
        with tempfile.TemporaryDirectory(prefix="synthval-copy-") as tmp:
            copy_tree(src_uri, tmp, exclude)
            copy_tree(tmp, dst_uri)
    if not is_local(dst_uri):
        dst_fs.invalidate_cache(dst_root)
    return len(rels)


def _join_path(fs: fsspec.AbstractFileSystem, root: str, rel: str) -> str:
    if isinstance(fs, LocalFileSystem):
        return os.path.join(root, *rel.split("/"))
    return f"{root.rstrip('/')}/{rel}"


def remove(uri: str, recursive: bool = False) -> None:
    """Delete a file, or with `recursive` a whole folder or prefix; a missing one is no error."""
    fs, path = filesystem(uri)
    if is_local(uri):
        if os.path.isdir(path) and not os.path.islink(path):
            if recursive:
                shutil.rmtree(path)
            else:
                os.rmdir(path)
        elif os.path.lexists(path):
            os.unlink(path)
        return
    fs.invalidate_cache(path)
    try:
        fs.rm(path, recursive=recursive)
    except FileNotFoundError:
        pass
    fs.invalidate_cache(path)


def write_html(uri: str, text: str) -> None:
    """Write an HTML page atomically; on GCS with Content-Type text/html so a browser renders it."""
    write_published(uri, text.encode("utf-8"), "text/html; charset=utf-8")


def write_published(uri: str, data: bytes, content_type: str) -> None:
    """Write bytes atomically; remote objects get `content_type` (gcsfs' default would be a download)."""
    if is_local(uri):
        write_bytes(uri, data)
        return
    fs, path = filesystem(uri)
    with tempfile.TemporaryDirectory(prefix="synthval-put-") as tmpdir:
        tmp = os.path.join(tmpdir, "object")
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            fs.put_file(tmp, path, content_type=content_type)
        except TypeError:  # a filesystem without content types (memory, ...)
            fs.put_file(tmp, path)

