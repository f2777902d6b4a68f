"""Safe extraction of .zip and .tar(.gz|.bz2|.xz) archives that someone else made.

A tar is extracted by the standard library itself, through its "data" extraction filter
(`tarfile.data_filter`, PEP 706), behind a filter of our own that adds what tarfile does not: the
member and size budgets, duplicate paths, and errors that name the archive and the member. A zip,
for which the standard library has no such filter, is written by `_Writer` under the same rules.

Every member is checked before anything is written: no absolute paths, no `..`, no device files,
FIFOs or sockets, links only to places inside the destination, no path twice (which copy would be
meant?). Sizes are checked twice: the sizes the archive declares (all of them up front for zip,
member by member for a tar stream) and the bytes actually written, so an archive that lies about its
sizes, or is cut short inside a member, is stopped as well. An archive must also be whole: a tar ends
with its end-of-archive block (a tar cut at a member boundary reads as a smaller valid archive
otherwise), a zip with its central directory. The number of members and the bytes extracted have
limits (`max_members`, `max_bytes`; `synthval fetch --max-extract-members / --max-extract-bytes`).
Any refusal raises FetchError naming the archive and the member; the caller extracts into a
temporary folder and throws it away, so nothing half-extracted is ever left where a dataset is expected.
"""

from __future__ import annotations

import bz2
import gzip
import logging
import lzma
import os
import re
import stat
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from synthval.errors import FetchError

log = logging.getLogger(__name__)

# Recognised by name only: a torch checkpoint is itself a zip file, and must stay one file.
ZIP_SUFFIXES = (".zip",)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
# A SynthDet run of 400,000 frames is some 800,000 files (RGB and segmentation); more than a million
# members in one archive is an archive bomb until someone says otherwise (--max-extract-members).
DEFAULT_MAX_MEMBERS = 1_000_000
CHUNK = 1 << 20
PROGRESS_INTERVAL_S = 10.0
_MAX_LINK_TARGET = 4096
_DRIVE = re.compile(r"^[A-Za-z]:")


def archive_kind(name: str) -> str | None:
    """Return "zip" or "tar" for an archive file name (URL query ignored), else None."""
    lower = name.split("?", 1)[0].lower()
    if lower.endswith(ZIP_SUFFIXES):
        return "zip"
    if lower.endswith(TAR_SUFFIXES):
        return "tar"
    return None


