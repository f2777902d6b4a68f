"""The simulator's metrics: every metric in Unity's own sample files, what generate writes, bad and partial metrics.

Expected values come from the JSON files, read here by a few independent lines per test, never from
the code under test. The fixtures are found in the nearest `shared/fixtures` above this checkout (the
main checkout's `../shared`, or a helper worktree's `../../shared`).
"""

from __future__ import annotations

import glob
import json
import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from report_fixtures import generate

from synthval.cli import main
from synthval.data import load_dataset
from synthval.data.readers.perception import read_perception_metrics
from synthval.data.simulator import metric_kind
from synthval.data.readers.solo import read_solo_metrics
from synthval.demo.generator import GENERATED, METRICS, generate_dataset
from synthval.data.simulator_stats import NO_RENDERED_OBJECT_INFO
from synthval.data.stats import compute_stats, load_stats

FIXTURES = next((p / "shared" / "fixtures" for p in Path(__file__).resolve().parents
                 if (p / "shared" / "fixtures").is_dir()), None)
needs_fixtures = pytest.mark.skipif(FIXTURES is None, reason="no shared/fixtures above this checkout")
PERCEPTION_FIXTURES = ("perception-0.0.1/simrun", "perception-0.0.1/no_annotations_or_metrics")


def perception_records(root: Path) -> list[dict]:
    records = []
    for path in sorted(glob.glob(str(root / "Dataset" / "metrics_*.json"))):
        records += json.loads(Path(path).read_text())["metrics"]
    return records


def solo_frames(root: Path) -> list[tuple[Path, dict]]:
    return [(Path(p), json.loads(Path(p).read_text()))
            for p in sorted(glob.glob(str(root / "sequence.*" / "step*.frame_data.json")))]


def solo_values(metric: dict) -> list:
    return metric["values"] if "values" in metric else [metric["value"]]


# --- Unity's sample files ------------------------------------------------------------------------------


@needs_fixtures
@pytest.mark.parametrize("name", PERCEPTION_FIXTURES)
def test_every_metric_in_the_perception_fixtures_is_read(name):
    root = FIXTURES / name
    definitions = json.loads((root / "Dataset" / "metric_definitions.json").read_text())["metric_definitions"]
    records = perception_records(root)
    expected = {str(d["id"]): [0, 0] for d in definitions}
    for record in records:
        expected[str(record["metric_definition"])][0] += 1
        expected[str(record["metric_definition"])][1] += len(record["values"])
    metrics = read_perception_metrics(str(root))
    assert {d.id: [d.records, d.values] for d in metrics.definitions} == expected
    assert {d.id: d.name for d in metrics.definitions} == {str(d["id"]): d["name"] for d in definitions}
    # every value is a row of its table: nothing read is dropped on the way
    kinds = {d.id: d.kind for d in metrics.definitions}
    by_kind = Counter()
    for record in records:
        by_kind[kinds[str(record["metric_definition"])]] += len(record["values"])
    assert len(metrics.object_counts["count"]) == by_kind["object_count"]
    assert len(metrics.objects["visible_pixels"]) == by_kind["rendered_object_info"]


@needs_fixtures
def test_simrun_metrics_attach_to_their_captures_and_no_other():
    root = FIXTURES / "perception-0.0.1" / "simrun"
    metrics = read_perception_metrics(str(root))
    camera_000 = metrics.image_paths.index(str(root / "captures" / "camera_000.png"))
    counts = metrics.object_counts
    attached = counts["image"] == camera_000
    # metrics_000.json's first record names capture e8b44709 (captures_000.json: camera_000.png)
    assert dict(zip(counts["label_id"][attached].tolist(), counts["count"][attached].tolist())) == {27: 5, 34: 1, 25: 7}
    # the second names the LIDAR capture 4b35a47a, the third and fourth a capture id no capture has
    assert int(np.count_nonzero(counts["image"] == -1)) == 5
    assert {d.name: d.attached for d in metrics.definitions} == {"object count": 1, "visible pixel": 0}
    # "visible pixel" values carry no instance id: kept per object, unattached
    assert metrics.objects["label_id"].tolist() == [21, 28]
    assert metrics.objects["visible_pixels"].tolist() == [1.0, 2.0]
    assert metrics.objects["instance_id"].tolist() == [-1, -1]


