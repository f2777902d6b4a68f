"""Bootstrap intervals: exact at replicate 0, right under resampling, calibrated, and fast enough."""

from __future__ import annotations

import contextlib
import io
import time

import numpy as np
import pytest

from synthval.bootstrap import (CocoBootstrap, bootstrap, coco_api, paired_difference, percentile_interval,
                                resample_weights, weighted_mean)
from synthval.datasets.index import DatasetIndex, ImageRecord
from synthval.metrics import evaluate_detections

LABELS = {1: "cereal", 2: "soda", 3: "tuna", 4: "jam", 7: "never_in_test"}


def random_case(n_images: int, seed: int, ties: bool = False, max_boxes: int = 6):
    """An index with random boxes and a noisy detector's predictions (test-set label ids)."""
    rng = np.random.default_rng(seed)
    records, predictions = [], []
    for i in range(n_images):
        n = int(rng.integers(0, max_boxes + 1))
        xy = rng.uniform(0, 150, (n, 2))
        wh = rng.uniform(8, 90, (n, 2))
        boxes = np.concatenate([xy, np.minimum(xy + wh, 256)], axis=1).astype(np.float32)
        labels = rng.choice([1, 2, 3, 4], size=n)
        records.append(ImageRecord(image_id=1000 + 3 * i, path=f"img{i}.png", width=256, height=256,
                                   boxes=boxes, labels=labels.astype(np.int64)))
        if rng.random() < 0.1:
            continue  # an image without any detection
        keep = rng.random(n) > 0.25
        det = boxes[keep].astype(np.float64) + rng.normal(0, 6, (int(keep.sum()), 4))
        det_labels = np.where(rng.random(int(keep.sum())) < 0.1, rng.choice([1, 2, 3, 4, 7], int(keep.sum())),
                              labels[keep])
        extra = int(rng.poisson(2))
        fxy = rng.uniform(0, 200, (extra, 2))
        det = np.concatenate([det, np.concatenate([fxy, fxy + rng.uniform(5, 50, (extra, 2))], axis=1)])
        det_labels = np.concatenate([det_labels, rng.choice([1, 2, 3, 4, 7], extra)])
        scores = rng.uniform(0, 1, len(det))
        if ties:
            scores = np.round(scores, 1)
        det[:, 2:] = np.maximum(det[:, 2:], det[:, :2] + 1)
        predictions.append({"image_id": 1000 + 3 * i, "boxes": det, "scores": scores,
                            "labels": det_labels.astype(np.int64)})
    return DatasetIndex("memory", "coco", dict(LABELS), records), predictions


def pycocotools_stats(index, predictions):
    from pycocotools.cocoeval import COCOeval

    gt, dt = coco_api(index, predictions)
    ev = COCOeval(gt, dt, iouType="bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"mAP": ev.stats[0], "mAP50": ev.stats[1], "mAP75": ev.stats[2], "mAR100": ev.stats[8]}, ev


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, True)])
def test_replicate_zero_equals_pycocotools_exactly(seed, ties):
    index, predictions = random_case(120, seed, ties=ties)
    reference, ev = pycocotools_stats(index, predictions)
    coco = CocoBootstrap(index, predictions)
    values = dict(zip(coco.names, coco.statistic(np.ones((1, len(index))))[0]))
    for key in ("mAP", "mAP50", "mAP75", "mAR100"):
        assert values[key] == reference[key], key  # equal to the bit, not approximately
    # per-class AP as pycocotools' precision array gives it (area all, 100 detections)
    for k, cat in enumerate(ev.params.catIds):
        p = ev.eval["precision"][:, :, k, 0, 2]
        expected = np.mean(p[p > -1]) if (p > -1).any() else np.nan
        assert np.array_equal(values[f"AP/{LABELS[cat]}"], expected, equal_nan=True)
    # and synthval's own evaluator (what metrics.json holds) agrees too
    metrics = evaluate_detections(index, {c: c for c in LABELS}, predictions)
    for key in ("mAP", "mAP50", "mAP75", "mAR100"):
        assert values[key] == pytest.approx(metrics[key], abs=1e-12)


def test_weights_score_the_resampled_test_set_as_pycocotools_would():
    """Weights (0, 1, 2, 3 draws) give pycocotools' numbers on a test set where images are really repeated."""
    index, predictions = random_case(60, seed=5)
    rng = np.random.default_rng(3)
    counts = rng.integers(0, 4, len(index))
    counts[0] = 2
    records, dup_predictions = [], []
    by_image = {p["image_id"]: p for p in predictions}
    for record, c in zip(index.images, counts):
        for copy in range(c):
            new_id = record.image_id * 10 + copy
            records.append(ImageRecord(new_id, record.path, record.width, record.height, record.boxes, record.labels))
            if record.image_id in by_image:
                dup_predictions.append(dict(by_image[record.image_id], image_id=new_id))
    duplicated = DatasetIndex("memory", "coco", dict(LABELS), records)
    reference, _ = pycocotools_stats(duplicated, dup_predictions)
    values = CocoBootstrap(index, predictions).statistic(counts[None, :].astype(float))[0]
    for j, key in enumerate(("mAP", "mAP50", "mAP75", "mAR100")):
        assert values[j] == pytest.approx(reference[key], abs=1e-12), key


def test_resample_weights_are_draws_with_replacement_and_paired_by_seed():
    w = resample_weights(50, 200, seed=4)
    assert w.shape == (200, 50)
    assert np.all(w.sum(axis=1) == 50)
    assert np.array_equal(w[:100], resample_weights(50, 100, seed=4))  # same rows whatever the count
    assert not np.array_equal(w, resample_weights(50, 200, seed=5))
    # every image is drawn about once per replicate on average
    assert abs(w.mean() - 1.0) < 0.05


