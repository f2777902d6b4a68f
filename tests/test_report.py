"""Run, comparison and statistics reports: content, self-containment, and rendering in headless Chromium.

Chromium is Debian's `chromium` package (`apt-get install -y chromium`; .ci/run installs it when
missing). Screenshots of every rendered page are kept in test-artifacts/ (gitignored) for people to
look at. Without Chromium the rendering tests skip and say why; everything else still runs.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from headless_chromium import find_chromium, open_page
from report_fixtures import evaluate_fake, generate

from synthval.render import plots
from synthval.io import storage
from synthval.cli import main
from synthval.scoring.analysis import analyze_run, load_run_inputs
from synthval.steps.compare import run_compare
from synthval.steps.report import run_report

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
needs_chromium = pytest.mark.skipif(find_chromium() is None,
                                    reason="no chromium on PATH: apt-get install -y chromium (Debian) to render reports")


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    """A 120-image real-proxy set, and a noisy detector scored on its test split, as evaluate writes it."""
    root = tmp_path_factory.mktemp("report")
    data = generate("real-proxy", root / "real", 120, seed=7)
    good = evaluate_fake(data, root / "eval-good", seed=1, miss_rate=0.15, confuse_rate=0.1)
    worse = evaluate_fake(data, root / "eval-worse", seed=2, miss_rate=0.6, confuse_rate=0.1)
    return {"data": data, "good": good, "worse": worse, "root": root}


def keep_artifact(path: Path, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(path, ARTIFACTS / name)


def external_references(page: str) -> list[str]:
    """src/href values that are not data: URIs or in-page anchors (anything the page would fetch)."""
    return [v for v in re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page) if not v.startswith(("data:", "#"))]


def test_report_cli_writes_one_self_contained_page(evaluation, tmp_path):
    xcom = tmp_path / "xcom.json"
    assert main(["report", "--metrics", evaluation["good"]["metrics_uri"], "--out", str(tmp_path / "out"),
                 "--replicates", "200", "--gallery-size", "3", "--xcom-file", str(xcom)]) == 0
    result = json.loads(xcom.read_text())
    page = Path(result["report_uri"]).read_text()
    assert result["report_uri"].endswith("report.html")
    assert external_references(page) == []
    assert "<script>" not in page and "<link rel=\"stylesheet\"" not in page
    # headline metrics with intervals; the interval's estimate is metrics.json's value
    metrics = json.loads(Path(evaluation["good"]["metrics_uri"]).read_text())
    for key in ("mAP", "mAP50", "mAR100"):
        interval = result["summary"][key]
        assert interval["value"] == metrics[key]
        assert interval["low"] <= metrics[key] <= interval["high"]
        assert f"{metrics[key]:.3f}" in page
    assert "95% interval" in page and "bias-corrected percentile bootstrap over the" in page
    # every section, with the score threshold and the three kinds of box named
    for text in ("AP per class", "Precision-recall curves", "Class confusion", "Worst and best test images",
                 "TP: detection", "FP: detection", "MISS: true box", "score &ge; <b>0.5</b>"):
        assert text in page, text
    assert page.count('src="data:image/jpeg;base64,') == 6  # 3 worst + 3 best
    assert page.count('src="data:image/png;base64,') >= 3  # AP chart, PR curves, confusion
    data = json.loads(re.search(r'<script type="application/json" id="synthval-data">(.*?)</script>', page).group(1))
    assert data["intervals"]["values"]["mAP"]["value"] == metrics["mAP"]
    assert sum(sum(row.values()) for row in data["confusion"].values()) > 0  # the detector confuses classes


def test_analysis_classifies_every_box(evaluation):
    inputs = load_run_inputs(evaluation["good"]["metrics_uri"])
    analysis = analyze_run(inputs, score_threshold=0.0, replicates=50)
    assert len(analysis.outcomes) == len(inputs.index)
    # at threshold 0 every true box is either found (TP) or missed, at IoU .5 as COCO's AP50 counts it
    assert sum(o.tp + o.miss for o in analysis.outcomes) == inputs.index.num_boxes
    scored = len(inputs.results)
    assert sum(o.tp + o.fp for o in analysis.outcomes) == scored
    kinds = {item["kind"] for o in analysis.outcomes for item in o.items}
    assert kinds == {"TP", "FP", "MISS"}
    assert all(o.f1 is None or 0 <= o.f1 <= 1 for o in analysis.outcomes)
    worst, best = analysis.worst(3), analysis.best(3)
    assert worst[0].f1 <= best[-1].f1
    strict = analyze_run(inputs, score_threshold=0.9, replicates=50)
    assert sum(o.tp + o.fp for o in strict.outcomes) < scored


def test_report_without_predictions_still_shows_the_metrics(evaluation, tmp_path):
    metrics = json.loads(Path(evaluation["good"]["metrics_uri"]).read_text())
    metrics["predictions_uri"] = str(tmp_path / "gone.json")
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    result = run_report(str(tmp_path / "metrics.json"), str(tmp_path / "r.html"), replicates=20)
    page = Path(result["report_uri"]).read_text()
    assert result["summary"] is None
    assert "No predictions file found" in page and f"{metrics['mAP']:.3f}" in page


@needs_chromium
@pytest.mark.parametrize("kind", ["run", "compare", "stats"])
def test_reports_render_in_headless_chromium_without_errors(evaluation, tmp_path, kind):
    if kind == "run":
        page = Path(run_report(evaluation["good"]["metrics_uri"], str(tmp_path), replicates=100)["report_uri"])
        expect = "Headline metrics"
    elif kind == "compare":
        page = Path(run_compare([evaluation["good"]["metrics_uri"], evaluation["worse"]["metrics_uri"]],
                                str(tmp_path), names=["good", "worse"], replicates=100)["report_uri"])
        expect = "larger than the noise"
    else:
        assert main(["stats", "--data", evaluation["data"], "--split", "train", "--compare-data", evaluation["data"],
                     "--compare-split", "test", "--pixel-sample", "4", "--out", str(tmp_path),
                     "--xcom-file", str(tmp_path / "x.json")]) == 0
        page = tmp_path / "stats.html"
        expect = "Domain gap"
    shot = tmp_path / f"{kind}.png"
    result = open_page(page, shot)
    assert result.errors == []
    assert result.image_count > 0 and result.broken_images == 0
    assert expect in result.text
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    keep_artifact(shot, f"{kind}_report.png")
    keep_artifact(page, f"{kind}_report.html")


@needs_chromium
def test_chromium_check_catches_an_injected_script_error(evaluation, tmp_path):
    """Negative check: the same harness reports a broken page, so a clean result means something."""
    page = Path(run_report(evaluation["good"]["metrics_uri"], str(tmp_path / "r.html"), replicates=20,
                           gallery_size=1)["report_uri"])
    broken = tmp_path / "broken.html"
    broken.write_text(page.read_text().replace("</body>", "<script>undefinedFunction();</script></body>"))
    # the report's Content-Security-Policy refuses inline script: that refusal is an error too
    assert open_page(broken).errors
    plain = tmp_path / "plain.html"
    plain.write_text("<!DOCTYPE html><html><head><link rel=\"icon\" href=\"data:,\"></head><body>"
                     "<img src=\"missing.png\"><script>console.error('boom'); undefinedFunction();</script></body></html>")
    result = open_page(plain)
    assert any("undefinedFunction" in e for e in result.errors), result.errors
    assert any("console.error: boom" in e for e in result.errors), result.errors
    assert any("missing.png" in e for e in result.errors) and result.broken_images == 1


@needs_chromium
def test_report_opens_from_a_signed_url_fetching_nothing_else(evaluation, tmp_path, http_server):
    """As from gs:// through a signed URL: one GET of the page, no further request, no error."""
    page = Path(run_report(evaluation["good"]["metrics_uri"], str(tmp_path / "r.html"), replicates=20,
                           gallery_size=2)["report_uri"])
    url = http_server.serve("/bucket/reports/r.html", page.read_bytes(), content_type="text/html; charset=utf-8")
    result = open_page(url + "?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Signature=0123abcd")
    assert result.errors == [] and result.broken_images == 0
    assert [r.path.split("?")[0] for r in http_server.requests] == ["/bucket/reports/r.html"]


