"""COCO box evaluation with a `reset / process / evaluate` shape; pycocotools is the reference.

`CocoEvaluator` computes exactly what pycocotools' `COCOeval` (iouType "bbox") computes, with its own
constants (`pycocotools.cocoeval.Params`), its greedy matching, its tie-breaking and its float
operations, but vectorised with numpy instead of a Python loop per image, category, area range,
threshold, detection and ground truth box. `tests/test_metrics.py` proves that the precision and recall
arrays, and so every number below, are identical to pycocotools run directly on the same inputs.

Ground truth comes from a `DatasetIndex`: box area is the box's width x height (the index holds no
segmentation areas) and no box is a crowd region. Boxes become COCO `[x, y, w, h]` in float64 once
(`xyxy_to_xywh`), and that same representation is written to `predictions.json`, so scoring the written
file again gives the same numbers. Detections carry model class ids; `class_ids` maps the test set's
label ids to model classes (matched by name), predictions of model classes outside it are dropped,
and test labels the model cannot predict count with AP 0. Scoring is over the test set's labels.

The result dict of `evaluate()` (what `metrics.json` holds, before `run_evaluate` adds provenance):

- "mAP", "mAP50", "mAP75": AP averaged over IoU .50:.05:.95, at IoU .50, at IoU .75 (100 detections).
- "mAP_small", "mAP_medium", "mAP_large": mAP for boxes of area < 32^2, 32^2..96^2, > 96^2 pixels.
- "mAR1", "mAR10", "mAR100": recall averaged over IoU .50:.95 given at most 1, 10, 100 detections
  per image and class; "mAR_small", "mAR_medium", "mAR_large" at 100.
- "mean-average-precision", "mean-average-precision-iou50", "mean-average-recall": the names the seed's
  tooling (datasetinsights) used, equal to "mAP", "mAP50" and "mAR100".
- "per_class": {test label name: {"AP", "AP50", "AP75", "AR100", "num_gt", "num_predictions"}}.
- "pr_curves": {test label name: {"recall": 101 recall points 0..1, "precision": 101 values}}, the
  interpolated precision at IoU .5 (all areas, 100 detections) as COCO computes AP50 from it, and
  "pr_curve": the same averaged over the classes that have ground truth.
- "num_images", "num_gt", "num_predictions" (scored), "num_predictions_dropped" (model-only labels).
- "label_match": {"shared", "only_in_model", "only_in_data"}: label names, sorted.
- "protocol": what the numbers mean ("coco-bbox-1"); "schema_version": version of this dict's layout.

Every metric lies in [0, 1] or is null: null where pycocotools reports -1, that is where there is no
ground truth to score against (for example "mAP_medium" when the test set has no medium boxes, or a
class's "AP" when it has no box in the test split). Nulls are left out of every average, as in COCO.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from synthval import storage
from synthval.datasets.index import DatasetIndex
from synthval.errors import DatasetError


METRICS_SCHEMA_VERSION = 1
# What the numbers mean: COCO box AP/AR as pycocotools computes them, box areas, no crowd regions.
# Change it when a change to this module would change a number; it enters the protocol fingerprint.
METRIC_PROTOCOL = "coco-bbox-1"


def _coco_params() -> Any:
    # pycocotools' own constants, so the thresholds are the very same floats it compares against.
    from pycocotools.cocoeval import Params

    return Params(iouType="bbox")


_P = _coco_params()
IOU_THRESHOLDS: np.ndarray = np.asarray(_P.iouThrs, dtype=np.float64)
RECALL_THRESHOLDS: np.ndarray = np.asarray(_P.recThrs, dtype=np.float64)
MAX_DETS: tuple[int, ...] = tuple(sorted(_P.maxDets))
AREA_RANGES: tuple[tuple[float, float], ...] = tuple((float(lo), float(hi)) for lo, hi in _P.areaRng)
AREA_NAMES: tuple[str, ...] = tuple(_P.areaRngLbl)
del _P

# (result key, average precision?, IoU threshold or None for .50:.95, area range, max detections):
# pycocotools' `summarize()` in its order.
SUMMARY = (
    ("mAP", True, None, "all", 100),
    ("mAP50", True, 0.5, "all", 100),
    ("mAP75", True, 0.75, "all", 100),
    ("mAP_small", True, None, "small", 100),
    ("mAP_medium", True, None, "medium", 100),
    ("mAP_large", True, None, "large", 100),
    ("mAR1", False, None, "all", 1),
    ("mAR10", False, None, "all", 10),
    ("mAR100", False, None, "all", 100),
    ("mAR_small", False, None, "small", 100),
    ("mAR_medium", False, None, "medium", 100),
    ("mAR_large", False, None, "large", 100),
)
SEED_NAMES = {
    "mean-average-precision": "mAP",
    "mean-average-precision-iou50": "mAP50",
    "mean-average-recall": "mAR100",
}
SUMMARY_KEYS = tuple(key for key, *_ in SUMMARY) + tuple(SEED_NAMES)


def xyxy_to_xywh(boxes: Any) -> np.ndarray:
    """Return (N, 4) float64 COCO boxes [x, y, w, h] from (N, 4) xyxy boxes (any float type)."""
    b = _numpy(boxes, np.float64).reshape(-1, 4)
    return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)


def _numpy(x: Any, dtype: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, possibly on an accelerator
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def box_iou_xywh(d: np.ndarray, g: np.ndarray) -> np.ndarray:
    """IoU of paired rows of two (N, 4) xywh arrays, with the float operations of pycocotools' bbIou."""
    w = np.minimum(d[:, 2] + d[:, 0], g[:, 2] + g[:, 0]) - np.maximum(d[:, 0], g[:, 0])
    h = np.minimum(d[:, 3] + d[:, 1], g[:, 3] + g[:, 1]) - np.maximum(d[:, 1], g[:, 1])
    overlap = (w > 0) & (h > 0)
    inter = w * h
    union = d[:, 2] * d[:, 3] + g[:, 2] * g[:, 3] - inter
    out = np.zeros(len(d), dtype=np.float64)
    np.divide(inter, union, out=out, where=overlap)
    return out


