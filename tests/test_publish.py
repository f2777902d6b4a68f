"""`synthval publish`: the versioned result record, its provenance, its model and its idempotent record id."""

import json
from pathlib import Path

import pytest
from PIL import Image

from synthval.cli import main
from synthval.scoring.coco_eval import SUMMARY_KEYS
from synthval.results.record import make_record_id

RECIPE = "train_on_synthetic_and_real_dataset"


def write_coco(root: Path) -> Path:
    (root / "annotations").mkdir(parents=True)
    (root / "images").mkdir()
    images, annotations = [], []
    for i in range(3):
        Image.new("RGB", (200, 150), "white").save(root / "images" / f"{i}.png")
        images.append({"id": 10 + i, "file_name": f"{i}.png", "width": 200, "height": 150})
        for j, (label, box) in enumerate([(1, [10, 10, 50, 40]), (2, [100, 60, 80, 80])]):
            annotations.append({"id": 100 * i + j + 1, "image_id": 10 + i, "category_id": label, "bbox": box,
                                "area": box[2] * box[3], "iscrowd": 0})
    categories = [{"id": 1, "name": "soup"}, {"id": 2, "name": "tea"}, {"id": 3, "name": "rice"}]
    (root / "annotations" / "instances.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return root


@pytest.fixture
def metrics_uri(tmp_path):
    data = write_coco(tmp_path / "real")
    doc = json.loads((data / "annotations" / "instances.json").read_text())
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in doc["annotations"] if a["category_id"] == 1]
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert main(["evaluate", "--predictions", str(tmp_path / "results.json"), "--data", str(data),
                 "--split", "all", "--out", str(tmp_path / "eval"), "--xcom-file", str(tmp_path / "e.json")]) == 0
    return str(tmp_path / "eval" / "metrics.json")


def publish(metrics_uri, results, *extra, xcom):
    args = ["publish", "--metrics", metrics_uri, "--results", str(results), "--recipe", RECIPE,
            "--dataset", "synthetic=gs://bucket/synthdet", "--dataset", "real=gs://bucket/groceries",
            "--checkpoint", "gs://bucket/run/ckpt/checkpoint-000100.pt", "--xcom-file", str(xcom), *extra]
    assert main(args) == 0
    return json.loads(Path(xcom).read_text())


def test_record_holds_metrics_and_provenance(metrics_uri, tmp_path):
    result = publish(metrics_uri, tmp_path / "results", "--run-id", "manual__1", "--real-budget", "76",
                     xcom=tmp_path / "p.json")
    record = json.loads(Path(result["result_uri"]).read_text())
    metrics = json.loads(Path(metrics_uri).read_text())
    assert Path(result["result_uri"]).parent == tmp_path / "results"
    assert Path(result["result_uri"]).name == f"{record['record_id']}.json"
    assert record["schema_version"] == 2
    assert record["recipe"] == RECIPE and record["run_id"] == "manual__1" and record["real_budget"] == 76
    assert record["datasets"] == {"real": "gs://bucket/groceries", "synthetic": "gs://bucket/synthdet"}
    # A synthetic model fine-tuned on 76 real images, identified by the results file it is (no checkpoint
    # was evaluated; the --checkpoint named cannot be read here).
    results_file = tmp_path / "results.json"
    assert record["model"] == {"id": record["model"]["id"], "basis": "predictions-sha256", "uri": str(results_file),
                               "role": "synthetic+real", "dataset": "gs://bucket/synthdet"}
    assert result["model_id"] == record["model"]["id"] and result["role"] == "synthetic+real"
    assert record["checkpoint_uri"] == "gs://bucket/run/ckpt/checkpoint-000100.pt"
    assert record["metrics"] == {k: metrics[k] for k in SUMMARY_KEYS}
    assert record["metrics"]["mAP50"] == pytest.approx(0.5)  # soup found everywhere, tea never, rice absent
    assert record["per_class"]["soup"]["AP50"] == pytest.approx(1.0)
    assert record["per_class"]["rice"] == {"AP": None, "AP50": None, "num_gt": 0}
    assert record["test_set"]["data_uri"] == str(tmp_path / "real") and record["test_set"]["split"] == "all"
    assert record["evaluation"]["metrics_uri"] == metrics_uri
    assert record["evaluation"]["predictions_uri"] == str(tmp_path / "eval" / "predictions.json")
    assert record["eval_config"]["split"] == "all"
    assert record["synthval_version"] and record["created_at"].endswith("+00:00")
    assert len(record["protocol_fingerprint"]) == 64 and record["protocol"] == metrics["protocol"] == "coco-bbox-2"
    assert record["protocol_facts"]["test_set"] == metrics["test_set"]["sha256"]
    assert len(record["benchmark_fingerprint"]) == 64


