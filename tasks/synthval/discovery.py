"""`synthval discover`: which synthetic datasets under a watched root are complete and not yet valued.

A dataset is a folder (local) or prefix (gs://) directly under the watched root. It is *complete*
when its completion marker exists: `_SUCCESS` by default, which `synthval generate` writes (uploads)
last; for Unity Perception output written by other tools, name the file it writes last (a relative
path, or a glob such as `Dataset/metrics_*.json`). A folder without the marker is being written and
is left alone, however long it has been there; hidden folders (`.name`, the generator's staging
folders) and `_name` folders are never datasets.

A dataset is *new* unless the results store already holds a result for it under the recipe, for
every requested real budget, under the *current* evaluation protocol. The protocol is computed before
anything is trained, exactly as `synthval publish` will compute it from the evaluation (the test
set's identity and the scoring config, see synthval.publish.protocol_fingerprint), so a changed test
split re-values every dataset, and results of the old protocol turn stale in the store.

Datasets may also be announced one by one (an Airflow Asset event carrying their URI): they are
checked for the marker like the listed ones and valued only if complete and new.
"""

from __future__ import annotations

import glob as globmod
import logging
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

from synthval import storage
from synthval.errors import ConfigError, FetchError
from synthval.results import normalize_uri, open_store

log = logging.getLogger(__name__)

DEFAULT_MARKER = "_SUCCESS"
REAL_ONLY_ROLE = "real"


def _children(root_uri: str) -> list[str]:
    """Dataset candidates directly under the root: folders or prefixes, hidden and `_` names skipped."""
    if storage.is_local(root_uri):
        root = storage.local_path(root_uri)
        if not os.path.isdir(root):
            raise FetchError(f"{root_uri}: the watched root is not a folder")
        names = sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n)))
        return [os.path.join(root, n) for n in names if not n.startswith((".", "_"))]
    if storage.scheme_of(root_uri) not in storage.GCS_SCHEMES:
        raise ConfigError(f"{root_uri}: a watched root must be a local folder or a gs:// prefix")
    fs, path = storage.filesystem(root_uri)
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        raise FetchError(f"{root_uri}: no such bucket or prefix") from None
    out = []
    for entry in entries:
        name = entry["name"].rstrip("/")
        if entry["type"] == "directory" and not name.rsplit("/", 1)[-1].startswith((".", "_")):
            out.append(f"gs://{name}")
    return sorted(out)


def is_complete(dataset_uri: str, marker: str = DEFAULT_MARKER) -> bool:
    """Whether the dataset's completion marker (a relative path or glob) exists."""
    if not marker or marker.startswith("/") or ".." in marker.split("/"):
        raise ConfigError(f"completion marker {marker!r}: expected a path relative to the dataset folder")
    if not globmod.has_magic(marker):
        return storage.exists(storage.join_uri(dataset_uri, marker))
    if storage.is_local(dataset_uri):
        return bool(globmod.glob(os.path.join(storage.local_path(dataset_uri), marker)))
    fs, path = storage.filesystem(dataset_uri)
    fs.invalidate_cache(path)
    return bool(fs.glob(f"{path.rstrip('/')}/{marker}"))


def find_datasets(root_uri: str | None, announced: Iterable[str] = (), marker: str = DEFAULT_MARKER
                  ) -> tuple[list[str], list[str]]:
    """(complete, incomplete) dataset URIs under `root_uri` and among `announced`, normalized and sorted."""
    candidates = {normalize_uri(u) for u in announced if u and u.strip()}
    if root_uri:
        candidates.update(normalize_uri(c) for c in _children(root_uri))
    complete, incomplete = [], []
    started = time.monotonic()
    for i, uri in enumerate(sorted(candidates), 1):
        (complete if is_complete(uri, marker) else incomplete).append(uri)
        if i % 100 == 0:
            rate = i / max(time.monotonic() - started, 1e-9)
            log.info("checked %d of %d datasets (%.0f/s, about %.0f s left)", i, len(candidates), rate,
                     (len(candidates) - i) / rate)
    return complete, incomplete


def evaluation_protocol(test_data_uri: str, split: str = "test", dataset_format: str = "auto",
                        overrides: Sequence[str] = ()) -> tuple[str, dict[str, Any]]:
    """(fingerprint, description) of evaluating on `split` of `test_data_uri`, as publish will record it."""
    from synthval.config import EvalConfig, load_config
    from synthval.datasets import load_dataset
    from synthval.evaluate import coco_image_ids, provenance
    from synthval.metrics import METRIC_PROTOCOL
    from synthval.publish import protocol_fingerprint

    if not storage.is_local(test_data_uri):
        raise ConfigError(f"{test_data_uri}: the test set must be fetched first (synthval fetch) and given locally")
    config = load_config(EvalConfig, preset=None, config_text=None, overrides=[*overrides, f"split={split}"],
                         source="config")
    path = storage.local_path(test_data_uri)
    index = load_dataset(path, format=dataset_format, split=config.split)
    facts = provenance(config, index, test_data_uri, None, None, "", coco_image_ids(index), None)
    facts["protocol"] = METRIC_PROTOCOL
    return protocol_fingerprint(facts), {"test_set": facts["test_set"], "protocol": METRIC_PROTOCOL}


def run_discover(*, root_uri: str | None, db_url: str, recipe: str, test_data_uri: str, real_dataset: str,
                 split: str = "test", announced: Sequence[str] = (), marker: str = DEFAULT_MARKER,
                 budgets: Sequence[int] = (0,), real_budgets: Sequence[int] = (), dataset_format: str = "auto",
                 limit: int | None = None) -> dict[str, Any]:
    """List new complete datasets and the real-only budgets still missing for the current protocol.

    Returns {"protocol", "new_datasets", "incomplete", "already_evaluated", "missing_real_budgets"};
    `real_dataset` is the URI the real-only results are recorded under (their `real=` dataset).
    """
    if not root_uri and not announced:
        raise ConfigError("discover: give a watched root (--root) or announced datasets (--dataset)")
    if any(b < 0 for b in [*budgets, *real_budgets]):
        raise ConfigError(f"discover: real budgets must not be negative, got {list(budgets)} / {list(real_budgets)}")
    protocol, description = evaluation_protocol(test_data_uri, split, dataset_format)
    store = open_store(db_url)
    store.register_protocol(recipe, protocol, description, make_current=True)
    complete, incomplete = find_datasets(root_uri, announced, marker)
    done = store.evaluated_datasets(recipe, protocol, budgets)
    new = [uri for uri in complete if uri not in done]
    valued = [uri for uri in complete if uri in done]
    if limit is not None and len(new) > limit:
        log.info("discover: %d new datasets; valuing the first %d now, the rest in later runs", len(new), limit)
        new = new[:limit]
    have_real = {row["real_budget"] for row in store.rows(recipe=recipe, protocol=protocol,
                                                          dataset_role=REAL_ONLY_ROLE)
                 if row["dataset"] == normalize_uri(real_dataset)}
    missing_real = sorted({b for b in real_budgets if b > 0} - have_real)
    log.info("discover: protocol %s; %d complete dataset(s): %d to value now, %d valued before; %d incomplete "
             "(no %s yet); real-only budgets to train: %s", protocol[:12], len(complete), len(new), len(valued),
             len(incomplete), marker, missing_real or "none")
    for uri in incomplete:
        log.info("discover: not complete yet, left for a later run: %s", uri)
    return {"protocol": protocol, "new_datasets": new, "incomplete": incomplete,
            "already_evaluated": valued, "missing_real_budgets": missing_real}
