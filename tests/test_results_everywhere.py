"""The results store everywhere: every pod that publishes, discovers or reads the leaderboard gets its URL
from a Kubernetes Secret (never a literal), the deployments set it, a pod backend without it refuses to
parse; and every recipe's publish step tells publish what its model was trained on.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_dags import DAGS, REQUIRED_CONF, ROOT, UPSTREAM_XCOMS, parse_dag_folder, render
from test_pods import CLUSTER_SETTINGS, GKE_SETTINGS

from synthval.cli import get_parser
from synthval.results.identity import model_role

STORE_STEPS = {"publish", "discover", "leaderboard"}
SECRET_REF = {"secretKeyRef": {"name": "synthval-results-db", "key": "url"}}


def _resolved(value: Any) -> Any:
    """A template field of a task in a mapped task group, its mapped arguments (known only once the group
    is expanded at run time) replaced by placeholders."""
    from airflow.sdk.definitions._internal.expandinput import MappedArgument

    from synthval_argv import Argv, Flag

    if isinstance(value, MappedArgument):
        return "gs://mapped-placeholder/value"
    if isinstance(value, Argv):
        return Argv([_resolved(item) for item in value.items])
    if isinstance(value, Flag):
        return Flag(value.flag, _resolved(value.value))
    if isinstance(value, (list, tuple)):
        return type(value)(_resolved(v) for v in value)
    return value


class AnyUpstream(dict):
    """The XCom of any upstream step (mapped ones included), as the recipe steps push them."""

    def get(self, task_id: Any, default: Any = None) -> Any:
        return {"checkpoint_uri": f"gs://xcom/{task_id}/checkpoint-000010.pt", "metrics_uri": f"gs://xcom/{task_id}/m.json",
                "dataset_uri": f"gs://xcom/{task_id}/data", "num_train_images": 76}


def build_pod(dag: Any, task: Any, conf: dict[str, Any]) -> dict[str, Any]:
    """The pod of `task` for a run with `conf`, as the Kubernetes API would receive it."""
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
    from kubernetes.client import ApiClient

    task = render(dag, task, conf, AnyUpstream())
    operator = task.pod_operator()
    if type(operator).__name__ == "SynthvalGKEPodOperator":
        operator.__dict__["hook"] = KubernetesHook(conn_id=None)  # asks GKE for the endpoint; the pod needs none
    return ApiClient().sanitize_for_serialization(task.build_pod_request_obj(task.test_context, dry_run=True))


@pytest.mark.parametrize("backend", ["kubernetes", "gke"])
def test_every_store_pod_gets_the_url_from_the_secret_and_no_other_pod_does(backend, monkeypatch):
    settings = GKE_SETTINGS if backend == "gke" else CLUSTER_SETTINGS
    bag = parse_dag_folder(monkeypatch, backend, **settings)
    assert bag.import_errors == {}
    for name, value in settings.items():
        monkeypatch.setenv(f"SYNTHVAL_{name.upper()}", value)
    monkeypatch.setenv("SYNTHVAL_BACKEND", backend)
    monkeypatch.setenv("SYNTHVAL_RESULTS_DB_URL", "postgresql+psycopg://synthval:LITERAL-pw@db/results")
    seen = set()
    for dag_id, dag in sorted(bag.dags.items()):
        conf = {k: v for k, v in REQUIRED_CONF.get(dag_id, {}).items() if k in dag.params}
        for task in (t for t in dag.tasks if hasattr(t, "command")):
            if task.get_closest_mapped_task_group() is not None:
                task = copy.deepcopy(task)
                for field in task.template_fields:
                    setattr(task, field, _resolved(getattr(task, field)))
            pod = build_pod(dag, task, conf)
            env = pod["spec"]["containers"][0].get("env", [])
            store_env = [e for e in env if e["name"] == "SYNTHVAL_RESULTS_DB_URL"]
            where = f"{dag_id}.{task.task_id}"
            if task.step in STORE_STEPS:
                assert store_env == [{"name": "SYNTHVAL_RESULTS_DB_URL", "valueFrom": SECRET_REF}], where
                seen.add((dag_id, task.task_id))
            else:
                assert store_env == [], where
            assert "LITERAL-pw" not in json.dumps(pod), where  # the worker's own URL never reaches a pod
    assert {("evaluate_new_synthetic_datasets", t) for t in (
        "discover", "leaderboard", "value_dataset.publish", "sweep.publish", "real_curve.publish")} <= seen
    assert {dag_id for dag_id, task_id in seen if task_id == "publish"} == {
        "train_on_synthdet_sample", "train_on_real_world_dataset", "train_on_synthetic_and_real_dataset",
        "train_on_synthetic_dataset_unity_simulation", "evaluate_the_model"}


@pytest.mark.parametrize("backend", ["kubernetes", "gke"])
def test_a_pod_backend_without_a_store_refuses_to_parse(backend, monkeypatch):
    settings = {k: v for k, v in (GKE_SETTINGS if backend == "gke" else CLUSTER_SETTINGS).items()
                if k != "results_db_secret"}
    bag = parse_dag_folder(monkeypatch, backend, **settings)
    assert set(bag.import_errors) == {str(p) for p in DAGS.glob("*.py") if not p.name.startswith("synthval_")}
    for error in bag.import_errors.values():
        assert "SYNTHVAL_RESULTS_DB_SECRET is not set" in error and "kubectl" in error
    # The local backend needs none: its steps are processes of the worker, with its environment.
    assert parse_dag_folder(monkeypatch, "local").import_errors == {}


def test_the_deployments_set_the_store(tmp_path):
    """Helm: the task pods' Secret by name, the Airflow containers' env from it; compose: the URL of its database."""
    values = yaml.safe_load((ROOT / "deploy" / "helm" / "values.yaml").read_text())
    env = {e["name"]: e.get("value") for e in values["env"]}
    assert env["SYNTHVAL_RESULTS_DB_SECRET"] == SECRET_REF["secretKeyRef"]["name"]
    assert "SYNTHVAL_RESULTS_DB_URL" not in env  # never a literal
    assert {"envName": "SYNTHVAL_RESULTS_DB_URL", "secretName": "synthval-results-db", "secretKey": "url"} in values[
        "secret"]
    # Rendered with exactly these values, as a worker builds them: the store pods carry the reference.
    out = tmp_path / "pods.json"
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNTHVAL_", "AIRFLOW"))}
    run_env.update({k: v for k, v in env.items() if k.startswith("SYNTHVAL_")}, AIRFLOW_HOME=str(tmp_path),
                   AIRFLOW__CORE__LOAD_EXAMPLES="False")
    run_env.update({k: v.replace("${PROJECT_ID}", "p").replace("${REGION}", "r").replace("${BUCKET}", "b")
                    .replace("${SYNTHVAL_IMAGE_TAG}", "0.1.0") for k, v in run_env.items() if k.startswith("SYNTHVAL_")})
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "render_dag_pods.py"), str(out)], env=run_env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rendered = [i for items in json.loads(out.read_text()).values() for i in items if "pod" in i]
    store_pods = [i for i in rendered if i["argv"][1] in STORE_STEPS]
    assert {i["dag_id"] for i in store_pods} >= {"evaluate_the_model", "evaluate_new_synthetic_datasets"}
    for item in store_pods:
        env_list = item["pod"]["spec"]["containers"][0]["env"]
        assert {"name": "SYNTHVAL_RESULTS_DB_URL", "valueFrom": SECRET_REF} in env_list, item["task_id"]
    compose = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
    url = compose["x-airflow-common"]["environment"]["SYNTHVAL_RESULTS_DB_URL"]
    assert url.startswith("postgresql") and url.rstrip().endswith("@postgres:5432/synthval_results")


# --- what each recipe tells publish --------------------------------------------------------------------


def published_role(dag: Any, conf: dict[str, Any]) -> tuple[str, str | None]:
    argv = render(dag, dag.task_dict["publish"], conf, UPSTREAM_XCOMS).command()
    args = get_parser().parse_args(argv[1:])
    return model_role(dict(d.split("=", 1) for d in args.datasets), args.real_budget)


def test_each_recipe_publishes_the_role_of_what_it_trained(monkeypatch):
    bag = parse_dag_folder(monkeypatch, "local", data_root=str(Path("/tmp/synthval-data")))
    dags = bag.dags
    given = {"start_from_checkpoint": "synthetic-400k"}
    expected = {
        ("train_on_synthdet_sample", None): "synthetic",
        ("train_on_synthetic_dataset_unity_simulation", None): "synthetic",
        ("train_on_real_world_dataset", None): "real",
        ("train_on_synthetic_and_real_dataset", None): "synthetic+real",
        ("train_on_synthetic_and_real_dataset", "given"): "model+real",
        ("evaluate_the_model", None): "model",
    }
    for (dag_id, variant), role in expected.items():
        conf = {**REQUIRED_CONF.get(dag_id, {}), **(given if variant else {})}
        got, dataset = published_role(dags[dag_id], conf)
        assert got == role, (dag_id, variant)
        if role.startswith("model"):
            assert dataset == "synthetic-400k"  # a published name stays a name