def test_percentile_interval_ignores_undefined_replicates():
    values = np.array([[1.0, np.nan], [2.0, np.nan], [3.0, np.nan], [np.nan, np.nan]])
    low, high = percentile_interval(values, 0.5)
    assert low[0] == pytest.approx(1.5) and high[0] == pytest.approx(2.5)
    assert np.isnan(low[1]) and np.isnan(high[1])


def test_interval_covers_the_true_mean_at_about_the_stated_rate():
    """Bernoulli(0.3) means of 100 items: the 95% interval covers 0.3 in 90-99% of 200 seeds."""
    p, n, hits = 0.3, 100, 0
    for seed in range(200):
        samples = (np.random.default_rng(10_000 + seed).random(n) < p).astype(float)
        result = bootstrap(weighted_mean(samples), n, ["mean"], replicates=500, seed=seed)
        hits += result.low["mean"] <= p <= result.high["mean"]
    assert 0.90 <= hits / 200 <= 0.99, hits / 200


def _bernoulli_detection_case(n_images: int, p: float, seed: int):
    """One true box per image and one detection on it (a hit) or far from it (a miss): mAR100 is the
    share of hits, a Bernoulli(p) mean whose true value is p."""
    rng = np.random.default_rng(seed)
    records, predictions = [], []
    for i in range(n_images):
        box = np.array([[20, 20, 60, 60]], dtype=np.float32)
        records.append(ImageRecord(i, f"{i}.png", 128, 128, box, np.array([1], dtype=np.int64)))
        det = box if rng.random() < p else np.array([[80, 80, 120, 120]], dtype=np.float32)
        predictions.append({"image_id": i, "boxes": det.astype(np.float64), "scores": np.array([rng.random()]),
                            "labels": np.array([1])})
    return DatasetIndex("memory", "coco", {1: "thing"}, records), predictions


def test_coco_interval_covers_the_true_recall_at_about_the_stated_rate():
    """The same calibration through the whole COCO path (pycocotools matching, re-accumulation)."""
    p, n, seeds, hits = 0.6, 60, 100, 0
    for seed in range(seeds):
        index, predictions = _bernoulli_detection_case(n, p, seed)
        result = CocoBootstrap(index, predictions).run(replicates=300, seed=seed)
        hits += result.low["mAR100"] <= p <= result.high["mAR100"]
    assert 0.88 <= hits / seeds <= 0.995, hits / seeds


def test_intervals_shrink_with_more_test_images():
    widths = {}
    for n in (50, 400):
        index, predictions = random_case(n, seed=11)
        result = CocoBootstrap(index, predictions).run(replicates=300, seed=0)
        widths[n] = {k: result.high[k] - result.low[k] for k in ("mAP", "mAP50", "mAR100")}
    for key in ("mAP", "mAP50", "mAR100"):
        # 8x the images: about sqrt(8) = 2.8x narrower
        assert widths[400][key] < widths[50][key] / 1.8, (key, widths)


def test_paired_difference_tells_a_real_gain_from_noise():
    index, predictions = random_case(150, seed=21)
    better = []
    for pred in predictions:  # the same detections, plus a perfect detection of every true box
        record = next(r for r in index.images if r.image_id == pred["image_id"])
        better.append({"image_id": pred["image_id"],
                       "boxes": np.concatenate([pred["boxes"], record.boxes.astype(np.float64)]),
                       "scores": np.concatenate([pred["scores"], np.full(len(record.boxes), 1.5)]),
                       "labels": np.concatenate([pred["labels"], record.labels])})
    a = CocoBootstrap(index, predictions).run(replicates=300, seed=7)
    b = CocoBootstrap(index, better).run(replicates=300, seed=7)
    gain = paired_difference(b, a, "mAP50")
    assert gain.value > 0 and gain.significant and gain.low > 0
    same = paired_difference(a, a, "mAP")
    assert same.value == 0 and same.low == 0 and same.high == 0 and not same.significant
    # a detector differing by one low-scoring false alarm is not "better" beyond noise
    nudged = [dict(predictions[0], boxes=np.concatenate([predictions[0]["boxes"], [[0, 0, 5, 5]]]),
                   scores=np.concatenate([predictions[0]["scores"], [0.01]]),
                   labels=np.concatenate([predictions[0]["labels"], [1]]))] + predictions[1:]
    c = CocoBootstrap(index, nudged).run(replicates=300, seed=7)
    assert not paired_difference(c, a, "mAP").significant


def test_thousand_replicates_of_250_images_take_seconds():
    index, predictions = random_case(250, seed=3, max_boxes=10)
    for pred in predictions:  # a detector's usual tail of low-scoring boxes: ~60 per image
        extra = 50
        xy = np.random.default_rng(pred["image_id"]).uniform(0, 200, (extra, 2))
        pred["boxes"] = np.concatenate([pred["boxes"], np.concatenate([xy, xy + 20], axis=1)])
        pred["scores"] = np.concatenate([pred["scores"], np.linspace(0.01, 0.2, extra)])
        pred["labels"] = np.concatenate([pred["labels"], np.resize([1, 2, 3, 4], extra)])
    start = time.perf_counter()
    result = CocoBootstrap(index, predictions).run(replicates=1000, seed=0)
    elapsed = time.perf_counter() - start
    assert result.replicates.shape == (1000, len(result.names))
    assert elapsed < 30, f"{elapsed:.1f} s"  # about 1-2 s on one idle core