def test_report_on_gcs_is_served_as_html(evaluation, gcs_emulator):
    uri = gcs_emulator.uri("reports/run1/report.html")
    result = run_report(evaluation["good"]["metrics_uri"], uri, replicates=20, gallery_size=1)
    assert result["report_uri"] == uri
    fs, path = storage.filesystem(uri)
    assert fs.info(path)["contentType"].startswith("text/html")
    assert storage.read_text(uri).startswith("<!DOCTYPE html>")


def test_compare_tells_a_real_difference_from_noise(evaluation, tmp_path):
    good, worse = evaluation["good"]["metrics_uri"], evaluation["worse"]["metrics_uri"]
    xcom = tmp_path / "x.json"
    assert main(["compare", "--metrics", good, worse, good, "--names", "good", "worse", "good again",
                 "--replicates", "300", "--out", str(tmp_path / "cmp.html"), "--xcom-file", str(xcom)]) == 0
    result = json.loads(xcom.read_text())
    diffs = {(d["a"], d["b"], d["metric"]): d for d in result["differences"]}
    assert len(diffs) == 3 * 3  # three pairs, three metrics
    real = diffs[("good", "worse", "mAR100")]
    assert real["method"] == "paired" and real["significant"] and real["low"] > 0
    same = diffs[("good", "good again", "mAP")]
    assert same["difference"] == 0 and not same["significant"]
    page = Path(result["report_uri"]).read_text()
    assert "larger than noise?" in page and external_references(page) == []


