"""COCO box metrics: hand-computed cases, COCO's crowd / area / ignore rules, and identical numbers to
pycocotools run directly on hundreds of random COCO files."""

import json

import numpy as np
import pytest

from coco_reference import pycocotools_eval, random_coco, write_json
from synthval.data.index import DatasetIndex, ImageRecord
from synthval.errors import DatasetError, SynthvalError
from synthval.scoring.coco_eval import (
    AREA_NAMES,
    AREA_RANGES,
    RECALL_THRESHOLDS,
    SUMMARY,
    SUMMARY_KEYS,
    CocoEvaluator,
    evaluate_detections,
    format_summary,
    load_coco_results,
    parse_coco_results,
    xyxy_to_xywh,
)

NAMES = {1: "apple", 2: "banana", 3: "cherry"}
IDENTITY = {1: 1, 2: 2, 3: 3}


def record(image_id, boxes, labels, size=(640, 480)):
    return ImageRecord(image_id, f"/data/{image_id}.png", size[0], size[1],
                       np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64))


def index_of(*records, names=NAMES):
    return DatasetIndex("/data", "test", dict(names), list(records))


def pred(image_id, boxes, scores, labels):
    return {"image_id": image_id, "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
            "scores": np.asarray(scores, np.float32), "labels": np.asarray(labels, np.int64)}


def perfect(index):
    return [pred(r.image_id, r.boxes, np.linspace(0.9, 0.5, len(r.labels)), r.labels) for r in index.images]


# --- hand-computed cases -------------------------------------------------------------------------------------


def test_perfect_predictions_score_one_and_absent_areas_are_null():
    # "1.0" is approximate: COCO's precision is tp / (tp + fp + eps), so one true positive gives
    # 1 / (1 + 2.2e-16) = 0.9999999999999998, in pycocotools as here.
    index = index_of(record(1, [[10, 10, 210, 210], [300, 300, 310, 320]], [1, 2]),
                     record(2, [[0, 0, 100, 100]], [1]))
    m = evaluate_detections(index, IDENTITY, perfect(index))
    for key in ("mAP", "mAP50", "mAP75", "mAP_small", "mAP_large", "mAR10", "mAR100",
                "mean-average-precision", "mean-average-precision-iou50", "mean-average-recall"):
        assert m[key] == pytest.approx(1.0), key
    assert m["mAP_medium"] is None and m["mAR_medium"] is None  # no box of 32^2..96^2
    assert m["per_class"]["apple"] == {"AP": 1.0, "AP50": 1.0, "AP75": 1.0, "AR100": 1.0, "num_gt": 2,
                                       "num_predictions": 2}  # 2/(2 + eps) rounds to 1 exactly
    assert m["per_class"]["cherry"]["AP"] is None and m["per_class"]["cherry"]["num_gt"] == 0
    assert "cherry" not in m["pr_curves"]
    assert m["pr_curves"]["apple"]["precision"] == [1.0] * 101
    assert m["pr_curve"]["recall"] == [float(r) for r in RECALL_THRESHOLDS]
    assert (m["num_images"], m["num_gt"], m["num_predictions"]) == (2, 3, 3)
    json.dumps(m, allow_nan=False)  # metrics.json holds plain JSON: no NaN, no numpy types


def test_no_predictions_score_zero():
    index = index_of(record(1, [[10, 10, 210, 210]], [1]), record(2, [], []))
    m = evaluate_detections(index, IDENTITY, [])
    assert m["mAP"] == 0.0 and m["mAP50"] == 0.0 and m["mAR100"] == 0.0 and m["mAP_large"] == 0.0
    assert m["mAP_small"] is None
    assert m["per_class"]["apple"]["AP"] == 0.0 and m["per_class"]["banana"]["AP"] is None


def test_no_ground_truth_at_all_gives_null_everywhere():
    index = index_of(record(1, [], []))
    m = evaluate_detections(index, IDENTITY, [pred(1, [[0, 0, 50, 50]], [0.9], [1])])
    assert all(m[key] is None for key in SUMMARY_KEYS)
    assert m["pr_curve"]["precision"] == [None] * 101


