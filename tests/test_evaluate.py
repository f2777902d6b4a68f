"""`synthval evaluate`: scoring COCO results files through the CLI, outputs, TensorBoard, and bad input."""

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from synthval.cli import main
from synthval.data import load_dataset
from synthval.scoring.coco_eval import SUMMARY, SUMMARY_KEYS

FIXTURE = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures" / "coco"


@pytest.fixture
def coco_dir(tmp_path):
    """The shared COCO fixture, made usable: its one image file is missing from the sample and its bicycle
    box overhangs the 240 px image by 11 px, so the copy gets that image, 260 px tall."""
    root = tmp_path / "coco"
    shutil.copytree(FIXTURE, root)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    annotations = root / "annotations" / "instances.json"
    doc = json.loads(annotations.read_text())
    doc["images"][0]["height"] = 260
    annotations.write_text(json.dumps(doc))
    Image.new("RGB", (320, 260), "gray").save(root / "images" / doc["images"][0]["file_name"])
    return root


def ground_truth_as_results(coco_root: Path) -> list[dict]:
    doc = json.loads((coco_root / "annotations" / "instances.json").read_text())
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in doc["annotations"]]


def pycocotools_stats(annotations: Path, results: Path):
    """pycocotools run directly on the two files: the reference numbers (COCOeval.stats)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(annotations))
        ev = COCOeval(coco, coco.loadRes(str(results)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def evaluate(*args, tmp_path):
    return main(["evaluate", *args, "--xcom-file", str(tmp_path / "xcom.json")])


def test_results_file_on_the_shared_coco_fixture(coco_dir, tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(ground_truth_as_results(coco_dir)))
    out = tmp_path / "eval"
    # No --split: a COCO folder defines no splits, so the whole folder is the test set.
    assert evaluate("--predictions", str(results), "--data", str(coco_dir), "--out", str(out),
                    tmp_path=tmp_path) == 0
    xcom = json.loads((tmp_path / "xcom.json").read_text())
    assert xcom["metrics_uri"] == str(out / "metrics.json")
    assert xcom["predictions_uri"] == str(out / "predictions.json")
    assert xcom["summary"]["mAP"] == pytest.approx(1.0)
    metrics = json.loads((out / "metrics.json").read_text())
    # Two small boxes (1000 and 200 px) and a large one (10000 px): no medium box, so medium is null.
    for key in SUMMARY_KEYS:
        if "medium" in key:
            assert metrics[key] is None
        else:
            assert metrics[key] == pytest.approx(1.0), key
    assert set(metrics["per_class"]) == {"car", "bicycle", "person"}
    assert metrics["source_predictions_uri"] == str(results) and metrics["checkpoint_uri"] is None
    assert metrics["data_uri"] == str(coco_dir) and metrics["split"] == "all"
    assert metrics["config"]["split"] == "all" and metrics["schema_version"] == 1
    assert metrics["test_set"]["num_images"] == 1 and len(metrics["test_set"]["image_ids_sha256"]) == 64
    # predictions.json keeps the COCO file's own (128-bit) image ids, so pycocotools or a second run can
    # score it against the same annotations.
    written = json.loads((out / "predictions.json").read_text())
    assert written == ground_truth_as_results(coco_dir)
    again = tmp_path / "again"
    assert evaluate("--predictions", str(out / "predictions.json"), "--data", str(coco_dir), "--split", "all",
                    "--out", str(again), tmp_path=tmp_path) == 0
    rescored = json.loads((again / "metrics.json").read_text())
    assert {k: rescored[k] for k in SUMMARY_KEYS} == {k: metrics[k] for k in SUMMARY_KEYS}


def test_pycocotools_agrees_on_the_fixture(coco_dir, tmp_path):


    results = ground_truth_as_results(coco_dir)
    results[0]["bbox"] = [35.0, 50.0, 100.0, 80.0]  # IoU 0.72 with the car
    results[1]["score"] = 0.95
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    assert evaluate("--predictions", str(path), "--data", str(coco_dir), "--split", "all", "--out",
                    str(tmp_path / "eval"), tmp_path=tmp_path) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    stats = pycocotools_stats(coco_dir / "annotations" / "instances.json", path)
    keys = ("mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large", "mAR1", "mAR10", "mAR100")
    assert [metrics[k] if metrics[k] is not None else -1.0 for k in keys] == stats[:9].tolist()


def test_results_on_a_groceries_layout_use_index_ids(tmp_path):
    from synthval.demo.generator import generate_dataset

    data = generate_dataset("real-proxy", str(tmp_path / "real"), num_images=30, image_size=64, seed=1)["dataset_uri"]
    index = load_dataset(data, split="test")
    results = [{"image_id": r.image_id, "category_id": int(label),
                "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], "score": 0.8}
               for r in index.images for (x1, y1, x2, y2), label in zip(r.boxes.tolist(), r.labels)]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    assert evaluate("--predictions", str(path), "--data", data, "--out", str(tmp_path / "eval"),
                    "--tb-log-dir", str(tmp_path / "tb"), "--set", "num_sample_images=2", tmp_path=tmp_path) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["num_images"] == len(index)
    assert metrics["mAP50"] == pytest.approx(1.0)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"eval/mAP", "eval/mAP50", "eval/mAR100"} <= set(tags["scalars"])
    # The run report's own pictures (synthval.render.tensorboard.tensorboard_images), num_sample_images of each kind.
    assert {"eval/per_class_AP", "eval/pr_curves", "eval/worst/0", "eval/worst/1", "eval/best/0",
            "eval/best/1"} <= set(tags["images"])
    assert "eval/worst/2" not in tags["images"]


@pytest.mark.parametrize("content, field", [
    ('[{"image_id": 1, "category_id": 27', "malformed JSON"),
    (b"\xef\xbb\xbf[\xff]", "not UTF-8"),
    ("[" * 10_000 + "]" * 10_000, "nested deeper"),
    ('[{"image_id": 91891091516384550185081373185892902457, "category_id": 27, "bbox": [0, 0, 5, 5],'
     ' "score": NaN}]', "'score'"),
    ('[{"image_id": 91891091516384550185081373185892902457, "category_id": 27, "bbox": [0, 0, 5, 5],'
     ' "score": 1e400}]', "'score'"),
    ('[{"image_id": 91891091516384550185081373185892902457, "category_id": 27, "bbox": [0, 0, 5, 5],'
     ' "score": ' + "1" + "0" * 400 + "}]", "'score'"),
    ('[{"image_id": 91891091516384550185081373185892902457, "category_id": 27, "bbox": [0, Infinity, 5, 5],'
     ' "score": 0.5}]', "'bbox'"),
    ('[{"image_id": 91891091516384550185081373185892902457, "category_id": 27, "bbox": [0, 0, 1e400, 5],'
     ' "score": 0.5}]', "'bbox'"),
    ('[{"image_id": 5, "category_id": 27, "bbox": [0, 0, 5, 5], "score": 0.5}]', "'image_id' 5"),
    ('[{"image_id": 91891091516384550185081373185892902457, "category_id": 99, "bbox": [0, 0, 5, 5],'
     ' "score": 0.5}]', "'category_id' 99"),
    ('[{"image_id": 91891091516384550185081373185892902457, "category_id": 27, "bbox": "0 0 5 5",'
     ' "score": 0.5}]', "'bbox'"),
])
def test_bad_results_file_exits_2_and_writes_nothing(coco_dir, tmp_path, capsys, content, field):
    path = tmp_path / "results.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "eval"
    code = evaluate("--predictions", str(path), "--data", str(coco_dir), "--split", "all", "--out", str(out),
                    "--tb-log-dir", str(tmp_path / "tb"), tmp_path=tmp_path)
    err = capsys.readouterr().err
    assert code == 2
    assert str(path) in err and field in err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "tb").exists() and not (tmp_path / "xcom.json").exists()


def test_results_file_needs_only_the_annotation_file(tmp_path):
    # The shared fixture as it is: its one image file is missing and its bicycle box overhangs the image.
    # Every number depends on the annotations alone, so scoring needs neither, and the box is scored as
    # the file gives it, as pycocotools does.
    annotations = FIXTURE / "annotations" / "instances.json"
    results = ground_truth_as_results(FIXTURE)
    results[0]["bbox"] = [35.0, 50.0, 100.0, 80.0]  # IoU 0.72 with the car
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    for data in (FIXTURE, annotations):
        out = tmp_path / f"eval-{data.name}"
        assert evaluate("--predictions", str(path), "--data", str(data), "--out", str(out), tmp_path=tmp_path) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        stats = pycocotools_stats(annotations, path)
        assert [metrics[key] if metrics[key] is not None else -1.0 for key, *_ in SUMMARY] == stats.tolist()
        assert metrics["inference"] is None and metrics["protocol"] == "coco-bbox-2"
        intervals = metrics["intervals"]
        assert intervals["replicates"] == 1000 and intervals["confidence"] == 0.95
        assert intervals["values"]["mAP"]["value"] == metrics["mAP"]


def tiny_checkpoint(path: Path, label_names: list[str]) -> str:
    from synthval import __version__
    from synthval.detection.checkpoint import FORMAT, FORMAT_VERSION, save_checkpoint
    from synthval.config import TrainConfig, load_config, to_dict
    from synthval.detection.model import build_model

    config = load_config(TrainConfig, preset="cpu-demo")
    model = build_model(config.model, num_classes=len(label_names) + 1, load_backbone_weights=False)
    save_checkpoint(str(path), {"format": FORMAT, "format_version": FORMAT_VERSION, "synthval_version": __version__,
                                "model": model.state_dict(), "config": to_dict(config), "label_names": label_names,
                                "step": 3, "epoch": 1})
    return str(path)


def test_a_model_needs_the_images_and_its_device_and_dtype_are_recorded(coco_dir, tmp_path, capsys):
    checkpoint = tiny_checkpoint(tmp_path / "checkpoint-3.pt", ["car", "bicycle", "person"])
    out = tmp_path / "eval"
    assert evaluate("--checkpoint", checkpoint, "--data", str(coco_dir), "--out", str(out), "--set",
                    "bootstrap_replicates=0", tmp_path=tmp_path) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["inference"] == {"device": "cpu", "dtype": "float32"}  # amp "auto" is off on a CPU
    assert metrics["intervals"] is None
    # Without its image file a model has nothing to look at: exit 2 naming the file, nothing written.
    missing = tmp_path / "eval-missing"
    assert evaluate("--checkpoint", checkpoint, "--data", str(FIXTURE), "--out", str(missing),
                    tmp_path=tmp_path) == 2
    assert "camera_91891091516384550185081373185892902457.png" in capsys.readouterr().err
    assert not missing.exists()


def test_empty_results_score_zero(coco_dir, tmp_path):
    results = tmp_path / "results.json"
    results.write_text("[]")
    assert evaluate("--predictions", str(results), "--data", str(coco_dir), "--split", "all", "--out",
                    str(tmp_path / "eval"), tmp_path=tmp_path) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["mAP"] == 0.0 and metrics["num_predictions"] == 0
    assert json.loads((tmp_path / "eval" / "predictions.json").read_text()) == []


def test_coco_image_ids_decide_ties_as_in_pycocotools(tmp_path):
    # images[] lists id 20 before id 10. A true detection on image 20 and a false one on image 10 tie on
    # score; pycocotools ranks the tie by image id (10 first), so AP50 is 0.5, not 1.0.


    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "images").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (100, 100)).save(root / "images" / name)
    doc = {"images": [{"id": 20, "file_name": "a.png", "width": 100, "height": 100},
                      {"id": 10, "file_name": "b.png", "width": 100, "height": 100}],
           "annotations": [{"id": 1, "image_id": 20, "category_id": 1, "bbox": [10, 10, 50, 50], "area": 2500,
                            "iscrowd": 0}],
           "categories": [{"id": 1, "name": "soup"}]}
    (root / "annotations" / "instances.json").write_text(json.dumps(doc))
    results = [{"image_id": 20, "category_id": 1, "bbox": [10, 10, 50, 50], "score": 0.5},
               {"image_id": 10, "category_id": 1, "bbox": [10, 10, 50, 50], "score": 0.5}]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    assert evaluate("--predictions", str(path), "--data", str(root), "--split", "all", "--out",
                    str(tmp_path / "eval"), tmp_path=tmp_path) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    stats = pycocotools_stats(root / "annotations" / "instances.json", path)
    assert metrics["mAP50"] == stats[1] == pytest.approx(0.5)
    assert json.loads((tmp_path / "eval" / "predictions.json").read_text()) == results


def test_the_scoring_benchmark_runs_at_toy_size():
    """benchmarks/bench_eval.py end to end on a toy size: every tool runs and all agree (no timing here)."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_eval.py"
    proc = subprocess.run([sys.executable, str(script), "--toy"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.strip().startswith("30 ")]
    assert [line.split()[2] for line in rows] == ["synthval", "synthval-no-intervals", "faster-coco-eval",
                                                   "pycocotools"]
    assert all(" yes (" in line for line in rows), proc.stdout