def _group_bounds(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique keys of a sorted array with the [start, end) of each run."""
    if len(sorted_keys) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    ends = np.r_[starts[1:], len(sorted_keys)]
    return sorted_keys[starts], starts, ends


def _ranges(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated aranges: (index into starts, offset within its range) for every element."""
    owner = np.repeat(np.arange(len(starts)), counts)
    offset = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    return owner, offset


def _match_groups(
    d_start: np.ndarray, d_count: np.ndarray, g_start: np.ndarray, g_count: np.ndarray,
    det_xywh: np.ndarray, gt_xywh: np.ndarray, gt_outside: np.ndarray, chunk: int = 2048,
) -> tuple[np.ndarray, np.ndarray]:
    """COCO's greedy matching for (image, class) groups holding both detections and ground truth.

    Detections of a group are in score order, ground truth in file order. Returns two (num dets, T, A)
    bool arrays: matched, and matched to a ground truth box ignored for that area range. Groups run in
    lockstep over detection rank: step r matches the r-th detection of every group at once.
    """
    n_det = len(det_xywh)
    T, A = len(IOU_THRESHOLDS), len(AREA_RANGES)
    matched = np.zeros((n_det, T, A), dtype=bool)
    on_ignored = np.zeros((n_det, T, A), dtype=bool)
    order = np.argsort(-d_count, kind="stable")
    thresholds = np.minimum(IOU_THRESHOLDS, 1 - 1e-10)[None, :, None, None]
    for lo in range(0, len(order), chunk):
        sel = order[lo:lo + chunk]
        ds, dc, gs, gc = d_start[sel], d_count[sel], g_start[sel], g_count[sel]
        n, d_max, g_max = len(sel), int(dc.max()), int(gc.max())
        # IoU of every (detection, ground truth) pair in each group; padding can never match.
        pair_owner, pair_offset = _ranges(np.zeros(n, dtype=np.int64), dc * gc)
        r, j = pair_offset // gc[pair_owner], pair_offset % gc[pair_owner]
        ious = np.full((n, d_max, g_max), -1.0)
        ious[pair_owner, r, j] = box_iou_xywh(det_xywh[ds[pair_owner] + r], gt_xywh[gs[pair_owner] + j])
        gt_owner, gt_offset = _ranges(gs, gc)
        ignored = np.ones((n, A, g_max), dtype=bool)
        ignored[gt_owner, :, gt_offset] = gt_outside[gs[gt_owner] + gt_offset]
        taken = np.zeros((n, T, A, g_max), dtype=bool)
        for rank in range(d_max):
            k = int(np.count_nonzero(dc > rank))  # groups are sorted by detection count, largest first
            iou = ious[:k, rank][:, None, None, :]
            eligible = (iou >= thresholds) & ~taken[:k]
            # pycocotools stops at the first ignored box once it holds a match to a regular one, and
            # keeps the last box reaching the best IoU (it updates on >=).
            regular = eligible & ~ignored[:k, None]
            eligible = np.where(regular.any(-1, keepdims=True), regular, eligible)
            value = np.where(eligible, iou, -np.inf)
            best = eligible & (value == value.max(-1, keepdims=True))
            gi, ti, ai = np.nonzero(eligible.any(-1))
            gj = g_max - 1 - np.argmax(best[gi, ti, ai, ::-1], axis=-1)
            taken[gi, ti, ai, gj] = True
            det = ds[gi] + rank
            matched[det, ti, ai] = True
            on_ignored[det, ti, ai] = ignored[gi, ai, gj]
    return matched, on_ignored


def accumulate(
    det_cat: np.ndarray, det_img: np.ndarray, det_rank: np.ndarray, det_score: np.ndarray,
    tp: np.ndarray, fp: np.ndarray, num_regular_gt: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval.accumulate: precision (T, R, K, A, M) and recall (T, K, A, M), -1 where no ground truth.

    `tp`/`fp` are (num dets, T, A) bool; `num_regular_gt` is (K, A): ground truth boxes not ignored.
    """
    T, R, A, M = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), len(AREA_RANGES), len(MAX_DETS)
    K = num_regular_gt.shape[0]
    precision = -np.ones((T, R, K, A, M))
    recall = -np.ones((T, K, A, M))
    # pycocotools concatenates images in id order, each in score order, then sorts stably by score.
    order = np.lexsort((det_rank, det_img, -det_score, det_cat))
    cats, starts, ends = _group_bounds(det_cat[order])
    span = {int(c): (s, e) for c, s, e in zip(cats, starts, ends)}
    empty = np.zeros(0, dtype=np.int64)
    for k in range(K):
        s, e = span.get(k, (0, 0))
        in_cat = order[s:e] if e > s else empty
        if not num_regular_gt[k].any():
            continue
        for m, max_det in enumerate(MAX_DETS):
            dets = in_cat[det_rank[in_cat] < max_det]
            nd = len(dets)
            tp_sums = np.cumsum(tp[dets], axis=0).astype(dtype=float)  # (nd, T, A)
            fp_sums = np.cumsum(fp[dets], axis=0).astype(dtype=float)
            for a in range(A):
                npig = int(num_regular_gt[k, a])
                if npig == 0:
                    continue
                if nd == 0:
                    recall[:, k, a, m] = 0
                    precision[:, :, k, a, m] = 0
                    continue
                tp_sum, fp_sum = tp_sums[:, :, a].T, fp_sums[:, :, a].T
                rc = tp_sum / npig
                pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
                recall[:, k, a, m] = rc[:, -1]
                pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
                for t in range(T):
                    inds = np.searchsorted(rc[t], RECALL_THRESHOLDS, side="left")
                    q = np.zeros(R)
                    ok = inds < nd
                    q[ok] = pr[t, inds[ok]]
                    precision[t, :, k, a, m] = q
    return precision, recall


def summarize(precision: np.ndarray, recall: np.ndarray, ap: bool, iou: float | None, area: str,
              max_dets: int) -> float:
    """COCOeval.summarize's `_summarize`: the mean over entries > -1, or -1 where there are none."""
    aind = [i for i, name in enumerate(AREA_NAMES) if name == area]
    mind = [i for i, m in enumerate(MAX_DETS) if m == max_dets]
    s = precision if ap else recall
    if iou is not None:
        s = s[np.where(iou == IOU_THRESHOLDS)[0]]
    s = s[:, :, :, aind, mind] if ap else s[:, :, aind, mind]
    if len(s[s > -1]) == 0:
        return -1.0
    return float(np.mean(s[s > -1]))


def _mean_or_none(values: np.ndarray) -> float | None:
    """Mean of entries > -1 as pycocotools averages, None where there are none."""
    kept = values[values > -1]
    return float(np.mean(kept)) if len(kept) else None


def _none_if_absent(value: float) -> float | None:
    return None if value <= -1 else value


class CocoEvaluator:
    """Collect detections with `process`, then `evaluate` them against `index` COCO-style.

    `class_ids` maps the test set's label ids to the model's class ids (shared names only);
    `label_names[k - 1]` names model class k (None: unknown, e.g. a seed checkpoint or a results file,
    whose classes are the test set's own ids). `coco_image_ids` maps index image ids to the ids a COCO
    annotation file gives them (default: the same): `coco_results()` writes those, and pycocotools
    visits images in their order, which decides ties between equal scores on different images.
    """

    def __init__(self, index: DatasetIndex, class_ids: Mapping[int, int],
                 label_names: Sequence[str] | None = None, coco_image_ids: Mapping[int, Any] | None = None):
        self.index = index
        self.cat_ids = sorted(int(c) for c in index.label_names)
        self.cat_pos = {c: k for k, c in enumerate(self.cat_ids)}
        self.model_to_cat: dict[int, int] = {}
        for data_id, model_class in class_ids.items():
            if int(data_id) not in self.cat_pos:
                raise ValueError(f"class_ids maps label id {data_id}, which is not a label of the test set")
            if int(model_class) in self.model_to_cat:
                raise ValueError(f"class_ids maps model class {model_class} to two test labels")
            self.model_to_cat[int(model_class)] = int(data_id)
        self.label_names = list(label_names) if label_names is not None else None
        image_ids = [r.image_id for r in index.images]
        if len(set(image_ids)) != len(image_ids):
            raise DatasetError(f"{index.root}: image ids are not unique; COCO evaluation needs one id per image")
        self.coco_image_ids = dict(coco_image_ids) if coco_image_ids is not None else {i: i for i in image_ids}
        # pycocotools visits images in id order; positions stand in for ids (which may exceed int64).
        self.image_ids = sorted(image_ids, key=self.coco_image_ids.__getitem__)
        self.img_pos = {img_id: i for i, img_id in enumerate(self.image_ids)}
        self._gt = self._ground_truth()
        self.precision: np.ndarray | None = None
        self.recall: np.ndarray | None = None
        self.reset()

    def _ground_truth(self) -> dict[str, np.ndarray]:
        imgs, cats, boxes = [], [], []
        for record in self.index.images:
            labels = np.asarray(record.labels, dtype=np.int64).reshape(-1)
            unknown = sorted(set(labels.tolist()) - set(self.cat_pos))
            if unknown:
                raise DatasetError(f"{record.path}: label id {unknown[0]} is not in the dataset's label names")
            imgs.append(np.full(len(labels), self.img_pos[record.image_id], dtype=np.int64))
            cats.append(np.array([self.cat_pos[int(c)] for c in labels], dtype=np.int64))
            boxes.append(xyxy_to_xywh(record.boxes))
        return {
            "img": np.concatenate(imgs) if imgs else np.zeros(0, dtype=np.int64),
            "cat": np.concatenate(cats) if cats else np.zeros(0, dtype=np.int64),
            "xywh": np.concatenate(boxes) if boxes else np.zeros((0, 4)),
        }

    def reset(self) -> None:
        """Forget every processed detection."""
        self._img: list[np.ndarray] = []
        self._cat: list[np.ndarray] = []
        self._xywh: list[np.ndarray] = []
        self._score: list[np.ndarray] = []
        self.num_dropped = 0

    def process(self, predictions: Iterable[Mapping[str, Any]]) -> None:
        """Add detections: dicts with image_id, boxes (N, 4) xyxy, scores (N,), labels (N,) model classes.

        A dict may carry "boxes_xywh" (COCO boxes exactly as read from a results file), which then
        takes precedence over "boxes", so a results file is scored on its own numbers.
        """
        model_classes = np.array(sorted(self.model_to_cat), dtype=np.int64)
        positions = np.array([self.cat_pos[self.model_to_cat[c]] for c in model_classes.tolist()], dtype=np.int64)
        for pred in predictions:
            image_id = pred["image_id"]
            image_id = int(image_id.item() if hasattr(image_id, "item") else image_id)
            if image_id not in self.img_pos:
                raise DatasetError(f"prediction for image id {image_id}, which is not in the test set "
                                   f"{self.index.root}")
            xywh = (_numpy(pred["boxes_xywh"], np.float64).reshape(-1, 4) if "boxes_xywh" in pred
                    else xyxy_to_xywh(pred["boxes"]))
            scores = _numpy(pred["scores"], np.float64).reshape(-1)
            labels = _numpy(pred["labels"], np.int64).reshape(-1)
            if not len(xywh) == len(scores) == len(labels):
                raise ValueError(f"image {image_id}: boxes, scores and labels differ in length")
            at = np.minimum(np.searchsorted(model_classes, labels), max(len(model_classes) - 1, 0))
            known = (model_classes[at] == labels) if len(model_classes) else np.zeros(len(labels), bool)
            cats = np.where(known, positions[at] if len(positions) else -1, -1)
            keep = (cats >= 0) & np.isfinite(scores) & np.isfinite(xywh).all(axis=1)
            self.num_dropped += int(len(keep) - keep.sum())
            self._img.append(np.full(int(keep.sum()), self.img_pos[image_id], dtype=np.int64))
            self._cat.append(cats[keep])
            self._xywh.append(xywh[keep])
            self._score.append(scores[keep])

    def _detections(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if not self._img:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0)
        return (np.concatenate(self._img), np.concatenate(self._cat), np.concatenate(self._xywh),
                np.concatenate(self._score))

    def coco_results(self) -> list[dict[str, Any]]:
        """The scored detections as a COCO results list (COCO image ids, test set label ids), in order."""
        img, cat, xywh, score = self._detections()
        return [
            {"image_id": self.coco_image_ids[self.image_ids[i]], "category_id": self.cat_ids[c], "bbox": b,
             "score": s}
            for i, c, b, s in zip(img.tolist(), cat.tolist(), xywh.tolist(), score.tolist())
        ]

    def label_match(self) -> dict[str, list[str]]:
        """Test labels shared with the model, only in the model, only in the test set (names, sorted)."""
        data_names = self.index.label_names
        shared = sorted(data_names[c] for c in self.model_to_cat.values())
        only_in_data = sorted(data_names[c] for c in self.cat_ids if c not in self.model_to_cat.values())
        only_in_model = []
        if self.label_names is not None:
            only_in_model = sorted(n for k, n in enumerate(self.label_names, start=1) if k not in self.model_to_cat)
        return {"shared": shared, "only_in_model": only_in_model, "only_in_data": only_in_data}

    def evaluate(self) -> dict[str, Any]:
        """Score everything processed so far; returns the result dict documented in the module."""
        T, A, K = len(IOU_THRESHOLDS), len(AREA_RANGES), len(self.cat_ids)
        img, cat, xywh, score = self._detections()
        # Detections per (image, class) in pycocotools' order: score, then arrival; at most 100 kept.
        det_key = img * K + cat
        order = np.lexsort((np.arange(len(img)), -score, det_key))
        keys, starts, ends = _group_bounds(det_key[order])
        rank = np.arange(len(order)) - np.repeat(starts, ends - starts)
        order = order[rank < MAX_DETS[-1]]
        rank = rank[rank < MAX_DETS[-1]]
        img, cat, xywh, score, det_key = img[order], cat[order], xywh[order], score[order], det_key[order]
        det_area = xywh[:, 2] * xywh[:, 3]

        gt = self._gt
        gt_key = gt["img"] * K + gt["cat"]
        gt_order = np.argsort(gt_key, kind="stable")
        gt_xywh = gt["xywh"][gt_order]
        gt_area = gt_xywh[:, 2] * gt_xywh[:, 3]
        lo = np.array([r[0] for r in AREA_RANGES])
        hi = np.array([r[1] for r in AREA_RANGES])
        gt_outside = (gt_area[:, None] < lo) | (gt_area[:, None] > hi)  # (num gt, A)
        det_outside = (det_area[:, None] < lo) | (det_area[:, None] > hi)

        d_keys, d_starts, d_ends = _group_bounds(det_key)
        g_keys, g_starts, g_ends = _group_bounds(gt_key[gt_order])
        both, d_at, g_at = np.intersect1d(d_keys, g_keys, assume_unique=True, return_indices=True)
        matched, on_ignored = _match_groups(
            d_starts[d_at], (d_ends - d_starts)[d_at], g_starts[g_at], (g_ends - g_starts)[g_at],
            xywh, gt_xywh, gt_outside,
        ) if len(both) else (np.zeros((len(img), T, A), bool), np.zeros((len(img), T, A), bool))
        tp = matched & ~on_ignored
        fp = ~matched & ~det_outside[:, None, :]
        regular = np.zeros((K, A), dtype=np.int64)
        np.add.at(regular, gt["cat"][gt_order], (~gt_outside).astype(np.int64))
        self.precision, self.recall = accumulate(cat, img, rank, score, tp, fp, regular)
        return self._result(cat)

    def _result(self, det_cat: np.ndarray) -> dict[str, Any]:
        precision, recall = self.precision, self.recall
        result: dict[str, Any] = {}
        for key, ap, iou, area, max_dets in SUMMARY:
            result[key] = _none_if_absent(summarize(precision, recall, ap, iou, area, max_dets))
        for seed_name, key in SEED_NAMES.items():
            result[seed_name] = result[key]
        names = [self.index.label_names[c] for c in self.cat_ids]
        num_gt = np.bincount(self._gt["cat"], minlength=len(names))
        num_det = np.bincount(det_cat, minlength=len(names))
        a_all, m_100 = AREA_NAMES.index("all"), MAX_DETS.index(100)
        t50, t75 = (int(np.where(IOU_THRESHOLDS == iou)[0][0]) for iou in (0.5, 0.75))
        result["per_class"] = {
            name: {
                "AP": _mean_or_none(precision[:, :, k, a_all, m_100]),
                "AP50": _mean_or_none(precision[t50, :, k, a_all, m_100]),
                "AP75": _mean_or_none(precision[t75, :, k, a_all, m_100]),
                "AR100": _mean_or_none(recall[:, k, a_all, m_100]),
                "num_gt": int(num_gt[k]),
                "num_predictions": int(num_det[k]),
            }
            for k, name in enumerate(names)
        }
        recall_points = [float(r) for r in RECALL_THRESHOLDS]
        curves = precision[t50, :, :, a_all, m_100]  # (R, K) at IoU .5
        result["pr_curves"] = {
            name: {"recall": recall_points, "precision": curves[:, k].tolist()}
            for k, name in enumerate(names) if curves[0, k] > -1
        }
        scored = curves[:, curves[0] > -1]
        result["pr_curve"] = {
            "recall": recall_points,
            "precision": scored.mean(axis=1).tolist() if scored.shape[1] else [None] * len(recall_points),
        }
        result["num_images"] = len(self.image_ids)
        result["num_gt"] = int(len(self._gt["cat"]))
        result["num_predictions"] = int(sum(len(s) for s in self._score))
        result["num_predictions_dropped"] = int(self.num_dropped)
        result["label_match"] = self.label_match()
        result["protocol"] = METRIC_PROTOCOL
        result["schema_version"] = METRICS_SCHEMA_VERSION
        return result


def evaluate_detections(index: DatasetIndex, class_ids: Mapping[int, int], predictions: Iterable[Mapping[str, Any]],
                        label_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Score `predictions` (engine.predict's dicts) on `index` in one call; returns the result dict."""
    evaluator = CocoEvaluator(index, class_ids, label_names)
    evaluator.process(predictions)
    return evaluator.evaluate()


def load_coco_results(uri: str, index: DatasetIndex, image_ids: Mapping[Any, int] | None = None
                      ) -> list[dict[str, Any]]:
    """Read a COCO results JSON ([{image_id, category_id, bbox [x, y, w, h], score}]) scored on `index`.

    `image_ids` maps the file's image ids to the index's (default: they are the index's own). Returns
    one prediction dict per image that has detections, with "labels" holding the test set's label ids
    (so evaluate it with an identity `class_ids`), "boxes" in xyxy and "boxes_xywh" exactly as in the
    file. Malformed JSON or entries, an unknown image id or category raise an error (exit code 2) naming
    the file, the entry and the field.
    """
    data = storage.read_json(uri)
    if not isinstance(data, list):
        raise DatasetError(f"{uri}: a COCO results file is a JSON list of detections, got {type(data).__name__}")
    if image_ids is None:
        image_ids = {r.image_id: r.image_id for r in index.images}
    known_cats = set(int(c) for c in index.label_names)
    by_image: dict[int, dict[str, list]] = {}
    for i, det in enumerate(data):
        where = f"{uri}: detection [{i}]"
        if not isinstance(det, dict):
            raise DatasetError(f"{where}: expected an object with image_id, category_id, bbox, score")
        for field in ("image_id", "category_id", "bbox", "score"):
            if field not in det:
                raise DatasetError(f"{where}: missing field '{field}'")
        image_id, category_id, bbox, score = det["image_id"], det["category_id"], det["bbox"], det["score"]
        if not _is_int(image_id):
            raise DatasetError(f"{where}: field 'image_id' must be an integer, got {image_id!r}")
        if image_id not in image_ids:
            raise DatasetError(f"{where}: field 'image_id' {image_id} is not an image of the test set {index.root}")
        image_id = image_ids[image_id]
        if not _is_int(category_id):
            raise DatasetError(f"{where}: field 'category_id' must be an integer, got {category_id!r}")
        if category_id not in known_cats:
            raise DatasetError(
                f"{where}: field 'category_id' {category_id} is not a label of the test set; "
                f"known ids: {_id_ranges(sorted(known_cats))}"
            )
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_finite_number(v) for v in bbox)):
            raise DatasetError(f"{where}: field 'bbox' must be [x, y, width, height] of finite numbers, got {bbox!r}")
        if bbox[2] < 0 or bbox[3] < 0:
            raise DatasetError(f"{where}: field 'bbox' has a negative width or height: {bbox!r}")
        if not _is_finite_number(score):
            raise DatasetError(f"{where}: field 'score' must be a finite number, got {score!r}")
        entry = by_image.setdefault(image_id, {"xywh": [], "scores": [], "labels": []})
        entry["xywh"].append([float(v) for v in bbox])
        entry["scores"].append(float(score))
        entry["labels"].append(int(category_id))
    predictions = []
    for image_id, entry in by_image.items():
        xywh = np.asarray(entry["xywh"], dtype=np.float64).reshape(-1, 4)
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        predictions.append({
            "image_id": image_id, "boxes": xyxy, "boxes_xywh": xywh,
            "scores": np.asarray(entry["scores"], dtype=np.float64),
            "labels": np.asarray(entry["labels"], dtype=np.int64),
        })
    return predictions


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))


