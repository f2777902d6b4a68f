"""`synthval discover`: which synthetic datasets under a watched root are complete and not yet valued.

A dataset is a folder (local) or prefix (gs://) directly under the watched root. It is *complete*
when its completion marker exists: `_SUCCESS` by default, which `synthval generate` writes (uploads)
last; for Unity Perception output written by other tools, name the file it writes last (a relative
path, or a glob such as `Dataset/metrics_*.json`). A folder without the marker is being written and
is left alone, however long it has been there; hidden folders (`.name`, the generator's staging
folders) and `_name` folders are never datasets.

A dataset is *new* unless the results store already holds a result for it under the recipe, for
every requested real budget, on the *current* benchmark: the test set's content and the metric
protocol (synthval.scoring.protocol), computed before anything is trained exactly as `synthval publish` will
compute it from the evaluation. A changed test set (one box, one image byte, another split) or scoring
re-values every dataset, and results on the old benchmark turn stale in the store; the same test set
fetched into another run folder is the same benchmark.

Real budgets larger than the real training split cannot be trained: they are clipped to the split's
size with a warning naming the `real_budgets` param, and the clipped list is returned for the DAG to
use.

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

from synthval.errors import ConfigError, FetchError
from synthval.io import storage
from synthval.io.sources import local_dataset
from synthval.results.identity import REAL_ONLY, normalize_uri
from synthval.results.store import open_store

log = logging.getLogger(__name__)

DEFAULT_MARKER = "_SUCCESS"


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


def evaluation_benchmark(test_data_uri: str, split: str = "test", dataset_format: str = "auto"
                         ) -> tuple[str, dict[str, Any]]:
    """(fingerprint, description) of the benchmark of `split` of `test_data_uri`, as publish will record it."""
    from synthval.config import EvalConfig, load_config
    from synthval.data import load_dataset
    from synthval.scoring.coco_eval import METRIC_PROTOCOL, coco_image_ids
    from synthval.scoring.protocol import benchmark_fingerprint
    from synthval.scoring.provenance import provenance

    path = local_dataset(test_data_uri)  # a pod gets gs://: read through the local cache, as evaluate does
    config = load_config(EvalConfig, preset=None, config_text=None, overrides=[f"split={split}"], source="config")
    index = load_dataset(path, format=dataset_format, split=config.split)
    facts = provenance(config, index, test_data_uri, None, None, "", coco_image_ids(index), None)
    facts["protocol"] = METRIC_PROTOCOL
    return benchmark_fingerprint(facts, test_data_uri), {"test_set": facts["test_set"], "protocol": METRIC_PROTOCOL}


def clip_budgets(budgets: Sequence[int], available: int, source: str) -> list[int]:
    """`budgets` sorted and unique, any larger than `available` images clipped to it, with a warning."""
    too_big = sorted(b for b in set(budgets) if b > available)
    clipped = sorted({min(b, available) for b in budgets})
    if too_big:
        log.warning("param real_budgets: %s larger than the %d images of %s; clipped to %d (real budgets now %s)",
                    ", ".join(map(str, too_big)), available, source, available, clipped)
    return clipped


def run_discover(*, root_uri: str | None, db_url: str, recipe: str, test_data_uri: str, real_dataset: str,
                 split: str = "test", announced: Sequence[str] = (), marker: str = DEFAULT_MARKER,
                 budgets: Sequence[int] = (0,), real_budgets: Sequence[int] = (), real_split: str | None = None,
                 dataset_format: str = "auto", limit: int | None = None) -> dict[str, Any]:
    """List new complete datasets and the real-only budgets still missing on the current benchmark.

    Returns {"benchmark", "new_datasets", "incomplete", "already_evaluated", "real_budgets" (as given, or
    clipped to the `real_split` of the real dataset at `test_data_uri`), "missing_real_budgets"};
    `real_dataset` is the URI the real-only results are recorded under (their `real=` dataset).
    """
    if not root_uri and not announced:
        raise ConfigError("discover: give a watched root (--root) or announced datasets (--dataset)")
    if any(b < 0 for b in [*budgets, *real_budgets]):
        raise ConfigError(f"discover: real budgets must not be negative, got {list(budgets)} / {list(real_budgets)}")
    if real_split is not None:
        from synthval.data import load_dataset

        path = local_dataset(test_data_uri)
        available = len(load_dataset(path, format=dataset_format, split=real_split))
        real_budgets = clip_budgets(real_budgets, available, f"split {real_split!r} of {test_data_uri}")
        budgets = sorted({min(b, available) for b in budgets})
    benchmark, description = evaluation_benchmark(test_data_uri, split, dataset_format)
    store = open_store(db_url)
    store.register_benchmark(recipe, benchmark, description, make_current=True)
    complete, incomplete = find_datasets(root_uri, announced, marker)
    done = store.evaluated_datasets(recipe, benchmark, budgets)
    new = [uri for uri in complete if uri not in done]
    valued = [uri for uri in complete if uri in done]
    if limit is not None and len(new) > limit:
        log.info("discover: %d new datasets; valuing the first %d now, the rest in later runs", len(new), limit)
        new = new[:limit]
    real = normalize_uri(real_dataset)
    have_real = {row["real_budget"] for row in store.rows(recipe=recipe, benchmark=benchmark, dataset_role=REAL_ONLY,
                                                          with_records=False) if row["dataset"] == real}
    missing_real = sorted({b for b in real_budgets if b > 0} - have_real)
    log.info("discover: benchmark %s; %d complete dataset(s): %d to value now, %d valued before; %d incomplete "
             "(no %s yet); real-only budgets to train: %s", benchmark[:12], len(complete), len(new), len(valued),
             len(incomplete), marker, missing_real or "none")
    for uri in incomplete:
        log.info("discover: not complete yet, left for a later run: %s", uri)
    return {"benchmark": benchmark, "new_datasets": new, "incomplete": incomplete,
            "already_evaluated": valued, "real_budgets": list(real_budgets), "missing_real_budgets": missing_real}
