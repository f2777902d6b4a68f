"""Dataset statistics: hand counts from the annotation files, the distances, and the `synthval stats` step."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from headless_chromium import find_chromium, open_page
from report_fixtures import generate

from synthval.cli import main
from synthval.data import load_dataset
from synthval.data.index import DatasetIndex, ImageRecord
from synthval.demo.generator import generate_dataset
from synthval.data.stats import (compare_stats, compute_stats, jensen_shannon, load_stats, noise_floor, total_variation,
                            wasserstein1)

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
needs_chromium = pytest.mark.skipif(find_chromium() is None, reason="no chromium on PATH: apt-get install -y chromium")

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
    assert {"brightness", "contrast", "warmth"} <= set(document["distances"]["one_d"])
    assert first["simulator"]["visible_fraction"]["all"]["count"] == first["num_boxes"]
    assert set(first["simulator"]["generic"]) == {"lighting info", "object placement info"}
    assert second["simulator"] is None and second["notes"] == [
        "No simulator metrics: a groceries dataset records none (only Perception and SOLO datasets do)."]
    plots = sorted(p.stem for p in Path(result["plots_uri"]).glob("*.png"))
    assert plots == sorted(["objects_per_label", "objects_per_image", "box_size", "aspect_ratio", "position_heatmap",
                            "box_size_per_label", "brightness", "contrast", "warmth", "visible_fraction",
                            "visible_fraction_per_label", "metric_lighting_info", "metric_object_placement_info"])
    for name in plots:
        assert (Path(result["plots_uri"]) / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = Path(result["report_uri"]).read_text()
    assert "Domain gap" in page and "Largest gaps" in page and page.count("data:image/png;base64,") == len(plots)
    assert "http://" not in page and "https://" not in page


def test_stats_cli_bad_dataset_is_exit_code_2(tmp_path, capsys):
    assert main(["stats", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"),
                 "--xcom-file", str(tmp_path / "x.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _index(sides: np.ndarray, image: int = 100) -> DatasetIndex:
    """One square box of each side, centred in its own image."""
    records = [ImageRecord(i, f"{i}.png", image, image,
                           np.array([[50 - w / 2, 50 - w / 2, 50 + w / 2, 50 + w / 2]], np.float32), np.array([1]))
               for i, w in enumerate(sides.tolist())]
    return DatasetIndex("memory", "coco", {1: "box"}, records)


def test_a_gap_beyond_sampling_noise_is_named_in_plain_words():
    rng = np.random.default_rng(1)
    small = compute_stats(_index(rng.normal(20, 3, 300)), name="sim")
    large = compute_stats(_index(rng.normal(40, 6, 300)), name="real")
    gap = compare_stats(small, large)
    row = gap["one_d"]["box_size"]
    assert row["beyond_noise"] and row["w1"] > 5 * row["noise"]
    (line,) = [g for g in gap["gaps"] if g["key"] == "box_size"]
    # sides ~20 and ~40 px in 100 px images: sqrt(area / image area) ~0.2 vs ~0.4
    assert re.match(r"sim has far smaller boxes than real: median 0\.(19|20)\d* vs 0\.(39|40|41)\d* ", line["text"])
    assert line["text"].endswith("To close it, move the camera closer or scale the objects up.")
    reverse = next(g["text"] for g in compare_stats(large, small)["gaps"] if g["key"] == "box_size")
    assert "far larger boxes" in reverse and reverse.endswith("move the camera away or scale the objects down.")


def test_two_draws_of_one_distribution_show_no_gap():
    rng = np.random.default_rng(2)
    one, other = (compute_stats(_index(rng.normal(30, 5, n)), name=name) for n, name in ((200, "a"), (60, "b")))
    gap = compare_stats(one, other)
    assert not gap["one_d"]["box_size"]["beyond_noise"]
    assert gap["one_d"]["box_size"]["w1"] < gap["one_d"]["box_size"]["noise"]
    assert gap["gaps"] == []


def test_noise_floor_shrinks_with_the_sample_and_tracks_scale():
    rng = np.random.default_rng(3)
    few = noise_floor(rng.normal(0, 1, 20), rng.normal(0, 1, 20), wasserstein1)
    many = noise_floor(rng.normal(0, 1, 2000), rng.normal(0, 1, 2000), wasserstein1)
    scaled = noise_floor(rng.normal(0, 10, 2000), rng.normal(0, 10, 2000), wasserstein1)
    assert many < few / 4 and 5 * many < scaled < 20 * many
    # below the floor 99 times in 100: count how often two fresh draws of one distribution exceed it
    exceed = sum(wasserstein1(rng.normal(0, 1, 20), rng.normal(0, 1, 20)) > few for _ in range(300))
    assert exceed <= 15


def test_generated_synthetic_beside_real_proxy_names_its_gaps(datasets):
    syn = load_stats(datasets["synthetic"])
    real = load_stats(datasets["real"])
    gap = compare_stats(syn, real)
    assert all(g["size"] > 0 and g["text"].endswith(".") for g in gap["gaps"])
    named = {g["key"] for g in gap["gaps"]}
    beyond = {k for k, r in gap["one_d"].items() if r["beyond_noise"] and (r["w1_std"] or 0) >= 0.25}
    assert named >= set(sorted(beyond, key=lambda k: -gap["one_d"][k]["w1_std"])[:3])


@needs_chromium
@pytest.mark.parametrize("layout", ["perception", "solo"])
def test_simulator_report_renders_in_headless_chromium_without_errors(datasets, tmp_path, layout):
    data = datasets["synthetic"] if layout == "perception" else generate_dataset(
        "synthetic", str(tmp_path / "solo"), 30, 96, 3, layout="solo")["dataset_uri"]
    assert main(["stats", "--data", data, "--name", f"synthetic ({layout})", "--compare-data", datasets["real"],
                 "--compare-name", "real-proxy", "--pixel-sample", "16", "--out", str(tmp_path / "out"),
                 "--xcom-file", str(tmp_path / "x.json")]) == 0
    page = tmp_path / "out" / "stats.html"
    shot = tmp_path / "stats.png"
    result = open_page(page, shot)
    assert result.errors == []
    assert result.broken_images == 0 and result.image_count == len(list((tmp_path / "out" / "plots").glob("*.png")))
    for text in ("Largest gaps", "What the simulator measured", "Visible fraction", "lighting info",
                 "object placement", "median visible fraction", "No simulator metrics: a groceries dataset"):
        assert text in result.text, text
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / f"stats_simulator_{layout}_report.png")
    shutil.copyfile(page, ARTIFACTS / f"stats_simulator_{layout}_report.html")


HOSTILE = '<img src=x onerror="alert(1)">&amp;'


def test_hostile_label_and_dataset_names_are_shown_as_text_in_the_stats_page():
    """The templates escape every value: a label or dataset name is text, never markup."""
    from synthval.render.report import write_stats_report

    rng = np.random.default_rng(3)
    index = _index(rng.normal(20, 3, 40))
    index.label_names[1] = HOSTILE
    a = compute_stats(index, name=HOSTILE)
    b = compute_stats(_index(rng.normal(30, 3, 40)), name="real")
    page = write_stats_report([a, b], compare_stats(a, b), {})
    shown = page.split('<script type="application/json"')[0]  # the inert JSON is checked apart
    assert HOSTILE not in shown and "<img src=x" not in shown
    assert '&lt;img src=x onerror=&#34;alert(1)&#34;&gt;&amp;amp;' in page
    assert page.count("<script") == 1  # the inert JSON block, nothing else
