"""Which model a result is of: real checkpoints evaluated by `synthval evaluate`, published by `synthval
publish` into a real store; roles from what each model was trained on; published names kept as names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_dags import airflow_db  # noqa: F401 - the session's migrated throwaway Airflow DB
from test_publish import write_coco

from synthval.cli import main
from synthval.io.sources import is_named_source
from synthval.results.identity import model_role, normalize_uri
from synthval.results.leaderboard import real_only_curves
from synthval.results.store import open_store


def write_checkpoint(path: Path, seed: int) -> str:
    """A synthval checkpoint of the cpu-demo `tiny` detector with random weights drawn from `seed`."""
    import torch

    from synthval import __version__
    from synthval.detection.checkpoint import FORMAT, FORMAT_VERSION, save_checkpoint
    from synthval.config import TrainConfig, load_config, to_dict
    from synthval.detection.model import build_model

    config = load_config(TrainConfig, preset="cpu-demo", overrides=[f"seed={seed}"])
    torch.manual_seed(seed)
    model = build_model(config.model, num_classes=4, load_backbone_weights=False)
    save_checkpoint(str(path), {"format": FORMAT, "format_version": FORMAT_VERSION, "synthval_version": __version__,
                                "model": model.state_dict(), "config": to_dict(config),
                                "label_names": ["soup", "tea", "rice"], "step": 10, "epoch": 1})
    return str(path)


def evaluate_checkpoint(tmp_path: Path, checkpoint: str, name: str) -> str:
    data = tmp_path / "real"
    if not data.exists():
        write_coco(data)
    out = tmp_path / "eval" / name
    assert main(["evaluate", "--checkpoint", checkpoint, "--data", str(data), "--split", "all", "--out", str(out),
                 "--set", "num_workers=0", "--xcom-file", str(tmp_path / "e.json")]) == 0
    return str(out / "metrics.json")


def publish(tmp_path: Path, metrics: str, recipe: str, run_id: str, *flags: str) -> dict:
    xcom = tmp_path / "p.json"
    assert main(["publish", "--metrics", metrics, "--results", str(tmp_path / "results"), "--recipe", recipe,
                 "--run-id", run_id, "--no-report", *flags, "--xcom-file", str(xcom)]) == 0
    return json.loads(xcom.read_text())


@pytest.fixture
def store(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'results.db'}"
    monkeypatch.setenv("SYNTHVAL_RESULTS_DB_URL", url)
    return open_store(url)


def test_two_checkpoints_on_one_test_set_are_two_rows_and_a_retry_is_none(tmp_path, store):
    """evaluate_the_model twice, on two checkpoints: two records and two rows (schema 1 kept one)."""
    first = evaluate_checkpoint(tmp_path, write_checkpoint(tmp_path / "a.pt", seed=1), "a")
    second = evaluate_checkpoint(tmp_path, write_checkpoint(tmp_path / "b.pt", seed=2), "b")
    real = ("--dataset", "real=/data/real")
    a = publish(tmp_path, first, "evaluate_the_model", "manual__1", "--checkpoint", str(tmp_path / "a.pt"), *real)
    b = publish(tmp_path, second, "evaluate_the_model", "manual__2", "--checkpoint", str(tmp_path / "b.pt"), *real)
    assert a["model_id"] != b["model_id"] and a["role"] == b["role"] == "model"
    rows = {r["dataset"]: r for r in store.rows()}
    assert set(rows) == {str(tmp_path / "a.pt"), str(tmp_path / "b.pt")}
    assert rows[str(tmp_path / "a.pt")]["record"]["model"]["basis"] == "checkpoint-sha256"
    # The same checkpoint evaluated again into another folder (a cleared run): its row, updated.
    again = evaluate_checkpoint(tmp_path, str(tmp_path / "a.pt"), "a-again")
    assert publish(tmp_path, again, "evaluate_the_model", "manual__3", *real)["model_id"] == a["model_id"]
    assert store.count() == 2
    assert {r["run_id"] for r in store.rows()} == {"manual__2", "manual__3"}
    # The same weights saved again (atomically, through another temporary name, as a deterministic
    # re-training writes them) or copied elsewhere: the same model.
    resaved = write_checkpoint(tmp_path / "resaved.pt", seed=1)
    assert (tmp_path / "resaved.pt").read_bytes() != (tmp_path / "a.pt").read_bytes()
    assert publish(tmp_path, evaluate_checkpoint(tmp_path, resaved, "resaved"), "evaluate_the_model", "manual__4",
                   *real)["model_id"] == a["model_id"]
    assert store.count() == 2
    # One changed weight is another model.
    import torch

    state = torch.load(tmp_path / "a.pt", weights_only=False)
    next(iter(state["model"].values())).view(-1)[0] += 1e-3
    torch.save(state, tmp_path / "changed.pt")
    changed = publish(tmp_path, evaluate_checkpoint(tmp_path, str(tmp_path / "changed.pt"), "changed"),
                      "evaluate_the_model", "manual__5", *real)
    assert changed["model_id"] not in (a["model_id"], b["model_id"]) and store.count() == 3


@pytest.mark.parametrize("flags, budget, role, dataset", [
    (["synthetic=gs://b/synth/", "real=groceries-real"], "0", "synthetic", "gs://b/synth"),
    (["synthetic=gcs://b/synth", "real=groceries-real"], "76", "synthetic+real", "gs://b/synth"),
    (["real=groceries-real"], "380", "real", "groceries-real"),
    (["model=synthetic-400k", "real=groceries-real"], "76", "model+real", "synthetic-400k"),
    (["model=synthetic-400k", "real=groceries-real"], None, "model", "synthetic-400k"),
    (["real=groceries-real"], None, "model", None),  # nothing said of its training: a given model
])
def test_roles_follow_what_the_model_was_trained_on(flags, budget, role, dataset):
    datasets = dict(f.split("=", 1) for f in flags)
    assert model_role(datasets, None if budget is None else int(budget)) == (role, dataset)


def test_a_fine_tune_of_a_given_model_stays_out_of_the_real_only_curve(tmp_path, store):
    """train_on_synthetic_and_real_dataset with start_from_checkpoint publishes model=<its checkpoint>."""
    metrics = {name: evaluate_checkpoint(tmp_path, write_checkpoint(tmp_path / f"{name}.pt", seed), name)
               for seed, name in enumerate(("real-only", "fine-tuned", "synthetic"))}
    publish(tmp_path, metrics["real-only"], "train_on_real_world_dataset", "r1",
            "--dataset", "real=groceries-real", "--real-budget", "76")
    publish(tmp_path, metrics["fine-tuned"], "train_on_synthetic_and_real_dataset", "r2",
            "--dataset", "model=synthetic-400k", "--dataset", "real=groceries-real", "--real-budget", "76")
    publish(tmp_path, metrics["synthetic"], "train_on_synthetic_and_real_dataset", "r3",
            "--dataset", "synthetic=synthdet-sample", "--dataset", "real=groceries-real", "--real-budget", "76")
    rows = store.rows()
    roles = {r["run_id"]: (r["dataset_role"], r["dataset"]) for r in rows}
    assert roles == {"r1": ("real", "groceries-real"), "r2": ("model+real", "synthetic-400k"),
                     "r3": ("synthetic+real", "synthdet-sample")}
    (curve,) = real_only_curves(rows).values()
    assert [(p["budget"], p["n"]) for p in curve] == [(0, 0), (76, 1)]
    assert curve[1]["mAP"] == next(r["map"] for r in rows if r["run_id"] == "r1")


def test_a_trained_model_published_again_as_a_given_model_keeps_its_role(tmp_path, store):
    metrics = evaluate_checkpoint(tmp_path, write_checkpoint(tmp_path / "m.pt", 3), "m")
    publish(tmp_path, metrics, "train_on_real_world_dataset", "r1", "--dataset", "real=/data/real",
            "--real-budget", "76")
    publish(tmp_path, metrics, "evaluate_the_model", "r2", "--dataset", "real=/data/real")
    (row,) = store.rows()
    assert (row["dataset_role"], row["real_budget"], row["recipe"]) == ("real", 76, "train_on_real_world_dataset")


def test_published_names_stay_names(tmp_path, store, monkeypatch):
    """A named model is identified by its name: nothing is downloaded, nothing becomes `<cwd>/name`."""
    monkeypatch.chdir(tmp_path)
    assert normalize_uri("synthdet-sample") == "synthdet-sample" and is_named_source("synthetic-400k")
    assert normalize_uri("./synthdet-sample") == str(tmp_path / "synthdet-sample")
    (tmp_path / "my-model").mkdir()
    assert normalize_uri("my-model") == str(tmp_path / "my-model")  # not a published name: a local path

    from synthval.config import EvalConfig
    from synthval.data import load_dataset
    from synthval.scoring.coco_eval import coco_image_ids
    from synthval.scoring.provenance import provenance

    write_coco(tmp_path / "real")
    index = load_dataset(str(tmp_path / "real"), split="all")
    facts = provenance(EvalConfig(split="all"), index, str(tmp_path / "real"), "synthetic-400k", None, "",
                       coco_image_ids(index), None)
    assert facts["checkpoint_uri"] == "synthetic-400k"
    # A metrics.json of the named model (as evaluate_the_model writes it), published under its name.
    metrics = evaluate_checkpoint(tmp_path, write_checkpoint(tmp_path / "x.pt", 4), "x")
    doc = json.loads(Path(metrics).read_text())
    doc["checkpoint_uri"] = "synthetic-400k"
    Path(metrics).write_text(json.dumps(doc))
    result = publish(tmp_path, metrics, "evaluate_the_model", "r1", "--checkpoint", "synthetic-400k",
                     "--dataset", "model=synthetic-400k", "--dataset", "real=groceries-real")
    (row,) = store.rows()
    assert (row["dataset"], row["dataset_role"]) == ("synthetic-400k", "model")
    assert row["record"]["model"]["basis"] == "name" and row["model_id"] == result["model_id"]
    assert row["record"]["datasets"] == {"model": "synthetic-400k", "real": "groceries-real"}


@pytest.mark.slow
def test_two_dag_runs_of_a_recipe_share_a_protocol_and_both_stay_current(airflow_db, tmp_path):  # noqa: F811
    """train_on_real_world_dataset run twice under `airflow dags test` (two seeds: two models): each run
    fetches the real set into its own folder; one protocol, two rows, neither stale. (A run that trains the
    same model again updates its row: tests/test_new_datasets_dag.py re-values a dataset.)"""
    import re

    from test_dags import TINY_CONF, dags_test

    db_url = f"sqlite:///{tmp_path / 'results.db'}"
    env = dict(airflow_db, SYNTHVAL_DATA_ROOT=str(tmp_path / "data"), SYNTHVAL_RESULTS_DB_URL=db_url,
               OMP_NUM_THREADS="1")
    conf = {k: v for k, v in TINY_CONF.items() if k != "synthetic_dataset"}
    run_ids = []
    for seed in (1, 2):
        log, _ = dags_test(env, "train_on_real_world_dataset", {**conf, "overrides": [*conf["overrides"], f"seed={seed}"]})
        run_ids.append(re.search(r"DagRun Finished: dag_id=train_on_real_world_dataset.*?run_id=([^,\s]+)", log).group(1))
    rows = open_store(db_url).rows()
    assert len(rows) == 2
    assert len({r["protocol"] for r in rows}) == 1 and not any(r["stale"] for r in rows)
    assert {r["dataset_role"] for r in rows} == {"real"} and {r["seed"] for r in rows} == {1, 2}
    assert {r["seed"]: r["run_id"] for r in rows} == {1: run_ids[0], 2: run_ids[1]}
    # Each run scored its own fetched copy of the test set.
    folders = {r["record"]["test_set"]["data_uri"] for r in rows}
    assert len(folders) == 2
