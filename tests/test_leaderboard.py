"""The leaderboard: real-image equivalents, sorting, filtering, deltas, and the CLI against the store."""

from __future__ import annotations

import csv
import io
import json
import math

import pytest
from test_results import evaluate, publish_args

from synthval.cli import main
from synthval.errors import ConfigError
from synthval.leaderboard import build_leaderboard, real_image_equivalent, real_only_curves
from synthval.results import open_store

RECIPE = "evaluate_new_synthetic_datasets"
CURVE = [{"budget": 0, "mAP": 0.0, "sigma": 0.0}, {"budget": 76, "mAP": 0.2, "sigma": 0.01},
         {"budget": 380, "mAP": 0.35, "sigma": 0.01}, {"budget": 760, "mAP": 0.4, "sigma": 0.01}]


def test_real_image_equivalent_reads_the_curve_in_log_images():
    at_point = real_image_equivalent(CURVE, 0.35)
    assert at_point["value"] == pytest.approx(380)
    assert at_point["low"] < 380 < at_point["high"] and at_point["max_budget"] == 760
    # Halfway between 76 and 380 in mAP is their geometric-like midpoint in log(1 + n), not the arithmetic one.
    middle = real_image_equivalent(CURVE, 0.275)["value"]
    assert middle == pytest.approx(math.expm1((math.log1p(76) + math.log1p(380)) / 2))
    assert real_image_equivalent(CURVE, 0.0)["value"] == 0
    beyond = real_image_equivalent(CURVE, 0.5)
    assert math.isinf(beyond["value"]) and math.isinf(beyond["high"])
    # Noisier curve points give a wider interval.
    noisy = real_image_equivalent([{**p, "sigma": p["sigma"] * 5} for p in CURVE], 0.35)
    assert noisy["high"] - noisy["low"] > at_point["high"] - at_point["low"]
    with pytest.raises(ConfigError, match="at least one measured budget"):
        real_image_equivalent(CURVE[:1], 0.1)


@pytest.fixture
def store_url(tmp_path, monkeypatch):
    """A store holding a real-only curve (budgets 10 and 40) and three synthetic datasets of the same protocol."""
    url = f"sqlite:///{tmp_path / 'results.db'}"
    monkeypatch.setenv("SYNTHVAL_RESULTS_DB_URL", url)
    half = evaluate(tmp_path, "half", keep_labels=(1,))  # finds one of the two labelled classes: mAP 0.5
    full = evaluate(tmp_path, "full", keep_labels=(1, 2))  # finds both: mAP 1.0
    none = evaluate(tmp_path, "none", keep_labels=())  # finds nothing: mAP 0
    results = tmp_path / "results"
    published = [
        (half, "synthetic=/data/synth-a", 0), (full, "synthetic=/data/synth-a", 40),
        (full, "synthetic=/data/synth-b", 0), (none, "synthetic=/data/synth-c", 0),
    ]
    for metrics, dataset, budget in published:
        args = publish_args(metrics, results, "unused", budget=budget)
        args[args.index("synthetic=unused")] = dataset
        assert main([*args, "--xcom-file", str(tmp_path / "x")]) == 0
    for metrics, budget in ((half, 10), (full, 40)):
        assert main(["publish", "--metrics", metrics, "--results", str(results), "--recipe", RECIPE,
                     "--dataset", "real=/data/real", "--real-budget", str(budget), "--run-id", "curve",
                     "--xcom-file", str(tmp_path / "x")]) == 0
    return url


def test_board_ranks_by_real_image_equivalent_with_deltas(store_url):
    rows = open_store(store_url).rows()
    curve = real_only_curves(rows)
    assert [(p["budget"], p["mAP"]) for p in next(iter(curve.values()))] == [(0, 0.0), (10, 0.5), (40, 1.0)]
    board = build_leaderboard(rows, roles=["synthetic"], budgets=[0], baseline="synth-c")
    assert [e["dataset"] for e in board] == ["/data/synth-b", "/data/synth-a", "/data/synth-c"]
    b, a, c = board
    assert b["real_equiv"] == pytest.approx(40) and a["real_equiv"] == pytest.approx(10)
    assert c["real_equiv"] == 0
    assert a["real_equiv_low"] <= 10 <= a["real_equiv_high"]
    assert b["delta_mAP"] == pytest.approx(1.0) and a["delta_mAP"] == pytest.approx(0.5) and c["delta_mAP"] == 0
    by_map = build_leaderboard(rows, sort="mAP", descending=False, dataset_contains="synth-a")
    assert [(e["dataset"], e["real_budget"]) for e in by_map] == [("/data/synth-a", 0), ("/data/synth-a", 40)]
    real = build_leaderboard(rows, roles=["real"])
    assert [e["real_equiv"] for e in real] == [40, 10]
    with pytest.raises(ConfigError, match="synth-"):
        build_leaderboard(rows, baseline="synth-")  # three datasets match
    with pytest.raises(ConfigError, match="sort key"):
        build_leaderboard(rows, sort="speed")


def test_cli_table_csv_and_json_match_the_store(store_url, tmp_path, capsys):
    store_rows = {(r["dataset"], r["real_budget"]): r for r in open_store(store_url).rows()}
    assert main(["leaderboard", "--format", "json", "--out", str(tmp_path / "board.json"),
                 "--xcom-file", str(tmp_path / "x")]) == 0
    entries = json.loads((tmp_path / "board.json").read_text())
    assert {(e["dataset"], e["real_budget"]) for e in entries} == set(store_rows)
    for e in entries:
        row = store_rows[(e["dataset"], e["real_budget"])]
        assert (e["mAP"], e["mAP50"], e["mAR100"]) == (row["map"], row["map50"], row["mar100"])
        assert e["link"] == row["result_uri"] and e["protocol"] == row["protocol"]
    capsys.readouterr()
    assert main(["leaderboard", "--role", "synthetic", "--budget", "0", "--baseline", "/data/synth-c",
                 "--xcom-file", str(tmp_path / "x")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:8] == ["#", "dataset", "recipe", "real", "mAP", "mAP@.5", "mAR@100", "real-equiv"]
    assert [line.split()[1] for line in lines[1:4]] == ["/data/synth-b", "/data/synth-a", "/data/synth-c"]
    assert "1.000" in lines[1] and "+1.000" in lines[1] and lines[1].split()[3] == "0"
    assert main(["leaderboard", "--format", "csv", "--sort", "mAP", "--xcom-file", str(tmp_path / "x")]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out.split("\n{")[0])))
    assert len(table) == len(store_rows) and float(table[0]["mAP"]) == 1.0
    assert main(["leaderboard", "--sort", "speed", "--xcom-file", str(tmp_path / "x")]) == 2
