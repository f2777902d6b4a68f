"""Per-image outcomes of an evaluation at a score threshold: true positives, false positives, misses and
class confusions, read off the evaluation's own matching (`coco_eval.Matches`), never matched again.

Reports, notebooks and TensorBoard draw these; the numbers stay the evaluator's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from synthval.scoring.coco_eval import IOU_THRESHOLDS, Matches, box_iou, expand_ranges

OUTCOME_IOU = 0.5


@dataclass
class ImageOutcome:
    """One test image at the score threshold and IoU .5: what was found, falsely found and missed."""

    position: int
    image_id: int
    path: str
    tp: int
    fp: int
    miss: int
    confused: int
    items: list[dict[str, Any]]

    @property
    def f1(self) -> float | None:
        """2 TP / (2 TP + FP + misses); None for an image with no box and no detection."""
        total = 2 * self.tp + self.fp + self.miss
        return None if total == 0 else 2 * self.tp / total


def image_outcomes(matches: Matches, score_threshold: float) -> tuple[list[ImageOutcome], dict[str, dict[str, int]]]:
    """Per image: detections >= threshold as TP/FP and true boxes as found/missed, at IoU .5.

    The matching is the evaluation's own (COCO's greedy, score-ordered matching at IoU .5, all areas,
    100 detections per image and class): matching runs in score order, so dropping detections below
    the threshold afterwards gives what matching only those above it would. A detection a crowd
    region absorbed is neither (and not drawn); a crowd region is never a miss. A false positive on a
    true box of another class (IoU >= .5) counts as a confusion: {true label: {predicted label: count}}.
    """
    t = int(np.argmin(np.abs(IOU_THRESHOLDS - OUTCOME_IOU)))
    names = [matches.index.label_names[c] for c in matches.cat_ids]
    match = matches.det_match(t)
    shown = matches.det_score >= score_threshold
    absorbed = (match >= 0) & matches.gt_crowd[np.maximum(match, 0)]
    tp, fp = shown & (match >= 0) & ~absorbed, shown & (match < 0)
    found = np.zeros(len(matches.gt_cat), dtype=bool)
    found[match[tp]] = True
    miss = ~found & ~matches.gt_crowd
    confused_with = _confusions(matches, np.flatnonzero(fp))
    per_image: list[list[dict[str, Any]]] = [[] for _ in matches.image_ids]
    counts = np.zeros((len(matches.image_ids), 4), dtype=np.int64)  # tp, fp, miss, confused
    for d in np.flatnonzero(tp | fp).tolist():
        label, score, kind = names[matches.det_cat[d]], float(matches.det_score[d]), "TP" if tp[d] else "FP"
        item = {"box": _xyxy(matches.det_xywh[d]), "kind": kind, "text": f"{kind} {label} {score:.2f}",
                "label": label, "score": score}
        counts[matches.det_img[d], 0 if tp[d] else 1] += 1
        if d in confused_with:
            item["text"] += f" on {confused_with[d]}"
            item["confused_with"] = confused_with[d]
            counts[matches.det_img[d], 3] += 1
        per_image[matches.det_img[d]].append(item)
    for g in np.flatnonzero(miss).tolist():
        label = names[matches.gt_cat[g]]
        per_image[matches.gt_img[g]].append({"box": _xyxy(matches.gt_xywh[g]), "kind": "MISS", "text": f"MISS {label}",
                                             "label": label})
        counts[matches.gt_img[g], 2] += 1
    confusion: dict[str, dict[str, int]] = {}
    for d, true_label in confused_with.items():
        row = confusion.setdefault(true_label, {})
        row[names[matches.det_cat[d]]] = row.get(names[matches.det_cat[d]], 0) + 1
    position = {img_id: pos for pos, img_id in enumerate(matches.image_ids)}
    outcomes = []
    for i, r in enumerate(matches.index.images):
        p = position[r.image_id]
        tp_n, fp_n, miss_n, confused_n = counts[p].tolist()
        outcomes.append(ImageOutcome(position=i, image_id=int(r.image_id), path=r.path, tp=tp_n, fp=fp_n, miss=miss_n,
                                     confused=confused_n, items=per_image[p]))
    return outcomes, confusion


def _confusions(matches: Matches, false_positives: np.ndarray) -> dict[int, str]:
    """{detection: the label of the true box of another class it lies on (IoU >= .5, the best one)}."""
    box_starts = np.searchsorted(matches.gt_img, np.arange(len(matches.image_ids) + 1))
    img = matches.det_img[false_positives]
    owner, gt = expand_ranges(box_starts[img], box_starts[img + 1] - box_starts[img])
    det = false_positives[owner]
    keep = (matches.gt_cat[gt] != matches.det_cat[det]) & ~matches.gt_crowd[gt]
    det, gt = det[keep], gt[keep]
    iou = box_iou(matches.det_xywh[det], matches.gt_xywh[gt])
    on = iou >= OUTCOME_IOU
    det, gt, iou = det[on], gt[on], iou[on]
    order = np.lexsort((-iou, det))  # per detection, highest IoU first (earliest box on ties)
    det, gt = det[order], gt[order]
    first = np.ones(len(det), dtype=bool)
    first[1:] = det[1:] != det[:-1]
    names = matches.index.label_names
    return {int(d): names[matches.cat_ids[matches.gt_cat[g]]] for d, g in zip(det[first], gt[first])}


def _xyxy(bbox: Sequence[float]) -> list[float]:
    x, y, w, h = (float(v) for v in bbox)
    return [x, y, x + w, y + h]

