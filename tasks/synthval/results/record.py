"""The result record: one evaluation's metrics.json turned into a versioned record, what `synthval publish`
writes under a results URI and the results store and leaderboard read.

It holds the metrics summary and per-class AP, and everything needed to
say where they come from, which model they are of, and whether two results are comparable. Layout
(schema_version 2):

    schema_version, record_id, created_at (UTC, ISO 8601)
    recipe, run_id, real_budget, datasets {role: URI} (synthetic, real, model; names stay names),
    checkpoint_uri
    model {id, basis, uri, role, dataset}: which model this is, by content, and what it was trained
          on (synthval.results.identity)
    metrics {mAP, mAP50, mAP75, mAP_small, mAP_medium, mAP_large, mAR1, mAR10, mAR100, mAR_small,
             mAR_medium, mAR_large, mean-average-precision, mean-average-precision-iou50,
             mean-average-recall}  (each in [0, 1] or null: no ground truth to score)
    per_class {label name: {AP, AP50, num_gt}}, label_match {shared, only_in_model, only_in_data}
    num_images, num_gt, num_predictions
    test_set {data_uri, split, format, num_images, num_boxes, image_ids_sha256, sha256, images_sha256,
              annotations_sha256, label_map_sha256}
    protocol (the metric protocol's name), protocol_fingerprint, protocol_facts, benchmark_fingerprint:
             results with equal protocol fingerprints were scored on the same content the same way
             (synthval.scoring.protocol); compare only those
    evaluation {metrics_uri, predictions_uri, source_predictions_uri, checkpoint_uri, created_at,
                synthval_version, inference}
    eval_config, checkpoint {step, epoch, model, synthval_version, source_format, num_classes, config}
    synthval_version (of the publisher)
    report_uri: the self-contained HTML run report (beside metrics.json), or null

Schema 1 (synthval 0.1.0) had no model, benchmark or protocol facts, and a protocol fingerprint of the
test set's path. The record is written atomically to `<results_uri>/<record_id>.json`; the record id
is derived from (recipe, model, protocol, run id), so a retried publish overwrites its own record, and
the results store keeps one row per (model, protocol) whatever the run.
"""

from __future__ import annotations

import datetime
import re
from typing import Any

from synthval import __version__
from synthval.errors import DatasetError
from synthval.results.identity import model_identity
from synthval.scoring.coco_eval import METRICS_SCHEMA_VERSION, SUMMARY_KEYS
from synthval.scoring.protocol import benchmark_fingerprint, protocol_facts, sha256_of

RECORD_SCHEMA_VERSION = 2
REQUIRED_FIELDS = ("schema_version", "test_set", "config", "per_class", "label_match", *SUMMARY_KEYS)


def build_record(metrics: dict[str, Any], metrics_uri: str, *, recipe: str, run_id: str | None,
                 datasets: dict[str, str], checkpoint_uri: str | None, real_budget: int | None, role: str,
                 dataset: str | None) -> dict[str, Any]:
    """The record of the checked evaluation `metrics` (read from `metrics_uri`); "report_uri" is left to the
    caller. `datasets` are {role: normalized URI}; `role` and `dataset` are `identity.model_role`'s."""
    evaluated_checkpoint = metrics.get("checkpoint_uri")
    scored_file = metrics.get("source_predictions_uri")
    model = model_identity(evaluated_checkpoint or (None if scored_file else checkpoint_uri), scored_file)
    model.update(role=role, dataset=dataset or model["uri"])
    facts = protocol_facts(metrics, metrics_uri)
    fingerprint = sha256_of(facts)
    return {
        "schema_version": RECORD_SCHEMA_VERSION,
        "record_id": make_record_id(recipe, model["id"], fingerprint, run_id),
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "recipe": recipe,
        "run_id": run_id,
        "real_budget": real_budget,
        "datasets": datasets,
        "checkpoint_uri": checkpoint_uri or evaluated_checkpoint,
        "model": model,
        "metrics": {key: metrics[key] for key in SUMMARY_KEYS},
        "per_class": {name: {k: row.get(k) for k in ("AP", "AP50", "num_gt")}
                      for name, row in metrics["per_class"].items()},
        "label_match": metrics["label_match"],
        "num_images": metrics.get("num_images"),
        "num_gt": metrics.get("num_gt"),
        "num_predictions": metrics.get("num_predictions"),
        "test_set": metrics["test_set"],
        "protocol": metrics.get("protocol"),
        "protocol_fingerprint": fingerprint,
        "protocol_facts": facts,
        "benchmark_fingerprint": benchmark_fingerprint(metrics, metrics_uri),
        "evaluation": {
            "metrics_uri": metrics_uri,
            "predictions_uri": metrics.get("predictions_uri"),
            "source_predictions_uri": metrics.get("source_predictions_uri"),
            "checkpoint_uri": evaluated_checkpoint,
            "created_at": metrics.get("created_at"),
            "synthval_version": metrics.get("synthval_version"),
            "inference": metrics.get("inference"),
        },
        "eval_config": metrics["config"],
        "checkpoint": metrics.get("checkpoint"),
        "synthval_version": __version__,
    }


def check_metrics(metrics: Any, uri: str) -> None:
    """Raise DatasetError naming `uri` and the field unless `metrics` is a metrics.json this version reads."""
    if not isinstance(metrics, dict):
        raise DatasetError(f"{uri}: expected the JSON object synthval evaluate writes, got {type(metrics).__name__}")
    missing = [key for key in REQUIRED_FIELDS if key not in metrics]
    if missing:
        raise DatasetError(f"{uri}: missing field {missing[0]!r}; is this a metrics.json written by synthval evaluate?")
    version = metrics["schema_version"]
    if not isinstance(version, int) or version > METRICS_SCHEMA_VERSION:
        raise DatasetError(f"{uri}: field 'schema_version' {version!r}: this synthval ({__version__}) reads "
                           f"metrics up to schema version {METRICS_SCHEMA_VERSION}")
    for key in SUMMARY_KEYS:
        value = metrics[key]
        if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
            raise DatasetError(f"{uri}: field {key!r} is {value!r}; expected a number in [0, 1] or null")
    test_set = metrics["test_set"]
    for key in ("data_uri", "split", "image_ids_sha256", "sha256"):
        if not isinstance(test_set, dict) or key not in test_set:
            raise DatasetError(f"{uri}: missing field 'test_set.{key}'"
                               + ("; evaluate again with this synthval, which fingerprints the test set's content"
                                  if key == "sha256" else ""))


def make_record_id(recipe: str, model_id: str, fingerprint: str, run_id: str | None) -> str:
    """`<recipe>-<20 hex digits>`, the same for the same inputs: a retry overwrites its own record."""
    digest = sha256_of({"recipe": recipe, "model": model_id, "protocol": fingerprint, "run_id": run_id})
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", recipe.strip()).strip("._")[:80] or "recipe"
    return f"{slug}-{digest[:20]}"