@needs_fixtures
def test_every_metric_in_the_solo_fixture_is_read():
    root = FIXTURES / "solo"
    frames = solo_frames(root)
    expected: dict[str, list[int]] = {}
    for _, doc in frames:
        for metric in doc["metrics"]:
            row = expected.setdefault(metric["id"], [0, 0])
            row[0] += 1
            row[1] += len(solo_values(metric))
    metrics = read_solo_metrics(str(root))
    assert {d.id: [d.records, d.values] for d in metrics.definitions} == expected
    assert {d.id: d.kind for d in metrics.definitions} == {
        "ObjectCount": "object_count", "RenderedObjectInfo": "rendered_object_info",
        "scenario_iteration": "scenario_iteration", "random-seed": "random_seed"}
    assert all(d.attached == d.records for d in metrics.definitions)
    for row, (path, doc) in enumerate(frames):
        assert metrics.image_paths[row] == str(path.parent / "step0.camera.png")
        roi = next(m for m in doc["metrics"] if m["id"] == "RenderedObjectInfo")
        mine = metrics.objects["image"] == row
        read = zip(metrics.objects["instance_id"][mine].tolist(), metrics.objects["visible_pixels"][mine].tolist())
        assert dict(read) == {v["instanceId"]: float(v["visiblePixels"]) for v in roi["values"]}
        assert metrics.iteration[row] == next(m["value"] for m in doc["metrics"] if m["id"] == "scenario_iteration")
    assert metrics.seeds == [539662031.0]


@needs_fixtures
def test_solo_fixture_visible_fraction_is_visible_pixels_over_box_area():
    root = FIXTURES / "solo"
    expected = []
    for _, doc in solo_frames(root):
        capture = doc["captures"][0]
        boxes = next(a for a in capture["annotations"] if a["@type"].endswith("BoundingBox2DAnnotation"))["values"]
        roi = {v["instanceId"]: v["visiblePixels"]
               for m in doc["metrics"] if m["id"] == "RenderedObjectInfo" for v in m["values"]}
        expected += [roi[b["instanceId"]] / (b["dimension"][0] * b["dimension"][1]) for b in boxes]
    stats = compute_stats(load_dataset(str(root)), metrics=read_solo_metrics(str(root)))
    assert stats.visible_fraction.tolist() == pytest.approx(expected)
    assert stats.simulator.object_count_by_label == {"Crate": 4, "Character": 2, "Cube": 0, "Box": 0, "Terrain": 0}
    assert stats.simulator.object_counts.tolist() == [3.0, 3.0]
    assert stats.simulator.iterations == 1 and stats.simulator.seeds == [539662031.0]
    assert stats.simulator.notes == []


@needs_fixtures
def test_simrun_statistics_without_rendered_object_info_on_its_images_say_so_once(tmp_path):
    """simrun's "visible pixel" metric names a capture that does not exist: no box has visible pixels."""
    out = tmp_path / "stats"
    assert main(["stats", "--data", str(FIXTURES / "perception-0.0.1" / "simrun"), "--skip-broken",
                 "--pixel-sample", "0", "--out", str(out), "--xcom-file", str(tmp_path / "x.json")]) == 0
    (dataset,) = json.loads((out / "stats.json").read_text())["datasets"]
    assert dataset["notes"].count(NO_RENDERED_OBJECT_INFO) == 1
    assert dataset["simulator"]["visible_fraction"] is None
    assert dataset["simulator"]["object_count"]["per_label"] == {"person": 7, "car": 5, "bicycle": 1}
    page = (out / "stats.html").read_text()
    assert page.count(NO_RENDERED_OBJECT_INFO) == 1 and "Visible fraction" not in page
    assert not (out / "plots" / "visible_fraction.png").exists()


def test_metric_kinds_from_ids_names_and_solo_types():
    assert metric_kind("5BA92024-B3B7-41A7-9D3F-C03A6A8DDD01") == "rendered_object_info"
    assert metric_kind("659c6e36-f9f8-4dd6-9651-4a80e51eabc4") == "rendered_object_info"  # SynthDet's
    assert metric_kind("x", "object count") == "object_count"
    assert metric_kind("random-seed") == "random_seed" and metric_kind("scenario_iteration") == "scenario_iteration"
    assert metric_kind("y", type_name="type.unity.com/unity.solo.RenderedObjectInfoMetric") == "rendered_object_info"
    assert metric_kind("939248ee-668a-4e98-8e79-e7909f034a47", "lighting info") == "generic"


