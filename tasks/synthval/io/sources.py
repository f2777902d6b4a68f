"""Bring a dataset or a model into a folder, once, whole, and verified: the machinery of `synthval fetch`,
and the local cache every step reads remote datasets and published models through.

Sources: http(s):// URLs (retried with exponential backoff, resumed with HTTP Range after a broken
transfer, see http.py), gs:// objects or prefixes (gcs.py), local paths, usim://PROJECT/RUN_EXECUTION
(a Unity Simulation run, by its manifest, see usim.py), and the named sources below. A single
.zip/.tar(.gz) is extracted safely (see archives.py) unless asked not to.

The destination is written atomically: everything is assembled in a temporary folder beside it and
renamed into place (on gs://, uploaded under a marker that says "incomplete" until the last object
is in). The folder then holds `.synthval-fetch.json`, naming the source and checksum; a later fetch
of the same source and checksum finds it and does nothing, a changed one fetches again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import tempfile
import urllib.parse
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from synthval import __version__
from synthval.errors import FetchError
from synthval.io import gcs, storage, usim
from synthval.io.archives import DEFAULT_MAX_MEMBERS, archive_kind, extract_archive
from synthval.io.http import CHUNK, download_http, redact

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


MARKER_NAME = ".synthval-fetch.json"


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


def _file_name(uri: str, fallback: str = "download") -> str:
    name = urllib.parse.unquote(storage.basename(uri))
    return name if name and name not in (".", "..") and "/" not in name and "\x00" not in name else fallback


def _fetch_http(url: str, download_dir: str, retries: int, retry_delay: float | None) -> str:
    dest = os.path.join(download_dir, _file_name(url))
    download_http(url, dest, retries=retries, retry_delay=retry_delay)
    return dest


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


def fetch_source(source: str, out_uri: str, checksum: str | None = None, extract: bool = True,
                 max_extract_bytes: int = 64 * 2**30, retries: int = 5, usim_token: str | None = None, *,
                 retry_delay: float | None = None, max_extract_members: int = DEFAULT_MAX_MEMBERS,
                 usim_api: str | None = None) -> dict[str, Any]:
    """Fetch `source` into the folder `out_uri`; return {"dataset_uri", "files", "cached"[, "file_uri"]}.

    `source` is an http(s):// URL, gs:// object or prefix, local path, usim://PROJECT/RUN or a name
    from NAMED_SOURCES (whose published checksum applies unless `checksum` is given). A single
    archive is extracted unless `extract` is False; a single other file keeps its name, and its
    URI comes back as "file_uri". A destination already holding this same fetch is left as it is.
    """
    named = NAMED_SOURCES.get(source)
    url = resolve_source(source)
    if checksum is None and named:
        checksum = named.get("checksum")
    expected = Checksum.parse(checksum) if checksum else None
    scheme = storage.scheme_of(url)
    if scheme == "usim":
        usim.parse_usim_uri(url)
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


def _fetch_into(url: str, scheme: str, staging: str, download_dir: str, work_root: str, retries: int,
                retry_delay: float | None, usim_token: str | None, usim_api: str | None) -> str | None:
    """Bring the source in: a whole tree straight into `staging` (None), or one file (its local path)."""
    if scheme in ("http", "https"):
        return _fetch_http(url, download_dir, retries, retry_delay)
    if scheme in ("gs", "gcs"):
        return gcs.fetch_gcs(url, os.path.join(download_dir, _file_name(url, "object")), staging)
    if scheme == "usim":
        usim.fetch_run(url, usim_token, usim_api or usim.USIM_API_BASE, staging, work_root, retries, retry_delay)
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
    result = fetch_source(uri, dest, checksum=checksum, retries=retries, retry_delay=retry_delay)
    return storage.local_path(result["file_uri"]) if "file_uri" in result else dest