def test_compare_accepts_result_records(evaluation, tmp_path):
    records = []
    for name in ("good", "worse"):
        xcom = tmp_path / f"{name}.json"
        assert main(["publish", "--metrics", evaluation[name]["metrics_uri"], "--results", str(tmp_path / "results"),
                     "--recipe", f"recipe_{name}", "--no-report", "--xcom-file", str(xcom)]) == 0
        records.append(json.loads(xcom.read_text())["result_uri"])
    result = run_compare(records, str(tmp_path), replicates=50)
    assert {d["a"] for d in result["differences"]} == {"recipe_good"}
    assert {d["b"] for d in result["differences"]} == {"recipe_worse"}


def test_compare_needs_two_results(evaluation, tmp_path, capsys):
    assert main(["compare", "--metrics", evaluation["good"]["metrics_uri"], "--out", str(tmp_path),
                 "--xcom-file", str(tmp_path / "x.json")]) == 2
    assert "at least two" in capsys.readouterr().err


def test_figures_for_tensorboard(evaluation):
    """The report's charts as arrays and figures, the form SummaryWriter.add_image/add_figure take."""
    metrics = json.loads(Path(evaluation["good"]["metrics_uri"]).read_text())
    for fig in (plots.per_class_ap_figure(metrics), plots.pr_curves_figure(metrics),
                plots.confusion_figure({"a": {"b": 2}})):
        pixels = plots.figure_array(fig)
        assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
        assert pixels.min() < 128  # something is drawn
    inputs = load_run_inputs(evaluation["good"]["metrics_uri"])
    analysis = analyze_run(inputs, replicates=20)
    from synthval.render.report import draw_outcome

    drawn = plots.image_array(draw_outcome(analysis.worst(1)[0], analysis.score_threshold))
    assert drawn.shape[2] == 3 and max(drawn.shape[:2]) == 360


