"""Bootstrap confidence intervals over test images, for COCO metrics and for anything else.

A test set of a few hundred images measures mAP with an error of a few points, and two models often
differ by less than that. The bootstrap puts a number on it: draw the test images with replacement,
score each draw, and read the interval off the replicate scores. The interval is Efron's bias-corrected
percentile interval: AP takes a running maximum of precision (COCO's interpolation), so resampled AP
runs high, and the plain 2.5th-97.5th percentiles sit above the estimate (a 24-image test set's mAP
0.339 got [0.291, 0.417]). The correction reads the percentiles shifted by how far the replicates'
median is off the estimate; with no such bias it is the plain percentile interval. A draw is a vector of weights, how many times each image was drawn, so a replicate never
copies data: every statistic here takes a (replicates, images) weight matrix and returns one row of
values per replicate. Weights of all ones give the plain, unresampled value.

`bootstrap` is the generic engine (any statistic of per-image data; the coverage tests run a mean of
Bernoulli samples through it). `CocoBootstrap` is the COCO statistic: it takes the matches that
`synthval.scoring.coco_eval` computed once for the evaluation itself, and each replicate only re-runs COCO's
accumulation with the weights, vectorised over replicates. Its unresampled values are the
evaluation's own numbers, to the bit.

Paired comparisons resample the same images for both models: the same `seed` and the same number of
images give the same weight matrix, so subtracting two models' replicate rows gives the bootstrap
distribution of their difference (`paired_difference`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from synthval.errors import ConfigError
from synthval.scoring.coco_eval import (
    AREA_NAMES,
    IOU_THRESHOLDS,
    MAX_DETS,
    RECALL_THRESHOLDS,
    Matches,
    needed_true_positives,
)

DEFAULT_REPLICATES = 1000
DEFAULT_CONFIDENCE = 0.95
DEFAULT_SEED = 0
# Replicates scored at once: bounds memory at about this many floats per array.
_CHUNK_CELLS = 16_000_000
# Resamples drawn from one random stream (see `resample_weights`).
_DRAW_BLOCK = 64

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
            "num_images": self.num_items, "method": "bias-corrected percentile bootstrap over test images",
            "values": {n: {"value": _none(self.estimate[n]), "low": _none(self.low[n]), "high": _none(self.high[n])}
                       for n in names},
        }


def _none(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def resample_weights(num_items: int, replicates: int, seed: int) -> np.ndarray:
    """(replicates, num_items) float32 draw counts (whole numbers, exact): each row is one resample of
    the items with replacement.

    Deterministic for (num_items, replicates, seed); row r is the same whatever `replicates` is, so
    two statistics bootstrapped with the same seed are paired image by image. Rows are drawn in
    blocks of `_DRAW_BLOCK`, each from its own stream (seed, block), so memory stays at the result's.
    """
    if num_items < 1:
        raise ValueError("cannot resample an empty set")
    weights = np.empty((replicates, num_items), dtype=np.float32)
    for block, lo in enumerate(range(0, replicates, _DRAW_BLOCK)):
        rows = min(_DRAW_BLOCK, replicates - lo)
        draws = np.random.default_rng([seed, block]).integers(0, num_items, size=(rows, num_items))
        cells = (draws + num_items * np.arange(rows)[:, None]).ravel()
        weights[lo:lo + rows] = np.bincount(cells, minlength=rows * num_items).reshape(rows, num_items)
    return weights


def percentile_interval(values: np.ndarray, confidence: float = DEFAULT_CONFIDENCE,
                        estimate: np.ndarray | float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds over axis 0, ignoring NaN (NaN where a column is all NaN).

    With ``estimate`` (one per column), the bias-corrected percentiles (Efron's BC): z0 is the normal
    quantile of the share of replicates below the estimate (ties count half), and the bounds are the
    Phi(2 z0 -+ z) quantiles instead of Phi(-+z). Without it, the plain percentiles.
    """
    alpha = (1.0 - confidence) / 2.0
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    columns = values.shape[1]
    low_q, high_q = np.full(columns, alpha), np.full(columns, 1.0 - alpha)
    if estimate is not None:
        estimate = np.broadcast_to(np.asarray(estimate, dtype=np.float64), (columns,))
        defined = np.isfinite(values).sum(axis=0)
        below = (values < estimate).sum(axis=0) + 0.5 * (values == estimate).sum(axis=0)
        normal = NormalDist()
        z = normal.inv_cdf(1.0 - alpha)
        for j in np.flatnonzero(np.isfinite(estimate) & (defined > 0)):
            # all replicates on one side: as far as `defined` replicates can tell, not an infinite shift
            share = min(max(below[j] / defined[j], 0.5 / defined[j]), 1.0 - 0.5 / defined[j])
            z0 = normal.inv_cdf(float(share))
            low_q[j], high_q[j] = normal.cdf(2 * z0 - z), normal.cdf(2 * z0 + z)
    low = np.full(columns, np.nan)
    high = np.full(columns, np.nan)
    for j in np.flatnonzero(np.isfinite(values).any(axis=0)):
        low[j], high[j] = np.nanquantile(values[:, j], [low_q[j], high_q[j]])
    return low, high