def safe_member_path(name: str, where: str) -> str | None:
    """Return a member name as a clean relative "/" path, None for the root entry ("./").

    Refuses (FetchError naming `where` and the member) absolute paths, Windows drive paths, NUL
    bytes and any `..` component. Backslashes count as separators, as archivers on Windows write them.
    """
    if "\x00" in name:
        raise FetchError(f"{where}: member {name!r} has a NUL byte in its name; refusing the archive")
    unified = name.replace("\\", "/")
    if unified.startswith("/") or _DRIVE.match(unified):
        raise FetchError(f"{where}: member {name!r} has an absolute path; refusing the archive")
    parts = [p for p in unified.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise FetchError(f"{where}: member {name!r} escapes the destination with '..'; refusing the archive")
    return "/".join(parts) if parts else None


@dataclass
class ExtractStats:
    files: int = 0
    bytes: int = 0


@dataclass
class _Member:
    name: str
    kind: str  # "file", "dir", "symlink", "special"
    size: int
    mode: int
    link: str = ""


class _Writer:
    """Writes checked members under `root`, never following a link out of it."""

    def __init__(self, root: str, label: str, max_bytes: int, max_members: int) -> None:
        self.root = os.path.realpath(root)
        self.label = label
        self.max_bytes = max_bytes
        self.max_members = max_members
        self.members = 0
        self.declared = 0
        self.stats = ExtractStats()
        self.paths: dict[str, int] = {}  # member path -> its number, for files and links
        self._last_log = time.monotonic()

    # --- limits -------------------------------------------------------------------------------
    def count_member(self, name: str) -> None:
        self.members += 1
        if self.members > self.max_members:
            raise FetchError(f"{self.label}: member {name!r} is number {self.members}, over the limit of "
                             f"{self.max_members} members; refusing the archive (possible archive bomb; raise "
                             f"--max-extract-members if it is genuine)")

    def claim(self, rel: str, name: str) -> None:
        """A file or link path may appear once: with two, which copy is the dataset's is anyone's guess."""
        first = self.paths.setdefault(rel, self.members)
        if first != self.members:
            raise FetchError(f"{self.label}: member {name!r} (number {self.members}) has the same path as member "
                             f"number {first}; refusing the archive (duplicate members)")

    def declare(self, name: str, size: int) -> None:
        self.declared += size
        if self.declared > self.max_bytes:
            raise FetchError(f"{self.label}: member {name!r} brings the declared uncompressed size to "
                             f"{self.declared} bytes, over the limit of {self.max_bytes}; refusing the archive "
                             f"(possible archive bomb; raise --max-extract-bytes if it is genuine)")

    def _add_bytes(self, name: str, n: int) -> None:
        self.stats.bytes += n
        if self.stats.bytes > self.max_bytes:
            raise FetchError(f"{self.label}: member {name!r} expands past the limit of {self.max_bytes} "
                             f"bytes while extracting; refusing the archive (possible archive bomb)")

    # --- paths --------------------------------------------------------------------------------
    def _inside(self, real: str) -> bool:
        return real == self.root or real.startswith(self.root + os.sep)

    def _parent(self, rel: str, name: str) -> str:
        """Create the member's parent folders one by one, refusing to pass through a link that leads out."""
        current = self.root
        for part in rel.split("/")[:-1]:
            current = os.path.join(current, part)
            if os.path.islink(current):
                if not self._inside(os.path.realpath(current)):
                    raise FetchError(f"{self.label}: member {name!r} would be written through a link that "
                                     f"leads outside the destination; refusing the archive")
                current = os.path.realpath(current)
                if not os.path.isdir(current):
                    raise FetchError(f"{self.label}: member {name!r} needs {part!r} to be a folder")
            elif os.path.isdir(current):
                continue
            elif os.path.lexists(current):
                raise FetchError(f"{self.label}: member {name!r} needs {part!r} to be a folder, "
                                 f"but a file of that name came first")
            else:
                os.mkdir(current)
        return current

    def _vacant(self, path: str, name: str) -> None:
        """Nothing may stand where a member goes: another path spelled so (a case-insensitive filesystem)
        would be a duplicate `claim` cannot see."""
        if os.path.lexists(path):
            raise FetchError(f"{self.label}: member {name!r} lands on a path an earlier member already took; "
                             f"refusing the archive (duplicate members)")

    def check_vacant(self, rel: str, name: str, folder: bool) -> None:
        """Where a tar member goes: its parent folders may not pass through a link leading out, and a file
        or link may not land on anything already there (nor a folder on a link)."""
        path = os.path.join(self._parent(rel, name), rel.rsplit("/", 1)[-1])
        if folder and os.path.islink(path):
            raise FetchError(f"{self.label}: member {name!r} is a folder where the archive made a link")
        if not folder:
            self._vacant(path, name)

    # --- members ------------------------------------------------------------------------------
    def mkdir(self, rel: str, name: str) -> None:
        parent = self._parent(rel, name)
        path = os.path.join(parent, rel.rsplit("/", 1)[-1])
        if os.path.islink(path):
            raise FetchError(f"{self.label}: member {name!r} is a folder where the archive made a link")
        os.makedirs(path, exist_ok=True)

    def write(self, rel: str, name: str, source: BinaryIO, declared: int, mode: int) -> None:
        parent = self._parent(rel, name)
        path = os.path.join(parent, rel.rsplit("/", 1)[-1])
        self._vacant(path, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        written = 0
        with os.fdopen(fd, "wb") as out:
            while True:
                chunk = source.read(CHUNK)
                if not chunk:
                    break
                written += len(chunk)
                if written > declared:
                    raise FetchError(f"{self.label}: member {name!r} holds more than the {declared} bytes it "
                                     f"declares; refusing the archive")
                self._add_bytes(name, len(chunk))
                out.write(chunk)
                self.progress()
        if written < declared:
            raise FetchError(f"{self.label}: member {name!r} holds {written} of the {declared} bytes it declares "
                             f"(the archive is cut short); refusing the archive")
        if mode & 0o111:
            os.chmod(path, 0o755)  # keep scripts runnable; never setuid, never group/world-writable
        self.stats.files += 1

    def symlink(self, rel: str, name: str, target: str) -> None:
        self.check_symlink(rel, name, target)
        path = os.path.join(self._parent(rel, name), rel.rsplit("/", 1)[-1])
        self._vacant(path, name)
        os.symlink(target, path)
        self.stats.files += 1

    def check_symlink(self, rel: str, name: str, target: str) -> None:
        """A link may lead only to a place inside the destination, as the path reads and as it resolves now."""
        if not target or "\x00" in target or target.startswith("/") or _DRIVE.match(target):
            raise FetchError(f"{self.label}: member {name!r} is a link to {target!r}, outside the destination; "
                             f"refusing the archive")
        parent_rel = rel.rsplit("/", 1)[0] if "/" in rel else ""
        lexical = os.path.normpath(os.path.join(parent_rel, target))
        if lexical == ".." or lexical.startswith("../"):
            raise FetchError(f"{self.label}: member {name!r} is a link to {target!r}, outside the destination; "
                             f"refusing the archive")
        parent = self._parent(rel, name)
        if not self._inside(os.path.realpath(os.path.join(parent, target))):
            raise FetchError(f"{self.label}: member {name!r} is a link to {target!r}, outside the destination; "
                             f"refusing the archive")

    def check_hardlink(self, name: str, target_name: str) -> None:
        """A tar hard link must name a regular file extracted before it, inside the destination."""
        try:
            target_rel = safe_member_path(target_name, self.label)
        except FetchError:
            target_rel = None
        source = os.path.join(self.root, *(target_rel or "").split("/"))
        if (target_rel is None or os.path.islink(source) or not os.path.isfile(source)
                or not self._inside(os.path.realpath(source))):
            raise FetchError(f"{self.label}: member {name!r} is a hard link to {target_name!r}, which is not a "
                             f"file extracted before it inside the destination; refusing the archive")

    def check_links(self) -> None:
        """Links are checked as they are made; a later link can still re-route an earlier one, so look again."""
        for folder, dirs, files in os.walk(self.root):
            for entry in dirs + files:
                path = os.path.join(folder, entry)
                if os.path.islink(path) and not self._inside(os.path.realpath(path)):
                    rel = os.path.relpath(path, self.root)
                    raise FetchError(f"{self.label}: member {rel!r} ends up as a link leading outside the "
                                     f"destination; refusing the archive")

    def progress(self) -> None:
        now = time.monotonic()
        if now - self._last_log >= PROGRESS_INTERVAL_S:
            self._last_log = now
            log.info("extracting %s: %d files, %.1f MiB so far", self.label, self.stats.files,
                     self.stats.bytes / 2**20)


def _zip_members(zf: zipfile.ZipFile) -> Iterator[tuple[_Member, zipfile.ZipInfo]]:
    for info in zf.infolist():
        mode = info.external_attr >> 16
        ftype = stat.S_IFMT(mode)
        if info.is_dir():
            kind = "dir"
        elif ftype == stat.S_IFLNK:
            kind = "symlink"
        elif ftype in (0, stat.S_IFREG):
            kind = "file"
        else:
            kind = "special"
        yield _Member(info.filename, kind, info.file_size, mode), info


def _extract_zip(path: str, writer: _Writer) -> None:
    with zipfile.ZipFile(path) as zf:
        members = list(_zip_members(zf))
        # The central directory lists everything: check all names and declared sizes before writing.
        for member, _ in members:
            writer.count_member(member.name)
            if member.kind == "special":
                raise FetchError(f"{writer.label}: member {member.name!r} is a device file, FIFO or socket; "
                                 f"refusing the archive")
            rel = safe_member_path(member.name, writer.label)
            if rel is not None and member.kind != "dir":
                writer.claim(rel, member.name)
            writer.declare(member.name, member.size)
        for member, info in members:
            rel = safe_member_path(member.name, writer.label)
            if rel is None:
                continue
            if member.kind == "dir":
                writer.mkdir(rel, member.name)
            elif member.kind == "symlink":
                if member.size > _MAX_LINK_TARGET:
                    raise FetchError(f"{writer.label}: member {member.name!r} is a link with an oversized target")
                target = zf.read(info).decode("utf-8", "surrogateescape")
                writer.symlink(rel, member.name, target)
            else:
                with zf.open(info) as src:
                    writer.write(rel, member.name, src, member.size, member.mode)


class _TarStream:
    """The uncompressed tar stream, remembering the last block read: tarfile stops at the end-of-archive
    block and at a plain end of file alike, and only this tells them apart."""

    def __init__(self, path: str) -> None:
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic[:2] == b"\x1f\x8b":
            self.raw = gzip.open(path, "rb")
        elif magic[:3] == b"BZh":
            self.raw = bz2.open(path, "rb")
        elif magic == b"\xfd7zXZ\x00":
            self.raw = lzma.open(path, "rb")
        else:
            self.raw = open(path, "rb")  # noqa: SIM115 - closed by close()
        self.last = b""

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        if size == tarfile.BLOCKSIZE:  # a header, or the end-of-archive block
            self.last = data
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def close(self) -> None:
        self.raw.close()

    @property
    def ended_properly(self) -> bool:
        return self.last == tarfile.NUL * tarfile.BLOCKSIZE


def _extract_tar(path: str, writer: _Writer) -> None:
    # A tar stream has no index: names and declared sizes are checked member by member, before
    # each member is written, so a compressed tar is read once rather than twice.
    stream = _TarStream(path)
    last = None
    checked = _tar_filter(writer)
    try:
        with tarfile.open(fileobj=stream, mode="r:") as tf:  # type: ignore[arg-type]
            while (info := tf.next()) is not None:
                last = info.name
                tf.members.clear()  # read once as a stream: do not keep every header of a huge archive
                try:
                    tf.extract(info, writer.root, filter=checked)
                except (tarfile.TarError, EOFError, zlib.error) as exc:
                    raise FetchError(f"{writer.label}: member {info.name!r} (number {writer.members}) is cut "
                                     f"short or corrupt ({exc}); refusing the archive") from exc
                if not info.isdir() and safe_member_path(info.name, writer.label) is not None:
                    writer.stats.files += 1
                    writer.stats.bytes += info.size if info.isreg() else 0
                    writer.progress()
    finally:
        stream.close()
    if not stream.ended_properly:
        after = f"after member {last!r} (number {writer.members})" if last else "before its first member"
        raise FetchError(f"{writer.label}: the tar stream ends {after} without tar's end-of-archive block: "
                         f"the archive is cut short; refusing it")


def _tar_filter(writer: _Writer) -> Callable[[tarfile.TarInfo, str], tarfile.TarInfo | None]:
    """tarfile's "data" filter behind our own checks and budgets; None (skip) for the root entry "./"."""

    def check(info: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
        writer.count_member(info.name)
        if not (info.isdir() or info.isreg() or info.issym() or info.islnk()):
            raise FetchError(f"{writer.label}: member {info.name!r} is a device file, FIFO or socket; "
                             f"refusing the archive")
        rel = safe_member_path(info.name, writer.label)
        if info.isreg():
            writer.declare(info.name, info.size)
        if rel is None:
            return None
        if not info.isdir():
            writer.claim(rel, info.name)
        writer.check_vacant(rel, info.name, folder=info.isdir())
        if info.issym():
            writer.check_symlink(rel, info.name, info.linkname)
        elif info.islnk():
            writer.check_hardlink(info.name, info.linkname)
        try:
            return tarfile.data_filter(info, dest)
        except tarfile.FilterError as exc:
            raise FetchError(f"{writer.label}: member {info.name!r} is refused by tarfile's data filter "
                             f"({exc}); refusing the archive") from exc

    return check


def extract_archive(archive_path: str, dest_dir: str, *, max_bytes: int,
                    max_members: int = DEFAULT_MAX_MEMBERS, label: str | None = None) -> ExtractStats:
    """Extract a zip or tar archive into the existing folder `dest_dir`; return files and bytes written.

    `label` names the archive in errors (its source URI); the kind is taken from the name of
    `label` or `archive_path`. On FetchError `dest_dir` holds a partial tree the caller must remove.
    """
    label = label or archive_path
    kind = archive_kind(os.path.basename(archive_path)) or archive_kind(label)
    if kind is None:
        raise FetchError(f"{label}: not a .zip or .tar archive")
    writer = _Writer(dest_dir, label, max_bytes, max_members)
    started = time.monotonic()
    try:
        if kind == "zip":
            _extract_zip(archive_path, writer)
        else:
            _extract_tar(archive_path, writer)
    except FetchError:
        raise
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, UnicodeError) as exc:
        raise FetchError(f"{label}: corrupt or truncated archive ({exc})") from exc
    except RuntimeError as exc:  # zipfile: encrypted members
        raise FetchError(f"{label}: cannot extract ({exc})") from exc
    except OSError as exc:  # disk full, permissions, a name the filesystem refuses
        raise FetchError(f"{label}: cannot extract ({exc})") from exc
    writer.check_links()
    log.info("extracted %s: %d files, %.1f MiB in %.1fs", label, writer.stats.files,
             writer.stats.bytes / 2**20, time.monotonic() - started)
    return writer.stats
