"""Unity Simulation runs (usim://PROJECT/RUN_EXECUTION): the run's manifest, then every file it lists.

The access token goes only to the Unity Simulation API, never into a URI; the files are fetched from
the manifest's pre-signed URLs in parallel.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import re
import time
import urllib.parse
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

from synthval.errors import FetchError
from synthval.io.archives import safe_member_path
from synthval.io.http import PROGRESS_INTERVAL_S, HTTPStatusError, download_http

log = logging.getLogger(__name__)

# Unity Simulation REST API; the CLI may point it elsewhere (env SYNTHVAL_USIM_API), tests do.
USIM_API_BASE = "https://api.simulation.unity3d.com"
USIM_COLUMNS = ("run_execution_id", "app_param_id", "instance_id", "attempt_id", "file_name", "download_uri")
USIM_WORKERS = 16
_USIM_RE = re.compile(r"^usim://([^/@?#]+)/([^/?#]+)/?$")


def parse_usim_uri(uri: str) -> tuple[str, str]:
    """(project id, run execution id) of a usim:// URI; FetchError for any other shape, or one with a token."""
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


def fetch_run(uri: str, token: str | None, api_base: str, tree_dir: str, work_dir: str, retries: int,
                retry_delay: float | None) -> int:
    project, run = parse_usim_uri(uri)
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