def test_retry_overwrites_the_same_record(metrics_uri, tmp_path):
    first = publish(metrics_uri, tmp_path / "results", "--run-id", "r1", xcom=tmp_path / "a.json")
    second = publish(metrics_uri, tmp_path / "results", "--run-id", "r1", xcom=tmp_path / "b.json")
    assert first == second
    assert [p.name for p in (tmp_path / "results").iterdir()] == [Path(first["result_uri"]).name]
    other_run = publish(metrics_uri, tmp_path / "results", "--run-id", "r2", xcom=tmp_path / "c.json")
    assert other_run["result_uri"] != first["result_uri"]


def test_record_id_depends_on_what_identifies_a_result():
    base = dict(recipe=RECIPE, model_id="m" * 64, fingerprint="f" * 64, run_id="r")
    same = make_record_id(**base)
    assert same == make_record_id(**base) and same.startswith(RECIPE + "-")
    for change in ({"recipe": "other"}, {"model_id": "n" * 64}, {"fingerprint": "e" * 64}, {"run_id": None}):
        assert make_record_id(**{**base, **change}) != same, change
    assert "/" not in make_record_id(**{**base, "recipe": "../evil/recipe"})


@pytest.mark.parametrize("datasets, budget, message", [
    (["synthetic=gs://b/s", "model=synthetic-400k"], "0", "either a synthetic dataset or a given model"),
    (["synthetic=gs://b/s"], "76", "--dataset real=URI"),
    (["sim=gs://b/s"], "0", "role 'sim'"),
])
def test_datasets_that_cannot_say_what_the_model_was_trained_on_exit_2(metrics_uri, tmp_path, capsys, datasets,
                                                                      budget, message):
    flags = [f for d in datasets for f in ("--dataset", d)]
    code = main(["publish", "--metrics", metrics_uri, "--results", str(tmp_path / "results"), "--recipe", RECIPE,
                 *flags, "--real-budget", budget, "--xcom-file", str(tmp_path / "x.json")])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("edit, field", [
    (lambda m: m.pop("mAP"), "'mAP'"),
    (lambda m: m.pop("test_set"), "'test_set'"),
    (lambda m: m.update(schema_version=99), "'schema_version'"),
    (lambda m: m.update(mAP50=1.5), "'mAP50'"),
    (lambda m: m["test_set"].pop("sha256"), "'test_set.sha256'"),  # evaluated before content fingerprints
])
def test_bad_metrics_file_exits_2_and_writes_nothing(metrics_uri, tmp_path, capsys, edit, field):
    metrics = json.loads(Path(metrics_uri).read_text())
    edit(metrics)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(metrics))
    code = main(["publish", "--metrics", str(bad), "--results", str(tmp_path / "results"), "--recipe", RECIPE,
                 "--xcom-file", str(tmp_path / "x.json")])
    err = capsys.readouterr().err
    assert code == 2 and str(bad) in err and field in err
    assert not (tmp_path / "results").exists() and not (tmp_path / "x.json").exists()


def test_missing_metrics_file_exits_2(tmp_path, capsys):
    code = main(["publish", "--metrics", str(tmp_path / "nope.json"), "--results", str(tmp_path / "results"),
                 "--recipe", RECIPE, "--xcom-file", str(tmp_path / "x.json")])
    assert code == 2 and "nope.json" in capsys.readouterr().err
