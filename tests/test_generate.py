"""`synthval generate`: the procedural demo data (NOT real data) in its three layouts.

Checks determinism, each layout's schema against the real formats (the SOLO keys against the pysolotools
sample in ../shared/fixtures/solo), the GroceriesReal split files, the domain shift between the two
kinds, atomic and idempotent output, and a round trip through the dataset readers.
"""

import io
import json
import os
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from synthval.demo import generator as generate
from synthval.cli import main
from synthval.errors import ConfigError, DatasetError
from synthval.demo.generator import (REAL_LABEL_IDS, SUCCESS_FILE, SYNTHDET_BBOX_DEFINITION_ID, SYNTHETIC_LABEL_IDS,
                               generate_dataset, split_indices)
from synthval.demo.procedural import LABEL_NAMES, render_scene

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
SIZE = 96


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def make(tmp_path: Path, name: str, kind: str = "synthetic", n: int = 6, seed: int = 0,
         layout: str = "perception", size: int = SIZE) -> Path:
    out = tmp_path / name
    result = generate_dataset(kind, str(out), n, size, seed, layout)
    assert result["dataset_uri"] == str(out) and result["num_images"] == n
    assert result["labels"] == len(LABEL_NAMES) == 10
    return out


def assert_box_ok(x, y, w, h, size=SIZE):
    assert w > 0 and h > 0
    assert 0 <= x and 0 <= y and x + w <= size and y + h <= size


@pytest.mark.parametrize("kind,layout", [("synthetic", "perception"), ("synthetic", "solo"),
                                         ("real-proxy", "perception")])
def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path, kind, layout):
    a = tree(make(tmp_path, "a", kind, seed=3, layout=layout))
    b = tree(make(tmp_path, "b", kind, seed=3, layout=layout))
    c = tree(make(tmp_path, "c", kind, seed=4, layout=layout))
    assert a == b
    images = [k for k in a if k.lower().endswith((".png", ".jpg"))]
    assert len(images) == 6
    assert sorted(a) != sorted(c) or any(a[k] != c[k] for k in images)


def test_perception_layout(tmp_path, monkeypatch):
    monkeypatch.setattr(generate, "CAPTURES_PER_FILE", 4)  # Unity's is 150; check the split cheaply
    root = make(tmp_path, "p", n=9)
    dataset = root / "Dataset"
    assert sorted(p.name for p in dataset.glob("captures_*.json")) == [
        "captures_000.json", "captures_001.json", "captures_002.json"]
    definitions = json.loads((dataset / "annotation_definitions.json").read_text())
    assert definitions["version"] == "0.0.1"
    (definition,) = definitions["annotation_definitions"]
    assert definition["id"] == SYNTHDET_BBOX_DEFINITION_ID and definition["format"] == "JSON"
    assert definition["name"] == "bounding box"
    spec = {s["label_id"]: s["label_name"] for s in definition["spec"]}
    assert spec == {v: k for k, v in SYNTHETIC_LABEL_IDS.items()}
    for name in ("sensors.json", "egos.json"):
        assert json.loads((dataset / name).read_text())["version"] == "0.0.1"
    captures = []
    for path in sorted(dataset.glob("captures_*.json")):
        doc = json.loads(path.read_text())
        assert doc["version"] == "0.0.1"
        captures += doc["captures"]
    assert [len(json.loads(p.read_text())["captures"]) for p in sorted(dataset.glob("captures_*.json"))] == [4, 4, 1]
    assert len({c["id"] for c in captures}) == 9
    for c in captures:
        assert {"id", "sequence_id", "step", "timestamp", "sensor", "ego", "filename", "format",
                "annotations"} <= set(c)
        assert c["format"] == "PNG" and c["filename"].startswith("RGB") and c["filename"].endswith(".png")
        with Image.open(root / c["filename"]) as im:
            assert im.format == "PNG" and im.size == (SIZE, SIZE)
        (annotation,) = c["annotations"]
        assert annotation["annotation_definition"] == SYNTHDET_BBOX_DEFINITION_ID
        assert annotation["values"], "every scene holds at least one object"
        for v in annotation["values"]:
            assert set(v) == {"label_id", "label_name", "instance_id", "x", "y", "width", "height"}
            assert spec[v["label_id"]] == v["label_name"]
            assert_box_ok(v["x"], v["y"], v["width"], v["height"])


