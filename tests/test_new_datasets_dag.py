"""evaluate_new_synthetic_datasets: structure, schedule and assets; (slow) a whole run under `airflow dags test`."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest
from test_dags import airflow_db, dags_test  # noqa: F401 - airflow_db: the session's migrated throwaway Airflow DB

from synthval.cli import main

DAG_ID = "evaluate_new_synthetic_datasets"


def load_dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(Path(__file__).resolve().parent.parent / "dags" / f"{DAG_ID}.py"))
    assert not bag.import_errors, bag.import_errors
    return bag.dags[DAG_ID]


def test_schedule_assets_mapping_and_bounded_concurrency():
    from airflow.sdk import AssetAlias, AssetOrTimeSchedule

    dag = load_dag()
    # Cron (hourly by default) or an announcing Asset event, whichever comes first.
    assert isinstance(dag.timetable, AssetOrTimeSchedule)
    assert dag.timetable.timetable.expression == "0 * * * *"
    assert [a.uri for a in dag.timetable.asset_condition.objects] == ["x-synthval://synthetic-datasets/announced"]
    upstream = {t.task_id: set(t.upstream_task_ids) for t in dag.tasks}
    assert upstream["discover"] == {"fetch_real"}
    assert upstream["value_dataset.train"] == {"plan_datasets"}
    assert "value_dataset.evaluate" in upstream["value_dataset.publish"]
    assert {"value_dataset.publish", "sweep.publish", "real_curve.publish"} <= upstream["leaderboard"]
    for task_id in ("value_dataset.train", "sweep.finetune", "real_curve.train", "value_dataset.evaluate"):
        assert dag.get_task(task_id).max_active_tis_per_dag == 2
    announce = dag.get_task("announce_results")
    assert any(isinstance(o, AssetAlias) and o.name == "synthval_results" for o in announce.outlets)
    assert dag.max_active_runs == 1


TINY = {
    "real_budgets": [8],
    "preset": "cpu-demo",
    "batch_size": 4,
    "overrides": ["max_steps=2", "model.min_size=96", "model.max_size=96"],
}


def _asset_events(db: Path) -> list[dict]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT a.uri, e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id").fetchall()
    return [{"uri": uri, "extra": json.loads(extra) if isinstance(extra, str) else extra} for uri, extra in rows]


@pytest.mark.slow
def test_a_run_values_both_new_datasets_and_the_leaderboard_lists_them(airflow_db, tmp_path):  # noqa: F811
    inbox = tmp_path / "inbox"
    for seed in (3, 4):
        assert main(["generate", "--kind", "synthetic", "--out", str(inbox / f"synth-{seed}"), "--num-images", "16",
                     "--image-size", "96", "--seed", str(seed), "--xcom-file", str(tmp_path / "g.json")]) == 0
    (inbox / "still-rendering" / "Dataset").mkdir(parents=True)  # no _SUCCESS yet
    db_url = f"sqlite:///{tmp_path / 'results.db'}"
    env = dict(airflow_db, SYNTHVAL_DATA_ROOT=str(tmp_path / "data"), SYNTHVAL_RESULTS_DB_URL=db_url,
               OMP_NUM_THREADS="1")
    conf = {**TINY, "watch_root": str(inbox), "real_dataset": "generate://real-proxy?num_images=40&image_size=96&seed=1"}
    log, elapsed = dags_test(env, DAG_ID, conf)
    print(f"dags test {DAG_ID}: {elapsed:.1f} s")

    from synthval.results import open_store

    rows = open_store(db_url).rows()
    synthetic = {r["dataset"]: r for r in rows if r["dataset_role"] == "synthetic"}
    assert set(synthetic) == {str(inbox / "synth-3"), str(inbox / "synth-4")}
    assert all(r["real_budget"] == 0 and 0 <= r["map"] <= 1 for r in synthetic.values())
    assert [r["real_budget"] for r in rows if r["dataset_role"] == "real"] == [8]  # the real-only curve

    out = tmp_path / "board.json"
    assert main(["leaderboard", "--db", db_url, "--role", "synthetic", "--format", "json", "--out", str(out),
                 "--xcom-file", str(tmp_path / "l.json")]) == 0
    board = json.loads(out.read_text())
    assert {e["dataset"] for e in board} == set(synthetic)
    for entry in board:
        assert entry["mAP"] is not None and entry["mAP50"] is not None and entry["mAR100"] is not None
        assert entry["real_equiv"] is not None or entry.get("real_equiv_beyond_curve")
        assert entry["tensorboard"] and Path(entry["tensorboard"]).is_dir()

    events = [e for e in _asset_events(Path(airflow_db["AIRFLOW_HOME"]) / "airflow.db")
              if e["uri"].startswith("x-synthval://results/") and e["extra"].get("dataset_uri") in synthetic]
    assert {e["extra"]["dataset_uri"] for e in events} == set(synthetic)
    for event in events:
        assert event["extra"]["mAP"] == synthetic[event["extra"]["dataset_uri"]]["map"]

    # A run announcing one of them with the budget sweep on: valued again at budget 0 (its row updated,
    # not doubled) and fine-tuned on 8 real images; the real-only curve is reused, not retrained.
    announce = {**conf, "watch_root": None, "datasets": [str(inbox / "synth-3")], "budget_sweep": True}
    log, _ = dags_test(env, DAG_ID, announce)
    after = open_store(db_url).rows()
    first_real = {r["real_budget"]: r["run_id"] for r in rows if r["dataset_role"] == "real"}
    assert {r["real_budget"]: r["run_id"] for r in after if r["dataset_role"] == "real"} == first_real
    assert len(after) == len(rows) + 1
    synth3 = {r["real_budget"]: r for r in after if r["dataset"] == str(inbox / "synth-3")}
    assert sorted(synth3) == [0, 8] and synth3[0]["run_id"] != synthetic[str(inbox / "synth-3")]["run_id"]
    assert re.search(r"Running: synthval finetune .*--max-images=8 --init-checkpoint=\S+checkpoint-\S+\.pt", log)


def test_announcing_asset_events_and_the_datasets_param_become_discover_flags():
    """What the task runner puts in a triggered run's context, built from the same API models."""
    import datetime

    from airflow.sdk.execution_time.comms import AssetEventDagRunReferenceResult
    from airflow.sdk.execution_time.context import TriggeringAssetEventsAccessor

    import evaluate_new_synthetic_datasets as module

    def event(extra: dict) -> AssetEventDagRunReferenceResult:
        return AssetEventDagRunReferenceResult(
            asset={"name": module.ANNOUNCED.name, "uri": module.ANNOUNCED.uri, "extra": {}}, extra=extra,
            source_task_id=None, source_dag_id=None, source_run_id=None, source_map_index=None, source_aliases=[],
            timestamp=datetime.datetime.now(datetime.timezone.utc))

    events = TriggeringAssetEventsAccessor.build([
        event({"dataset_uri": "gs://bucket/inbox/run-42"}),
        event({"dataset_uris": ["gs://bucket/inbox/run-43", "gs://bucket/inbox/run-42"]}),
        event({"unrelated": True}),
    ])
    context = {"params": {"datasets": ["/data/given"]}, "triggering_asset_events": events}
    assert module.announced_flags(context) == [
        "--dataset=/data/given", "--dataset=gs://bucket/inbox/run-42", "--dataset=gs://bucket/inbox/run-43"]
    assert module.announced_flags({"params": {"datasets": []}}) == []
