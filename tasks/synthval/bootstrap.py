"""Bootstrap confidence intervals over test images, for COCO metrics and for anything else.

A test set of a few hundred images measures mAP with an error of a few points, and two models often
differ by less than that. The bootstrap puts a number on it: draw the test images with replacement,
score each draw, and read the 2.5th and 97.5th percentiles of the replicate scores (the percentile
interval). A draw is a vector of weights, how many times each image was drawn, so a replicate never
copies data: every statistic here takes a (replicates, images) weight matrix and returns one row of
values per replicate. Weights of all ones give the plain, unresampled value.

`bootstrap` is the generic engine (any statistic of per-image data; the coverage tests run a mean of
Bernoulli samples through it). `CocoBootstrap` is the COCO statistic: pycocotools' own `evaluateImg`
matches every detection once per IoU threshold, and each replicate only re-runs pycocotools'
`accumulate` arithmetic with the weights (a detection of an image drawn twice counts twice), vectorised
over replicates. With weights of all ones that is pycocotools' accumulate itself, so the replicate-0
values equal pycocotools' mAP, mAP50, mAP75 and mAR100 exactly (tests/test_bootstrap.py). The one
difference from literally duplicating images: detections with exactly equal scores in different
images are ordered by image rather than interleaved, which changes nothing but ties.

Paired comparisons resample the same images for both models: the same `seed` and the same number of
images give the same weight matrix, so subtracting two models' replicate rows gives the bootstrap
distribution of their difference (`paired_difference`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from synthval.datasets.index import DatasetIndex

DEFAULT_REPLICATES = 1000
DEFAULT_CONFIDENCE = 0.95
DEFAULT_SEED = 0
# Replicates scored at once: bounds memory at about this many floats per array.
_CHUNK_CELLS = 2_000_000

Statistic = Callable[[np.ndarray], np.ndarray]


@dataclass
class BootstrapResult:
    """Point estimates, percentile intervals and the replicate values of named statistics.

    `estimate`, `low`, `high` map a name to a float (NaN where undefined, e.g. a class with no box);
    `replicates` is (B, M) with one column per name in `names`.
    """

    names: list[str]
    estimate: dict[str, float]
    low: dict[str, float]
    high: dict[str, float]
    replicates: np.ndarray
    confidence: float
    seed: int
    num_items: int

    def interval(self, name: str) -> tuple[float, float]:
        return self.low[name], self.high[name]

    def to_dict(self, names: Sequence[str] | None = None) -> dict[str, Any]:
        """{name: {"value", "low", "high"}} with None for NaN, plus the method's parameters; JSON-ready."""
        names = self.names if names is None else names
        return {
            "confidence": self.confidence, "replicates": int(self.replicates.shape[0]), "seed": self.seed,
            "num_images": self.num_items, "method": "percentile bootstrap over test images",
            "values": {n: {"value": _none(self.estimate[n]), "low": _none(self.low[n]), "high": _none(self.high[n])}
                       for n in names},
        }


def _none(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def resample_weights(num_items: int, replicates: int, seed: int) -> np.ndarray:
    """(replicates, num_items) float64 draw counts: each row is one resample of the items with replacement.

    Deterministic for (num_items, replicates, seed); row r is the same whatever `replicates` is, so
    two statistics bootstrapped with the same seed are paired image by image.
    """
    if num_items < 1:
        raise ValueError("cannot resample an empty set")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, num_items, size=(replicates, num_items))
    cells = (draws + num_items * np.arange(replicates)[:, None]).ravel()
    return np.bincount(cells, minlength=replicates * num_items).reshape(replicates, num_items).astype(np.float64)


