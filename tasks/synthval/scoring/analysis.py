"""One evaluation read back and analysed once: its metrics.json, test set and predictions file, their
matches, bootstrap intervals and per-image outcomes; and a result named by a record or a metrics file.

The run report, the comparison report, TensorBoard and the notebooks all start from here, so they
show the same matches the evaluation scored.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from synthval.data import load_dataset, load_ground_truth
from synthval.data.index import DatasetIndex
from synthval.errors import ConfigError, DatasetError
from synthval.io import storage
from synthval.io.sources import local_dataset
from synthval.scoring.bootstrap import (
    DEFAULT_CONFIDENCE,
    DEFAULT_REPLICATES,
    DEFAULT_SEED,
    SUMMARY_NAMES,
    BootstrapResult,
    CocoBootstrap,
)
from synthval.scoring.coco_eval import CocoEvaluator, CocoResults, Matches, coco_image_ids, load_coco_results
from synthval.scoring.outcomes import ImageOutcome, image_outcomes

log = logging.getLogger(__name__)

DEFAULT_SCORE_THRESHOLD = 0.5
DEFAULT_GALLERY_SIZE = 6


@dataclass
class RunInputs:
    """What a run report is made from: metrics.json, the test set's index and the scored predictions.

    `results` is the predictions file (`coco_eval.load_coco_results`: index image ids, test-set label
    ids), or None when none could be found (the report then has no intervals and no gallery).
    """

    metrics_uri: str
    metrics: dict[str, Any]
    index: DatasetIndex
    data_uri: str
    split: str | None
    predictions_uri: str | None
    results: CocoResults | None
    notes: list[str] = field(default_factory=list)


def load_run_inputs(metrics_uri: str, predictions_uri: str | None = None, data_uri: str | None = None,
                    split: str | None = None, dataset_format: str = "auto", bbox_definition_id: str | None = None,
                    skip_broken: bool = False) -> RunInputs:
    """Read metrics.json and, by default, the test set and predictions it names.

    `data_uri`, `split` and `predictions_uri` default to metrics.json's "data_uri", "split" and
    "predictions_uri". The predictions file's image ids are the test set's public ids (a COCO file's
    own ids), as `synthval evaluate` writes them. The test set is read as the evaluation read it: the
    annotations alone for a scored results file, the checked index (images present) for a checkpoint.
    """
    metrics = storage.read_json(metrics_uri)
    if not isinstance(metrics, dict) or "per_class" not in metrics:
        raise DatasetError(f"{metrics_uri}: not a metrics.json written by synthval evaluate (no 'per_class')")
    test_set = metrics.get("test_set") or {}
    data_uri = data_uri or metrics.get("data_uri") or test_set.get("data_uri")
    if not data_uri:
        raise ConfigError(f"{metrics_uri} names no test set (data_uri); pass --data")
    split = split if split is not None else metrics.get("split", test_set.get("split"))
    data_path = local_dataset(data_uri)
    if metrics.get("checkpoint_uri"):
        index = load_dataset(data_path, format=dataset_format, split=split, bbox_definition_id=bbox_definition_id,
                             skip_broken=skip_broken)
    else:
        index = load_ground_truth(data_path, format=dataset_format, split=split, bbox_definition_id=bbox_definition_id)
    public = coco_image_ids(index)
    notes = []
    expected = test_set.get("image_ids_sha256")
    if expected:
        ids = sorted(public[r.image_id] for r in index.images)
        actual = hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()
        if actual != expected:
            notes.append(f"The test set read from {data_uri} (split {split}) is not the one metrics.json was "
                         "scored on (its image ids differ); intervals and pictures describe the images read now.")
    predictions_uri = predictions_uri or metrics.get("predictions_uri")
    results = None
    if predictions_uri and storage.exists(predictions_uri):
        results = load_coco_results(predictions_uri, index, image_ids={p: i for i, p in public.items()})
    else:
        notes.append(f"No predictions file found ({predictions_uri or 'none named in metrics.json'}): the report "
                     "has no intervals and no gallery.")
        log.warning("%s", notes[-1])
    return RunInputs(metrics_uri, metrics, index, data_uri, split, predictions_uri, results, notes)


@dataclass
class RunAnalysis:
    """Everything a run report shows, computed once (notebooks use it directly)."""

    inputs: RunInputs
    score_threshold: float
    bootstrap: BootstrapResult | None
    matches: Matches | None
    outcomes: list[ImageOutcome]
    confusion: dict[str, dict[str, int]]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.inputs.metrics

    def worst(self, n: int = DEFAULT_GALLERY_SIZE) -> list[ImageOutcome]:
        """The n images with the lowest F1 at the threshold (most errors first among equals)."""
        scored = [o for o in self.outcomes if o.f1 is not None]
        return sorted(scored, key=lambda o: (o.f1, -(o.fp + o.miss), o.image_id))[:n]

    def best(self, n: int = DEFAULT_GALLERY_SIZE, exclude: Sequence[ImageOutcome] = ()) -> list[ImageOutcome]:
        """The n images with the highest F1 (most true positives first among equals), not in `exclude`."""
        skip = {o.image_id for o in exclude}
        scored = [o for o in self.outcomes if o.f1 is not None and o.image_id not in skip]
        return sorted(scored, key=lambda o: (-o.f1, -o.tp, o.image_id))[:n]


def analyze_run(inputs: RunInputs, score_threshold: float | None = None, replicates: int = DEFAULT_REPLICATES,
                seed: int = DEFAULT_SEED, confidence: float = DEFAULT_CONFIDENCE) -> RunAnalysis:
    """Score the predictions file once, bootstrap its metrics from those matches and classify every
    detection and true box of the test set."""
    if score_threshold is None:
        score_threshold = float((inputs.metrics.get("config") or {}).get("draw_score_thresh", DEFAULT_SCORE_THRESHOLD))
    if not 0.0 <= score_threshold <= 1.0:
        raise ConfigError(f"score threshold {score_threshold} must lie in [0, 1]")
    if inputs.results is None:
        return RunAnalysis(inputs, score_threshold, None, None, [], {})
    matches = score_results(inputs)
    result = CocoBootstrap(matches).run(replicates=replicates, seed=seed, confidence=confidence)
    for key in SUMMARY_NAMES:
        reported, recomputed = inputs.metrics.get(key), result.estimate[key]
        if reported is not None and np.isfinite(recomputed) and abs(reported - recomputed) > 1e-9:
            inputs.notes.append(f"{key} recomputed from the predictions file is {recomputed:.6f}, metrics.json "
                                f"says {reported:.6f}: the file is not the one these metrics were scored from.")
    outcomes, confusion = image_outcomes(matches, score_threshold)
    return RunAnalysis(inputs, score_threshold, result, matches, outcomes, confusion)


def score_results(inputs: RunInputs) -> Matches:
    """Score the run's predictions file on its test set, as `synthval evaluate` does; returns the matches."""
    evaluator = CocoEvaluator(inputs.index, {c: c for c in inputs.index.label_names},
                              coco_image_ids=coco_image_ids(inputs.index))
    evaluator.add_results(inputs.results)
    evaluator.evaluate()
    return evaluator.matches


