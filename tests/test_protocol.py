"""The protocol: a test set fingerprinted by content, and the evaluation settings that change numbers.

Every metrics.json here comes from `synthval evaluate` on a small COCO set; the edits are the ones users
make to test sets (a copy elsewhere, a moved box, a re-saved image, a renamed class, reordered entries).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from test_publish import write_coco

from synthval.cli import main
from synthval.scoring.protocol import benchmark_fingerprint, protocol_facts, protocol_fingerprint


def evaluate(tmp_path: Path, data: Path, split: str = "all") -> dict:
    """metrics.json of scoring the ground truth of `data` as detections."""
    doc = json.loads(sorted((data / "annotations").glob("*.json"))[0].read_text())
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in doc["annotations"]]
    name = f"{data.name}-{split}"
    (tmp_path / f"{name}.json").write_text(json.dumps(results))
    out = tmp_path / "eval" / name
    assert main(["evaluate", "--predictions", str(tmp_path / f"{name}.json"), "--data", str(data), "--split", split,
                 "--out", str(out), "--xcom-file", str(tmp_path / "x.json")]) == 0
    return json.loads((out / "metrics.json").read_text())


def edit_annotations(data: Path, edit) -> None:
    path = data / "annotations" / "instances.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


@pytest.fixture
def original(tmp_path):
    data = write_coco(tmp_path / "original")
    return data, evaluate(tmp_path, data)


def variant(tmp_path: Path, original: Path, name: str) -> Path:
    copy_path = tmp_path / name
    shutil.copytree(original, copy_path)
    return copy_path


def test_the_same_images_at_another_path_are_the_same_protocol(tmp_path, original):
    data, metrics = original
    elsewhere = variant(tmp_path, data, "fetched-again-by-another-run")
    # The same content, its JSON written in another order (images and annotations reversed, keys reordered).
    edit_annotations(elsewhere, lambda doc: (doc["images"].reverse(), doc["annotations"].reverse()))
    moved = evaluate(tmp_path, elsewhere)
    assert moved["test_set"]["data_uri"] != metrics["test_set"]["data_uri"]
    assert moved["test_set"]["sha256"] == metrics["test_set"]["sha256"]
    assert protocol_fingerprint(moved) == protocol_fingerprint(metrics)
    assert benchmark_fingerprint(moved) == benchmark_fingerprint(metrics)


@pytest.mark.parametrize("change, parts", [
    ("box", {"annotations_sha256"}),
    ("label", {"annotations_sha256"}),
    ("image byte", {"images_sha256"}),
    ("class name", {"label_map_sha256"}),  # rice: a class with no box in the set
    ("image id", {"images_sha256", "annotations_sha256"}),  # results files name images by id
])
def test_any_change_to_what_is_measured_is_another_protocol(tmp_path, original, change, parts):
    data, metrics = original
    changed = variant(tmp_path, data, change.replace(" ", "-"))
    if change == "box":
        edit_annotations(changed, lambda doc: doc["annotations"][3]["bbox"].__setitem__(2, 81))
    elif change == "label":
        edit_annotations(changed, lambda doc: doc["annotations"][0].__setitem__("category_id", 3))
    elif change == "image byte":
        image = changed / "images" / "1.png"
        blob = bytearray(image.read_bytes())
        blob[-20] ^= 1  # inside the PNG's last chunk: the file differs by one byte (pixels are not read)
        image.write_bytes(bytes(blob))
    elif change == "class name":
        edit_annotations(changed, lambda doc: doc["categories"][2].__setitem__("name", "noodles"))
    else:
        def renumber(doc):
            doc["images"][0]["id"] = 99
            for a in doc["annotations"]:
                a["image_id"] = 99 if a["image_id"] == 10 else a["image_id"]
        edit_annotations(changed, renumber)
    other = evaluate(tmp_path, changed)
    assert protocol_fingerprint(other) != protocol_fingerprint(metrics)
    assert benchmark_fingerprint(other) != benchmark_fingerprint(metrics)
    # The components say which part of the test set changed.
    for key in ("images_sha256", "annotations_sha256", "label_map_sha256"):
        assert (other["test_set"][key] != metrics["test_set"][key]) == (key in parts), key


def test_another_split_name_is_another_protocol(tmp_path, original):
    data, metrics = original
    train = evaluate(tmp_path, data, "train")
    assert train["test_set"]["images_sha256"] == metrics["test_set"]["images_sha256"]
    assert protocol_fingerprint(train) != protocol_fingerprint(metrics)


def test_image_files_are_hashed_not_decoded(tmp_path):
    """Bytes that no image decoder accepts still fingerprint (scoring a results file reads no pixels)."""
    data = write_coco(tmp_path / "data")
    (data / "images" / "0.png").write_bytes(b"not a PNG at all")
    first = evaluate(tmp_path, data)
    (data / "images" / "0.png").write_bytes(b"not a PNG at all!")
    assert evaluate(tmp_path, data)["test_set"]["images_sha256"] != first["test_set"]["images_sha256"]


def test_evaluation_settings_that_change_numbers_enter_the_protocol(original):
    _, metrics = original
    base = protocol_fingerprint(metrics)
    assert metrics["scoring"]["max_dets"] == [1, 10, 100] and len(metrics["scoring"]["iou_thresholds"]) == 10

    def changed(edit) -> str:
        m = copy.deepcopy(metrics)
        edit(m)
        return protocol_fingerprint(m)

    # Speed and pictures only: the same protocol. A missing "inference" field (before contract 1) is null.
    assert changed(lambda m: m["config"].update(batch_size=64, num_workers=8, device="cuda", amp="bf16",
                                                draw_score_thresh=0.1, num_sample_images=9,
                                                bootstrap_replicates=50)) == base
    assert changed(lambda m: m.pop("inference", None)) == changed(lambda m: m.update(inference=None))
    trained = copy.deepcopy(metrics)
    trained["checkpoint"] = {"config": {"model": {"min_size": 800, "max_size": 1333, "box_score_thresh": 0.05,
                                                  "box_detections_per_img": 100, "roi_pool_size": 7}}}
    trained["inference"] = {"device": "cuda", "dtype": "bfloat16"}
    reference = protocol_fingerprint(trained)
    assert protocol_facts(trained)["model_inference"] == {
        "min_size": 800, "max_size": 1333, "box_score_thresh": 0.05, "box_detections_per_img": 100,
        "rpn_pre_nms_top_n_test": 1000, "rpn_post_nms_top_n_test": 1000}
    # A seed checkpoint stores no model config: it ran with the defaults, so it compares with synthval's.
    seed = copy.deepcopy(trained)
    seed["checkpoint"] = {"config": {"backbone": "resnet50"}, "source_format": "datasetinsights"}
    assert protocol_fingerprint(seed) == reference
    assert protocol_facts(metrics)["model_inference"] == {}  # a results file: its detector's settings are unknown
    for edit in (
        lambda m: m["inference"].update(dtype="float32"),
        lambda m: m["inference"].update(device="cpu"),
        lambda m: m["checkpoint"]["config"]["model"].update(min_size=640),
        lambda m: m["checkpoint"]["config"]["model"].update(box_score_thresh=0.001),
        lambda m: m["checkpoint"]["config"]["model"].update(box_detections_per_img=300),
        lambda m: m["scoring"].update(max_dets=[1, 10, 300]),
        lambda m: m["scoring"]["iou_thresholds"].pop(),
        lambda m: m.update(protocol="coco-bbox-3"),
    ):
        m = copy.deepcopy(trained)
        edit(m)
        assert protocol_fingerprint(m) != reference
    # Settings are no part of the benchmark (the test set and the scoring rules): discovery can know it
    # before any model exists.
    assert benchmark_fingerprint(trained) == benchmark_fingerprint(metrics)
    assert benchmark_fingerprint({**metrics, "protocol": "coco-bbox-3"}) != benchmark_fingerprint(metrics)


def test_a_results_file_needs_no_image_and_its_test_set_says_which_are_missing(tmp_path, original):
    """Scoring a results file reads the annotations alone; images that are not there count as missing,
    so an annotations-only copy is another test set than the one with its images (nothing vouches for
    its pixels), and the copy that has them all is the same one."""
    data, metrics = original
    bare = variant(tmp_path, data, "annotations-only")
    for image in (bare / "images").iterdir():
        image.unlink()
    scored = evaluate(tmp_path, bare)
    assert scored["test_set"]["annotations_sha256"] == metrics["test_set"]["annotations_sha256"]
    assert scored["test_set"]["images_sha256"] != metrics["test_set"]["images_sha256"]


def test_large_test_sets_are_hashed_in_chunks(tmp_path):
    """A 12 MB image (bigger than one 1 MiB chunk) changed in its last byte: another fingerprint."""
    import numpy as np

    data = write_coco(tmp_path / "data")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (2000, 2000, 3), dtype=np.uint8)).save(data / "images" / "2.png")
    first = evaluate(tmp_path, data)["test_set"]["images_sha256"]
    blob = bytearray((data / "images" / "2.png").read_bytes())
    assert len(blob) > 8 << 20
    blob[-1] ^= 1
    (data / "images" / "2.png").write_bytes(bytes(blob))
    assert evaluate(tmp_path, data)["test_set"]["images_sha256"] != first


def test_compare_pairs_results_on_the_same_test_set_fetched_into_two_folders(tmp_path, original):
    """Two runs, each scoring its own copy of the test set: one test set, so a paired comparison."""
    data, metrics = original
    elsewhere = variant(tmp_path, data, "run-2-data")
    other = evaluate(tmp_path, elsewhere)
    first_uri = str(tmp_path / "eval" / "original-all" / "metrics.json")
    second_uri = str(tmp_path / "eval" / "run-2-data-all" / "metrics.json")
    assert other["test_set"]["data_uri"] != metrics["test_set"]["data_uri"]
    xcom = tmp_path / "compare.json"
    assert main(["compare", "--metrics", first_uri, second_uri, "--replicates", "50", "--out",
                 str(tmp_path / "compare.html"), "--xcom-file", str(xcom)]) == 0
    assert {d["method"] for d in json.loads(xcom.read_text())["differences"]} == {"paired"}