def percentile_interval(values: np.ndarray, confidence: float = DEFAULT_CONFIDENCE) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper percentile bounds over axis 0, ignoring NaN (NaN where a column is all NaN)."""
    alpha = (1.0 - confidence) / 2.0
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    low = np.full(values.shape[1], np.nan)
    high = np.full(values.shape[1], np.nan)
    ok = np.isfinite(values).any(axis=0)
    if ok.any():
        low[ok] = np.nanquantile(values[:, ok], alpha, axis=0)
        high[ok] = np.nanquantile(values[:, ok], 1.0 - alpha, axis=0)
    return low, high


def bootstrap(statistic: Statistic, num_items: int, names: Sequence[str], replicates: int = DEFAULT_REPLICATES,
              seed: int = DEFAULT_SEED, confidence: float = DEFAULT_CONFIDENCE,
              chunk: int = 100) -> BootstrapResult:
    """Percentile bootstrap of `statistic` over `num_items` items.

    `statistic(weights)` takes a (b, num_items) weight matrix and returns (b, len(names)) values (NaN
    where undefined). The estimate is the statistic at weights of all ones.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if replicates < 1:
        raise ValueError(f"replicates must be positive, got {replicates}")
    names = list(names)
    estimate = np.asarray(statistic(np.ones((1, num_items))), dtype=np.float64).reshape(len(names))
    weights = resample_weights(num_items, replicates, seed)
    rows = [np.asarray(statistic(weights[i:i + chunk]), dtype=np.float64).reshape(-1, len(names))
            for i in range(0, replicates, chunk)]
    values = np.concatenate(rows, axis=0)
    low, high = percentile_interval(values, confidence)
    return BootstrapResult(
        names=names, estimate=dict(zip(names, estimate.tolist())), low=dict(zip(names, low.tolist())),
        high=dict(zip(names, high.tolist())), replicates=values, confidence=confidence, seed=seed,
        num_items=num_items,
    )


def weighted_mean(samples: np.ndarray) -> Statistic:
    """The statistic "mean of per-item samples" for `bootstrap` (used to check coverage)."""
    samples = np.asarray(samples, dtype=np.float64)

    def statistic(weights: np.ndarray) -> np.ndarray:
        return (weights @ samples / weights.sum(axis=1))[:, None]

    return statistic


@dataclass
class Difference:
    """A paired bootstrap of `a - b` for one metric: is the difference larger than its noise?"""

    name: str
    value: float
    low: float
    high: float

    @property
    def significant(self) -> bool:
        """True when the interval of the difference excludes 0 (both bounds on one side)."""
        return bool(np.isfinite(self.low) and np.isfinite(self.high) and (self.low > 0 or self.high < 0))


def paired_difference(a: BootstrapResult, b: BootstrapResult, name: str) -> Difference:
    """Interval of a[name] - b[name] from replicates drawn with the same weights (same seed and images).

    Replicates where either is undefined are left out.
    """
    if a.seed != b.seed or a.num_items != b.num_items or a.replicates.shape[0] != b.replicates.shape[0]:
        raise ValueError("a paired difference needs bootstraps with the same seed, images and replicates")
    diff = a.replicates[:, a.names.index(name)] - b.replicates[:, b.names.index(name)]
    low, high = percentile_interval(diff, a.confidence)
    return Difference(name, a.estimate[name] - b.estimate[name], float(low[0]), float(high[0]))


def independent_difference(a: BootstrapResult, b: BootstrapResult, name: str) -> Difference:
    """Interval of a[name] - b[name] for results on different test sets (replicates drawn independently).

    Wider than a paired interval: image difficulty is not shared between the two.
    """
    n = min(a.replicates.shape[0], b.replicates.shape[0])
    rng = np.random.default_rng(a.seed + 7919)
    # Independent draws: decouple b's rows from a's by a random permutation.
    diff = a.replicates[:n, a.names.index(name)] - b.replicates[rng.permutation(n), b.names.index(name)]
    low, high = percentile_interval(diff, a.confidence)
    return Difference(name, a.estimate[name] - b.estimate[name], float(low[0]), float(high[0]))


# --- COCO ---------------------------------------------------------------------------------------------

SUMMARY_NAMES = ("mAP", "mAP50", "mAP75", "mAR100")


