"""What metrics.json records beside the numbers: where they came from and how they were made.

`provenance` is written by every evaluation and rebuilt by discovery (for a test set alone, before any
model exists), so both describe a benchmark the same way and their fingerprints agree.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Mapping
from typing import Any

from synthval import __version__
from synthval.config import EvalConfig, to_dict
from synthval.data.index import DatasetIndex
from synthval.io import storage
from synthval.io.sources import is_named_source
from synthval.scoring.protocol import scoring_settings, test_set_fingerprint


def provenance(config: EvalConfig, index: DatasetIndex, data_uri: str, checkpoint_uri: str | None,
               source_predictions_uri: str | None, predictions_uri: str, coco_ids: Mapping[int, Any],
               checkpoint_info: dict[str, Any] | None) -> dict[str, Any]:
    """The fields metrics.json adds to the metrics: where the numbers come from and how they were made.

    Keys: "checkpoint_uri" and "checkpoint" (step, epoch, model, num_classes, source_format,
    synthval_version and training config of the checkpoint; null when a results file was scored),
    "source_predictions_uri" (the results file scored, or null), "predictions_uri" (the written
    predictions.json), "data_uri", "split", "test_set" {data_uri, split, format, num_images, num_boxes,
    image_ids_sha256: SHA-256 of the sorted image ids, and the content fingerprint of
    `protocol.test_set_fingerprint`: sha256, images_sha256, annotations_sha256, label_map_sha256},
    "scoring" (the IoU thresholds, max detections and area ranges scored with), "config" (the resolved
    EvalConfig), "synthval_version", "created_at" (UTC). Local URIs are recorded as absolute paths,
    published model names as names.
    """
    ids = sorted(coco_ids[r.image_id] for r in index.images)
    data_uri = _absolute(data_uri)
    return {
        "checkpoint_uri": _absolute(checkpoint_uri),
        "checkpoint": checkpoint_info,
        "source_predictions_uri": _absolute(source_predictions_uri),
        "predictions_uri": predictions_uri,
        "data_uri": data_uri,
        "split": config.split,
        "test_set": {
            "data_uri": data_uri, "split": config.split, "format": index.format, "num_images": len(index),
            "num_boxes": index.num_boxes,
            "image_ids_sha256": hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest(),
            **test_set_fingerprint(index, coco_ids, config.split),
        },
        "scoring": scoring_settings(),
        "config": to_dict(config),
        "synthval_version": __version__,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _absolute(uri: str | None) -> str | None:
    """Local paths made absolute, so provenance (and the protocol fingerprint) does not hang on a cwd;
    a named source (a published model, `groceries-real`) stays a name."""
    return uri if uri is None or is_named_source(uri) else storage.absolute_uri(uri)
