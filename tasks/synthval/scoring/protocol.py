"""What a result measured: the test set by content, and the protocol that makes two numbers comparable.

Two results are comparable when they were scored on the same images with the same ground truth, the
same way. Where the test set lay (`/runs/a/data/real` or `/runs/b/data/real`, a fresh fetch per DAG run)
says nothing about that, so every fingerprint here is of *content*:

- `test_set_fingerprint`: SHA-256 over the split name, the label map, and per image (in image-id order)
  its id, size, file bytes (hashed in 1 MiB chunks on several threads, never decoded) and its boxes (float32 bytes)
  with their label names, in a canonical order (the order a file lists them in is no part of the set). Components (`images_sha256`, `annotations_sha256`, `label_map_sha256`) say
  which part changed between two test sets.
- `benchmark_fingerprint`: the test set and the metric protocol (`coco_eval.METRIC_PROTOCOL`, which names
  the IoU thresholds, COCO max detections and area ranges). This is what discovery can know before a
  model exists; a recipe's results on another benchmark are stale.
- `protocol_fingerprint`: the benchmark plus every evaluation setting that changes numbers: the scoring
  constants as recorded, the eval config without the knobs that change only speed or pictures
  (`NON_PROTOCOL_KEYS`), the inference device and dtype (`"inference"` of metrics.json; null when a
  results file was scored), and the model's inference settings (image size, score threshold,
  detections per image) as its checkpoint stored them (torchvision's defaults for a seed checkpoint,
  which stores none; none for a scored results file). Leaderboard curves, deltas and comparisons pair
  only results of one protocol.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from synthval.errors import DatasetError

CHUNK_BYTES = 1 << 20
HASH_THREADS = 8  # hashlib releases the GIL on large updates: reading and hashing overlap across files
# Eval config keys that change speed, pictures or the intervals, never the numbers. `amp` is the request;
# the dtype inference actually ran in is recorded in "inference".
NON_PROTOCOL_KEYS = ("batch_size", "num_workers", "device", "amp", "draw_score_thresh", "num_sample_images",
                     "bootstrap_replicates")
# Model config keys that decide what a detector outputs at inference time.
MODEL_INFERENCE_KEYS = ("min_size", "max_size", "box_score_thresh", "box_detections_per_img",
                        "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test")


def file_sha256(path: str) -> str:
    """SHA-256 of a local file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _image_digest(path: str) -> str:
    try:
        return file_sha256(path)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the test image to fingerprint the test set ({exc.strerror})") from None


def _id_order(image_id: Any) -> tuple[int, Any]:
    return (0, image_id) if isinstance(image_id, int) else (1, str(image_id))


def test_set_fingerprint(index: Any, coco_ids: Mapping[int, Any], split: str | None) -> dict[str, str]:
    """{"sha256", "images_sha256", "annotations_sha256", "label_map_sha256"} of a `DatasetIndex`'s content.

    `coco_ids` maps index ids to the ids results files use (`coco_eval.coco_image_ids`); images are taken in
    that id order, so the reader's order does not matter. An image file that is not there (a results file
    scored from the annotations alone) counts as missing: nothing vouches for its pixels.
    """
    records = sorted(index.images, key=lambda r: _id_order(coco_ids[r.image_id]))
    with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
        file_digests = list(pool.map(lambda r: _image_digest(r.path), records))
    label_map = json.dumps(sorted((int(k), v) for k, v in index.label_names.items()))
    images, annotations = hashlib.sha256(), hashlib.sha256()
    for record, file_digest in zip(records, file_digests, strict=True):
        image_id = json.dumps(coco_ids[record.image_id])
        images.update(f"{image_id}\t{record.width}\t{record.height}\t{file_digest}\n".encode())
        boxes, names = _canonical_boxes(record, index.label_names)
        annotations.update(f"{image_id}\t{len(boxes)}\t".encode() + boxes + names.encode() + b"\n")
    parts = {
        "images_sha256": images.hexdigest(),
        "annotations_sha256": annotations.hexdigest(),
        "label_map_sha256": hashlib.sha256(label_map.encode()).hexdigest(),
    }
    return {"sha256": sha256_of({"split": split, **parts}), **parts}