def test_iou_between_half_and_three_quarters_counts_at_050_only():
    # 100x100 truth, 100x62 detection inside it: IoU 0.62, a match at thresholds .50, .55 and .60 only.
    index = index_of(record(1, [[0, 0, 100, 100]], [1]))
    m = evaluate_detections(index, IDENTITY, [pred(1, [[0, 0, 100, 62]], [0.9], [1])])
    assert m["mAP50"] == pytest.approx(1.0)
    assert m["mAP75"] == 0.0
    assert m["mAP"] == pytest.approx(0.3)
    assert m["mAR100"] == pytest.approx(0.3)


def test_false_positive_ranked_above_the_true_positive_halves_ap():
    # Ranked FP (0.9) then TP (0.8): precision 1/2 at recall 1, and the envelope carries 1/2 to recall 0.
    index = index_of(record(1, [[0, 0, 100, 100]], [1]))
    m = evaluate_detections(index, IDENTITY, [pred(1, [[300, 300, 400, 400], [0, 0, 100, 100]], [0.9, 0.8], [1, 1])])
    assert m["mAP50"] == pytest.approx(0.5)
    assert m["mAP"] == pytest.approx(0.5)
    assert m["mAR1"] == 0.0 and m["mAR10"] == pytest.approx(1.0)  # the top-1 detection is the false one


def test_false_positive_between_two_true_positives():
    # TP (.95), FP (.9), TP (.8) on two truths: precision 1 up to recall .5, then 2/3 to recall 1.
    # COCO samples 101 recall points: 51 of them (0.00..0.50) read 1, 50 (0.51..1.00) read 2/3.
    index = index_of(record(1, [[0, 0, 100, 100], [200, 200, 300, 300]], [1, 1]))
    dets = [[0, 0, 100, 100], [400, 0, 500, 100], [200, 200, 300, 300]]
    m = evaluate_detections(index, IDENTITY, [pred(1, dets, [0.95, 0.9, 0.8], [1, 1, 1])])
    assert m["mAP50"] == pytest.approx((51 * 1 + 50 * 2 / 3) / 101)
    assert m["pr_curves"]["apple"]["precision"][:51] == pytest.approx([1.0] * 51)
    assert m["pr_curves"]["apple"]["precision"][51:] == pytest.approx([2 / 3] * 50)


def test_duplicate_detection_is_a_false_positive():
    index = index_of(record(1, [[0, 0, 100, 100]], [1]))
    m = evaluate_detections(index, IDENTITY, [pred(1, [[0, 0, 100, 100], [0, 0, 100, 100]], [0.9, 0.8], [1, 1])])
    assert m["mAP50"] == pytest.approx(1.0)  # the duplicate ranks after the match: precision 1 is reached at recall 1
    m = evaluate_detections(index, IDENTITY, [pred(1, [[0, 0, 100, 100], [0, 0, 100, 100]], [0.9, 0.8], [2, 1])])
    assert m["per_class"]["apple"]["AP"] == pytest.approx(1.0) and m["per_class"]["banana"]["AP"] is None


def test_wrong_class_does_not_match():
    index = index_of(record(1, [[0, 0, 100, 100]], [1]))
    m = evaluate_detections(index, IDENTITY, [pred(1, [[0, 0, 100, 100]], [0.9], [2])])
    assert m["mAP"] == 0.0
    assert m["per_class"]["apple"]["num_predictions"] == 0 and m["per_class"]["banana"]["num_predictions"] == 1


def test_classes_are_averaged():
    index = index_of(record(1, [[0, 0, 100, 100], [200, 200, 300, 300], [400, 0, 500, 100]], [1, 2, 3]))
    # apple found, banana found at IoU 0.62, cherry missed
    m = evaluate_detections(index, IDENTITY, [pred(1, [[0, 0, 100, 100], [200, 200, 300, 262]], [0.9, 0.8], [1, 2])])
    assert [m["per_class"][n]["AP"] for n in ("apple", "banana", "cherry")] == pytest.approx([1.0, 0.3, 0.0])
    assert m["mAP"] == pytest.approx((1.0 + 0.3 + 0.0) / 3)
    assert m["mAP50"] == pytest.approx(2 / 3)


