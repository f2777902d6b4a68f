"""Discovery: complete, not-yet-valued datasets under a watched root, locally and on gs:// (storage emulator)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_results import evaluate, publish_args

from synthval.io import storage
from synthval.cli import main

RECIPE = "evaluate_new_synthetic_datasets"


def discover(tmp_path: Path, *extra: str) -> dict:
    xcom = tmp_path / "discover.json"
    assert main(["discover", "--recipe", RECIPE, "--test-data", str(tmp_path / "real"), "--split", "all",
                 "--real-dataset", "/data/real", "--xcom-file", str(xcom), *extra]) == 0
    return json.loads(xcom.read_text())


def value(tmp_path: Path, dataset: str, budget: int = 0) -> None:
    """Publish a result for `dataset` as the DAG would after training a model on it and evaluating it."""
    metrics = evaluate(tmp_path, f"model-of-{Path(dataset).name}-{budget}")
    assert main([*publish_args(metrics, tmp_path / "results", dataset, budget=budget),
                 "--xcom-file", str(tmp_path / "p")]) == 0


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("SYNTHVAL_RESULTS_DB_URL", f"sqlite:///{tmp_path / 'results.db'}")
    return evaluate(tmp_path, "seen")  # also writes the COCO test set at tmp_path/real


def test_local_root_picks_exactly_the_new_complete_datasets(tmp_path, store):
    root = tmp_path / "inbox"
    # A dataset as `synthval generate` writes it: _SUCCESS last.
    assert main(["generate", "--kind", "synthetic", "--out", str(root / "generated"), "--num-images", "2",
                 "--image-size", "64", "--xcom-file", str(tmp_path / "g")]) == 0
    for name, complete in (("fresh", True), ("half-written", False), ("valued", True)):
        (root / name / "Dataset").mkdir(parents=True)
        (root / name / "Dataset" / "captures_000.json").write_text("{}")
        if complete:
            (root / name / "_SUCCESS").write_text("{}")
    (root / ".generated.tmp-x1").mkdir()  # the generator's staging folder
    (root / ".generated.tmp-x1" / "_SUCCESS").write_text("{}")
    (root / "_logs").mkdir()
    value(tmp_path, str(root / "valued"))

    found = discover(tmp_path, "--root", str(root))
    assert found["new_datasets"] == [str(root / "fresh"), str(root / "generated")]
    assert found["incomplete"] == [str(root / "half-written")]
    assert found["already_evaluated"] == [str(root / "valued")]
    assert found["missing_real_budgets"] == []
    # The benchmark discover computes before anything is trained is the one publish recorded.
    record = json.loads(next((tmp_path / "results").glob("*.json")).read_text())
    assert found["benchmark"] == record["benchmark_fingerprint"]

    # Valuing one, finishing another, announcing one outside the root (and a half-written one).
    value(tmp_path, str(root / "fresh"))
    (root / "half-written" / "_SUCCESS").write_text("{}")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "announced").mkdir(parents=True)
    (elsewhere / "announced" / "_SUCCESS").write_text("{}")
    (elsewhere / "announced-early").mkdir()
    found = discover(tmp_path, "--root", str(root), "--dataset", str(elsewhere / "announced") + "/",
                     "--dataset", str(elsewhere / "announced-early"), "--real-budget", "10",
                     "--real-budget", "40", "--limit", "2")
    assert found["new_datasets"] == [str(elsewhere / "announced"), str(root / "generated")]  # limit 2 of 3
    assert found["incomplete"] == [str(elsewhere / "announced-early")]
    assert found["missing_real_budgets"] == [10, 40]


def test_a_custom_marker_and_a_changed_protocol(tmp_path, store):
    root = tmp_path / "inbox"
    for name, last_file in (("done", "metrics_000.json"), ("running", None)):
        (root / name / "Dataset").mkdir(parents=True)
        if last_file:
            (root / name / "Dataset" / last_file).write_text("[]")
    value(tmp_path, str(root / "done"))
    marker = ["--marker", "Dataset/metrics_*.json"]
    assert discover(tmp_path, "--root", str(root), *marker)["new_datasets"] == []
    # Another test split is another benchmark: the valued dataset is new again.
    xcom = tmp_path / "d.json"
    assert main(["discover", "--recipe", RECIPE, "--test-data", str(tmp_path / "real"), "--split", "train",
                 "--real-dataset", "/data/real", "--root", str(root), *marker, "--xcom-file", str(xcom)]) == 0
    assert json.loads(xcom.read_text())["new_datasets"] == [str(root / "done")]
    from synthval.results.store import open_store

    store_rows = open_store(f"sqlite:///{tmp_path / 'results.db'}").rows()
    assert [r["stale"] for r in store_rows] == [True]  # kept, marked stale
    # Back to the first benchmark: its results are current again, nothing to value.
    assert discover(tmp_path, "--root", str(root), *marker)["new_datasets"] == []
    assert [r["stale"] for r in open_store(f"sqlite:///{tmp_path / 'results.db'}").rows()] == [False]
    assert main(["discover", "--recipe", RECIPE, "--test-data", str(tmp_path / "real"), "--real-dataset", "r",
                 "--root", str(root), "--marker", "../escape", "--xcom-file", str(xcom)]) == 2
    assert main(["discover", "--recipe", RECIPE, "--test-data", str(tmp_path / "real"), "--real-dataset", "r",
                 "--root", str(tmp_path / "missing"), "--xcom-file", str(xcom)]) == 2


def test_gcs_root_on_the_storage_emulator(tmp_path, store, gcs_emulator):
    root = gcs_emulator.uri("inbox")
    for name, complete in (("fresh", True), ("half-written", False), ("valued", True)):
        storage.write_text(f"{root}/{name}/Dataset/captures_000.json", "{}")
        if complete:
            storage.write_text(f"{root}/{name}/_SUCCESS", "{}")
    storage.write_text(f"{root}/loose-file.json", "{}")  # an object, not a dataset prefix
    value(tmp_path, f"{root}/valued")
    found = discover(tmp_path, "--root", root + "/")
    assert found["new_datasets"] == [f"{root}/fresh"]
    assert found["incomplete"] == [f"{root}/half-written"]
    assert found["already_evaluated"] == [f"{root}/valued"]


def test_real_budgets_beyond_the_real_split_are_clipped_with_a_warning(tmp_path, store, caplog):
    """Budgets (76, 380, 760) larger than the real training split would fail every run: clipped to it."""
    (tmp_path / "inbox" / "a").mkdir(parents=True)
    (tmp_path / "inbox" / "a" / "_SUCCESS").write_text("{}")
    flags = [f for b in (1, 2, 76, 380) for f in ("--real-budget", str(b))]
    found = discover(tmp_path, "--root", str(tmp_path / "inbox"), *flags, "--budget", "0", "--budget", "380",
                     "--real-split", "all")
    assert found["real_budgets"] == [1, 2, 3] and found["missing_real_budgets"] == [1, 2, 3]
    warning = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("param real_budgets"))
    assert "76, 380" in warning and "3 images" in warning and "'all'" in warning
    # Valued at every clipped budget: nothing left to value.
    for budget in (0, 3):
        value(tmp_path, str(tmp_path / "inbox" / "a"), budget)
    found = discover(tmp_path, "--root", str(tmp_path / "inbox"), *flags, "--budget", "0", "--budget", "380",
                     "--real-split", "all")
    assert found["new_datasets"] == [] and found["already_evaluated"] == [str(tmp_path / "inbox" / "a")]
    # Without --real-split the budgets are taken as given.
    assert discover(tmp_path, "--root", str(tmp_path / "inbox"), *flags)["real_budgets"] == [1, 2, 76, 380]


def test_a_test_set_on_gcs_is_the_same_benchmark_as_its_local_copy(tmp_path, store, gcs_emulator):
    """On a pod backend the fetched test set is a gs:// URI: discover reads it there, and since the
    benchmark is of content, it matches results evaluated on a local copy."""
    (tmp_path / "inbox" / "a").mkdir(parents=True)
    (tmp_path / "inbox" / "a" / "_SUCCESS").write_text("{}")
    value(tmp_path, str(tmp_path / "inbox" / "a"))
    real = gcs_emulator.uri("runs/run-1/data/real")
    storage.copy_tree(str(tmp_path / "real"), real)
    xcom = tmp_path / "gcs.json"
    assert main(["discover", "--recipe", RECIPE, "--test-data", real, "--split", "all", "--real-dataset", "/data/real",
                 "--root", str(tmp_path / "inbox"), "--real-budget", "40", "--real-split", "all",
                 "--xcom-file", str(xcom)]) == 0
    found = json.loads(xcom.read_text())
    record = json.loads(next((tmp_path / "results").glob("*.json")).read_text())
    assert found["benchmark"] == record["benchmark_fingerprint"]
    assert found["already_evaluated"] == [str(tmp_path / "inbox" / "a")] and found["real_budgets"] == [3]
