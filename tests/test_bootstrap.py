"""Bootstrap intervals: the evaluation's own numbers unresampled, right under resampling, calibrated."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from coco_reference import pycocotools_eval, random_coco, write_json
from synthval.scoring.bootstrap import CocoBootstrap, bootstrap, paired_difference, percentile_interval, resample_weights
from synthval.data import load_ground_truth
from synthval.data.index import DatasetIndex, ImageRecord
from synthval.scoring.coco_eval import CocoEvaluator, coco_image_ids, load_coco_results

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


def matches_of(index, predictions):
    """The evaluation's matches of engine.predict-style predictions (test-set label ids)."""
    evaluator = CocoEvaluator(index, {c: c for c in index.label_names})
    evaluator.process(predictions)
    evaluator.evaluate()
    return evaluator


def coco_file_matches(doc, results, tmp_path):
    """The evaluation's matches of a COCO file and results file, read as `evaluate --predictions` does."""
    index = load_ground_truth(write_json(tmp_path / "instances.json", doc))
    public = coco_image_ids(index)
    evaluator = CocoEvaluator(index, {c: c for c in index.label_names}, coco_image_ids=public)
    evaluator.add_results(load_coco_results(write_json(tmp_path / "results.json", results), index,
                                            image_ids={p: i for i, p in public.items()}))
    evaluator.evaluate()
    return evaluator.matches


def reference_values(ev, cat_ids, names):
    """mAP, mAP50, mAP75, mAR100 and per-class AP / AP50 from a pycocotools COCOeval (area all, 100)."""
    values = dict(zip(("mAP", "mAP50", "mAP75", "mAR100"), (ev.stats[0], ev.stats[1], ev.stats[2], ev.stats[8])))
    for k, cat in enumerate(cat_ids):
        for key, p in ((f"AP/{names[cat]}", ev.eval["precision"][:, :, k, 0, 2]),
                       (f"AP50/{names[cat]}", ev.eval["precision"][0, :, k, 0, 2])):
            values[key] = np.mean(p[p > -1]) if (p > -1).any() else np.nan
    return values


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, True)])
def test_unresampled_values_are_pycocotools_own(seed, ties):
    index, predictions = random_case(120, seed, ties=ties)
    evaluator = matches_of(index, predictions)
    reference = reference_values(pycocotools_eval(index_doc(index), evaluator.coco_results()), evaluator.cat_ids,
                                 LABELS)
    coco = CocoBootstrap(evaluator.matches)
    exact = dict(zip(coco.names, coco.estimate()))
    replicate = dict(zip(coco.names, coco.statistic(np.ones((1, len(index))))[0]))
    for name in coco.names:
        # The estimate is the evaluation's own arithmetic, equal to the bit; a replicate's arithmetic is
        # float32 (its rounding is far below an interval's width).
        assert np.array_equal(exact[name], reference[name], equal_nan=True), name
        assert replicate[name] == pytest.approx(reference[name], abs=1e-6, nan_ok=True), name
    estimate = coco.run(replicates=20).estimate
    assert np.array_equal([estimate[n] for n in coco.names], [exact[n] for n in coco.names], equal_nan=True)


@pytest.mark.parametrize("seed", range(4))
def test_weights_score_the_resampled_test_set_as_pycocotools_would(seed, tmp_path):
    """Weights (0, 1, 2, 3 draws) give pycocotools' numbers on a COCO file (crowd regions, given areas)
    where the images are really repeated, and the results with them. (Without tied scores: a repeated
    image's detections are ranked copy after copy there, detection after detection here.)"""
    doc, results = random_coco(seed, n_images=40, crowd=0.2, ties=False)
    matches = coco_file_matches(doc, results, tmp_path)
    counts = np.random.default_rng(seed).integers(0, 4, len(matches.image_ids))
    counts[0] = 2
    public = coco_image_ids(matches.index)
    repeated = {"images": [], "annotations": [], "categories": doc["categories"]}
    repeated_results = []
    by_id = {image["id"]: image for image in doc["images"]}
    for position, count in enumerate(counts.tolist()):
        image_id = public[matches.image_ids[position]]
        for copy_no in range(count):
            new_id = image_id * 10 + copy_no  # keeps pycocotools' image order: copies of an image adjacent
            repeated["images"].append(dict(by_id[image_id], id=new_id))
            repeated["annotations"] += [dict(copy.deepcopy(a), image_id=new_id, id=len(repeated["annotations"]) + j + 1)
                                        for j, a in enumerate(a for a in doc["annotations"] if a["image_id"] == image_id)]
            repeated_results += [dict(r, image_id=new_id) for r in results if r["image_id"] == image_id]
    coco = CocoBootstrap(matches)
    reference = reference_values(pycocotools_eval(repeated, repeated_results), coco.cat_ids,
                                 {c["id"]: c["name"] for c in doc["categories"]})
    values = dict(zip(coco.names, coco.statistic(counts[None, :])[0]))
    for name in coco.names:
        assert values[name] == pytest.approx(reference[name], abs=1e-6, nan_ok=True), name