# --- what generate writes ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim")
    return {"perception": Path(generate("synthetic", root / "perception", 80, seed=9)),
            "solo": Path(_generate_solo(root / "solo", 12, seed=9))}


def _generate_solo(out: Path, n: int, seed: int) -> str:
    return generate_dataset("synthetic", str(out), n, 96, seed, layout="solo")["dataset_uri"]


def perception_tables(root: Path) -> tuple[list[dict], dict[str, list[dict]]]:
    """(captures in order, {metric definition id: records})."""
    captures = []
    for path in sorted(glob.glob(str(root / "Dataset" / "captures_*.json"))):
        captures += json.loads(Path(path).read_text())["captures"]
    records: dict[str, list[dict]] = {}
    for record in perception_records(root):
        records.setdefault(record["metric_definition"], []).append(record)
    return captures, records


def test_generated_perception_metrics_use_unitys_ids_keys_and_say_they_are_generated(generated):
    root = generated["perception"]
    definitions = json.loads((root / "Dataset" / "metric_definitions.json").read_text())["metric_definitions"]
    assert [d["id"] for d in definitions] == [m.perception_id for m in METRICS]
    assert all(d["description"].startswith(GENERATED) and "NOT real data" in d["description"] for d in definitions)
    captures, records = perception_tables(root)
    if FIXTURES is not None:  # the record keys of Unity's own sample
        sample = perception_records(FIXTURES / "perception-0.0.1" / "simrun")[0]
        assert all(set(r) == set(sample) for rs in records.values() for r in rs)
    ids = {m.key: m.perception_id for m in METRICS}
    assert len(records[ids["random_seed"]]) == 1 and records[ids["random_seed"]][0]["values"] == [9]
    for key in ("object_count", "rendered_object_info"):  # capture metrics name their capture
        assert [r["capture_id"] for r in records[ids[key]]] == [c["id"] for c in captures]
    for key in ("scenario_iteration", "lighting", "placement"):  # frame metrics name their sequence and step
        assert [(r["capture_id"], r["sequence_id"]) for r in records[ids[key]]] == [
            (None, c["sequence_id"]) for c in captures]
    assert {k for r in records[ids["object_count"]] for v in r["values"] for k in v} == {
        "label_id", "label_name", "count"}
    assert {k for r in records[ids["rendered_object_info"]] for v in r["values"] for k in v} == {
        "label_id", "instance_id", "visible_pixels"}


@needs_fixtures
def test_generated_solo_metrics_use_the_keys_of_the_real_sample(generated):
    root, sample = generated["solo"], FIXTURES / "solo"
    real = {m["id"]: m for m in solo_frames(sample)[0][1]["metrics"]}
    ours_definitions = json.loads((root / "metric_definitions.json").read_text())["metricDefinitions"]
    real_definitions = json.loads((sample / "metric_definitions.json").read_text())["metricDefinitions"]
    types = {d["id"]: d["@type"] for d in ours_definitions}
    assert all(types.get(d["id"]) == d["@type"] for d in real_definitions)
    assert all(set(d) == set(real_definitions[0]) for d in ours_definitions)
    assert set(json.loads((sample / "metadata.json").read_text())["metricCollectors"]) <= set(
        json.loads((root / "metadata.json").read_text())["metricCollectors"])
    for _, doc in solo_frames(root):
        for metric in doc["metrics"]:
            assert metric["description"].startswith(GENERATED)
            if metric["id"] in real:
                assert set(metric) == set(real[metric["id"]]), metric["id"]
                if "values" in metric and metric["values"]:
                    assert set(metric["values"][0]) == set(real[metric["id"]]["values"][0]), metric["id"]