def test_small_medium_large_areas():
    small, medium, large = [0, 0, 20, 20], [100, 100, 150, 150], [200, 200, 400, 400]
    index = index_of(record(1, [small, medium, large], [1, 1, 1]))
    m = evaluate_detections(index, IDENTITY, [pred(1, [small, large], [0.9, 0.8], [1, 1])])
    assert (m["mAP_small"], m["mAP_medium"], m["mAP_large"]) == pytest.approx((1.0, 0.0, 1.0))
    assert m["mAR100"] == pytest.approx(2 / 3)
    # A box of exactly 32 x 32 = 1024 px lies in both the small and the medium range, as in COCO.
    index = index_of(record(1, [[0, 0, 32, 32]], [1]))
    m = evaluate_detections(index, IDENTITY, [pred(1, [[0, 0, 32, 32]], [0.9], [1])])
    assert (m["mAP_small"], m["mAP_medium"]) == pytest.approx((1.0, 1.0)) and m["mAP_large"] is None


def test_at_most_one_detection_per_image_and_class_for_mar1():
    index = index_of(record(1, [[0, 0, 100, 100], [200, 200, 300, 300]], [1, 1]))
    m = evaluate_detections(index, IDENTITY, perfect(index))
    assert (m["mAR1"], m["mAR10"], m["mAR100"]) == pytest.approx((0.5, 1.0, 1.0))


def test_labels_are_matched_by_name_and_model_only_classes_dropped():
    # The model knows banana (class 1), apple (class 2) and durian (class 3); the test set has no durian
    # and a cherry the model cannot predict.
    index = index_of(record(1, [[0, 0, 100, 100], [200, 200, 300, 300], [400, 0, 500, 100]], [1, 2, 3]))
    model_names = ["banana", "apple", "durian"]
    class_ids = {1: 2, 2: 1}  # LabelSpace(model_names).class_ids(index)
    dets = pred(1, [[0, 0, 100, 100], [200, 200, 300, 300], [400, 0, 500, 100]], [0.9, 0.8, 0.99], [2, 1, 3])
    m = evaluate_detections(index, class_ids, [dets], model_names)
    assert m["per_class"]["apple"]["AP"] == pytest.approx(1.0) and m["per_class"]["banana"]["AP"] == pytest.approx(1.0)
    assert m["per_class"]["cherry"]["AP"] == 0.0  # the truth for a model that cannot predict cherries
    assert m["mAP"] == pytest.approx(2 / 3)
    assert m["label_match"] == {"shared": ["apple", "banana"], "only_in_model": ["durian"],
                                "only_in_data": ["cherry"]}
    assert m["num_predictions"] == 2 and m["num_predictions_dropped"] == 1
    results = CocoEvaluator(index, class_ids, model_names)
    results.process([dets])
    assert [(d["category_id"], d["bbox"]) for d in results.coco_results()] == [
        (1, [0.0, 0.0, 100.0, 100.0]), (2, [200.0, 200.0, 100.0, 100.0])]


def test_label_space_mapping_matches_the_dataset_labels_module():
    from synthval.data.labels import LabelSpace

    index = index_of(record(1, [], []))
    assert LabelSpace(("banana", "apple", "durian")).class_ids(index) == {1: 2, 2: 1}