def test_solo_layout_uses_the_keys_of_the_real_sample(tmp_path):
    root = make(tmp_path, "s", n=4, layout="solo")
    sample = FIXTURES / "solo"
    for name in ("annotation_definitions.json", "metadata.json", "sensor_definitions.json",
                 "metric_definitions.json"):
        assert set(json.loads((root / name).read_text())) == set(json.loads((sample / name).read_text())), name
    ours_meta = json.loads((root / "metadata.json").read_text())
    assert ours_meta["totalFrames"] == 4 and set(ours_meta) == set(json.loads((sample / "metadata.json").read_text()))

    real = json.loads((sample / "sequence.0" / "step0.frame_data.json").read_text())
    real_capture = real["captures"][0]
    real_bbox = next(a for a in real_capture["annotations"] if a["@type"].endswith("BoundingBox2DAnnotation"))
    (definition,) = json.loads((root / "annotation_definitions.json").read_text())["annotationDefinitions"]
    assert definition["@type"] == real_bbox["@type"] and definition["id"] == real_bbox["id"]
    spec = {s["label_id"]: s["label_name"] for s in definition["spec"]}
    for i in range(4):
        frame = json.loads((root / f"sequence.{i}" / "step0.frame_data.json").read_text())
        assert set(frame) == set(real) and frame["sequence"] == i
        (capture,) = frame["captures"]
        assert set(capture) == set(real_capture)
        assert capture["@type"] == real_capture["@type"] and capture["id"] == "camera"
        assert capture["imageFormat"] == "Png" and capture["dimension"] == [float(SIZE), float(SIZE)]
        with Image.open(root / f"sequence.{i}" / capture["filename"]) as im:
            assert im.size == (SIZE, SIZE)
        (annotation,) = capture["annotations"]
        assert set(annotation) == set(real_bbox) and annotation["@type"] == real_bbox["@type"]
        assert annotation["values"]
        for v in annotation["values"]:
            assert set(v) == set(real_bbox["values"][0])
            assert spec[v["labelId"]] == v["labelName"]
            assert_box_ok(*v["origin"], *v["dimension"])


def test_groceries_layout_and_label_ids(tmp_path):
    root = make(tmp_path, "r", kind="real-proxy", n=30)
    annotations = json.loads((root / "annotations.json").read_text())
    assert isinstance(annotations, list) and len(annotations) == 30
    (definition,) = json.loads((root / "annotation_definitions.json").read_text())["annotation_definitions"]
    spec = {s["label_id"]: s["label_name"] for s in definition["spec"]}
    assert spec == {v: k for k, v in REAL_LABEL_IDS.items()}
    # the same names as the synthetic set under other ids: readers must match labels by name
    assert set(REAL_LABEL_IDS) == set(SYNTHETIC_LABEL_IDS)
    assert sum(REAL_LABEL_IDS[n] != SYNTHETIC_LABEL_IDS[n] for n in LABEL_NAMES) >= 8
    for record in annotations:
        assert set(record) == {"file_name", "annotations"}
        with Image.open(root / "images" / record["file_name"]) as im:
            assert im.format == "JPEG" and im.size == (SIZE, SIZE)
        for a in record["annotations"]:
            assert set(a) == {"label_id", "bbox"} and a["label_id"] in spec
            assert all(isinstance(v, int) for v in a["bbox"])
            assert_box_ok(*a["bbox"])
    splits = {name: [int(line) for line in (root / f"groceries_real_{name}.txt").read_text().splitlines()]
              for name in ("train", "val", "test", "train_small", "train_medium")}
    assert sorted(splits["train"] + splits["val"] + splits["test"]) == list(range(30))
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (18, 6, 6)
    assert set(splits["train_small"]) <= set(splits["train_medium"]) <= set(splits["train"])


def test_split_proportions_are_the_real_sets():
    sizes = {k: len(v) for k, v in split_indices(1267, np.random.default_rng(0)).items()}
    assert sizes == {"train": 760, "val": 253, "test": 254, "train_small": 76, "train_medium": 380}
    for n in (3, 4, 7, 100):
        s = split_indices(n, np.random.default_rng(n))
        assert sorted(s["train"] + s["val"] + s["test"]) == list(range(n))
        assert all(len(v) >= 1 for v in s.values())
        assert set(s["train_small"]) <= set(s["train_medium"]) <= set(s["train"])


def _image_stats(domain: str, count: int = 24, size: int = 128) -> tuple[float, float]:
    """Mean share of exactly flat neighbour pairs (no sensor noise) and of the 99.5th percentile step."""
    flat, edge = [], []
    for i in range(count):
        scene = render_scene(np.random.default_rng([11, i]), size, domain)
        pixels = scene.image
        if scene.jpeg_quality:
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, "JPEG", quality=scene.jpeg_quality)
            pixels = np.asarray(Image.open(buf))
        step = np.abs(np.diff(pixels.astype(np.int16), axis=1)).max(-1)
        flat.append((step == 0).mean())
        edge.append(np.percentile(step, 99.5))
    return float(np.mean(flat)), float(np.mean(edge))


def test_real_proxy_images_are_shifted_from_synthetic_ones():
    synthetic_flat, synthetic_edge = _image_stats("synthetic")
    real_flat, real_edge = _image_stats("real-proxy")
    assert synthetic_flat > 2 * real_flat  # sensor noise and JPEG leave few exactly flat areas
    assert synthetic_edge > 1.5 * real_edge  # blur softens the renders' crisp edges