@dataclass
class CompareEntry:
    """One result of a comparison: its display name, metrics and, when its predictions can be read, its
    inputs and bootstrap."""

    name: str
    metrics_uri: str
    metrics: dict[str, Any]
    inputs: RunInputs | None = None
    bootstrap: BootstrapResult | None = None


def resolve_result(uri: str) -> tuple[str, dict[str, Any], str | None]:
    """(metrics URI, metrics, default name) for a metrics.json or a published result record."""
    doc = storage.read_json(uri)
    if not isinstance(doc, dict):
        raise DatasetError(f"{uri}: expected a metrics.json or a result record (a JSON object)")
    if "record_id" in doc and isinstance(doc.get("evaluation"), dict):
        metrics_uri = doc["evaluation"].get("metrics_uri")
        if not metrics_uri:
            raise DatasetError(f"{uri}: result record without 'evaluation.metrics_uri'")
        name = doc.get("recipe") or doc["record_id"]
        if doc.get("real_budget") is not None:
            name = f"{name} (real {doc['real_budget']})"
        return metrics_uri, storage.read_json(metrics_uri), name
    if "per_class" not in doc:
        raise DatasetError(f"{uri}: neither a metrics.json (no 'per_class') nor a result record (no 'record_id')")
    return uri, doc, None


def test_set_key(metrics: Mapping[str, Any]) -> tuple:
    """What identifies the test set a metrics.json was scored on: its content fingerprint where recorded."""
    t = metrics.get("test_set") or {}
    if t.get("sha256"):  # by content (synthval.scoring.protocol): the same set fetched into two run folders is one
        return ("sha256", t["sha256"])
    return (t.get("data_uri"), t.get("split"), t.get("image_ids_sha256"))


def with_predictions(base: RunInputs, entry: CompareEntry) -> RunInputs:
    """Another result on the same test set: reuse the index, read this result's predictions."""
    uri = entry.metrics.get("predictions_uri")
    results = None
    if uri and storage.exists(uri):
        public = coco_image_ids(base.index)
        results = load_coco_results(uri, base.index, image_ids={p: i for i, p in public.items()})
    return RunInputs(entry.metrics_uri, entry.metrics, base.index, base.data_uri, base.split, uri, results, [])

