"""gs:// sources: one object, or a whole prefix, fetched through fsspec (gcsfs) with errors that name the URI."""

from __future__ import annotations

import logging
import os

from synthval.errors import FetchError
from synthval.humanize import format_size
from synthval.io import storage

log = logging.getLogger(__name__)


def fetch_gcs(uri: str, dest: str, tree_dir: str) -> str | None:
    """A single object into the local file `dest` (returns it), or a whole prefix into `tree_dir` (None)."""
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
        log.info("fetching %s (%s)", uri, format_size(info.get("size") or 0))
        fs.get_file(path, dest + ".part")
        os.replace(dest + ".part", dest)
        return dest
    except FetchError:
        raise
    except OSError as exc:
        raise FetchError(f"{uri}: cannot be fetched ({exc})") from exc

