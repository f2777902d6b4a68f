"""Dataset statistics: hand counts from the annotation files, the distances, and the `synthval stats` step."""

from __future__ import annotations

import glob
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from report_fixtures import generate

from synthval.cli import main
from synthval.datasets import load_dataset
from synthval.stats import (compare_stats, compute_stats, jensen_shannon, total_variation, wasserstein1)

SYNTHDET_BBOX = "c31620e3-55ff-4af6-ae86-884aa0daa9b2"


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats-data")
    return {"synthetic": generate("synthetic", root / "synthetic", 30, seed=3),
            "real": generate("real-proxy", root / "real", 40, seed=4)}


def hand_count_perception(root: str) -> tuple[Counter, list[int], int]:
    """Boxes per label name and per image, read from captures_*.json without synthval."""
    per_label, per_image = Counter(), []
    for path in sorted(glob.glob(os.path.join(root, "Dataset", "captures_*.json"))):
        with open(path, encoding="utf-8") as f:
            for capture in json.load(f)["captures"]:
                n = 0
                for annotation in capture["annotations"]:
                    if annotation["annotation_definition"] != SYNTHDET_BBOX:
                        continue
                    for value in annotation["values"]:
                        per_label[value["label_name"]] += 1
                        n += 1
                per_image.append(n)
    return per_label, per_image, len(per_image)


def hand_count_groceries(root: str) -> tuple[Counter, list[int], int]:
    with open(os.path.join(root, "annotation_definitions.json"), encoding="utf-8") as f:
        spec = json.load(f)["annotation_definitions"][0]["spec"]
    names = {s["label_id"]: s["label_name"] for s in spec}
    with open(os.path.join(root, "annotations.json"), encoding="utf-8") as f:
        images = json.load(f)
    per_label = Counter(names[a["label_id"]] for image in images for a in image["annotations"])
    return per_label, [len(image["annotations"]) for image in images], len(images)


@pytest.mark.parametrize("kind,counter", [("synthetic", hand_count_perception), ("real", hand_count_groceries)])
def test_statistics_match_hand_counts(datasets, kind, counter):
    per_label, per_image, num_images = counter(datasets[kind])
    stats = compute_stats(load_dataset(datasets[kind]))
    assert stats.num_images == num_images
    assert stats.num_boxes == sum(per_label.values()) == sum(per_image)
    assert {k: v for k, v in stats.label_counts.items() if v} == dict(per_label)
    assert sorted(stats.objects_per_image.tolist()) == sorted(per_image)
    assert stats.heatmap.sum() == stats.num_boxes
    assert sum(stats.size_counts().values()) == stats.num_boxes
    assert np.all((stats.center_x >= 0) & (stats.center_x <= 1) & (stats.center_y >= 0) & (stats.center_y <= 1))
    assert np.all(stats.box_size > 0) and np.all(stats.aspect_ratio > 0)


def test_box_geometry_by_hand():
    from synthval.datasets.index import DatasetIndex, ImageRecord

    index = DatasetIndex("memory", "coco", {1: "a", 2: "b"}, [
        ImageRecord(0, "0.png", 200, 100, np.array([[0, 0, 50, 25], [100, 0, 200, 100]], np.float32), np.array([1, 2])),
        ImageRecord(1, "1.png", 200, 100, np.zeros((0, 4), np.float32), np.zeros(0, np.int64)),
    ])
    stats = compute_stats(index)
    assert stats.label_counts == {"a": 1, "b": 1} and stats.images_per_label == {"a": 1, "b": 1}
    assert stats.objects_per_image.tolist() == [2, 0]
    assert stats.aspect_ratio.tolist() == [2.0, 1.0]
    assert stats.box_size.tolist() == pytest.approx([np.sqrt(50 * 25 / 20000), np.sqrt(100 * 100 / 20000)])
    assert stats.center_x.tolist() == pytest.approx([0.125, 0.75])
    assert stats.center_y.tolist() == pytest.approx([0.125, 0.5])
    assert stats.size_counts() == {"small": 0, "medium": 1, "large": 1}
    assert stats.image_sizes == {"200x100": 2}


def test_wasserstein_total_variation_jensen_shannon():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, 500)
    assert wasserstein1(a, a) == 0
    assert wasserstein1(a, a + 0.7) == pytest.approx(0.7)
    assert wasserstein1([0, 0, 1], [0, 1, 1]) == pytest.approx(1 / 3)
    b = rng.normal(0.5, 2, 300)
    scipy_stats = pytest.importorskip("scipy.stats")
    assert wasserstein1(a, b) == pytest.approx(scipy_stats.wasserstein_distance(a, b), rel=1e-9)
    assert total_variation([1, 0], [0, 1]) == 1 and jensen_shannon([1, 0], [0, 1]) == pytest.approx(1)
    assert total_variation([2, 2], [1, 1]) == 0 and jensen_shannon([3, 1], [3, 1]) == 0
    assert 0 < jensen_shannon([3, 1], [1, 3]) < total_variation([3, 1], [1, 3]) <= 1


def test_a_dataset_is_at_distance_zero_from_itself_and_not_from_another(datasets):
    syn = compute_stats(load_dataset(datasets["synthetic"]))
    real = compute_stats(load_dataset(datasets["real"]))
    same = compare_stats(syn, syn)
    assert all(row["w1"] == 0 for row in same["one_d"].values())
    assert same["labels"]["tv"] == 0 and same["position_heatmap"]["tv"] == 0
    gap = compare_stats(syn, real)
    assert set(gap["one_d"]) >= {"objects_per_image", "box_size", "log2_aspect_ratio", "center_x", "center_y"}
    assert gap["one_d"]["box_size"]["w1"] > 0
    # both kinds name the same ten labels (with different ids): matched by name
    assert gap["labels"]["only_in_a"] == [] and gap["labels"]["only_in_b"] == []
    assert len(gap["labels"]["shared"]) == 10


def test_stats_cli_writes_json_html_and_plots(datasets, tmp_path):
    out = tmp_path / "stats"
    xcom = tmp_path / "xcom.json"
    code = main(["stats", "--data", datasets["synthetic"], "--compare-data", datasets["real"], "--compare-split",
                 "test", "--pixel-sample", "8", "--out", str(out), "--xcom-file", str(xcom)])
    assert code == 0
    result = json.loads(xcom.read_text())
    document = json.loads(Path(result["stats_uri"]).read_text())
    first, second = document["datasets"]
    per_label, _, num_images = hand_count_perception(datasets["synthetic"])
    assert first["num_images"] == num_images
    assert {k: v for k, v in first["labels"]["objects"].items() if v} == dict(per_label)
    assert second["name"] == "real (test)" and second["num_images"] == len(load_dataset(datasets["real"], split="test"))
    assert first["pixel"]["sampled_images"] == 8
    assert "brightness" in document["distances"]["one_d"]
    for name in ("objects_per_label", "objects_per_image", "box_size", "aspect_ratio", "position_heatmap", "brightness"):
        assert (Path(result["plots_uri"]) / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = Path(result["report_uri"]).read_text()
    assert "Domain gap" in page and page.count("data:image/png;base64,") == 6
    assert "http://" not in page and "https://" not in page


def test_stats_cli_bad_dataset_is_exit_code_2(tmp_path, capsys):
    assert main(["stats", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"),
                 "--xcom-file", str(tmp_path / "x.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