def test_generated_visible_pixels_are_consistent_with_occlusion(generated):
    """Read by hand: every box has its object's visible pixels, no pixel is counted twice, and ObjectCount
    counts the objects RenderedObjectInfo lists; the statistics join the same numbers."""
    root = generated["perception"]
    captures, records = perception_tables(root)
    ids = {m.key: m.perception_id for m in METRICS}
    roi = {r["capture_id"]: {v["instance_id"]: v for v in r["values"]} for r in records[ids["rendered_object_info"]]}
    counts = {r["capture_id"]: {v["label_id"]: v["count"] for v in r["values"]} for r in records[ids["object_count"]]}
    expected = []
    for capture in captures:
        size = Image.open(root / capture["filename"]).size
        boxes = capture["annotations"][0]["values"]
        visible = roi[capture["id"]]
        union = np.zeros(size[::-1], dtype=bool)
        for box in boxes:
            entry = visible[box["instance_id"]]
            area = box["width"] * box["height"]
            assert 0 < entry["visible_pixels"] <= area and entry["label_id"] == box["label_id"]
            union[int(box["y"]):int(box["y"] + box["height"]), int(box["x"]):int(box["x"] + box["width"])] = True
            expected.append(entry["visible_pixels"] / area)
        # an object's visible pixels lie in its box: the boxed objects' pixels, each counted once, fit in
        # the union of their boxes (counting occluded pixels twice would overflow it where boxes overlap)
        assert sum(visible[b["instance_id"]]["visible_pixels"] for b in boxes) <= union.sum()
        assert Counter(v["label_id"] for v in visible.values()) == +Counter(counts[capture["id"]])
    stats = load_stats(str(root))
    assert stats.visible_fraction.tolist() == pytest.approx(expected)
    assert np.nanmax(stats.visible_fraction) <= 1 and stats.simulator.notes == []


def test_generated_light_metric_describes_the_pixels(generated):
    """The light's tilt and turn show in the images: brighter towards where the metric says it comes from."""
    root = generated["perception"]
    captures, records = perception_tables(root)
    light = {r["sequence_id"]: r["values"][0] for r in records[METRICS[4].perception_id]}
    tilt, top_minus_bottom, turn, right_minus_left, warm, red_minus_blue = [], [], [], [], [], []
    for capture in captures:
        pixels = np.asarray(Image.open(root / capture["filename"]), dtype=np.float64)
        luma, half = pixels.mean(axis=2), pixels.shape[0] // 2
        value = light[capture["sequence_id"]]
        tilt.append(math.sin(math.radians(value["x_rotation"])))
        top_minus_bottom.append((luma[:half].mean() - luma[half:].mean()) / luma.mean())
        turn.append(math.sin(math.radians(value["y_rotation"])))
        right_minus_left.append((luma[:, half:].mean() - luma[:, :half].mean()) / luma.mean())
        warm.append(value["color"]["r"] - value["color"]["b"])
        red_minus_blue.append((pixels[..., 0].mean() - pixels[..., 2].mean()) / luma.mean())
    assert np.corrcoef(tilt, top_minus_bottom)[0, 1] > 0.4
    assert np.corrcoef(turn, right_minus_left)[0, 1] > 0.4
    assert np.corrcoef(warm, red_minus_blue)[0, 1] > 0.2


def test_solo_and_perception_give_the_same_statistics_for_the_same_scenes(generated, tmp_path):
    perception = Path(generate("synthetic", tmp_path / "p", 12, seed=9))
    a, b = load_stats(str(perception)), load_stats(str(generated["solo"]))
    assert a.visible_fraction.tolist() == pytest.approx(b.visible_fraction.tolist())
    assert a.simulator.object_counts.tolist() == b.simulator.object_counts.tolist()
    assert a.simulator.object_count_by_label == b.simulator.object_count_by_label
    assert a.simulator.iterations == b.simulator.iterations == 12
    assert set(a.simulator.generic["lighting info"]) == set(b.simulator.generic["lighting info"])
    for field, values in a.simulator.generic["lighting info"].items():
        assert values.tolist() == pytest.approx(b.simulator.generic["lighting info"][field].tolist()), field


def test_statistics_of_a_split_count_only_its_images_metrics(generated):
    whole = load_stats(str(generated["perception"]))
    test = load_stats(str(generated["perception"]), split="test")
    assert len(whole.simulator.generic["lighting info"]["intensity"]) == 80
    assert len(test.simulator.generic["lighting info"]["intensity"]) == test.num_images < 80
    assert test.simulator.images_with_iteration == test.num_images
    assert len(test.visible_fraction) == test.num_boxes
    assert len(test.simulator.object_counts) == test.num_images


