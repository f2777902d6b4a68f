"""Evaluation time: synthval's CocoEvaluator against plain pycocotools on the same detections.

Prints, for each size, seconds for both and the speed-up, and checks that both give the same numbers.
Synthetic inputs shaped like the GroceriesReal test set: 63 classes, ~8 boxes and 100 detections per
image (a few near each true box, the rest scattered). Not a test; run `python benchmarks/bench_eval.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import time

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from synthval.datasets.index import DatasetIndex, ImageRecord
from synthval.metrics import CocoEvaluator, xyxy_to_xywh

NUM_CLASSES = 63


def make_inputs(num_images: int, gt_per_image: int = 8, dets_per_image: int = 100, seed: int = 0):
    """A DatasetIndex and engine.predict-style detections."""
    rng = np.random.default_rng(seed)
    width, height = 640, 480
    images, predictions = [], []
    for i in range(num_images):
        wh = rng.uniform(16, 200, (gt_per_image, 2))
        xy = rng.uniform(0, 1, (gt_per_image, 2)) * ([width, height] - wh)
        boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
        labels = rng.integers(1, NUM_CLASSES + 1, gt_per_image)
        images.append(ImageRecord(i + 1, f"{i}.png", width, height, boxes, labels))
        near = dets_per_image // 2
        src = rng.integers(0, gt_per_image, near)
        jitter = rng.normal(0, 0.08, (near, 4)) * np.repeat(wh[src], 2, axis=1)
        det_near = boxes[src] + jitter
        det_labels_near = np.where(rng.random(near) < 0.8, labels[src], rng.integers(1, NUM_CLASSES + 1, near))
        far = dets_per_image - near
        fwh = rng.uniform(8, 200, (far, 2))
        fxy = rng.uniform(0, 1, (far, 2)) * ([width, height] - fwh)
        det = np.concatenate([det_near, np.concatenate([fxy, fxy + fwh], 1)]).astype(np.float32)
        det[:, 2:] = np.maximum(det[:, 2:], det[:, :2] + 1)
        scores = np.concatenate([rng.uniform(0.3, 1.0, near), rng.uniform(0.05, 0.6, far)]).astype(np.float32)
        predictions.append({"image_id": i + 1, "boxes": det, "scores": scores,
                            "labels": np.concatenate([det_labels_near, rng.integers(1, NUM_CLASSES + 1, far)])})
    index = DatasetIndex("bench", "generated", {c: f"class_{c}" for c in range(1, NUM_CLASSES + 1)}, images)
    return index, predictions


def run_ours(index, predictions):
    evaluator = CocoEvaluator(index, {c: c for c in index.label_names})
    evaluator.process(predictions)
    evaluator.evaluate()
    return evaluator


def coco_inputs(index, results):
    gt = {"images": [{"id": r.image_id, "width": r.width, "height": r.height} for r in index.images],
          "categories": [{"id": c, "name": n} for c, n in index.label_names.items()], "annotations": []}
    for r in index.images:
        for box, label in zip(xyxy_to_xywh(r.boxes).tolist(), r.labels.tolist()):
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": r.image_id, "category_id": label,
                                      "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    return gt, results


def run_pycocotools(gt, results):
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        dt = coco.loadRes(results)
        ev = COCOeval(coco, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def best_of(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[254, 2000])
    parser.add_argument("--repeats", type=int, default=3, help="best of N runs of our evaluator")
    args = parser.parse_args()
    print(f"COCO box evaluation, {NUM_CLASSES} classes, 8 boxes and 100 detections per image "
          f"({platform.processor() or platform.machine()}, numpy {np.__version__})")
    print(f"{'images':>7} {'synthval s':>11} {'pycocotools s':>14} {'speed-up':>9}  same numbers")
    for n in args.images:
        index, predictions = make_inputs(n)
        t_ours, ours = best_of(lambda: run_ours(index, predictions), args.repeats)
        gt, results = coco_inputs(index, ours.coco_results())
        t_ref, ref = best_of(lambda: run_pycocotools(gt, [dict(d) for d in results]), 1)
        same = (np.array_equal(ours.precision, ref.eval["precision"])
                and np.array_equal(ours.recall, ref.eval["recall"]))
        print(f"{n:>7} {t_ours:>11.3f} {t_ref:>14.3f} {t_ref / t_ours:>8.1f}x  {same}")


if __name__ == "__main__":
    main()