def _canonical_boxes(record: Any, label_names: Mapping[int, str]) -> tuple[bytes, str]:
    """An image's boxes (float32 bytes) and label names, sorted: the order annotations were listed in is
    not part of the test set."""
    names = [str(label_names.get(int(label))) for label in record.labels]
    boxes = np.asarray(record.boxes, dtype="<f4").reshape(-1, 4)
    order = sorted(range(len(names)), key=lambda i: (names[i], *boxes[i].tolist()))
    return np.ascontiguousarray(boxes[order]).tobytes(), json.dumps([names[i] for i in order])


def scoring_settings() -> dict[str, Any]:
    """The scoring constants of this synthval (pycocotools' own): recorded with every evaluation."""
    from synthval.scoring.coco_eval import AREA_RANGES, IOU_THRESHOLDS, MAX_DETS

    return {"iou_thresholds": [round(float(t), 6) for t in IOU_THRESHOLDS], "max_dets": list(MAX_DETS),
            "area_ranges": [list(r) for r in AREA_RANGES]}


def _test_set_sha(metrics: Mapping[str, Any], where: str) -> str:
    test_set = metrics.get("test_set")
    sha = test_set.get("sha256") if isinstance(test_set, Mapping) else None
    if not isinstance(sha, str):
        raise DatasetError(f"{where}: missing field 'test_set.sha256' (the test set's content fingerprint); "
                           "evaluate again with this synthval, which records it")
    return sha


def benchmark_fingerprint(metrics: Mapping[str, Any], where: str = "metrics") -> str:
    """SHA-256 of the test set's content and the metric protocol of a metrics.json."""
    return sha256_of({"test_set": _test_set_sha(metrics, where), "metric_protocol": metrics.get("protocol")})


def protocol_facts(metrics: Mapping[str, Any], where: str = "metrics") -> dict[str, Any]:
    """Everything the protocol fingerprint hashes, as a readable dict (stored with each protocol)."""
    eval_config = metrics.get("config") or {}
    return {
        "test_set": _test_set_sha(metrics, where),
        "split": (metrics.get("test_set") or {}).get("split"),
        "metric_protocol": metrics.get("protocol"),
        "scoring": metrics.get("scoring"),
        "eval_config": {k: v for k, v in sorted(eval_config.items()) if k not in NON_PROTOCOL_KEYS},
        "inference": metrics.get("inference"),
        "model_inference": model_inference(metrics.get("checkpoint")),
    }


def model_inference(checkpoint: Any) -> dict[str, Any]:
    """The inference settings of the evaluated checkpoint (metrics.json "checkpoint"); {} when a results
    file was scored. A checkpoint that stores no model config (the seed's) ran with ModelConfig's defaults,
    which are torchvision's, as the seed built its models."""
    import dataclasses

    from synthval.config import ModelConfig

    if not isinstance(checkpoint, Mapping):
        return {}
    train_config = checkpoint.get("config")
    stored = train_config.get("model") if isinstance(train_config, Mapping) else None
    stored = stored if isinstance(stored, Mapping) else {}
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in MODEL_INFERENCE_KEYS}
    return {**defaults, **{k: stored[k] for k in MODEL_INFERENCE_KEYS if k in stored}}


def protocol_fingerprint(metrics: Mapping[str, Any], where: str = "metrics") -> str:
    """SHA-256 of `protocol_facts`: equal for results that can be compared number for number."""
    return sha256_of(protocol_facts(metrics, where))


def sha256_of(obj: Any) -> str:
    """SHA-256 of the canonical JSON of `obj` (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()
