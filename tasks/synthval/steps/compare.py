"""`synthval compare`: several results side by side, and which differences are larger than their noise."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from synthval.errors import ConfigError, SynthvalError
from synthval.humanize import format_interval, format_number
from synthval.io import storage
from synthval.render.report import COMPARE_FILE, render_compare_report, report_file_uri
from synthval.scoring.analysis import (
    CompareEntry,
    RunInputs,
    load_run_inputs,
    resolve_result,
    score_results,
    test_set_key,
    with_predictions,
)
from synthval.scoring.bootstrap import (
    DEFAULT_CONFIDENCE,
    DEFAULT_REPLICATES,
    DEFAULT_SEED,
    CocoBootstrap,
    Difference,
    check_replicates,
    independent_difference,
    paired_difference,
)

log = logging.getLogger(__name__)

def run_compare(metrics_uris: Sequence[str], out_uri: str, names: Sequence[str] | None = None,
                data_uri: str | None = None, split: str | None = None, dataset_format: str = "auto",
                replicates: int = DEFAULT_REPLICATES, seed: int = DEFAULT_SEED,
                confidence: float = DEFAULT_CONFIDENCE) -> dict[str, Any]:
    """`synthval compare`: metrics and intervals of several results side by side, and which differences
    are larger than their noise.

    Inputs are metrics.json files or result records. Results scored on the same test images get a
    paired bootstrap (the same resamples for all, so image difficulty cancels); others an independent
    one. Returns {"report_uri", "differences": [{"a", "b", "metric", "difference", "low", "high",
    "significant"}]}.
    """
    if len(metrics_uris) < 2:
        raise ConfigError("compare needs at least two results")
    if names and len(names) != len(metrics_uris):
        raise ConfigError(f"--names gives {len(names)} names for {len(metrics_uris)} results")
    check_replicates(replicates)
    entries = []
    for i, uri in enumerate(metrics_uris):
        metrics_uri, metrics, default = resolve_result(uri)
        name = names[i] if names else default or f"{i + 1}: {storage.basename(storage.join_uri(metrics_uri, '..')) or metrics_uri}"
        entries.append(CompareEntry(name, metrics_uri, metrics))
    if len({e.name for e in entries}) != len(entries):
        for i, e in enumerate(entries):
            e.name = f"{i + 1}. {e.name}"
    # Load each distinct test set once; bootstrap every result that has its predictions.
    index_cache: dict[tuple, RunInputs] = {}
    for e in entries:
        key = test_set_key(e.metrics) if data_uri is None else (data_uri, split)
        try:
            base = index_cache.get(key)
            if base is None:
                base = load_run_inputs(e.metrics_uri, None, data_uri, split, dataset_format)
                index_cache[key] = base
                e.inputs = base
            else:
                e.inputs = with_predictions(base, e)
        except SynthvalError as exc:  # a result whose test set or predictions cannot be read: no intervals
            log.warning("%s: no intervals (%s)", e.name, exc)
            continue
        if e.inputs.results is not None:
            e.bootstrap = CocoBootstrap(score_results(e.inputs)).run(replicates, seed, confidence)
    differences = []
    for i in range(len(entries)):
        for j in range(i + 1, len(entries)):
            a, b = entries[i], entries[j]
            paired = (a.bootstrap is not None and b.bootstrap is not None
                      and test_set_key(a.metrics) == test_set_key(b.metrics) and a.inputs.index is b.inputs.index)
            for key in ("mAP", "mAP50", "mAR100"):
                if a.bootstrap is None or b.bootstrap is None:
                    va, vb = a.metrics.get(key), b.metrics.get(key)
                    diff = Difference(key, (va - vb) if va is not None and vb is not None else float("nan"),
                                      float("nan"), float("nan"))
                    how = "no predictions: untested"
                elif paired:
                    diff, how = paired_difference(a.bootstrap, b.bootstrap, key), "paired"
                else:
                    diff, how = independent_difference(a.bootstrap, b.bootstrap, key), "independent (different test sets)"
                differences.append({"a": a.name, "b": b.name, "metric": key, "difference": storage.json_safe(diff.value),
                                    "low": storage.json_safe(diff.low), "high": storage.json_safe(diff.high),
                                    "significant": diff.significant, "method": how})
    target = report_file_uri(out_uri, COMPARE_FILE)
    storage.write_html(target, render_compare_report(entries, differences, confidence))
    for d in differences:
        log.info("%s - %s %s: %s %s %s", d["a"], d["b"], d["metric"], format_number(d["difference"]),
                 format_interval(d["low"], d["high"]), "larger than noise" if d["significant"] else "within noise")
    return {"report_uri": target, "differences": differences}

