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
from synthval.results.leaderboard import CSV_COLUMNS, build_leaderboard, real_only_curves, to_csv
from synthval.scoring.equivalent import real_image_equivalent
from synthval.results.store import open_store

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
    # Each published result is a model of its own: one that finds one of the two labelled classes (mAP 0.5),
    # both (mAP 1.0) or nothing (mAP 0).
    half, full, none = (1,), (1, 2), ()
    results = tmp_path / "results"
    published = [
        (half, "/data/synth-a", 0), (full, "/data/synth-a", 40), (full, "/data/synth-b", 0), (none, "/data/synth-c", 0),
    ]
    for i, (labels, dataset, budget) in enumerate(published):
        metrics = evaluate(tmp_path, f"model-{i}", keep_labels=labels)
        assert main([*publish_args(metrics, results, dataset, budget=budget), "--xcom-file", str(tmp_path / "x")]) == 0
    for labels, budget in ((half, 10), (full, 40)):
        metrics = evaluate(tmp_path, f"real-only-{budget}", keep_labels=labels)
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
    assert main(["leaderboard", "--format", "json", "--xcom-file", str(tmp_path / "x")]) == 0
    assert json.loads(capsys.readouterr().out) == entries  # stdout is the document, nothing after it
    assert main(["leaderboard", "--role", "synthetic", "--budget", "0", "--baseline", "/data/synth-c",
                 "--xcom-file", str(tmp_path / "x")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:8] == ["#", "dataset", "recipe", "real", "mAP", "mAP@.5", "mAR@100", "real-equiv"]
    assert [line.split()[1] for line in lines[1:4]] == ["/data/synth-b", "/data/synth-a", "/data/synth-c"]
    assert "1.000" in lines[1] and "+1.000" in lines[1] and lines[1].split()[3] == "0"
    assert main(["leaderboard", "--format", "csv", "--sort", "mAP", "--xcom-file", str(tmp_path / "x")]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(table) == len(store_rows) and float(table[0]["mAP"]) == 1.0
    assert all(set(row) == set(CSV_COLUMNS) and None not in row.values() for row in table)
    assert main(["leaderboard", "--sort", "speed", "--xcom-file", str(tmp_path / "x")]) == 2
    assert main(["leaderboard", "--role", "synthetic-ish", "--xcom-file", str(tmp_path / "x")]) == 2
    assert "role 'synthetic-ish'" in capsys.readouterr().err


HOSTILE = "gs://inbox/\x1b]0;pwned\x07\x1b[2Jrun-1"


def test_hostile_names_reach_no_terminal_and_no_spreadsheet_formula(tmp_path, capsys, monkeypatch):
    """A folder name under a watched root, a recipe or run id is anyone's text: shown, never run."""
    url = f"sqlite:///{tmp_path / 'results.db'}"
    monkeypatch.setenv("SYNTHVAL_RESULTS_DB_URL", url)
    for i, (recipe, run_id) in enumerate((("=HYPERLINK(\"http://evil\")", "-3"), ("+cmd", "@SUM(A1)"))):
        metrics = evaluate(tmp_path, f"m{i}", keep_labels=(1,))
        args = publish_args(metrics, tmp_path / "results", f"{HOSTILE}{i}", run_id=run_id, recipe=recipe)
        assert main([*args, "--xcom-file", str(tmp_path / "x")]) == 0
    assert f"{HOSTILE}0" in {r["dataset"] for r in open_store(url).rows()}  # the store keeps what was published
    capsys.readouterr()
    assert main(["leaderboard", "--xcom-file", str(tmp_path / "x")]) == 0
    table = capsys.readouterr().out
    assert "\x1b" not in table and "\x07" not in table
    assert "gs://inbox/\\x1b]0;pwned\\x07\\x1b[2Jrun-10" in table
    assert main(["leaderboard", "--format", "csv", "--xcom-file", str(tmp_path / "x")]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out
    rows = list(csv.DictReader(io.StringIO(out)))
    assert {r["dataset"] for r in rows} == {f"gs://inbox/\\x1b]0;pwned\\x07\\x1b[2Jrun-1{i}" for i in (0, 1)}
    assert {r["recipe"] for r in rows} == {"'=HYPERLINK(\"http://evil\")", "'+cmd"}
    assert {r["run_id"] for r in rows} == {"'-3", "'@SUM(A1)"}
    assert main(["leaderboard", "--format", "json", "--xcom-file", str(tmp_path / "x")]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and f"{HOSTILE}0" in {e["dataset"] for e in json.loads(out)}  # escaped, kept


def test_negative_numbers_stay_numbers_in_csv():
    entry = {k: None for k in CSV_COLUMNS}
    entry.update(dataset="d", delta_mAP=-0.25, real_budget=0, stale=False)
    (row,) = csv.DictReader(io.StringIO(to_csv([entry])))
    assert row["delta_mAP"] == "-0.25" and row["dataset"] == "d"


def test_equivalents_are_those_of_the_replicate_by_replicate_bootstrap():
    """The bootstrap of synthval 0.1.0, one replicate at a time (np.interp per replicate), as reference."""
    import numpy as np

    def reference(curve, target_map, target_sigma, replicates=2000, seed=0):
        x = np.log1p(np.array([p["budget"] for p in curve], dtype=float))
        means = np.maximum.accumulate(np.array([p["mAP"] for p in curve], dtype=float))
        sigmas = np.array([p["sigma"] for p in curve], dtype=float)

        def one(curve_map, target):
            if target <= curve_map[0]:
                return math.expm1(x[0])
            if target > curve_map[-1]:
                return math.inf
            return math.expm1(np.interp(target, curve_map + np.arange(len(curve_map)) * 1e-12, x))

        rng = np.random.default_rng(seed)
        draws = np.maximum.accumulate(means + sigmas * rng.standard_normal((replicates, len(curve))), axis=1)
        targets = target_map + target_sigma * rng.standard_normal(replicates)
        values = np.array([one(draws[i], targets[i]) for i in range(replicates)])
        low, high = np.quantile(values, [0.025, 0.975], method="lower")
        return one(means, target_map), low, high

    flat = [{**p, "mAP": min(p["mAP"], 0.35)} for p in CURVE]  # a flat stretch, as real curves have
    for curve in (CURVE, flat):
        for target, sigma in ((0.0, 0.0), (0.1, 0.02), (0.2, 0.0), (0.3, 0.05), (0.35, 0.01), (0.41, 0.02), (0.6, 0.1)):
            got = real_image_equivalent(curve, target, sigma)
            assert (got["value"], got["low"], got["high"]) == pytest.approx(reference(curve, target, sigma), rel=1e-12)


def test_a_batch_of_equivalents_is_each_result_alone():
    from synthval.scoring.equivalent import real_image_equivalents

    maps, sigmas = [0.0, 0.1, 0.2, 0.3, 0.35, 0.39, 0.45], [0.0, 0.01, 0.02, 0.0, 0.05, 0.01, 0.02]
    batch = real_image_equivalents(CURVE, maps * 100, sigmas * 100)  # several chunks of 256
    assert len(batch) == 700
    for i, (m, s) in enumerate(zip(maps * 100, sigmas * 100, strict=True)):
        if i % 97 == 0 or i < 7:
            assert batch[i] == real_image_equivalent(CURVE, m, s), i
