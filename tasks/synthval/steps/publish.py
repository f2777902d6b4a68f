"""`synthval publish`: one evaluation's metrics.json as a versioned result record under a results URI
(`synthval.results.record` says what a record holds), its HTML run report beside metrics.json, and its
row in the results store.
"""

from __future__ import annotations

import logging
from typing import Any

from synthval.errors import ConfigError, SynthvalError
from synthval.humanize import format_number
from synthval.io import storage
from synthval.render.report import REPORT_FILE, sibling_uri, write_run_report
from synthval.results.identity import model_role, normalize_uri
from synthval.results.record import build_record, check_metrics

log = logging.getLogger(__name__)


def run_publish(metrics_uri: str, results_uri: str, recipe: str, run_id: str | None, datasets: dict[str, str],
                checkpoint_uri: str | None, real_budget: int | None, store_url: str | None = None,
                report: bool = True) -> dict[str, Any]:
    """Write the result record of the evaluation at `metrics_uri`; returns {"result_uri", "record_id",
    "report_uri", "model_id", "role"}.

    With `report` (the default) the run report (synthval.render.report) is written first, beside the evaluation's
    metrics.json as `report.html` (the run's own folder; the results folder keeps only records), and the
    record names it in "report_uri" (null when it could not be made, with a warning: a missing picture
    must not lose the numbers).

    With `store_url` (a SQLAlchemy URL) the record is also upserted into the results store (synthval.results.store).
    """
    if not recipe or not recipe.strip():
        raise ConfigError("publish: the recipe name is empty")
    if real_budget is not None and real_budget < 0:
        raise ConfigError(f"publish: real_budget {real_budget} must not be negative")
    datasets = {role: normalize_uri(uri) for role, uri in sorted(datasets.items())}
    role, dataset = model_role(datasets, real_budget)
    metrics = storage.read_json(metrics_uri)
    check_metrics(metrics, metrics_uri)
    evaluated_checkpoint = metrics.get("checkpoint_uri")
    if checkpoint_uri and evaluated_checkpoint and checkpoint_uri != evaluated_checkpoint:
        log.warning("--checkpoint %s differs from the checkpoint %s evaluated; recording both, identifying "
                    "the model by the evaluated one", checkpoint_uri, evaluated_checkpoint)
    record = build_record(metrics, metrics_uri, recipe=recipe, run_id=run_id, datasets=datasets,
                          checkpoint_uri=checkpoint_uri, real_budget=real_budget, role=role, dataset=dataset)
    record_id, model, fingerprint = record["record_id"], record["model"], record["protocol_fingerprint"]
    result_uri = storage.join_uri(results_uri, f"{record_id}.json")
    record["report_uri"] = write_report(metrics_uri, record_id) if report else None  # issue 6
    storage.write_json(result_uri, record)
    if store_url:  # issue 4: the results store, after the record file it points to exists
        from synthval.results.store import open_store

        open_store(store_url).upsert(record, result_uri)
    summary = ", ".join(f"{k} {format_number(record['metrics'][k])}" for k in ("mAP", "mAP50", "mAR100"))
    log.info("published %s (%s; %s model %s, protocol %s)", result_uri, summary, role, model["id"][:12],
             fingerprint[:12])
    return {"result_uri": result_uri, "record_id": record_id, "report_uri": record["report_uri"],
            "model_id": model["id"], "role": role}


def write_report(metrics_uri: str, record_id: str) -> str | None:
    """The run report of the evaluation at `metrics_uri`, written beside it as report.html; None (and a
    warning) if the test set or predictions it needs cannot be read."""
    report_uri = sibling_uri(metrics_uri, REPORT_FILE)
    try:
        write_run_report(metrics_uri, report_uri)
    except SynthvalError as exc:
        log.warning("no run report for %s: %s", record_id, exc)
        return None
    return report_uri
