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
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from synthval.errors import FetchError

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
        if os.path.exists(final) and not os.path.isdir(final) and (not os.path.isfile(final) or _is_mount(final)):
            # A device or FIFO (--xcom-file /dev/null, a pipe): write through; renaming over it would
            # replace the device node with a plain file. The same for a file mounted on its own, such as
            # Kubernetes' /dev/termination-log: a rename over a mount point fails (EBUSY).
            yield final
            return
        folder = os.path.dirname(final) or "."
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(final)}.", suffix=".tmp", dir=folder)
        os.close(fd)
        try:
            yield tmp
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
