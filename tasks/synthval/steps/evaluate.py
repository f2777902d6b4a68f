"""`run_evaluate`: COCO metrics of a checkpoint, or of an existing COCO results file, on a test set.

    checkpoint:    dataset -> checked index of the split (images must be there) -> model -> predictions
    results file:  annotations of the split alone (no image is opened) -> the file's detections
                   -> CocoEvaluator (matches once) -> bootstrap intervals from the same matches
                   -> <out>/predictions.json, <out>/metrics.json, TensorBoard, a summary table in the log

Labels: the test set's labels are scored; model classes are matched to them by name (a seed checkpoint,
which names none, by id: its class k is the test set's label id k). Test labels the model cannot predict
stay in (AP 0 where they have boxes: the truth for that model) and a warning names them; detections of
model classes the test set lacks are not scored, and a warning and `metrics.json`'s "unscored_detections"
count them per class. `metrics.json` holds `synthval.scoring.coco_eval`'s result
dict plus provenance (see `scoring.provenance`), "intervals" (`BootstrapResult.to_dict()`: 95% percentile
bootstrap intervals over the test images of mAP, mAP50, mAP75, mAR100 and per-class AP / AP50, from
`config.bootstrap_replicates` resamples; null when 0), and "inference": {"device": "cpu" | "cuda" |
"mps", "dtype": "float32" | "bfloat16" | "float16"} (the model's device class and autocast dtype; box
decoding is float32 whatever the dtype, see `engine.predict`), null when a results file was scored.
`predictions.json` is a COCO results list in the test set's category ids and image ids: a COCO test
set's own `images[].id`, else synthval's index ids. That is also what `--predictions` files must use
(a scored file is copied there as it is), so a written `predictions.json` scores again to the same
numbers. Everything is checked before anything is written: bad input leaves `out_uri` untouched.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from typing import Any

from synthval.config import EvalConfig
from synthval.data import DatasetIndex, default_split, load_dataset, load_ground_truth
from synthval.errors import ConfigError
from synthval.io import storage
from synthval.io.sources import local_dataset
from synthval.scoring.bootstrap import CocoBootstrap
from synthval.scoring.coco_eval import (
    SUMMARY_KEYS,
    CocoEvaluator,
    Matches,
    coco_image_ids,
    format_summary,
    parse_coco_results,
)
from synthval.scoring.provenance import provenance

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.json"


def run_evaluate(config: EvalConfig, data_uri: str, out_uri: str, checkpoint_uri: str | None,
                 predictions_uri: str | None, tb_log_dir_uri: str | None, dataset_format: str = "auto",
                 bbox_definition_id: str | None = None, skip_broken: bool = False) -> dict[str, Any]:
    """Score a checkpoint or a COCO results file on `config.split` of `data_uri`; write into `out_uri`.

    Returns {"metrics_uri", "predictions_uri", "summary": {"mAP", "mAP50", "mAR100"}}.
    """
    if (checkpoint_uri is None) == (predictions_uri is None):
        raise ConfigError("evaluate needs exactly one of a checkpoint or a predictions (COCO results) file")
    if 0 < config.bootstrap_replicates < 10:
        raise ConfigError(f"bootstrap_replicates: {config.bootstrap_replicates} resamples give no interval worth "
                          "the name; use 0 (no intervals) or at least 10 (1000 for reported intervals)")
    data_path = local_dataset(data_uri)
    config = dataclasses.replace(config, split=default_split(data_path, dataset_format, config.split))
    if predictions_uri is not None:  # every number depends on the annotations alone
        index = load_ground_truth(data_path, format=dataset_format, split=config.split,
                                  bbox_definition_id=bbox_definition_id)
    else:
        index = load_dataset(data_path, format=dataset_format, split=config.split,
                             bbox_definition_id=bbox_definition_id, skip_broken=skip_broken)
    log.info("test set: %d images, %d boxes, %d labels (%s, split %s)", len(index), index.num_boxes,
             len(index.label_names), index.format, config.split)
    coco_ids = coco_image_ids(index)
    checkpoint_info: dict[str, Any] | None = None
    inference: dict[str, str] | None = None
    if predictions_uri is not None:
        source = storage.read_bytes(predictions_uri)
        results = parse_coco_results(source, predictions_uri, index,
                                     image_ids={coco_id: image_id for image_id, coco_id in coco_ids.items()})
        log.info("scoring %d detections from %s", len(results), predictions_uri)
        evaluator = CocoEvaluator(index, {c: c for c in index.label_names}, None, coco_image_ids=coco_ids)
        evaluator.add_results(results)
    else:
        predictions, class_ids, model_names, checkpoint_info, inference = predict_checkpoint(
            config, checkpoint_uri, index)
        evaluator = CocoEvaluator(index, class_ids, model_names, coco_image_ids=coco_ids)
        evaluator.process(predictions)
    metrics = evaluator.evaluate()
    _warn_label_mismatch(metrics["label_match"], metrics["num_predictions_dropped"])
    metrics["unscored_detections"] = (unscored_detections(predictions, class_ids, model_names)
                                      if checkpoint_uri is not None else {"total": 0, "by_class": {}})
    metrics["intervals"] = None
    if config.bootstrap_replicates:
        intervals = CocoBootstrap(evaluator.matches).run(replicates=config.bootstrap_replicates)
        metrics["intervals"] = intervals.to_dict()

    out_predictions_uri = storage.join_uri(out_uri, PREDICTIONS_FILE)
    metrics_uri = storage.join_uri(out_uri, METRICS_FILE)
    metrics.update(provenance(config, index, data_uri, checkpoint_uri, predictions_uri, out_predictions_uri,
                              coco_ids, checkpoint_info))
    metrics["inference"] = inference
    if tb_log_dir_uri:
        step = int((checkpoint_info or {}).get("step") or 0)
        write_tensorboard(tb_log_dir_uri, metrics, evaluator.matches, config, step)
    if predictions_uri is not None:
        storage.write_bytes(out_predictions_uri, source)  # the scored file itself, checked above
    else:
        storage.write_text(out_predictions_uri, json.dumps(evaluator.coco_results()) + "\n")
    storage.write_json(metrics_uri, metrics)  # last: its presence means the evaluation is complete
    log.info("%s", format_summary(metrics))
    log.info("wrote %s and %s", metrics_uri, out_predictions_uri)
    return {"metrics_uri": metrics_uri, "predictions_uri": out_predictions_uri,
            "summary": {k: metrics[k] for k in ("mAP", "mAP50", "mAR100")}}


def predict_checkpoint(config: EvalConfig, checkpoint_uri: str, index: DatasetIndex
                       ) -> tuple[list[dict], dict[int, int], list[str] | None, dict[str, Any], dict[str, str]]:
    """Run the checkpoint over the index; return (predictions, class_ids, model class names, checkpoint
    info, inference {"device": device class, "dtype": autocast dtype or float32})."""
    import torch

    from synthval.data import DetectionDataset, collate_detection
    from synthval.detection import distributed, engine
    from synthval.detection.inference import load_model_for_inference

    device = distributed.resolve_device(config.device)
    amp_dtype = distributed.resolve_amp_dtype(config.amp, device)
    model, space, meta = load_model_for_inference(checkpoint_uri, device)
    if space is None:  # a seed checkpoint: its class k is the test set's label id k
        class_ids, names = {c: c for c in index.label_names}, None
    else:
        class_ids, names = space.class_ids(index), list(space.names)
    loader = torch.utils.data.DataLoader(
        DetectionDataset(index, class_ids, train=False), batch_size=config.batch_size, shuffle=False,
        num_workers=config.num_workers, collate_fn=collate_detection, pin_memory=device.type == "cuda",
    )
    log.info("predicting %d images on %s (amp %s, batch %d)", len(index), device, amp_dtype, config.batch_size)
    predictions = engine.predict(model, loader, device, amp_dtype=amp_dtype)
    info = {k: meta.get(k) for k in ("step", "epoch", "synthval_version", "source_format", "num_classes")}
    info["model"] = (meta.get("model_config") or {}).get("name")
    info["config"] = _jsonable(meta.get("config"))
    inference = {"device": device.type, "dtype": str(amp_dtype or torch.float32).removeprefix("torch.")}
    return predictions, class_ids, names, info, inference


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str)) if value is not None else None


def unscored_detections(predictions: list[dict], class_ids: Mapping[int, int], model_names: list[str] | None
                        ) -> dict[str, Any]:
    """{"total": n, "by_class": {class: n}} of the detections whose model class has no label in the test
    set, so are not scored; a class is its name, or "class <k>" when the model names none. Warns when the
    model names none (`_warn_label_mismatch` names them otherwise)."""
    import numpy as np

    scored = np.array(sorted(set(class_ids.values())), dtype=np.int64)
    labels = np.concatenate([np.asarray(p["labels"], dtype=np.int64).reshape(-1) for p in predictions]
                            or [np.zeros(0, np.int64)])
    classes, counts = np.unique(labels[~np.isin(labels, scored)], return_counts=True)

    def name(k: int) -> str:
        return model_names[k - 1] if model_names is not None and 0 < k <= len(model_names) else f"class {k}"

    by_class = {name(int(k)): int(n) for k, n in zip(classes, counts)}
    total = int(counts.sum())
    if total and model_names is None:
        shown = ", ".join(f"{k} ({n})" for k, n in sorted(by_class.items(), key=lambda kv: -kv[1])[:20])
        log.warning("%d detection(s) of %d model class(es) with no label id in the test set are not scored "
                    "(the checkpoint names no classes, so class k is the test set's label id k): %s",
                    total, len(by_class), shown)
    return {"total": total, "by_class": by_class}


def _warn_label_mismatch(match: Mapping[str, list[str]], dropped: int) -> None:
    if match["only_in_data"]:
        log.warning("%d test label(s) the model cannot predict; they count with AP 0 where they have boxes: %s",
                    len(match["only_in_data"]), ", ".join(match["only_in_data"]))
    if match["only_in_model"]:
        log.warning("%d model class(es) absent from the test set; their %d detection(s) are not scored: %s",
                    len(match["only_in_model"]), dropped, ", ".join(match["only_in_model"]))
    if not match["shared"]:
        log.warning("the model shares no label with the test set: every AP is 0")


# --- TensorBoard ----------------------------------------------------------------------------------------


def write_tensorboard(tb_log_dir_uri: str, metrics: dict[str, Any], matches: Matches, config: EvalConfig,
                      step: int) -> None:
    """Scalars, a summary table and the run report's own pictures (per-class AP, PR curves, confusion,
    worst and best images with TP / FP / misses drawn, from the evaluation's own matches), so
    TensorBoard and the report show the same."""
    from synthval.render.tensorboard import add_scalars, open_summary_writer, tensorboard_images

    images = tensorboard_images(matches, metrics, score_threshold=config.draw_score_thresh,
                                num_images=config.num_sample_images)
    writer = open_summary_writer(tb_log_dir_uri)
    try:
        add_scalars(writer, "eval", {k: metrics[k] for k in SUMMARY_KEYS if "-" not in k}, step)
        writer.add_text("eval/summary", "    " + format_summary(metrics).replace("\n", "\n    "), step)
        for tag, image in images.items():
            writer.add_image(tag, image, step, dataformats="HWC")
    finally:
        writer.close()