def test_tensorboard_images_from_in_memory_predictions(evaluation):
    """What evaluate/train log: the pictures of the evaluation's own matches of model-class predictions."""
    from synthval.scoring.coco_eval import CocoEvaluator
    from synthval.render.tensorboard import tensorboard_images

    inputs = load_run_inputs(evaluation["good"]["metrics_uri"])
    shift = {c: c + 100 for c in inputs.index.label_names}  # pretend model classes differ from label ids
    r = inputs.results
    predictions = [{"image_id": i, "boxes": np.concatenate([r.xywh[r.image_ids == i, :2], r.xywh[r.image_ids == i, :2]
                                                            + r.xywh[r.image_ids == i, 2:]], axis=1),
                    "scores": r.scores[r.image_ids == i],
                    "labels": np.array([shift[int(c)] for c in r.labels[r.image_ids == i]])}
                   for i in np.unique(r.image_ids).tolist()]
    evaluator = CocoEvaluator(inputs.index, shift)
    evaluator.process(predictions)
    metrics = evaluator.evaluate()
    assert metrics["mAP"] == pytest.approx(inputs.metrics["mAP"], abs=1e-9)
    images = tensorboard_images(evaluator.matches, metrics, num_images=2)
    assert {"eval/per_class_AP", "eval/pr_curves", "eval/worst/0", "eval/worst/1", "eval/best/0"} <= set(images)
    for array in images.values():
        assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3


def test_pictures_follow_coco_s_crowd_rule():
    """A detection absorbed by a crowd region is neither a TP nor an FP, and the region is never a miss:
    the report draws what was scored."""
    from synthval.data.index import DatasetIndex, ImageRecord
    from synthval.scoring.coco_eval import CocoEvaluator
    from synthval.scoring.outcomes import image_outcomes

    xywh = np.array([[0, 0, 100, 100], [200, 0, 100, 200], [0, 300, 50, 50]], dtype=np.float64)
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1).astype(np.float32)
    record = ImageRecord(1, "/nowhere/1.png", 640, 480, xyxy, np.array([1, 1, 2]), xywh, None,
                         np.array([False, True, False]), None)
    index = DatasetIndex("/nowhere", "coco", {1: "person", 2: "dog"}, [record])
    evaluator = CocoEvaluator(index, {1: 1, 2: 2})
    evaluator.process([{"image_id": 1, "boxes": np.array([[0, 0, 100, 100], [210, 10, 260, 60], [400, 400, 450, 450],
                                                          [0, 300, 50, 350]], np.float32),
                        "scores": np.array([0.9, 0.8, 0.7, 0.6]), "labels": np.array([1, 1, 1, 1])}])
    evaluator.evaluate()
    [outcome], confusion = image_outcomes(evaluator.matches, 0.5)
    kinds = sorted(item["kind"] for item in outcome.items)
    # person found, the detection in the crowd region not drawn, one false alarm, which lies on the dog
    assert (outcome.tp, outcome.fp, outcome.miss, outcome.confused) == (1, 2, 1, 1)
    assert kinds == ["FP", "FP", "MISS", "TP"]
    assert confusion == {"dog": {"person": 1}}


def test_hostile_names_in_a_comparison_are_shown_as_text():
    from synthval.render.report import render_compare_report
    from synthval.scoring.analysis import CompareEntry

    hostile = '<script>alert("x")</script>'
    metrics = {"mAP": 0.5, "mAP50": 0.7, "num_images": 3, "per_class": {hostile: {"AP50": 0.7}}}
    entries = [CompareEntry(hostile, f"/runs/{hostile}/metrics.json", metrics),
               CompareEntry("plain", "/runs/plain/metrics.json", metrics)]
    differences = [{"a": hostile, "b": "plain", "metric": "mAP", "difference": 0.0, "low": None, "high": None,
                    "significant": False, "method": "no predictions: untested"}]
    page = render_compare_report(entries, differences)
    shown = page.split('<script type="application/json"')[0]  # the inert JSON is checked apart
    assert "<script>alert" not in shown and "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page
    data = json.loads(re.search(r'<script type="application/json" id="synthval-data">(.*?)</script>', page).group(1))
    assert data["results"][0]["name"] == hostile  # the inert JSON keeps the name whole, and cannot close its element