def coco_api(index: DatasetIndex, predictions: Sequence[Mapping[str, Any]]) -> tuple[Any, Any]:
    """pycocotools COCO objects (ground truth, detections) for an index and prediction dicts.

    Predictions are dicts with image_id (the index's ids), "boxes_xywh" (or xyxy "boxes"), scores and
    labels in the dataset's label ids, as `metrics.load_coco_results` returns them. Category and image
    ids are the index's; box area is width x height, as `synthval.metrics` scores it.
    """
    from pycocotools.coco import COCO

    images, annotations = [], []
    for record in index.images:
        images.append({"id": int(record.image_id), "width": int(record.width), "height": int(record.height)})
        boxes = np.asarray(record.boxes, dtype=np.float64).reshape(-1, 4)
        for box, label in zip(boxes.tolist(), np.asarray(record.labels).reshape(-1).tolist()):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append({"id": len(annotations) + 1, "image_id": int(record.image_id),
                                "category_id": int(label), "bbox": [box[0], box[1], w, h], "area": w * h,
                                "iscrowd": 0})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations,
                  "categories": [{"id": int(c), "name": n} for c, n in sorted(index.label_names.items())]}
    _quiet(gt.createIndex)
    dets = []
    for pred in predictions:
        xywh = prediction_xywh(pred)
        for box, score, label in zip(xywh.tolist(), np.asarray(pred["scores"]).tolist(),
                                     np.asarray(pred["labels"]).tolist()):
            dets.append({"id": len(dets) + 1, "image_id": int(pred["image_id"]), "category_id": int(label),
                         "bbox": box, "score": float(score), "area": box[2] * box[3], "iscrowd": 0})
    dt = COCO()
    dt.dataset = {"images": [dict(i) for i in images], "annotations": dets,
                  "categories": [dict(c) for c in gt.dataset["categories"]]}
    _quiet(dt.createIndex)
    return gt, dt


def prediction_xywh(pred: Mapping[str, Any]) -> np.ndarray:
    if "boxes_xywh" in pred:
        return np.asarray(pred["boxes_xywh"], dtype=np.float64).reshape(-1, 4)
    b = np.asarray(pred["boxes"], dtype=np.float64).reshape(-1, 4)
    return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)


def _quiet(fn: Callable[[], Any]) -> Any:
    # pycocotools prints progress to stdout; a CLI step's stdout carries its result JSON.
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return fn()


