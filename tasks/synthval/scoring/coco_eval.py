"""COCO box evaluation with a `reset / process / evaluate` shape: pycocotools' numbers, exactly and fast.

`CocoEvaluator` computes what pycocotools' `COCOeval` (iouType "bbox") computes on any COCO detection
file, with its constants (`pycocotools.cocoeval.Params`), its greedy matching, its tie-breaking and its
float operations, vectorised with numpy instead of a Python loop per image, class, area range,
threshold, detection and box. COCO's rules, all kept:

- Ground truth is every annotation as the file gives it, in float64 (`ImageRecord.xywh`): the box
  `[x, y, w, h]` for IoU, the annotation's `area` (the box area where the file has none) for the
  small / medium / large ranges.
- `iscrowd` annotations are regions: their IoU is the intersection over the detection's own area, any
  number of detections may match one, a detection matched to one is neither a true nor a false
  positive, and they are not boxes to find. Within an area range, boxes outside it are ignored the same
  way (but match one detection at most), and so are unmatched detections outside it.
- An annotation's own `ignore` flag changes nothing: pycocotools replaces it by `iscrowd` before
  scoring (faster-coco-eval does the same), so we do too.
- Each image and class keeps its 100 best-scored detections (equal scores: file order); mAR1 and
  mAR10 take the first 1 and 10 of them. Images without annotations count (their detections are false
  positives); classes without ground truth are null.
- Annotation ids play no part. (pycocotools mis-scores a match to an annotation whose id is 0 and, of
  repeated ids, keeps one annotation twice; valid COCO files have neither.)

`tests/test_metrics.py` checks on hundreds of random cases with crowds, given areas, ignore flags,
duplicate boxes, tied scores, empty images and empty results that the precision and recall arrays,
every per-class AP and the 12 summary numbers equal pycocotools' run directly, to the bit.

The matches are computed once: `CocoEvaluator.matches` (a `Matches`) holds every scored detection and
ground-truth box with what it matched, and the bootstrap intervals (`synthval.scoring.bootstrap`), the report's
pictures and TensorBoard's reuse it. A written `predictions.json` holds the detections in COCO
`[x, y, w, h]` float64, so scoring the written file again gives the same numbers. Detections carry model
class ids; `class_ids` maps the test set's label ids to model classes (matched by name), predictions of
model classes outside it are dropped, and test labels the model cannot predict count with AP 0.

The result dict of `evaluate()` (what `metrics.json` holds, before `run_evaluate` adds provenance):

- "mAP", "mAP50", "mAP75": AP averaged over IoU .50:.05:.95, at IoU .50, at IoU .75 (100 detections).
- "mAP_small", "mAP_medium", "mAP_large": mAP for boxes of area < 32^2, 32^2..96^2, > 96^2 pixels.
- "mAR1", "mAR10", "mAR100": recall averaged over IoU .50:.95 given at most 1, 10, 100 detections
  per image and class; "mAR_small", "mAR_medium", "mAR_large" at 100.
- "mean-average-precision", "mean-average-precision-iou50", "mean-average-recall": the names the seed's
  tooling (datasetinsights) used, equal to "mAP", "mAP50" and "mAR100".
- "per_class": {test label name: {"AP", "AP50", "AP75", "AR100", "num_gt", "num_predictions"}}, where
  "num_gt" counts boxes to find (crowd regions left out).
- "pr_curves": {test label name: {"recall": 101 recall points 0..1, "precision": 101 values}}, the
  interpolated precision at IoU .5 (all areas, 100 detections) as COCO computes AP50 from it, and
  "pr_curve": the same averaged over the classes that have ground truth.
- "num_images", "num_gt" (boxes to find), "num_crowd" (crowd regions), "num_predictions" (scored),
  "num_predictions_dropped" (model-only labels).
- "label_match": {"shared", "only_in_model", "only_in_data"}: label names, sorted.
- "protocol": what the numbers mean ("coco-bbox-2"); "schema_version": version of this dict's layout.

Every metric lies in [0, 1] or is null: null where pycocotools reports -1, that is where there is no
ground truth to score against (for example "mAP_medium" when the test set has no medium boxes, or a
class's "AP" when it has no box in the test split). Nulls are left out of every average, as in COCO.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from synthval.data.index import DatasetIndex, is_finite_number
from synthval.errors import DatasetError, shown
from synthval.io import storage

METRICS_SCHEMA_VERSION = 1
# What the numbers mean: COCO box AP/AR exactly as pycocotools computes them on the file's own boxes,
# areas and crowd regions. Change it when a change to this module would change a number; it enters the
# protocol fingerprint. ("coco-bbox-1" dropped crowd regions and used box areas and float32 boxes.)
METRIC_PROTOCOL = "coco-bbox-2"


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
# pycocotools matches at IoU >= min(t, 1 - 1e-10); below the lowest threshold nothing can match.
_MATCH_THRESHOLDS = np.minimum(IOU_THRESHOLDS, 1 - 1e-10)
_MIN_IOU = float(_MATCH_THRESHOLDS.min())
# Detection-box pairs whose IoU is computed at once: bounds memory at ~100 bytes a pair.
_PAIR_CHUNK = 1 << 21

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


def box_iou(det: np.ndarray, gt: np.ndarray, crowd: np.ndarray | bool = False) -> np.ndarray:
    """IoU of paired rows of two (N, 4) float64 xywh arrays with the float operations of pycocotools'
    bbIou; where `crowd`, the union is the detection's own area (a crowd region absorbs it)."""
    w = np.minimum(det[:, 2] + det[:, 0], gt[:, 2] + gt[:, 0]) - np.maximum(det[:, 0], gt[:, 0])
    h = np.minimum(det[:, 3] + det[:, 1], gt[:, 3] + gt[:, 1]) - np.maximum(det[:, 1], gt[:, 1])
    inter = w * h
    det_area = det[:, 2] * det[:, 3]
    union = np.where(crowd, det_area, det_area + gt[:, 2] * gt[:, 3] - inter)
    out = np.zeros(len(det), dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        np.divide(inter, union, out=out, where=(w > 0) & (h > 0))
    return out


def _group_bounds(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique keys of a sorted array with the [start, end) of each run."""
    if len(sorted_keys) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return sorted_keys[:0], empty, empty
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    ends = np.r_[starts[1:], len(sorted_keys)]
    return sorted_keys[starts], starts, ends


def expand_ranges(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated aranges: (index into starts, starts[index] + offset) for every element."""
    owner = np.repeat(np.arange(len(starts)), counts)
    offset = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    return owner, starts[owner] + offset


def _outside(area: np.ndarray) -> np.ndarray:
    """(N, A) bool: area outside each of COCO's area ranges (pycocotools' `a < lo or a > hi`)."""
    lo = np.array([r[0] for r in AREA_RANGES])
    hi = np.array([r[1] for r in AREA_RANGES])
    return (area[:, None] < lo) | (area[:, None] > hi)


@dataclass
class Matches:
    """Every scored detection and ground-truth box of one evaluation, with COCO's matches.

    Images are positions in pycocotools' visiting order (by COCO image id): `image_ids[i]` is the
    index id of image i. Classes are positions k in `cat_ids` (the test set's label ids, sorted).
    Ground truth (G boxes) is sorted by (image, class), file order within; `gt_ignored[g, a]` says box g
    is a crowd region or outside area range a. Detections (D) are sorted by (image, class, score rank)
    and hold only the 100 best of each image and class (`det_rank` < 100). Only the detections
    `cand` overlap a box of their image and class at IoU >= .5, so only they can match:
    `cand_match[u, t, a]` is the box detection `cand[u]` matched at IoU threshold t in area range a,
    or -1. `precision` (T, R, K, A, M) and `recall` (T, K, A, M) are pycocotools' accumulated arrays
    (`accumulate`), once the evaluator has made them.
    """

    index: DatasetIndex
    image_ids: list[int]
    cat_ids: list[int]
    gt_img: np.ndarray
    gt_cat: np.ndarray
    gt_xywh: np.ndarray
    gt_area: np.ndarray
    gt_crowd: np.ndarray
    gt_ignored: np.ndarray
    det_img: np.ndarray
    det_cat: np.ndarray
    det_xywh: np.ndarray
    det_score: np.ndarray
    det_rank: np.ndarray
    det_outside: np.ndarray
    cand: np.ndarray
    cand_match: np.ndarray
    precision: np.ndarray | None = None
    recall: np.ndarray | None = None

    def det_match(self, t: int, a: int = 0) -> np.ndarray:
        """(D,) the box each detection matched at IoU threshold index t, area range a (0: all), or -1."""
        out = np.full(len(self.det_score), -1, dtype=np.int64)
        out[self.cand] = self.cand_match[:, t, a]
        return out

    def scoring_order(self) -> np.ndarray:
        """Detections in pycocotools' accumulation order: by class, then score (highest first), then
        image (COCO id order), then rank within the image."""
        # The arrays are in (image, class, rank) order, so a stable sort keeps image and rank for ties.
        return np.lexsort((-self.det_score, self.det_cat))


def match_detections(det_group: np.ndarray, det_xywh: np.ndarray, gt_group: np.ndarray, gt_xywh: np.ndarray,
                     gt_crowd: np.ndarray, gt_ignored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """COCO's greedy matching of every detection at every IoU threshold and area range.

    `det_group`, `gt_group`: sorted (image, class) keys; detections are in score order within a group
    (pycocotools' sort), boxes in file order. `gt_ignored` (G, A): crowd or outside the area range.
    Returns (cand, match): the detections with a box of their group at IoU >= .5 (no other can match)
    and match[u, t, a], the box cand[u] matched, or -1.

    pycocotools walks each group's detections in score order; each takes, among the boxes it reaches
    at the threshold and that are free (a crowd region is never used up), the one of highest IoU (the
    last one on ties), preferring boxes that are not ignored. Here every group takes the same step at
    once: step s matches the s-th candidate detection of every group, for all thresholds and areas.
    """
    T, A, G = len(IOU_THRESHOLDS), gt_ignored.shape[1], len(gt_group)
    keys, g_start, g_end = _group_bounds(gt_group)
    at = np.minimum(np.searchsorted(keys, det_group), max(len(keys) - 1, 0))
    has_gt = (keys[at] == det_group) if len(keys) else np.zeros(len(det_group), dtype=bool)
    counts = np.where(has_gt, g_end[at] - g_start[at], 0) if len(keys) else np.zeros(len(det_group), np.int64)
    # Candidate pairs: every (detection, box) of a group at IoU >= .5, ordered by detection then box.
    cum = np.cumsum(counts)
    cand_d, cand_g, cand_iou = [], [], []
    lo = 0
    while lo < len(det_group):
        before = int(cum[lo] - counts[lo])
        hi = max(int(np.searchsorted(cum, before + _PAIR_CHUNK, side="right")), lo + 1)
        d_idx, g_idx = expand_ranges(g_start[at[lo:hi]] if len(keys) else np.zeros(hi - lo, np.int64), counts[lo:hi])
        d_idx = d_idx + lo
        iou = box_iou(det_xywh[d_idx], gt_xywh[g_idx], gt_crowd[g_idx])
        keep = iou >= _MIN_IOU
        cand_d.append(d_idx[keep])
        cand_g.append(g_idx[keep])
        cand_iou.append(iou[keep])
        lo = hi
    pair_det = np.concatenate(cand_d) if cand_d else np.zeros(0, np.int64)
    pair_gt = np.concatenate(cand_g) if cand_g else np.zeros(0, np.int64)
    pair_iou = np.concatenate(cand_iou) if cand_iou else np.zeros(0)

    cand, p_start, p_end = _group_bounds(pair_det)
    match = np.full((len(cand), T, A), -1, dtype=np.int32)
    if not len(cand):
        return cand, match
    _, s_start, s_end = _group_bounds(det_group[cand])
    step = np.arange(len(cand)) - np.repeat(s_start, s_end - s_start)
    by_step = np.argsort(step, kind="stable")
    _, st_start, st_end = _group_bounds(step[by_step])
    taken = np.zeros((G, T, A), dtype=bool)
    thresholds = _MATCH_THRESHOLDS[None, :, None]
    for s0, s1 in zip(st_start.tolist(), st_end.tolist()):
        active = by_step[s0:s1]
        n_pairs = p_end[active] - p_start[active]
        seg, pairs = expand_ranges(p_start[active], n_pairs)
        seg_starts = np.cumsum(n_pairs) - n_pairs
        g, iou = pair_gt[pairs], pair_iou[pairs][:, None, None]
        eligible = (iou >= thresholds) & (gt_crowd[g][:, None, None] | ~taken[g])  # (pairs, T, A)
        regular = eligible & ~gt_ignored[g][:, None, :]
        # A detection that reaches a box not ignored takes one of those; else an ignored one.
        chosen = np.where(np.logical_or.reduceat(regular, seg_starts, axis=0)[seg], regular, eligible)
        value = np.where(chosen, iou, -1.0)
        best = chosen & (value == np.maximum.reduceat(value, seg_starts, axis=0)[seg])
        last = np.maximum.reduceat(np.where(best, np.arange(len(pairs))[:, None, None], -1), seg_starts, axis=0)
        det_i, t_i, a_i = np.nonzero(last >= 0)
        box = g[last[det_i, t_i, a_i]]
        match[active[det_i], t_i, a_i] = box
        taken[box, t_i, a_i] = True
    return cand, match


def needed_true_positives(num_gt: np.ndarray) -> np.ndarray:
    """(..., R) the smallest true-positive count c with c / num_gt >= each recall threshold, using the
    very float division pycocotools' `searchsorted(rc, recThrs)` compares."""
    n = np.asarray(num_gt, dtype=np.float64)[..., None]
    need = np.ceil(RECALL_THRESHOLDS * n)
    need = np.where((need - 1) / n >= RECALL_THRESHOLDS, need - 1, need)
    return np.where(need / n < RECALL_THRESHOLDS, need + 1, need)


def interpolated_precision(tp_upto: np.ndarray, scored_upto: np.ndarray, is_tp: np.ndarray, need: np.ndarray
                           ) -> np.ndarray:
    """COCO's interpolated precision at the recall thresholds for L ranked lists at once.

    `tp_upto`, `scored_upto` (L, n): true positives and scored detections (true + false positives) up
    to and including each of n ranked positions of each list; `is_tp` (L, n) marks true positives;
    `need` (L, R) is `needed_true_positives(num_gt)`. Returns (L, R): pycocotools'
    `pr[searchsorted(rc, recThrs)]` after its running maximum from the end, 0 where the recall is
    never reached. Only true positives need to be among the n positions: precision peaks at one (a
    false positive lowers it, an ignored detection keeps it), so other detections change no maximum.
    """
    L, n = tp_upto.shape
    if n == 0:
        return np.zeros(need.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        pr = np.where(is_tp, tp_upto / (scored_upto + np.spacing(1)), -np.inf)
    envelope = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
    # First position whose true-positive count reaches `need`, all lists in one sorted search: the
    # counts are whole numbers, offset per list so that one ascending array holds them all.
    stride = float(max(tp_upto[:, -1].max(), need.max()) + 2)
    offset = np.arange(L)[:, None] * stride
    first = np.searchsorted((tp_upto + offset).ravel(), (need + offset).ravel(), side="left")
    first = first.reshape(need.shape) - np.arange(L)[:, None] * n
    lists, points = np.nonzero(first < n)
    q = np.zeros(need.shape)
    q[lists, points] = envelope[lists, first[lists, points]]
    return np.maximum(q, 0.0)  # no true positive at all: pycocotools' precision there is 0


def accumulate(m: Matches) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval.accumulate: precision (T, R, K, A, M) and recall (T, K, A, M), -1 where no ground truth.

    Per class, area range and detection budget, pycocotools ranks the detections, counts true and
    false positives (detections matched to an ignored box, or unmatched outside the area range, count
    as neither) and reads precision at recall thresholds. Counts at the true positives are all it
    needs: the running count of scored detections is the count of those inside the area range, plus a
    correction at the few detections that matched something.
    """
    T, R, A, M = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), len(AREA_RANGES), len(MAX_DETS)
    K = len(m.cat_ids)
    precision = -np.ones((T, R, K, A, M))
    recall = -np.ones((T, K, A, M))
    num_gt = np.zeros((K, A), dtype=np.int64)
    np.add.at(num_gt, m.gt_cat, (~m.gt_ignored).astype(np.int64))

    order = m.scoring_order()
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order))
    cat_sorted = m.det_cat[order]
    cats, cat_start, cat_end = _group_bounds(cat_sorted)
    span = dict(zip(cats.tolist(), zip(cat_start.tolist(), cat_end.tolist())))
    inside = ~m.det_outside[order]  # (D, A) in ranked order
    rank = m.det_rank[order]

    by_position = np.argsort(position[m.cand])
    cand_pos = position[m.cand][by_position]
    match = m.cand_match[by_position]
    matched = match >= 0
    on_ignored = m.gt_ignored[np.maximum(match, 0), np.arange(A)] & matched
    tp = matched & ~on_ignored  # (U, T, A)
    cand_inside = inside[cand_pos][:, None, :]
    correction = (tp | (~matched & cand_inside)).astype(np.int64) - cand_inside  # scored - counted as inside
    cand_cat_start = np.searchsorted(cat_sorted[cand_pos], np.arange(K + 1))

    for mi, max_det in enumerate(MAX_DETS):
        in_budget = rank < max_det
        inside_upto = np.cumsum(inside & in_budget[:, None], axis=0, dtype=np.int64)  # (D, A)
        count_upto = np.cumsum(in_budget, dtype=np.int64)
        for k in range(K):
            areas = np.flatnonzero(num_gt[k] > 0)
            if not len(areas):
                continue
            s, e = span.get(k, (0, 0))
            before = count_upto[s - 1] if s > 0 else 0
            if e == s or count_upto[e - 1] == before:  # no detection of this class
                precision[:, :, k, areas, mi] = 0
                recall[:, k, areas, mi] = 0
                continue
            u = np.arange(cand_cat_start[k], cand_cat_start[k + 1])
            u = u[in_budget[cand_pos[u]]]
            base = inside_upto[cand_pos[u]] - (inside_upto[s - 1] if s > 0 else 0)  # (n, A)
            tp_k = tp[u]
            tp_upto = np.cumsum(tp_k, axis=0, dtype=np.int64).astype(np.float64)  # (n, T, A)
            scored_upto = (base[:, None, :] + np.cumsum(correction[u], axis=0)).astype(np.float64)
            # One ranked list per (threshold, area).
            need = np.broadcast_to(needed_true_positives(np.maximum(num_gt[k], 1)), (T, A, R)).reshape(T * A, R)
            q = interpolated_precision(*(x.reshape(len(u), T * A).T for x in (tp_upto, scored_upto, tp_k)),
                                       need).reshape(T, A, R)
            total = tp_upto[-1] if len(u) else np.zeros((T, A))
            for a in areas.tolist():
                precision[:, :, k, a, mi] = q[:, a]
                recall[:, k, a, mi] = total[:, a] / num_gt[k, a]
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


@dataclass
class CocoResults:
    """A COCO results file as columns: index image ids, test-set label ids, float64 [x, y, w, h] boxes
    exactly as written, and scores, in the file's order."""

    image_ids: np.ndarray
    labels: np.ndarray
    xywh: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


class CocoEvaluator:
    """Collect detections with `process` (or `add_results`), then `evaluate` them against `index`.

    `class_ids` maps the test set's label ids to the model's class ids (shared names only);
    `label_names[k - 1]` names model class k (None: unknown, e.g. a seed checkpoint or a results file,
    whose classes are the test set's own ids). `coco_image_ids` maps index image ids to the ids a COCO
    annotation file gives them (default: the same): `coco_results()` writes those, and pycocotools
    visits images in their order, which decides ties between equal scores on different images.
    After `evaluate`, `matches` holds the matches and `precision` / `recall` pycocotools' arrays.
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
        self.matches: Matches | None = None
        self.precision: np.ndarray | None = None
        self.recall: np.ndarray | None = None
        self.reset()

    def _ground_truth(self) -> dict[str, np.ndarray]:
        """Every box of the test set in float64 as the file gives it, sorted by (image, class), file order within."""
        records = self.index.images
        counts = np.array([len(r.labels) for r in records], dtype=np.int64)
        img = np.repeat(np.array([self.img_pos[r.image_id] for r in records], dtype=np.int64), counts)

        def joined(name: str, dtype: Any, shape: tuple[int, ...] = (-1,)) -> np.ndarray:
            if not records:
                return np.zeros((0, *shape[1:]), dtype=dtype)
            return np.concatenate([np.asarray(getattr(r, name), dtype=dtype).reshape(shape) for r in records])

        labels = joined("labels", np.int64)
        known = np.array(self.cat_ids, dtype=np.int64)
        at = np.minimum(np.searchsorted(known, labels), max(len(known) - 1, 0))
        unknown = (known[at] != labels) if len(known) else np.ones(len(labels), dtype=bool)
        if unknown.any():
            j = int(np.argmax(unknown))
            record = records[int(np.searchsorted(np.cumsum(counts), j, side="right"))]
            raise DatasetError(f"{record.path}: label id {labels[j]} is not in the dataset's label names")
        cat = at
        order = np.lexsort((cat, img))  # stable: file order within an (image, class)
        xywh = joined("xywh", np.float64, (-1, 4))[order]
        area = joined("area", np.float64)[order]
        crowd = joined("iscrowd", bool)[order]
        return {"img": img[order], "cat": cat[order], "xywh": xywh, "area": area, "crowd": crowd,
                "ignored": crowd[:, None] | _outside(area)}

    def reset(self) -> None:
        """Forget every processed detection."""
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self.num_dropped = 0

    def process(self, predictions: Iterable[Mapping[str, Any]]) -> None:
        """Add detections: dicts with image_id, boxes (N, 4) xyxy, scores (N,), labels (N,) model classes.

        Boxes become COCO [x, y, w, h] in float64 once; non-finite ones (a diverged model) are dropped.
        """
        model_classes = np.array(sorted(self.model_to_cat), dtype=np.int64)
        positions = np.array([self.cat_pos[self.model_to_cat[c]] for c in model_classes.tolist()], dtype=np.int64)
        for pred in predictions:
            image_id = pred["image_id"]
            image_id = int(image_id.item() if hasattr(image_id, "item") else image_id)
            if image_id not in self.img_pos:
                raise DatasetError(f"prediction for image id {image_id}, which is not in the test set "
                                   f"{self.index.root}")
            xywh = xyxy_to_xywh(pred["boxes"])
            scores = _numpy(pred["scores"], np.float64).reshape(-1)
            labels = _numpy(pred["labels"], np.int64).reshape(-1)
            if not len(xywh) == len(scores) == len(labels):
                raise ValueError(f"image {image_id}: boxes, scores and labels differ in length")
            at = np.minimum(np.searchsorted(model_classes, labels), max(len(model_classes) - 1, 0))
            known = (model_classes[at] == labels) if len(model_classes) else np.zeros(len(labels), bool)
            cats = np.where(known, positions[at] if len(positions) else -1, -1)
            keep = (cats >= 0) & np.isfinite(scores) & np.isfinite(xywh).all(axis=1)
            self.num_dropped += int(len(keep) - keep.sum())
            self._parts.append((np.full(int(keep.sum()), self.img_pos[image_id], dtype=np.int64), cats[keep],
                                xywh[keep], scores[keep]))

    def add_results(self, results: CocoResults) -> None:
        """Add a results file's detections (index image ids and test-set label ids, checked on reading)."""
        img = np.array([self.img_pos[i] for i in results.image_ids.tolist()], dtype=np.int64)
        cats = np.searchsorted(np.array(self.cat_ids, dtype=np.int64), results.labels)
        self._parts.append((img, cats, np.asarray(results.xywh, np.float64), np.asarray(results.scores, np.float64)))

    def _detections(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if not self._parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0)
        img, cat, xywh, score = zip(*self._parts)
        return np.concatenate(img), np.concatenate(cat), np.concatenate(xywh), np.concatenate(score)

    def coco_results(self) -> list[dict[str, Any]]:
        """The processed detections as a COCO results list (COCO image ids, test set label ids), in order."""
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
        K = len(self.cat_ids)
        img, cat, xywh, score = self._detections()
        num_scored = len(score)
        # Detections per (image, class) in pycocotools' order: score, then arrival; at most 100 kept.
        group = img * K + cat
        order = np.lexsort((-score, group))
        _, starts, ends = _group_bounds(group[order])
        rank = np.arange(len(order)) - np.repeat(starts, ends - starts)
        order, rank = order[rank < MAX_DETS[-1]], rank[rank < MAX_DETS[-1]]
        img, cat, xywh, score, group = img[order], cat[order], xywh[order], score[order], group[order]
        gt = self._gt
        cand, cand_match = match_detections(group, xywh, gt["img"] * K + gt["cat"], gt["xywh"], gt["crowd"],
                                            gt["ignored"])
        self.matches = Matches(
            index=self.index, image_ids=self.image_ids, cat_ids=self.cat_ids,
            gt_img=gt["img"], gt_cat=gt["cat"], gt_xywh=gt["xywh"], gt_area=gt["area"], gt_crowd=gt["crowd"],
            gt_ignored=gt["ignored"], det_img=img, det_cat=cat, det_xywh=xywh, det_score=score, det_rank=rank,
            det_outside=_outside(xywh[:, 2] * xywh[:, 3]), cand=cand, cand_match=cand_match,
        )
        self.precision, self.recall = self.matches.precision, self.matches.recall = accumulate(self.matches)
        return self._result(num_scored)

    def _result(self, num_scored: int) -> dict[str, Any]:
        precision, recall = self.precision, self.recall
        result: dict[str, Any] = {}
        for key, ap, iou, area, max_dets in SUMMARY:
            result[key] = _none_if_absent(summarize(precision, recall, ap, iou, area, max_dets))
        for seed_name, key in SEED_NAMES.items():
            result[seed_name] = result[key]
        names = [self.index.label_names[c] for c in self.cat_ids]
        gt = self._gt
        num_gt = np.bincount(gt["cat"][~gt["crowd"]], minlength=len(names))
        num_det = np.bincount(self._detections()[1], minlength=len(names))
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
        result["num_gt"] = int(num_gt.sum())
        result["num_crowd"] = int(gt["crowd"].sum())
        result["num_predictions"] = int(num_scored)
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


# --- COCO results files --------------------------------------------------------------------------------

_FIELDS = ("image_id", "category_id", "bbox", "score")


def coco_image_ids(index: DatasetIndex) -> dict[int, Any]:
    """{index image id: the id results files use}: a COCO file's own `images[].id`, else the index id.

    The COCO reader numbers images by their position in `images[]`; a detector's COCO results use the
    file's ids, and matching those against positions would silently score boxes on the wrong images.
    """
    return {r.image_id: index.source_ids.get(r.image_id, r.image_id) for r in index.images}


def load_coco_results(uri: str, index: DatasetIndex, image_ids: Mapping[Any, int] | None = None) -> CocoResults:
    """Read a COCO results JSON ([{image_id, category_id, bbox [x, y, w, h], score}]) scored on `index`.

    See `parse_coco_results`; the file is read through `synthval.io.storage` (any URI).
    """
    return parse_coco_results(storage.read_bytes(uri), uri, index, image_ids)


def parse_coco_results(data: bytes, uri: str, index: DatasetIndex, image_ids: Mapping[Any, int] | None = None
                       ) -> CocoResults:
    """Parse the bytes of a COCO results file named `uri`; returns its detections as columns.

    `image_ids` maps the file's image ids to the index's (default: they are the index's own); labels
    are the test set's label ids (so score it with an identity `class_ids`). Anything but UTF-8 JSON
    holding a list of such objects raises DatasetError (exit code 2) naming the file, the entry and
    the field: malformed or deeply nested JSON, a missing field, a non-integer or unknown image or
    category id, a bbox that is not 4 finite numbers or has a negative size, a score that is not a
    finite number (NaN, Infinity and 1e400 are not). Other fields are ignored. Checks run column by
    column in C where they can: half a million detections parse in about a second.
    """
    if image_ids is None:
        image_ids = {r.image_id: r.image_id for r in index.images}

    def fail(i: int, message: str) -> DatasetError:
        return DatasetError(f"{uri}: detection [{i}]: {message}")

    # Half a million small objects: the cyclic garbage collector would walk them all again and again
    # while they are made (seconds); none of them can form a cycle.
    with _gc_paused():
        doc = storage.decode_json(data, uri, DatasetError, check_numbers=False)  # numbers: checked below
        if not isinstance(doc, list):
            raise DatasetError(f"{uri}: a COCO results file is a JSON list of detections, got {type(doc).__name__}")
        try:
            ids, cats, boxes, scores = ([d[f] for d in doc] for f in _FIELDS)
        except (KeyError, TypeError):
            i = next(i for i, d in enumerate(doc) if type(d) is not dict or not all(f in d for f in _FIELDS))
            if type(doc[i]) is not dict:
                raise fail(i, "expected an object with image_id, category_id, bbox, score") from None
            raise fail(i, f"missing field '{next(f for f in _FIELDS if f not in doc[i])}'") from None
        del doc

    def first(values: Sequence[Any], bad: Any) -> int:
        return next(i for i, v in enumerate(values) if bad(v))

    for field, values, lookup in (("image_id", ids, image_ids), ("category_id", cats, index.label_names)):
        if set(map(type, values)) - {int}:
            i = first(values, lambda v: type(v) is not int)
            raise fail(i, f"field '{field}' must be an integer, got {shown(values[i])}")
        if not all(map(lookup.__contains__, values)):
            i = first(values, lambda v: v not in lookup)
            if field == "image_id":
                raise fail(i, f"field 'image_id' {shown(values[i])} is not an image of the test set {index.root}")
            raise fail(i, f"field 'category_id' {shown(values[i])} is not a label of the test set; known ids: "
                          f"{_id_ranges(sorted(index.label_names))}")
    if set(map(type, boxes)) - {list} or set(map(len, boxes)) - {4}:
        i = first(boxes, lambda b: type(b) is not list or len(b) != 4)
        raise fail(i, f"field 'bbox' must be [x, y, width, height] of finite numbers, got {shown(boxes[i])}")
    xywh = _finite_column(list(itertools.chain.from_iterable(boxes)), lambda j: fail(
        j // 4, f"field 'bbox' must be [x, y, width, height] of finite numbers, got {shown(boxes[j // 4])}"))
    xywh = xywh.reshape(-1, 4)
    negative = (xywh[:, 2] < 0) | (xywh[:, 3] < 0)
    if negative.any():
        i = int(np.argmax(negative))
        raise fail(i, f"field 'bbox' has a negative width or height: {shown(boxes[i])}")
    score = _finite_column(scores, lambda i: fail(i, f"field 'score' must be a finite number, got {shown(scores[i])}"))
    return CocoResults(
        image_ids=np.array([image_ids[i] for i in ids], dtype=np.int64),
        labels=np.array(cats, dtype=np.int64), xywh=xywh, scores=score,
    )


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _finite_column(values: Sequence[Any], error: Any) -> np.ndarray:
    """float64 array of JSON numbers; else raise error(i) at the first that is not a finite number."""
    types = set(map(type, values))
    array = None
    if types <= {int, float}:
        try:
            array = np.array(values, dtype=np.float64)
        except OverflowError:  # an integer beyond float range, e.g. 10**400
            array = None
    if array is None:
        raise error(next(i for i, v in enumerate(values) if not is_finite_number(v)))
    finite = np.isfinite(array)
    if not finite.all():
        raise error(int(np.argmin(finite)))
    return array


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