def index_doc(index):
    """The ground truth of an index (no crowds) as a COCO dict."""
    boxes = [(r.image_id, box, label) for r in index.images for box, label in zip(r.xywh.tolist(), r.labels.tolist())]
    return {"images": [{"id": r.image_id, "width": r.width, "height": r.height} for r in index.images],
            "categories": [{"id": c, "name": n} for c, n in index.label_names.items()],
            "annotations": [{"id": i + 1, "image_id": image_id, "category_id": label, "bbox": box,
                             "area": box[2] * box[3], "iscrowd": 0} for i, (image_id, box, label) in enumerate(boxes)]}


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


def test_bias_corrected_interval_undoes_a_median_shift():
    """Replicates N(estimate + b, s): the corrected interval is estimate - b -+ 1.96 s (Efron's BC), the
    plain one estimate + b -+ 1.96 s; replicates centred on the estimate get the plain one."""
    estimate, b, s = 0.30, 0.02, 0.05
    shifted = estimate + b + s * np.random.default_rng(0).standard_normal(200_000)
    low, high = percentile_interval(shifted, 0.95, estimate)
    assert low[0] == pytest.approx(estimate - b - 1.96 * s, abs=0.002)
    assert high[0] == pytest.approx(estimate - b + 1.96 * s, abs=0.002)
    plain_low, plain_high = percentile_interval(shifted, 0.95)
    assert plain_low[0] == pytest.approx(estimate + b - 1.96 * s, abs=0.002)
    centred = shifted - b
    assert np.allclose(percentile_interval(centred, 0.95, estimate), percentile_interval(centred, 0.95), atol=0.002)
    # every replicate above the estimate: a finite, lower interval, not NaN
    low, high = percentile_interval(np.linspace(0.4, 0.5, 100), 0.95, 0.3)
    assert 0.4 <= low[0] < high[0] < 0.45


def _one_box_detector_case(n_images: int, seed: int):
    """One true box per image; the detector finds it (60%) or boxes empty space, with a random score,
    and sometimes adds a false alarm: a test set drawn from a population whose AP is known."""
    rng = np.random.default_rng(seed)
    records, predictions = [], []
    for i in range(n_images):
        box = [20.0, 20.0, 60.0, 60.0]
        records.append(ImageRecord(i, f"{i}.png", 128, 128, np.array([box], dtype=np.float32),
                                   np.array([1], dtype=np.int64)))
        boxes = [box if rng.random() < 0.6 else [80.0, 80.0, 120.0, 120.0]]
        scores = [rng.uniform(0.2, 1.0)]
        if rng.random() < 0.5:
            boxes.append([0.0, 0.0, 10.0, 10.0])
            scores.append(rng.uniform(0.0, 0.9))
        predictions.append({"image_id": i, "boxes": np.array(boxes), "scores": np.array(scores),
                            "labels": np.ones(len(boxes), dtype=np.int64)})
    return DatasetIndex("memory", "coco", {1: "thing"}, records), predictions