class CocoBootstrap:
    """COCO mAP, mAP50, mAP75, mAR100 and per-class AP/AP50 of one set of detections, under image weights.

    Built once from pycocotools' per-image matches (area "all", at most 100 detections per image and
    class, the ten IoU thresholds); `statistic(weights)` re-accumulates them for each weight row.
    `names` lists the statistic's columns: the four summaries, then "AP/<label>" and "AP50/<label>"
    for every label of the test set. `evaluation` keeps pycocotools' COCOeval (its `evalImgs`, area
    "all" only, hold the per-image matches the report draws).

    Why it is fast: COCO's interpolated precision at recall r is the best precision of any point of
    the ranked list whose recall reaches r, and that best is always reached at a true positive (a
    false positive only lowers precision at the same recall). So a replicate needs the cumulative
    weights only at the true positives: the running sum of the weights of the true positives, and the
    running sum of all scored detections' weights (false positives = all - true positives), one
    gather and one cumulative sum per class, no matrix products and no per-replicate Python loop. A
    true positive of an image drawn zero times becomes a point with the previous point's recall and
    no better precision, which changes no maximum.
    """

    def __init__(self, index: DatasetIndex, predictions: Sequence[Mapping[str, Any]]):
        from pycocotools.cocoeval import COCOeval

        self.index = index
        self.gt, self.dt = coco_api(index, predictions)
        ev = COCOeval(self.gt, self.dt, iouType="bbox")
        # Only area "all" is bootstrapped: evaluate it alone (4x less work, same matches).
        all_area = ev.params.areaRngLbl.index("all")
        ev.params.areaRng = [ev.params.areaRng[all_area]]
        ev.params.areaRngLbl = ["all"]
        self.max_det = ev.params.maxDets[-1]
        _quiet(ev.evaluate)
        self.evaluation = ev
        p = ev.params
        self.iou_thresholds = np.asarray(p.iouThrs, dtype=np.float64)
        self.recall_thresholds = np.asarray(p.recThrs, dtype=np.float64)
        self.cat_ids = list(p.catIds)
        self.img_ids = list(p.imgIds)
        self.label_names = [index.label_names[c] for c in self.cat_ids]
        self.names = (list(SUMMARY_NAMES) + [f"AP/{n}" for n in self.label_names]
                      + [f"AP50/{n}" for n in self.label_names])
        # Images are columns of the weight matrix in the index's order.
        self.position = {int(r.image_id): i for i, r in enumerate(index.images)}
        n_img = len(self.img_ids)
        T = len(self.iou_thresholds)
        # Per class: ground truth count per image, the image of each ranked detection, which of them
        # are scored at each threshold, and where the true positives are.
        self.gt_count = np.zeros((len(self.cat_ids), len(index)), dtype=np.float64)
        self.has_dets = np.zeros(len(self.cat_ids), dtype=bool)
        self.ranked: list[tuple[np.ndarray, np.ndarray, list[np.ndarray]] | None] = []
        for k in range(len(self.cat_ids)):
            entries = [e for e in ev.evalImgs[k * n_img:(k + 1) * n_img] if e is not None]
            for e in entries:
                self.gt_count[k, self.position[e["image_id"]]] += np.count_nonzero(np.logical_not(e["gtIgnore"]))
            if not entries:
                self.ranked.append(None)
                continue
            # accumulate(): each image's first maxDet detections, images in id order, then a stable sort.
            scores = np.concatenate([e["dtScores"][:self.max_det] for e in entries])
            order = np.argsort(-scores, kind="mergesort")
            img = np.concatenate([np.full(len(e["dtScores"][:self.max_det]), self.position[e["image_id"]],
                                          dtype=np.int64) for e in entries])[order]
            dtm = np.concatenate([e["dtMatches"][:, :self.max_det] for e in entries], axis=1)[:, order]
            dt_ig = np.concatenate([e["dtIgnore"][:, :self.max_det] for e in entries], axis=1)[:, order]
            self.has_dets[k] = len(img) > 0
            counted = np.logical_not(dt_ig)  # (T, D): scored detections (not matched to ignored boxes)
            tp_pos = [np.flatnonzero(np.logical_and(dtm[t], counted[t])) for t in range(T)]
            self.ranked.append((img, counted, tp_pos))

    def statistic(self, weights: np.ndarray) -> np.ndarray:
        """(b, len(names)) values for a (b, num images) weight matrix; NaN where a metric is undefined."""
        weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
        if weights.shape[1] != len(self.index):
            raise ValueError(f"weights have {weights.shape[1]} columns for {len(self.index)} images")
        most = max([len(r[0]) for r in self.ranked if r is not None] + [1])
        step = max(1, _CHUNK_CELLS // most)
        parts = [self._statistic(weights[i:i + step]) for i in range(0, weights.shape[0], step)]
        return np.concatenate(parts, axis=0) if parts else np.zeros((0, len(self.names)))

    def _statistic(self, weights: np.ndarray) -> np.ndarray:
        b, K, T, R = weights.shape[0], len(self.cat_ids), len(self.iou_thresholds), len(self.recall_thresholds)
        # pycocotools' precision (T, R, K) and recall (T, K) per replicate, 0 where there are no
        # detections; a class without ground truth in a replicate is invalid (pycocotools' -1).
        precision = np.zeros((b, T, R, K))
        recall = np.zeros((b, T, K))
        npig = weights @ self.gt_count.T  # (b, K) exact: small integers
        valid = npig > 0
        rows = np.arange(b)
        for k in range(K):
            if self.ranked[k] is None or not self.has_dets[k] or not valid[:, k].any():
                continue
            img, counted, tp_pos = self.ranked[k]
            n = np.where(valid[:, k], npig[:, k], 1.0)
            # Smallest true-positive count c with c / n >= r, using the very float division that
            # pycocotools' searchsorted compares, so the integer comparison below is exact.
            need = np.ceil(self.recall_thresholds[None, :] * n[:, None])
            need = np.where((need - 1) / n[:, None] >= self.recall_thresholds, need - 1, need)
            need = np.where(need / n[:, None] < self.recall_thresholds, need + 1, need)
            w = weights[:, img]  # (b, D): each ranked detection's weight
            all_counted = counted.all()
            if all_counted:
                scored_sum = np.cumsum(w, axis=1)
            for t in range(T):
                pos = tp_pos[t]
                m = len(pos)
                if m == 0:
                    continue
                if not all_counted:
                    scored_sum = np.cumsum(w * counted[t], axis=1)
                tp_sum = np.cumsum(w[:, pos], axis=1)  # (b, m): true positives up to each one
                fp_sum = scored_sum[:, pos] - tp_sum  # false positives up to each true positive
                pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
                pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
                recall[:, t, k] = tp_sum[:, -1] / n
                # First true positive whose count reaches `need`, for every row at once: offset each
                # row's counts (exact small integers) so one sorted array holds them all.
                stride = float(tp_sum[:, -1].max() + need.max() + 2)
                keys = (tp_sum + rows[:, None] * stride).ravel()
                first = np.searchsorted(keys, (need + rows[:, None] * stride).ravel(), side="left")
                first = first.reshape(b, R) - rows[:, None] * m
                ok = first < m
                q = np.zeros((b, R))
                q[ok] = pr[np.nonzero(ok)[0], first[ok]]
                precision[:, t, :, k] = q
        t50 = int(np.argmin(np.abs(self.iou_thresholds - 0.5)))
        t75 = int(np.argmin(np.abs(self.iou_thresholds - 0.75)))
        out = np.full((b, len(self.names)), np.nan)
        # np.mean over the same entries in the same order as pycocotools' summarize() (row by row, a
        # contiguous reduction: the same pairwise sum as on one flat array), so equal to the bit.
        patterns, which = np.unique(valid, axis=0, return_inverse=True)
        for j, v in enumerate(patterns):
            if not v.any():
                continue
            sel = np.flatnonzero(which.ravel() == j)
            p = precision[sel][:, :, :, v]  # (rows, T, R, classes)
            out[sel, 0] = np.mean(p.reshape(len(sel), -1), axis=1)
            out[sel, 1] = np.mean(p[:, t50].reshape(len(sel), -1), axis=1)
            out[sel, 2] = np.mean(p[:, t75].reshape(len(sel), -1), axis=1)
            out[sel, 3] = np.mean(recall[sel][:, :, v].reshape(len(sel), -1), axis=1)
        per_class = np.ascontiguousarray(precision.transpose(0, 3, 1, 2)).reshape(b, K, T * R).mean(axis=2)
        per_class50 = precision[:, t50].mean(axis=1)
        out[:, 4:4 + K] = np.where(valid, per_class, np.nan)
        out[:, 4 + K:] = np.where(valid, per_class50, np.nan)
        return out

    def run(self, replicates: int = DEFAULT_REPLICATES, seed: int = DEFAULT_SEED,
            confidence: float = DEFAULT_CONFIDENCE) -> BootstrapResult:
        """Bootstrap the COCO metrics over the test images."""
        cells = len(self.iou_thresholds) * len(self.recall_thresholds) * max(1, len(self.cat_ids))
        return bootstrap(self.statistic, len(self.index), self.names, replicates=replicates, seed=seed,
                         confidence=confidence, chunk=max(1, _CHUNK_CELLS // cells))