def test_failure_midway_leaves_nothing_at_out(tmp_path, monkeypatch):
    calls = []

    def failing_add(self, i, scene):
        calls.append(i)
        if i == 3:
            raise RuntimeError("disk full")

    monkeypatch.setattr(generate._GroceriesWriter, "add", failing_add)
    out = tmp_path / "parent" / "real"
    with pytest.raises(RuntimeError, match="disk full"):
        generate_dataset("real-proxy", str(out), 8, 64, 0)
    assert calls == [0, 1, 2, 3]
    assert not out.exists()
    assert os.listdir(tmp_path / "parent") == []  # the staging folder is gone too


def test_rerun_is_idempotent_and_refuses_to_overwrite_other_data(tmp_path):
    out = make(tmp_path, "d", n=3)
    marker = out / SUCCESS_FILE
    stamp = marker.stat().st_mtime_ns
    again = generate_dataset("synthetic", str(out), 3, SIZE, 0, "perception")
    assert again["dataset_uri"] == str(out) and marker.stat().st_mtime_ns == stamp
    assert json.loads(marker.read_text())["num_boxes"] == again["num_boxes"]
    with pytest.raises(DatasetError, match="other parameters"):
        generate_dataset("synthetic", str(out), 3, SIZE, 1, "perception")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not empty"):
        generate_dataset("synthetic", str(foreign), 3, SIZE, 0)
    assert sorted(os.listdir(foreign)) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    generate_dataset("synthetic", str(empty), 2, SIZE, 0)
    assert (empty / SUCCESS_FILE).is_file()


def test_remote_uri_is_uploaded_with_success_last(tmp_path):
    fs = fsspec.filesystem("memory")
    uri = "memory://synthval-test-bucket/real"
    try:
        result = generate_dataset("real-proxy", uri, 5, 64, 0)
        assert result["dataset_uri"] == uri
        assert fs.exists("/synthval-test-bucket/real/_SUCCESS")
        assert fs.exists("/synthval-test-bucket/real/images/IMG_0005.JPG")
        local = make(tmp_path, "local", kind="real-proxy", n=5, size=64)
        assert fs.cat_file("/synthval-test-bucket/real/annotations.json") == (local / "annotations.json").read_bytes()
        # an upload that died before _SUCCESS is replaced on the next try
        fs.rm("/synthval-test-bucket/real/_SUCCESS")
        generate_dataset("real-proxy", uri, 5, 64, 0)
        assert fs.exists("/synthval-test-bucket/real/_SUCCESS")
    finally:
        if fs.exists("/synthval-test-bucket"):
            fs.rm("/synthval-test-bucket", recursive=True)


@pytest.mark.parametrize("kwargs,field", [
    ({"kind": "photos"}, "kind"), ({"num_images": 0}, "--num-images"), ({"image_size": 16}, "--image-size"),
    ({"layout": "coco"}, "layout"), ({"seed": -1}, "--seed"), ({"kind": "real-proxy", "num_images": 2}, ">= 3"),
])
def test_bad_arguments_raise_config_error_naming_them(tmp_path, kwargs, field):
    args = {"kind": "synthetic", "out_uri": str(tmp_path / "x"), "num_images": 4, "image_size": 64, "seed": 0,
            "layout": "perception", **kwargs}
    with pytest.raises(ConfigError, match=field):
        generate_dataset(**args)
    assert not (tmp_path / "x").exists()


def test_cli_generate_writes_xcom(tmp_path):
    out, xcom = tmp_path / "synthetic", tmp_path / "xcom" / "return.json"
    code = main(["generate", "--kind", "synthetic", "--out", str(out), "--num-images", "6", "--image-size", "96",
                 "--xcom-file", str(xcom)])
    assert code == 0
    result = json.loads(xcom.read_text())
    assert result["dataset_uri"] == str(out) and result["num_images"] == 6 and result["format"] == "perception"
    assert (out / SUCCESS_FILE).is_file()
    assert main(["generate", "--kind", "real-proxy", "--out", str(tmp_path / "r"), "--num-images", "1",
                 "--xcom-file", str(tmp_path / "x2.json")]) == 2


@pytest.mark.parametrize("kind,layout,fmt", [("synthetic", "perception", "perception"),
                                             ("synthetic", "solo", "solo"), ("real-proxy", "perception", "groceries")])
def test_readers_read_what_generate_writes(tmp_path, kind, layout, fmt):
    from synthval.data import detect_format, load_dataset

    out = tmp_path / "d"
    result = generate_dataset(kind, str(out), 12, SIZE, 2, layout)
    assert detect_format(str(out)) == fmt == result["format"]
    index = load_dataset(str(out))
    assert len(index) == 12 and index.num_boxes == result["num_boxes"]
    assert sorted(index.label_names.values()) == sorted(LABEL_NAMES)
    for record in index.images:
        assert (record.width, record.height) == (SIZE, SIZE) and os.path.isfile(record.path)
        assert len(record.boxes) == len(record.labels) > 0
        assert (record.boxes[:, 2:] > record.boxes[:, :2]).all()
    if kind == "real-proxy":
        test = load_dataset(str(out), split="test")
        train = load_dataset(str(out), split="train")
        assert len(test) + len(train) + len(load_dataset(str(out), split="val")) == 12
        assert not {r.image_id for r in test.images} & {r.image_id for r in train.images}