def test_map_interval_covers_the_population_ap_better_than_plain_percentiles():
    """AP's interpolated precision is a running maximum, so resampled AP runs high (about 57% of
    replicates above the estimate here) and the plain percentile interval of 30 images covers the
    population's AP in only ~87% of test sets; the bias-corrected one in ~92%. Measured over 200
    test sets against the AP of 10,000 images from the same detector."""
    truth = CocoBootstrap(matches_of(*_one_box_detector_case(10_000, seed=999)).matches).estimate()[0]
    corrected = plain = 0
    seeds = 200
    for seed in range(seeds):
        result = CocoBootstrap(matches_of(*_one_box_detector_case(30, seed)).matches).run(replicates=400, seed=seed)
        corrected += result.low["mAP"] <= truth <= result.high["mAP"]
        low, high = percentile_interval(result.replicates[:, result.names.index("mAP")], 0.95)
        plain += low[0] <= truth <= high[0]
    assert corrected / seeds >= 0.88 and corrected - plain >= 0.02 * seeds, (corrected / seeds, plain / seeds)


def _mean_of(samples: np.ndarray):
    """The bootstrap statistic "weighted mean of per-item samples": one column, one row per replicate."""
    def statistic(weights: np.ndarray) -> np.ndarray:
        return (weights @ samples / weights.sum(axis=1))[:, None]

    return statistic


def test_interval_covers_the_true_mean_at_about_the_stated_rate():
    """Bernoulli(0.3) means of 100 items: the 95% interval covers 0.3 in 90-99% of 200 seeds."""
    p, n, hits = 0.3, 100, 0
    for seed in range(200):
        samples = (np.random.default_rng(10_000 + seed).random(n) < p).astype(float)
        result = bootstrap(_mean_of(samples), n, ["mean"], replicates=500, seed=seed)
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
    """The same calibration through the whole COCO path (the evaluation's matching, re-accumulation)."""
    p, n, seeds, hits = 0.6, 60, 100, 0
    for seed in range(seeds):
        index, predictions = _bernoulli_detection_case(n, p, seed)
        result = CocoBootstrap(matches_of(index, predictions).matches).run(replicates=300, seed=seed)
        hits += result.low["mAR100"] <= p <= result.high["mAR100"]
    assert 0.88 <= hits / seeds <= 0.995, hits / seeds


def test_intervals_shrink_with_more_test_images():
    widths = {}
    for n in (50, 400):
        index, predictions = random_case(n, seed=11)
        result = CocoBootstrap(matches_of(index, predictions).matches).run(replicates=300, seed=0)
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
    a = CocoBootstrap(matches_of(index, predictions).matches).run(replicates=300, seed=7)
    b = CocoBootstrap(matches_of(index, better).matches).run(replicates=300, seed=7)
    gain = paired_difference(b, a, "mAP50")
    assert gain.value > 0 and gain.significant and gain.low > 0
    same = paired_difference(a, a, "mAP")
    assert same.value == 0 and same.low == 0 and same.high == 0 and not same.significant
    # a detector differing by one low-scoring false alarm is not "better" beyond noise
    nudged = [dict(predictions[0], boxes=np.concatenate([predictions[0]["boxes"], [[0, 0, 5, 5]]]),
                   scores=np.concatenate([predictions[0]["scores"], [0.01]]),
                   labels=np.concatenate([predictions[0]["labels"], [1]]))] + predictions[1:]
    c = CocoBootstrap(matches_of(index, nudged).matches).run(replicates=300, seed=7)
    assert not paired_difference(c, a, "mAP").significant


def test_a_thousand_replicates_of_a_detector_s_long_tail():
    """1000 resamples of 250 images with ~60 detections each (speed: benchmarks/bench_eval.py)."""
    index, predictions = random_case(250, seed=3, max_boxes=10)
    for pred in predictions:  # a detector's usual tail of low-scoring boxes
        extra = 50
        xy = np.random.default_rng(pred["image_id"]).uniform(0, 200, (extra, 2))
        pred["boxes"] = np.concatenate([pred["boxes"], np.concatenate([xy, xy + 20], axis=1)])
        pred["scores"] = np.concatenate([pred["scores"], np.linspace(0.01, 0.2, extra)])
        pred["labels"] = np.concatenate([pred["labels"], np.resize([1, 2, 3, 4], extra)])
    evaluator = matches_of(index, predictions)
    result = CocoBootstrap(evaluator.matches).run(replicates=1000, seed=0)
    assert result.replicates.shape == (1000, len(result.names))
    metrics = evaluator.evaluate()
    for key in ("mAP", "mAP50", "mAR100"):
        assert result.estimate[key] == metrics[key]
        assert result.low[key] < result.high[key]