# --- missing, partial and malformed metrics --------------------------------------------------------------


def copy_of(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / source.name
    shutil.copytree(source, target)
    return target


def edit_records(root: Path, change) -> None:
    for path in sorted((root / "Dataset").glob("metrics_*.json")):
        doc = json.loads(path.read_text())
        doc["metrics"] = [r for r in (change(r) for r in doc["metrics"]) if r is not None]
        path.write_text(json.dumps(doc))


def run_stats(data: Path, tmp_path: Path, capsys) -> tuple[int, str, Path]:
    out = tmp_path / "out"
    code = main(["stats", "--data", str(data), "--pixel-sample", "0", "--out", str(out),
                 "--xcom-file", str(tmp_path / "x.json")])
    return code, capsys.readouterr().err, out


def test_without_rendered_object_info_the_rest_is_there_and_one_line_says_so(generated, tmp_path, capsys):
    root = copy_of(generated["perception"], tmp_path)
    roi_id = METRICS[1].perception_id
    edit_records(root, lambda r: None if r["metric_definition"] == roi_id else r)
    code, _, out = run_stats(root, tmp_path, capsys)
    assert code == 0
    (dataset,) = json.loads((out / "stats.json").read_text())["datasets"]
    assert dataset["notes"] == [NO_RENDERED_OBJECT_INFO]
    assert dataset["simulator"]["visible_fraction"] is None
    assert dataset["simulator"]["generic"]["lighting info"]["intensity"]["count"] == 80
    assert dataset["simulator"]["object_count"]["per_image"]["count"] == 80
    page = (out / "stats.html").read_text()
    assert page.count(NO_RENDERED_OBJECT_INFO) == 1
    assert "lighting info" in page and "Visible fraction" not in page


def test_partial_rendered_object_info_leaves_out_only_the_boxes_it_lacks(generated, tmp_path):
    root = copy_of(generated["perception"], tmp_path)
    roi_id = METRICS[1].perception_id
    dropped = []

    def drop_first_object(record):
        if record["metric_definition"] == roi_id and len(dropped) < 5:
            dropped.append(record["values"].pop(0)["instance_id"])
        return record

    edit_records(root, drop_first_object)
    stats = load_stats(str(root))
    assert int(np.isnan(stats.visible_fraction).sum()) == 5
    assert any(note.startswith("5 of ") and "no RenderedObjectInfo entry" in note for note in stats.simulator.notes)
    whole = load_stats(str(generated["perception"]))
    known = ~np.isnan(stats.visible_fraction)
    assert stats.visible_fraction[known].tolist() == whole.visible_fraction[known].tolist()


def test_no_metric_files_is_a_note_not_an_error(generated, tmp_path, capsys):
    root = copy_of(generated["perception"], tmp_path)
    for path in (root / "Dataset").glob("metric*.json"):
        path.unlink()
    code, _, out = run_stats(root, tmp_path, capsys)
    assert code == 0
    notes = json.loads((out / "stats.json").read_text())["datasets"][0]["notes"]
    assert any("no metrics_*.json" in n for n in notes) and NO_RENDERED_OBJECT_INFO in notes


def _set_first(records_of: str, change):
    done = []

    def edit(record):
        if record["metric_definition"] == records_of and not done:
            change(record)
            done.append(True)
        return record

    return edit


PERCEPTION_BAD = [
    ("visible pixels not a number", METRICS[1].perception_id,
     lambda r: r["values"][0].update(visible_pixels="many"), "values[0]: field 'visible_pixels' must be a number"),
    ("negative count", METRICS[0].perception_id, lambda r: r["values"][2].update(count=-1),
     "values[2]: field 'count' must be at least 0"),
    ("huge light intensity", METRICS[4].perception_id, lambda r: r["values"][0].update(intensity=1e300),
     "values[0]: field 'intensity' must be a finite number"),
    ("values not a list", METRICS[5].perception_id, lambda r: r.update(values={"a": 1}), "'values' must be a list"),
    ("no definition", METRICS[2].perception_id, lambda r: r.pop("metric_definition"),
     "missing field 'metric_definition'"),
    ("instance id not whole", METRICS[1].perception_id, lambda r: r["values"][0].update(instance_id=1.5),
     "field 'instance_id' must be a whole number"),
]


@pytest.mark.parametrize("what,definition,change,expected", PERCEPTION_BAD, ids=[c[0] for c in PERCEPTION_BAD])
def test_malformed_perception_metrics_exit_2_naming_file_and_field(generated, tmp_path, capsys, what, definition,
                                                                  change, expected):
    root = copy_of(generated["perception"], tmp_path)
    edit_records(root, _set_first(definition, change))
    code, err, out = run_stats(root, tmp_path, capsys)
    assert code == 2
    assert f"{root / 'Dataset' / 'metrics_000.json'}: metrics[" in err and expected in err, err
    assert "Traceback" not in err and not out.exists()


def test_nan_and_malformed_json_in_metric_files_exit_2(generated, tmp_path, capsys):
    root = copy_of(generated["perception"], tmp_path)
    path = root / "Dataset" / "metrics_000.json"
    text = path.read_text()
    path.write_text(text.replace('"intensity": ', '"intensity": NaN, "was": ', 1))
    code, err, out = run_stats(root, tmp_path, capsys)
    # NaN is not JSON: the strict reader refuses it, naming the line and field, before the metrics are read.
    assert code == 2 and "field 'intensity': number NaN is not a JSON number" in err and not out.exists()
    path.write_text(text[: len(text) // 2])
    code, err, out = run_stats(root, tmp_path, capsys)
    assert code == 2 and f"{path}: malformed JSON at line" in err and not out.exists()
    path.write_text(text)
    (root / "Dataset" / "metric_definitions.json").write_text('{"metric_definitions": [{"name": "no id"}]}')
    code, err, out = run_stats(root, tmp_path, capsys)
    assert code == 2 and "metric_definitions.json: metric_definitions[0]: missing field 'id'" in err


def test_malformed_solo_metrics_exit_2_naming_file_and_field(generated, tmp_path, capsys):
    root = copy_of(generated["solo"], tmp_path)
    frame = root / "sequence.3" / "step0.frame_data.json"
    doc = json.loads(frame.read_text())
    original = json.dumps(doc)
    roi = next(i for i, m in enumerate(doc["metrics"]) if m["id"] == "RenderedObjectInfo")
    del doc["metrics"][roi]["values"][0]["visiblePixels"]
    frame.write_text(json.dumps(doc))
    code, err, out = run_stats(root, tmp_path, capsys)
    assert code == 2 and not out.exists()
    assert f"{frame}: metrics[{roi}].values[0]: missing field 'visible_pixels' or 'visiblePixels'" in err, err
    doc = json.loads(original)
    doc["metrics"] = {"not": "a list"}
    frame.write_text(json.dumps(doc))
    code, err, out = run_stats(root, tmp_path, capsys)
    assert code == 2 and f"{frame}: field 'metrics' must be a list" in err and not out.exists()
    doc = json.loads(original)
    del doc["metrics"][0]["value"]
    frame.write_text(json.dumps(doc))
    code, err, _ = run_stats(root, tmp_path, capsys)
    assert code == 2 and f"{frame}: metrics[0]: missing field 'values' (or 'value')" in err


def test_solo_without_metric_definitions_names_metrics_by_id(generated, tmp_path):
    root = copy_of(generated["solo"], tmp_path)
    (root / "metric_definitions.json").unlink()
    stats = load_stats(str(root))
    (note,) = [n for n in stats.simulator.notes if "metric_definitions.json" in n]
    assert note.startswith("metrics 'scenario_iteration', 'RenderedObjectInfo', 'random-seed', 'ObjectCount', "
                           "'lighting info', 'object placement' are not in metric_definitions.json")
    assert {d["id"]: d["kind"] for d in stats.simulator.definitions} == {
        "scenario_iteration": "scenario_iteration", "RenderedObjectInfo": "rendered_object_info",
        "random-seed": "random_seed", "ObjectCount": "object_count", "lighting info": "generic",
        "object placement": "generic"}
    assert len(stats.visible_fraction) == stats.num_boxes and not np.isnan(stats.visible_fraction).any()