def test_reset_process_evaluate_and_torch_inputs():
    torch = pytest.importorskip("torch")
    index = index_of(record(1, [[0, 0, 100, 100]], [1]), record(2, [[0, 0, 50, 50]], [2]))
    evaluator = CocoEvaluator(index, IDENTITY)
    evaluator.process([pred(1, [[300, 300, 400, 400]], [0.9], [1])])
    assert evaluator.evaluate()["mAP"] == 0.0
    evaluator.reset()
    evaluator.process([{"image_id": torch.tensor(1), "boxes": torch.tensor([[0.0, 0, 100, 100]]),
                        "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}])
    evaluator.process([{"image_id": 2, "boxes": torch.tensor([[0.0, 0, 50, 50]]), "scores": torch.tensor([0.7]),
                        "labels": torch.tensor([2])}])
    assert evaluator.evaluate()["mAP"] == pytest.approx(1.0)


def test_unknown_image_in_predictions_is_an_input_error():
    index = index_of(record(1, [[0, 0, 100, 100]], [1]))
    with pytest.raises(DatasetError, match="image id 7"):
        evaluate_detections(index, IDENTITY, [pred(7, [[0, 0, 1, 1]], [0.5], [1])])


def test_summary_table_names_every_metric():
    index = index_of(record(1, [[0, 0, 100, 100]], [1]))
    text = format_summary(evaluate_detections(index, IDENTITY, perfect(index)))
    for key, *_ in SUMMARY:
        assert key in text
    assert "apple" in text and "n/a" in text


# --- COCO's own rules: crowd regions, the area field, ignore flags -------------------------------------------


def crowd_record(image_id, xywh, labels, iscrowd, area=None, ignore=None):
    xywh = np.asarray(xywh, np.float64).reshape(-1, 4)
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1).astype(np.float32)
    return ImageRecord(image_id, f"/data/{image_id}.png", 640, 480, xyxy, np.asarray(labels, np.int64), xywh,
                       None if area is None else np.asarray(area, np.float64), np.asarray(iscrowd, bool),
                       None if ignore is None else np.asarray(ignore, bool))


def test_a_crowd_region_absorbs_the_detections_on_it():
    # One person, and a crowd region of people beside it: detections inside the region are neither true
    # nor false positives (IoU with a crowd is intersection over the detection's own area), any number
    # of them, and the region itself is not a box to find.
    index = index_of(crowd_record(1, [[0, 0, 100, 100], [200, 0, 300, 200]], [1, 1], [False, True]))
    dets = [[0, 0, 100, 100], [210, 10, 260, 60], [250, 100, 290, 190], [205, 5, 295, 95]]
    m = evaluate_detections(index, IDENTITY, [pred(1, dets, [0.5, 0.9, 0.8, 0.7], [1, 1, 1, 1])])
    assert m["mAP"] == pytest.approx(1.0) and m["mAR100"] == pytest.approx(1.0)
    assert m["per_class"]["apple"]["num_gt"] == 1 and m["num_gt"] == 1 and m["num_crowd"] == 1
    # Without the crowd flag the same region is a box to find, matched once: the rest are false positives.
    plain = index_of(crowd_record(1, [[0, 0, 100, 100], [200, 0, 300, 200]], [1, 1], [False, False]))
    assert evaluate_detections(plain, IDENTITY, [pred(1, dets, [0.5, 0.9, 0.8, 0.7], [1, 1, 1, 1])])["mAP50"] < 0.9


def test_the_area_field_decides_small_medium_large():
    # A 50 x 50 box (medium by its box area) whose annotation area is 500 px (a thin object): small.
    index = index_of(crowd_record(1, [[10, 10, 50, 50]], [1], [False], area=[500.0]))
    m = evaluate_detections(index, IDENTITY, [pred(1, [[10, 10, 60, 60]], [0.9], [1])])
    assert m["mAP_small"] == pytest.approx(1.0) and m["mAP_medium"] is None


def test_an_ignore_flag_changes_nothing_as_in_pycocotools():
    # pycocotools replaces `ignore` by `iscrowd` before scoring; an ignored box is still a box to find.
    flagged = index_of(crowd_record(1, [[0, 0, 100, 100]], [1], [False], ignore=[True]))
    m = evaluate_detections(flagged, IDENTITY, [])
    assert m["mAP"] == 0.0 and m["per_class"]["apple"]["num_gt"] == 1


# --- identical to pycocotools ----------------------------------------------------------------------------------


def random_case(seed, n_images=25, n_cats=5, max_gt=8, max_det=40):
    """engine.predict-style detections: random boxes of every size, integer coordinates and scores
    rounded to 0.1 so IoUs and scores tie, images without truth or detections, class ids with gaps."""
    rng = np.random.default_rng(seed)
    names = {int(c): f"c{c}" for c in rng.choice(np.arange(1, 100), n_cats, replace=False)}
    cats = sorted(names)
    images, preds = [], []
    for i in range(n_images):
        n = int(rng.integers(0, max_gt + 1)) if rng.random() > 0.15 else 0
        sizes = rng.choice([8, 20, 32, 40, 96, 120], size=n)
        xy = rng.integers(0, 280, (n, 2)).astype(np.float32)
        wh = np.round(sizes[:, None] * rng.uniform(0.5, 1.5, (n, 2)))
        boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
        labels = rng.choice(cats, n)
        image_id = int(rng.integers(1, 10**6)) * 100 + i
        images.append(record(image_id, boxes, labels, size=(320, 240)))
        if rng.random() < 0.1:
            continue
        m = int(rng.integers(0, max_det))
        src = rng.integers(0, max(n, 1), m)
        jitter = rng.choice([0, 1, 2, 4, 8, 16], size=(m, 4)) * rng.choice([-1, 1], size=(m, 4))
        det = (boxes[src] if n else np.tile(np.float32([10, 10, 50, 50]), (m, 1))) + jitter
        scattered = rng.random(m) < 0.3
        rxy = rng.integers(0, 320, (m, 2))
        det[scattered] = np.concatenate([rxy, rxy + rng.integers(1, 100, (m, 2))], 1)[scattered]
        det[:, 2:] = np.maximum(det[:, 2:], det[:, :2])
        det_labels = np.where(rng.random(m) < 0.8, labels[src] if n else rng.choice(cats, m), rng.choice(cats, m))
        scores = np.round(rng.random(m), 1)
        if m and rng.random() < 0.3:  # exact duplicates with equal scores
            det, scores, det_labels = (np.concatenate([a, a[:3]]) for a in (det, scores, det_labels))
        preds.append(pred(image_id, det, scores, det_labels))
    rng.shuffle(images)
    return DatasetIndex("/random", "test", names, images), preds


def index_doc(index):
    """The ground truth of an index as a COCO dict."""
    doc = {"images": [{"id": r.image_id, "file_name": f"{r.image_id}.png", "width": r.width, "height": r.height}
                      for r in index.images],
           "categories": [{"id": c, "name": n} for c, n in index.label_names.items()], "annotations": []}
    for r in index.images:
        for box, label, area, crowd in zip(r.xywh.tolist(), r.labels.tolist(), r.area.tolist(), r.iscrowd.tolist()):
            doc["annotations"].append({"id": len(doc["annotations"]) + 1, "image_id": r.image_id, "category_id": label,
                                       "bbox": box, "area": area, "iscrowd": int(crowd)})
    return doc


def assert_same_as_pycocotools(evaluator, metrics, doc, results):
    """Precision and recall arrays, the 12 summary numbers and every class's AP: pycocotools' own, to the bit."""
    if results:
        ref = pycocotools_eval(doc, results)
        precision, recall, stats = ref.eval["precision"], ref.eval["recall"], ref.stats.tolist()
    else:  # pycocotools cannot load an empty results list: 0 wherever there is a box to find, else -1
        precision, recall = empty_results_arrays(doc, evaluator)
        stats = [0.0 if (recall[:, :, AREA_NAMES.index(area)] > -1).any() else -1.0 for _, _, _, area, _ in SUMMARY]
    np.testing.assert_array_equal(evaluator.precision, precision)
    np.testing.assert_array_equal(evaluator.recall, recall)
    assert [metrics[key] if metrics[key] is not None else -1.0 for key, *_ in SUMMARY] == stats
    for k, cat in enumerate(evaluator.cat_ids):
        p = precision[:, :, k, 0, 2]
        expected = float(np.mean(p[p > -1])) if (p > -1).any() else None
        assert metrics["per_class"][evaluator.index.label_names[cat]]["AP"] == expected


def empty_results_arrays(doc, evaluator):
    regular = np.zeros((len(evaluator.cat_ids), len(AREA_RANGES)), dtype=bool)
    for a in doc["annotations"]:
        if not a.get("iscrowd", 0):
            area = a.get("area", a["bbox"][2] * a["bbox"][3])
            for j, (lo, hi) in enumerate(AREA_RANGES):
                regular[evaluator.cat_ids.index(a["category_id"]), j] |= lo <= area <= hi
    precision = np.where(regular[None, None, :, :, None], 0.0, -1.0) * np.ones((10, 101, 1, 1, 3))
    recall = np.where(regular[None, :, :, None], 0.0, -1.0) * np.ones((10, 1, 1, 3))
    return precision, recall


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("shape", [
    {},  # a few classes, a few boxes
    {"n_cats": 2, "max_det": 300, "max_gt": 20, "n_images": 10},  # over 100 detections per image and class
    {"n_cats": 1, "max_gt": 30, "max_det": 60, "n_images": 6},  # crowded: many truths compete for detections
    {"n_cats": 8, "max_gt": 3, "max_det": 12},  # sparse
])
def test_model_predictions_identical_to_pycocotools(seed, shape):
    index, preds = random_case(seed, **shape)
    evaluator = CocoEvaluator(index, {c: c for c in index.label_names})
    evaluator.process(preds)
    metrics = evaluator.evaluate()
    assert_same_as_pycocotools(evaluator, metrics, index_doc(index), evaluator.coco_results())


COCO_SHAPES = [
    {},  # a few classes, crowds, areas, ignores, duplicates, ties
    {"n_cats": 2, "max_gt": 12, "max_det": 60, "many": True},  # over 100 detections of a class in an image
    {"n_cats": 1, "max_gt": 25, "max_det": 50, "n_images": 6, "crowd": 0.3},  # crowded, many crowd regions
    {"n_cats": 8, "max_gt": 3, "max_det": 10, "n_images": 30},  # sparse: classes without boxes or detections
    {"max_det": 0},  # empty results
]


@pytest.mark.parametrize("seed", range(60))
@pytest.mark.parametrize("shape", COCO_SHAPES)
def test_coco_files_identical_to_pycocotools(seed, shape, tmp_path):
    """300 random COCO files and results files, read as `synthval evaluate --predictions` reads them."""
    from synthval.data import load_ground_truth
    from synthval.scoring.coco_eval import coco_image_ids

    doc, results = random_coco(seed, **shape)
    index = load_ground_truth(write_json(tmp_path / "instances.json", doc))
    public = coco_image_ids(index)
    scored = load_coco_results(write_json(tmp_path / "results.json", results), index,
                               image_ids={p: i for i, p in public.items()})
    evaluator = CocoEvaluator(index, {c: c for c in index.label_names}, coco_image_ids=public)
    evaluator.add_results(scored)
    metrics = evaluator.evaluate()
    assert_same_as_pycocotools(evaluator, metrics, doc, results)
    assert metrics["num_gt"] + metrics["num_crowd"] == len(doc["annotations"])


def test_results_file_scores_to_the_same_numbers(tmp_path):
    index, preds = random_case(3)
    evaluator = CocoEvaluator(index, {c: c for c in index.label_names})
    evaluator.process(preds)
    first = evaluator.evaluate()
    path = tmp_path / "predictions.json"
    path.write_text(json.dumps(evaluator.coco_results()))
    again = CocoEvaluator(index, {c: c for c in index.label_names})
    again.add_results(load_coco_results(str(path), index))
    assert again.evaluate() == first
    assert again.coco_results() == evaluator.coco_results()


def test_results_file_with_odd_floats_matches_pycocotools(tmp_path):
    # Boxes as an arbitrary detector writes them: x + w is not exact in floating point.
    index, _ = random_case(5)
    rng = np.random.default_rng(0)
    results = []
    for r in index.images:
        for _ in range(5):
            x, y = rng.uniform(0, 250, 2)
            w, h = rng.uniform(1, 90, 2)
            results.append({"image_id": r.image_id, "category_id": int(rng.choice(list(index.label_names))),
                            "bbox": [x, y, w, h], "score": float(rng.random())})
    for r in index.images[:5]:  # and some near-perfect ones so that matches happen
        for box, label in zip(xyxy_to_xywh(r.boxes).tolist(), r.labels.tolist()):
            results.append({"image_id": r.image_id, "category_id": label, "bbox": [v + 0.1 for v in box], "score": 0.7})
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    evaluator = CocoEvaluator(index, {c: c for c in index.label_names})
    evaluator.add_results(load_coco_results(str(path), index))
    metrics = evaluator.evaluate()
    assert metrics["mAP50"] > 0
    assert_same_as_pycocotools(evaluator, metrics, index_doc(index), results)


# --- results files ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content, message", [
    (b"{not json", "malformed JSON"),
    (b'{"annotations": []}', "JSON list"),
    (b"[1]", r"detection \[0\]: expected an object"),
    (b'[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}]', "missing field 'score'"),
    (b'[{"image_id": 9, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}]', "'image_id' 9 is not an image"),
    (b'[{"image_id": "1", "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}]', "'image_id' must be an integer"),
    (b'[{"image_id": true, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}]', "'image_id' must be an integer"),
    (b'[{"image_id": 1, "category_id": 5, "bbox": [0, 0, 1, 1], "score": 0.5}]', r"'category_id' 5 .*known ids: 1-3"),
    (b'[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1], "score": 0.5}]', "'bbox' must be"),
    (b'[{"image_id": 1, "category_id": 1, "bbox": [0, 0, -1, 1], "score": 0.5}]', "negative width"),
    (b'[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": true}]', "'score' must be a finite"),
    (b'[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": NaN}]', "'score' must be a finite"),
    (b'[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": Infinity}]', "'score' must be a finite"),
    (b'[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1e400}]', "'score' must be a finite"),
    (b'[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1' + b"0" * 400 + b"}]",
     "'score' must be a finite"),
    (b'[{"image_id": 1, "category_id": 1, "bbox": [0, NaN, 1, 1], "score": 0.5}]', "'bbox' must be"),
    (b'[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1e400, 1], "score": 0.5}]', "'bbox' must be"),
    (b'[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1' + b"0" * 400 + b', 1], "score": 0.5}]', "'bbox' must be"),
    (b'[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}, {"image_id": 1, "category_id": 1, '
     b'"bbox": [0, 0, 1, 1], "score": -Infinity}]', r"detection \[1\]: field 'score'"),
    (b"[\xff]", "not UTF-8"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5, "note": "caf\u00e9"}]'.encode("latin-1"),
     "not UTF-8"),
    (b"[" * 10_000 + b"]" * 10_000, "nested deeper"),
    (b"[" + b"9" * 5000 + b"]", "unreadable JSON"),
])
def test_malformed_results_name_the_file_and_field(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    index = index_of(record(1, [[0, 0, 100, 100]], [1]))
    with pytest.raises(SynthvalError, match=message) as info:
        load_coco_results(str(path), index)
    assert str(path) in str(info.value)
    assert info.value.exit_code == 2


def test_results_with_other_fields_and_a_bom_are_read():
    index = index_of(record(1, [[0, 0, 100, 100]], [1]))
    data = '\ufeff[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100], "score": 1, "segmentation": []}]'
    results = parse_coco_results(data.encode("utf-8"), "mem.json", index)
    assert results.xywh.tolist() == [[0, 0, 100, 100]] and results.scores.tolist() == [1.0]


def test_results_image_ids_can_be_mapped(tmp_path):
    index = index_of(record(0, [[0, 0, 100, 100]], [1]))
    path = tmp_path / "results.json"
    path.write_text(json.dumps([{"image_id": 2**100, "category_id": 1, "bbox": [0, 0, 100, 100], "score": 0.5}]))
    results = load_coco_results(str(path), index, image_ids={2**100: 0})
    assert results.image_ids.tolist() == [0]
    evaluator = CocoEvaluator(index, IDENTITY)
    evaluator.add_results(results)
    assert evaluator.evaluate()["mAP"] == pytest.approx(1.0)