def bootstrap(statistic: Statistic, num_items: int, names: Sequence[str], replicates: int = DEFAULT_REPLICATES,
              seed: int = DEFAULT_SEED, confidence: float = DEFAULT_CONFIDENCE,
              chunk: int = 100, estimate: Sequence[float] | None = None) -> BootstrapResult:
    """Bias-corrected percentile bootstrap of `statistic` over `num_items` items.

    `statistic(weights)` takes a (b, num_items) weight matrix and returns (b, len(names)) values (NaN
    where undefined). The estimate is `estimate` if given (the exact unresampled values), else the
    statistic at weights of all ones.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if replicates < 1:
        raise ValueError(f"replicates must be positive, got {replicates}")
    names = list(names)
    if estimate is None:
        estimate = statistic(np.ones((1, num_items)))
    estimate = np.asarray(estimate, dtype=np.float64).reshape(len(names))
    weights = resample_weights(num_items, replicates, seed)
    rows = [np.asarray(statistic(weights[i:i + chunk]), dtype=np.float64).reshape(-1, len(names))
            for i in range(0, replicates, chunk)]
    values = np.concatenate(rows, axis=0)
    low, high = percentile_interval(values, confidence, estimate)
    return BootstrapResult(
        names=names, estimate=dict(zip(names, estimate.tolist())), low=dict(zip(names, low.tolist())),
        high=dict(zip(names, high.tolist())), replicates=values, confidence=confidence, seed=seed,
        num_items=num_items,
    )


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
    value = a.estimate[name] - b.estimate[name]
    low, high = percentile_interval(diff, a.confidence, value)
    return Difference(name, value, float(low[0]), float(high[0]))


def independent_difference(a: BootstrapResult, b: BootstrapResult, name: str) -> Difference:
    """Interval of a[name] - b[name] for results on different test sets (replicates drawn independently).

    Wider than a paired interval: image difficulty is not shared between the two.
    """
    n = min(a.replicates.shape[0], b.replicates.shape[0])
    rng = np.random.default_rng(a.seed + 7919)
    # Independent draws: decouple b's rows from a's by a random permutation.
    diff = a.replicates[:n, a.names.index(name)] - b.replicates[rng.permutation(n), b.names.index(name)]
    value = a.estimate[name] - b.estimate[name]
    low, high = percentile_interval(diff, a.confidence, value)
    return Difference(name, value, float(low[0]), float(high[0]))


# --- COCO ---------------------------------------------------------------------------------------------

SUMMARY_NAMES = ("mAP", "mAP50", "mAP75", "mAR100")


@dataclass
class _RankedClass:
    """One class's detections in pycocotools' rank order (area "all", 100 per image) as the statistic
    needs them: the image of each, up to the last that matched anything (later ones change nothing),
    and the matched ones: their positions among those, and per IoU threshold whether each is a true
    positive or was absorbed by a crowd region (scored neither way)."""

    img: np.ndarray
    cand_pos: np.ndarray
    tp: np.ndarray
    absorbed: np.ndarray


def running(op: np.ufunc, x: np.ndarray) -> np.ndarray:
    """x (n, ...) in place: x[i] = op(x[i - 1], x[i]) down axis 0 (np.add: running sum; np.maximum:
    running maximum); returns x.

    numpy's own `accumulate` along an axis walks that axis in its innermost loop, one element at a
    time: ~10x slower here than elementwise loops over the contiguous replicates. So the rows are
    cut into blocks of ~sqrt(n): one vector op per row of a block, for all blocks at once, then each
    block's total carried into the next (the same, recursively, over the block totals).
    """
    n = len(x)
    block = int(np.sqrt(n)) + 1
    full = n // block * block
    if full < 2 * block:
        for i in range(1, n):
            op(x[i - 1], x[i], out=x[i])
        return x
    blocks = x[:full].reshape(-1, block, *x.shape[1:])
    for i in range(1, block):
        op(blocks[:, i - 1], blocks[:, i], out=blocks[:, i])
    for i in range(full + 1, n):
        op(x[i - 1], x[i], out=x[i])
    carry = running(op, blocks[:, -1].copy())  # carry[j]: over blocks 0..j
    op(carry[:-1, None], blocks[1:], out=blocks[1:])
    op(carry[-1], x[full:], out=x[full:])
    return x


class CocoBootstrap:
    """COCO mAP, mAP50, mAP75, mAR100 and per-class AP/AP50 of one evaluation, under image weights.

    Built from `CocoEvaluator.matches` (area "all", at most 100 detections per image and class, the
    ten IoU thresholds): the matches are never computed again, and `statistic(weights)` re-runs
    only COCO's accumulation with the weights: a replicate's values are pycocotools' on a test set
    where each image (with its detections) really appears as often as drawn (tests/test_bootstrap.py).
    The one difference: a repeated image's detections that tie on score are ranked detection after
    detection rather than copy after copy, which changes nothing but such ties. `estimate()`, the
    unresampled values, comes from the evaluation's own arrays: metrics.json's numbers to the bit.
    Image weights are indexed like `matches.image_ids`. `names` lists the statistic's columns: the
    four summaries, then "AP/<label>" and "AP50/<label>" for every label of the test set.

    Why it is fast: interpolated precision peaks at true positives, so a replicate needs running
    weights only there: of the true positives, and of all scored detections up to each (every
    detection, less those a crowd region absorbed); and AP needs only the sum of precision over the
    recall thresholds, to which each true positive adds its running maximum once per threshold it
    is the first to reach. Replicates lie along the contiguous axis of every array, classes run on
    all cores, and there is no per-replicate Python loop.
    """

    def __init__(self, matches: Matches):
        self.matches = matches
        self.num_images = len(matches.image_ids)
        self.iou_thresholds = IOU_THRESHOLDS
        self.recall_thresholds = RECALL_THRESHOLDS
        self.cat_ids = list(matches.cat_ids)
        self.label_names = [matches.index.label_names[c] for c in self.cat_ids]
        self.names = (list(SUMMARY_NAMES) + [f"AP/{n}" for n in self.label_names]
                      + [f"AP50/{n}" for n in self.label_names])
        a = AREA_NAMES.index("all")
        K = len(self.cat_ids)
        regular = ~matches.gt_ignored[:, a]
        self.gt_count = np.zeros((K, self.num_images), dtype=np.float64)
        np.add.at(self.gt_count, (matches.gt_cat[regular], matches.gt_img[regular]), 1.0)
        order = matches.scoring_order()  # the evaluation keeps 100 detections per image and class
        position = np.empty(len(order), dtype=np.int64)
        position[order] = np.arange(len(order))
        cat_sorted = matches.det_cat[order]
        cat_start = np.searchsorted(cat_sorted, np.arange(K + 1))
        cand_pos, match = position[matches.cand], matches.cand_match[:, :, a]  # (U, T)
        by_pos = np.argsort(cand_pos)
        cand_pos, match = cand_pos[by_pos], match[by_pos]
        crowd = matches.gt_crowd[np.maximum(match, 0)] & (match >= 0)
        cand_cat_start = np.searchsorted(cat_sorted[cand_pos], np.arange(K + 1))
        self.ranked: list[_RankedClass | None] = []
        for k in range(K):
            u = slice(cand_cat_start[k], cand_cat_start[k + 1])
            if cand_cat_start[k] == cand_cat_start[k + 1]:
                self.ranked.append(None)  # nothing matched: precision 0 wherever there is ground truth
                continue
            s = cat_start[k]
            local = cand_pos[u] - s
            self.ranked.append(_RankedClass(img=matches.det_img[order[s:s + local[-1] + 1]], cand_pos=local,
                                            tp=(match[u] >= 0) & ~crowd[u], absorbed=crowd[u]))

    def statistic(self, weights: np.ndarray) -> np.ndarray:
        """(b, len(names)) values for a (b, num images) weight matrix; NaN where a metric is undefined.

        At weights of all ones these are the evaluation's numbers up to float rounding (~1e-16: sums
        are taken in another order); `estimate()` gives them exactly.
        """
        weights = np.atleast_2d(np.asarray(weights))
        if weights.shape[1] != self.num_images:
            raise ValueError(f"weights have {weights.shape[1]} columns for {self.num_images} images")
        b, K = weights.shape[0], len(self.cat_ids)
        num_gt = weights @ self.gt_count.T  # (b, K) in float64, exact: small integers
        valid = num_gt > 0
        if not np.array_equal(weights, np.round(weights)) or weights.min(initial=0) < 0:
            raise ValueError("weights are draw counts: whole numbers >= 0")
        # (images, b): a detection's weights over all replicates are one contiguous row. Draw counts
        # and their sums are whole numbers, exact in float32 below 2^24.
        by_image = np.ascontiguousarray(weights.T, dtype=np.float32)
        # Per class: AP, AP50, AP75 and AR100; 0 where there is ground truth but no match. Classes
        # (and slices of replicates) are independent, and numpy lets go of the GIL in its loops.
        per_class = np.zeros((4, b, K))
        tasks = [(k, slice(lo, lo + max(1, _CHUNK_CELLS // len(ranked.img))))
                 for k, ranked in enumerate(self.ranked) if ranked is not None and valid[:, k].any()
                 for lo in range(0, b, max(1, _CHUNK_CELLS // len(ranked.img)))]

        def run(task: tuple[int, slice]) -> None:
            k, rows = task
            per_class[:, rows, k] = self._class_values(self.ranked[k], by_image[:, rows], num_gt[rows, k])

        with ThreadPoolExecutor(max_workers=min(len(tasks), os.cpu_count() or 1, 8) or 1) as pool:
            list(pool.map(run, tasks))
        count = valid.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            summaries = np.where(count > 0, (per_class * valid).sum(axis=2) / count, np.nan)  # (4, b)
        return np.concatenate([summaries.T, np.where(valid, per_class[0], np.nan),
                               np.where(valid, per_class[1], np.nan)], axis=1)

    def _class_values(self, ranked: _RankedClass, weights: np.ndarray, num_gt: np.ndarray) -> np.ndarray:
        """(4, b): one class's AP, AP50, AP75 and AR100 under `weights` (images, b), draw counts.

        Counts are exact; precision is float32, whose rounding (~1e-7) is far below any interval's
        width (`estimate()` holds pycocotools' arithmetic to the bit). Arrays are (positions, b).
        """
        T, R = len(self.iou_thresholds), len(self.recall_thresholds)
        b = weights.shape[1]
        n = np.where(num_gt > 0, num_gt, 1.0)
        # reached[offset[j] + c]: how many recall thresholds c true positives reach in replicate j
        # (pycocotools' `c / n >= threshold`), for every count c = 0..n; one table per distinct n, so
        # small enough to stay in cache.
        distinct, which = np.unique(n, return_inverse=True)
        sizes = distinct.astype(np.int64) + 1
        starts = np.cumsum(sizes) - sizes
        hits = (starts[:, None] + needed_true_positives(distinct).astype(np.int64)).ravel()
        reached = np.cumsum(np.bincount(hits, minlength=int(sizes.sum()) + 1)[:-1]).astype(np.float32)
        reached -= np.repeat(np.r_[0, reached[starts[1:] - 1]], sizes)  # restart the count per table
        offset = starts[which.ravel()].astype(np.float32)
        summed = np.zeros((T, b))  # sum of precision over the recall thresholds
        recall = np.zeros((T, b))
        # Weight of all detections up to each matched one (the tiny epsilon is COCO's: 0 / 0 is 0).
        upto = running(np.add, weights[ranked.img])[ranked.cand_pos] + np.spacing(np.float32(1))
        w = weights[ranked.img[ranked.cand_pos]]  # the matched detections' weights
        for t in range(T):
            tp = ranked.tp[:, t]
            if not tp.any():
                continue
            scored = upto[tp]
            if ranked.absorbed[:, t].any():
                absorbed = running(np.add, w * ranked.absorbed[:, t, None])[tp]
                scored = np.maximum(scored - absorbed, np.spacing(np.float32(1)))
            tp_upto = running(np.add, w[tp])[::-1]  # (m, b), from the last true positive up
            # COCO's interpolated precision is the running maximum of precision from the last true
            # positive up, read at the first true positive that reaches each recall threshold: so
            # each true positive adds its running maximum once per threshold it is the first to reach.
            envelope = running(np.maximum, tp_upto / scored[::-1])
            first_reached = reached[(tp_upto + offset).astype(np.intp)]
            first_reached[:-1] -= first_reached[1:]
            summed[t] = np.einsum("ij,ij->j", envelope, first_reached)
            recall[t] = tp_upto[0] / n
        t50 = int(np.argmin(np.abs(self.iou_thresholds - 0.5)))
        t75 = int(np.argmin(np.abs(self.iou_thresholds - 0.75)))
        return np.stack([summed.sum(axis=0) / (T * R), summed[t50] / R, summed[t75] / R, recall.mean(axis=0)])

    def estimate(self) -> np.ndarray:
        """(len(names),) the unresampled values, exactly the evaluation's (from its precision arrays)."""
        m = self.matches
        a, top = AREA_NAMES.index("all"), MAX_DETS.index(100)
        precision, recall = m.precision[:, :, :, a, top], m.recall[:, :, a, top]  # (T, R, K), (T, K)
        t50 = int(np.argmin(np.abs(self.iou_thresholds - 0.5)))
        t75 = int(np.argmin(np.abs(self.iou_thresholds - 0.75)))

        def mean(values: np.ndarray) -> float:
            kept = values[values > -1]
            return float(np.mean(kept)) if len(kept) else np.nan

        K = len(self.cat_ids)
        return np.array([mean(precision), mean(precision[t50]), mean(precision[t75]), mean(recall)]
                        + [mean(precision[:, :, k]) for k in range(K)] + [mean(precision[t50, :, k]) for k in range(K)])

    def run(self, replicates: int = DEFAULT_REPLICATES, seed: int = DEFAULT_SEED,
            confidence: float = DEFAULT_CONFIDENCE) -> BootstrapResult:
        """Bootstrap the COCO metrics over the test images."""
        return bootstrap(self.statistic, self.num_images, self.names, replicates=replicates, seed=seed,
                         confidence=confidence, chunk=replicates, estimate=self.estimate())


def check_replicates(replicates: int) -> None:
    """Refuse (ConfigError) fewer resamples than give an interval worth reporting."""
    if replicates < 10:
        raise ConfigError(f"bootstrap replicates {replicates}: use at least 10 (1000 for reported intervals)")