def _id_ranges(ids: list[int]) -> str:
    """'1-5, 7, 9-12' for a sorted id list."""
    parts, start = [], None
    for i, v in enumerate(ids):
        if start is None:
            start = v
        if i + 1 == len(ids) or ids[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(parts)


def format_summary(metrics: Mapping[str, Any], max_classes: int = 100) -> str:
    """A plain-text table of the summary metrics and per-class AP, for logs."""

    def fmt(v: float | None) -> str:
        return "   n/a" if v is None else f"{v:6.3f}"

    lines = [
        f"COCO box metrics on {metrics.get('num_images')} images, {metrics.get('num_gt')} boxes, "
        f"{metrics.get('num_predictions')} detections",
    ]
    for key, ap, iou, area, max_dets in SUMMARY:
        iou_text = "0.50:0.95" if iou is None else f"{iou:0.2f}"
        kind = "Average Precision (AP)" if ap else "Average Recall    (AR)"
        lines.append(f"  {kind} @[ IoU={iou_text:<9} | area={area:>6} | maxDets={max_dets:>3} ] = "
                     f"{fmt(metrics.get(key))}   {key}")
    per_class = metrics.get("per_class") or {}
    if per_class:
        width = max(10, *(len(n) for n in per_class))
        lines.append(f"  {'class':<{width}}     AP   AP50  num_gt  num_pred")
        ranked = sorted(per_class.items(), key=lambda kv: (kv[1]["AP"] is None, -(kv[1]["AP"] or 0.0), kv[0]))
        for name, row in ranked[:max_classes]:
            lines.append(f"  {name:<{width}} {fmt(row['AP'])} {fmt(row['AP50'])} {row['num_gt']:>7} "
                         f"{row['num_predictions']:>9}")
        if len(ranked) > max_classes:
            lines.append(f"  ... {len(ranked) - max_classes} more classes in metrics.json")
    return "\n".join(lines)
