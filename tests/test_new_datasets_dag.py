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
    # One Pool bounds the GPU steps of every run together (a per-task cap would allow 2 per task: 8 at once).
    import evaluate_new_synthetic_datasets as module

    assert (module.POOL, module.POOL_SLOTS) == ("synthval_training", 2)
    gpu_steps = {t.task_id for t in dag.tasks if getattr(t, "step", None) in ("train", "finetune", "evaluate")}
    assert gpu_steps == {"value_dataset.train", "value_dataset.evaluate", "sweep.finetune", "sweep.evaluate",
                         "real_curve.train", "real_curve.evaluate"}
    for task_id in gpu_steps:
        task = dag.get_task(task_id)
        assert task.pool == module.POOL and task.max_active_tis_per_dag is None, task_id
    announce = dag.get_task("announce_results")
    assert any(isinstance(o, AssetAlias) and o.name == "synthval_results" for o in announce.outlets)
    assert dag.max_active_runs == 1
    # The run fails when any task failed: a watcher downstream of every task, the only other leaf.
    watcher = dag.get_task("check_valuations")
    assert watcher.trigger_rule == "one_failed" and watcher.retries == 0
    assert upstream["check_valuations"] == {t.task_id for t in dag.tasks} - {"check_valuations"}
    assert {t.task_id for t in dag.leaves} == {"check_valuations"}


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

    from synthval.results.store import open_store

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


@pytest.mark.slow
def test_a_run_with_a_failed_valuation_ends_failed_and_keeps_what_was_valued(airflow_db, tmp_path):  # noqa: F811
    """A complete-looking dataset that cannot be trained on: its valuation fails, the run ends failed; the
    real-only curve of the same run is still published, at budgets clipped to the real split."""
    import subprocess

    from test_dags import PYTHON_BIN

    from synthval.data import load_dataset

    inbox = tmp_path / "inbox"
    (inbox / "broken" / "Dataset").mkdir(parents=True)
    (inbox / "broken" / "Dataset" / "captures_000.json").write_text('{"captures": "not a list"}')
    (inbox / "broken" / "_SUCCESS").write_text("{}")
    db_url = f"sqlite:///{tmp_path / 'results.db'}"
    env = dict(airflow_db, SYNTHVAL_DATA_ROOT=str(tmp_path / "data"), SYNTHVAL_RESULTS_DB_URL=db_url,
               OMP_NUM_THREADS="1")
    conf = {**TINY, "real_budgets": [8, 1000], "watch_root": str(inbox),
            "real_dataset": "generate://real-proxy?num_images=40&image_size=96&seed=1"}
    proc = subprocess.run([str(PYTHON_BIN / "airflow"), "dags", "test", DAG_ID, "--conf", json.dumps(conf)],
                          capture_output=True, text=True, env=env, timeout=1200)
    log = proc.stdout + proc.stderr
    assert re.search(rf"DagRun Finished: dag_id={DAG_ID}.*state=failed", log), log[-8000:]
    assert re.search(r"check_valuations.*(FAILED|state=failed)", log, re.I | re.S), log[-8000:]
    assert "param real_budgets: 1000 larger than" in log

    from synthval.results.store import open_store

    rows = open_store(db_url).rows()
    assert [r["dataset"] for r in rows if r["dataset_role"] != "real"] == []  # the broken dataset: no result
    (real_folder,) = (tmp_path / "data" / DAG_ID / "real").iterdir()
    train_images = len(load_dataset(str(real_folder), split="train"))
    assert sorted(r["real_budget"] for r in rows if r["dataset_role"] == "real") == [8, train_images]


@pytest.mark.slow
def test_the_compose_stack_creates_the_pool_of_the_documented_size(airflow_db):  # noqa: F811
    """The pool command of docker-compose.yaml's airflow-init, run against a real Airflow database."""
    import shlex
    import subprocess

    import yaml
    from test_dags import PYTHON_BIN, ROOT

    import evaluate_new_synthetic_datasets as module

    command = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())["services"]["airflow-init"]["command"]
    pool_command = next(part.strip() for part in command[-1].split("&&") if part.strip().startswith("airflow pools"))
    argv = shlex.split(pool_command)
    assert argv[:4] == ["airflow", "pools", "set", module.POOL] and int(argv[4]) == module.POOL_SLOTS
    airflow = str(PYTHON_BIN / "airflow")
    subprocess.run([airflow, *argv[1:]], env=airflow_db, capture_output=True, text=True, timeout=300, check=True)
    got = subprocess.run([airflow, "pools", "get", module.POOL, "-o", "json"], env=airflow_db, capture_output=True,
                         text=True, timeout=300, check=True)
    (pool,) = json.loads(got.stdout[got.stdout.index("["):])
    assert int(pool["slots"]) == module.POOL_SLOTS


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
