"""Every task of every DAG rendered as the pod the kubernetes and gke backends would create, without a
cluster: templates rendered with a run's context, `build_pod_request_obj(dry_run=True)`, serialized as
the API server receives it, and validated against the Kubernetes schema.
"""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest
from test_dags import REQUIRED_CONF, RUN_ID, UPSTREAM_XCOMS, load_dags, option, render, synthval_tasks_of

K8S_VERSION = "1.33"  # a GKE regular-channel version
IMAGE = "europe-west4-docker.pkg.dev/proj/synthval/training"
FAKE_TOKEN = "usim-FAKE-token-3f9c1e77a0"
CLUSTER_SETTINGS = {
    "data_root": "gs://bucket/synthval",
    "image": IMAGE,
    "image_tag": "0.1.0",
    "gpu_node_pool": "gpu-pool",
    "gpu_accelerator": "nvidia-l4",
    "usim_secret": "usim-access-token",
    "results_db_secret": "synthval-results-db",
}
GKE_SETTINGS = {**CLUSTER_SETTINGS, "gke_project": "proj", "gke_location": "europe-west4", "gke_cluster": "synthval"}
GPU_STEPS = {"train", "finetune", "evaluate"}


@pytest.fixture(scope="module", params=["kubernetes", "gke"])
def parsed(request):
    settings = GKE_SETTINGS if request.param == "gke" else CLUSTER_SETTINGS
    with pytest.MonkeyPatch.context() as mp:
        return request.param, load_dags(mp, request.param, **settings)


@pytest.fixture
def backend(parsed, monkeypatch):
    import synthval_settings

    # Present in the worker's environment and in a connection: neither may reach a pod spec.
    monkeypatch.setenv("USIM_ACCESS_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("AIRFLOW_CONN_USIM_DEFAULT", json.dumps({"conn_type": "generic", "password": FAKE_TOKEN}))
    yield parsed
    synthval_settings.load_settings.cache_clear()  # settings cached from this test's environment


def build_pod(dag: Any, task: Any, conf: dict[str, Any]) -> dict[str, Any]:
    """Render ``task`` for a run with ``conf``; return its pod as the Kubernetes API would receive it."""
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
    from kubernetes.client import ApiClient

    import synthval_settings

    task = render(dag, task, conf)
    synthval_settings.load_settings.cache_clear()
    operator = task.pod_operator()
    if type(operator).__name__ == "SynthvalGKEPodOperator":
        # The GKE hook asks the GKE API for the cluster endpoint; the pod itself does not depend on it.
        operator.__dict__["hook"] = KubernetesHook(conn_id=None)
    pod = task.build_pod_request_obj(task.test_context, dry_run=True)
    return ApiClient().sanitize_for_serialization(pod)


def use_settings(monkeypatch, backend: str) -> None:
    """The deployment's settings, as a worker that runs a pod task reads them."""
    import synthval_settings

    settings = GKE_SETTINGS if backend == "gke" else CLUSTER_SETTINGS
    for name, value in settings.items():
        monkeypatch.setenv(f"SYNTHVAL_{name.upper()}", value)
    monkeypatch.setenv("SYNTHVAL_BACKEND", backend)
    synthval_settings.load_settings.cache_clear()


def all_pods(dags: dict[str, Any], conf: dict[str, Any], monkeypatch, backend: str):
    use_settings(monkeypatch, backend)
    for dag_id, dag in sorted(dags.items()):
        full = {k: v for k, v in {**REQUIRED_CONF.get(dag_id, {}), **conf}.items() if k in dag.params}
        for task in synthval_tasks_of(dag):
            yield dag, task, render(dag, task, full).command(), build_pod(dag, task, full)


@pytest.mark.parametrize("gpus", [1, 2])
def test_every_task_pod_is_valid_and_shaped_for_its_step(backend, gpus, monkeypatch):
    name, dags = backend
    seen = set()
    for dag, task, argv, pod in all_pods(dags, {"gpus": gpus, "storage_gib": 200}, monkeypatch, name):
        where = f"{dag.dag_id}.{task.task_id}"
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        spec = pod["spec"]
        main, sidecar = spec["containers"]
        assert sidecar["name"] == "airflow-xcom-sidecar", where  # do_xcom_push
        assert main["image"] == f"{IMAGE}:0.1.0", where
        assert pod["metadata"]["namespace"] == "synthval" and spec["serviceAccountName"] == "synthval"
        assert spec["restartPolicy"] == "Never"
        # The image's non-root user, able to write its volumes; no privilege escalation.
        assert spec["securityContext"]["runAsUser"] == 10001 and spec["securityContext"]["fsGroup"] == 10001
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert main["securityContext"]["allowPrivilegeEscalation"] is False
        assert spec["activeDeadlineSeconds"] > 0
        # The command is the task's synthval argv, the same the local backend runs.
        step_gpus = min(gpus, 1) if task.step == "evaluate" else gpus
        if task.step in GPU_STEPS and step_gpus > 1:
            assert main["command"] == ["torchrun"], where
            assert main["args"][:5] == ["--standalone", "--nproc-per-node", str(gpus), "-m", "synthval.cli"]
            assert main["args"][5:] == argv[1:], where
        else:
            assert main["command"] + main["args"] == argv, where
        limits, requests = main["resources"]["limits"], main["resources"]["requests"]
        # Memory is limited to what was asked; CPU is not limited, so data loaders may use idle cores.
        assert requests["memory"] == limits["memory"] and "cpu" in requests and "cpu" not in limits, where
        mounts = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert mounts["scratch"] == "/scratch"
        assert {"name": "TMPDIR", "value": "/scratch"} in main["env"]
        claim = volumes["scratch"]["ephemeral"]["volumeClaimTemplate"]["spec"]
        assert claim["resources"]["requests"]["storage"] == "200Gi"
        if task.step in GPU_STEPS:
            assert limits["nvidia.com/gpu"] == str(step_gpus), where
            assert spec["nodeSelector"] == {"cloud.google.com/gke-nodepool": "gpu-pool",
                                            "cloud.google.com/gke-accelerator": "nvidia-l4"}, where
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
            assert mounts["dshm"] == "/dev/shm"
            assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
        else:
            assert "nvidia.com/gpu" not in limits, where
            assert not spec.get("nodeSelector") and not spec.get("tolerations"), where
            assert "dshm" not in volumes
        assert FAKE_TOKEN not in json.dumps(pod), where
        seen.add(task.step)
    assert seen == {"fetch", "train", "finetune", "evaluate", "publish"}


def test_pods_carry_templated_upstream_uris(backend, monkeypatch):
    name, dags = backend
    dag = dags["train_on_synthetic_and_real_dataset"]
    pods = {task.task_id: pod for d, task, _, pod in all_pods({dag.dag_id: dag}, {"gpus": 1}, monkeypatch, name)}
    args = {task_id: pod["spec"]["containers"][0]["args"] for task_id, pod in pods.items()}
    after = lambda task_id, flag: option(args[task_id], flag)  # noqa: E731
    assert after("train", "--train-data") == UPSTREAM_XCOMS["fetch_synthetic"]["dataset_uri"]
    assert after("finetune", "--init-checkpoint") == UPSTREAM_XCOMS["train"]["checkpoint_uri"]
    assert after("finetune", "--train-data") == UPSTREAM_XCOMS["fetch_real"]["dataset_uri"]
    assert after("evaluate", "--checkpoint") == UPSTREAM_XCOMS["finetune"]["checkpoint_uri"]
    assert after("evaluate_synthetic", "--checkpoint") == UPSTREAM_XCOMS["train"]["checkpoint_uri"]
    assert after("publish", "--metrics") == UPSTREAM_XCOMS["evaluate"]["metrics_uri"]
    run_root = "gs://bucket/synthval/train_on_synthetic_and_real_dataset/manual__2026-11-24T14-20-42.222917"
    assert after("train", "--checkpoint-dir") == f"{run_root}/checkpoints/train"
    assert after("train", "--resume") == "auto"
    assert after("publish", "--run-id") == RUN_ID


def test_unity_simulation_token_comes_only_from_the_secret(backend, monkeypatch):
    name, dags = backend
    dag = dags["train_on_synthetic_dataset_unity_simulation"]
    pods = {task.task_id: pod for _, task, _, pod in all_pods({dag.dag_id: dag}, {}, monkeypatch, name)}
    fetch = pods["fetch_synthetic"]["spec"]["containers"][0]
    token_env = [e for e in fetch["env"] if e["name"] == "USIM_ACCESS_TOKEN"]
    assert token_env == [{"name": "USIM_ACCESS_TOKEN",
                          "valueFrom": {"secretKeyRef": {"name": "usim-access-token", "key": "token"}}}]
    assert fetch["args"][0] == "fetch" and fetch["args"][-2:] == ["--", "usim://proj-1/yJ3kQ2x"]
    for task_id, pod in pods.items():
        assert FAKE_TOKEN not in json.dumps(pod)
        if task_id != "fetch_synthetic":  # only the step that needs it gets it
            assert "usim-access-token" not in json.dumps(pod), task_id


def test_operators_clean_up_defer_and_wait_for_a_cold_gpu_pool(backend, monkeypatch):
    name, dags = backend
    use_settings(monkeypatch, name)
    expected = "SynthvalGKEPodOperator" if name == "gke" else "SynthvalPodOperator"
    for dag in dags.values():
        for parsed in synthval_tasks_of(dag):
            assert type(parsed).__name__ == "SynthvalPodTask"
            full = {k: v for k, v in REQUIRED_CONF.get(dag.dag_id, {}).items() if k in dag.params}
            task = render(dag, parsed, full).pod_operator()
            assert type(task).__name__ == expected
            assert task.do_xcom_push and task.get_logs
            assert task.deferrable and task.logging_interval and task.poll_interval >= 10
            assert task.on_finish_action.value == "delete_pod"
            assert task.on_kill_action.value == "delete_pod"
            assert task.startup_timeout_seconds >= 1800 and task.schedule_timeout_seconds >= 1800
            assert task.execution_timeout == parsed.execution_timeout
            assert task.image_pull_policy == "IfNotPresent"
            if parsed.step in ("train", "finetune"):
                assert parsed.retries >= 2  # with --resume auto in the argv
            links = {link.name: link.xcom_key for link in parsed.operator_extra_links}
            if name == "gke":
                assert (task.project_id, task.location, task.cluster_name) == ("proj", "europe-west4", "synthval")
                # The parsed task's link reads what the provider's operator stores for its own link.
                provider_links = {link.name: link.xcom_key for link in task.operator_extra_links}
                assert links["Kubernetes Pod"] == provider_links["Kubernetes Pod"]
            if parsed.step in GPU_STEPS:
                assert "TensorBoard" in links


def test_pods_run_as_the_training_images_user():
    import re
    from pathlib import Path

    import synthval_pods

    dockerfile = (Path(__file__).parents[1] / "images" / "training" / "Dockerfile").read_text()
    uid = int(re.search(r"^ARG UID=(\d+)$", dockerfile, re.M).group(1))
    assert synthval_pods.TRAINING_IMAGE_UID == uid


def _finished_pod(code: int) -> Any:
    from kubernetes.client import models as k8s

    state = k8s.V1ContainerState(terminated=k8s.V1ContainerStateTerminated(exit_code=code))
    return k8s.V1Pod(metadata=k8s.V1ObjectMeta(name="synthval-train-x"), status=k8s.V1PodStatus(
        phase="Failed", container_statuses=[
            k8s.V1ContainerStatus(name="base", state=state, image="i", image_id="", ready=False, restart_count=0)]))


@pytest.mark.parametrize("code, retried", [(2, False), (1, True), (137, True)])
def test_a_pod_that_rejected_its_input_fails_without_retry(parsed, monkeypatch, code, retried):
    """The cluster is the boundary here: the provider's own cleanup reports the failed pod as it does."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    import synthval_pods

    name, dags = parsed
    use_settings(monkeypatch, name)
    dag = dags["train_on_synthdet_sample"]
    task = render(dag, dag.task_dict["train"], {}).pod_operator()
    pod = _finished_pod(code)
    assert synthval_pods.exit_code(pod, "base") == code

    def provider_cleanup(self, pod, remote_pod, *args, **kwargs):
        raise AirflowException(f"Pod {pod.metadata.name} returned a failure.")

    monkeypatch.setattr(KubernetesPodOperator, "cleanup", provider_cleanup)
    with pytest.raises(AirflowException) as err:
        task.cleanup(pod, pod)
    assert isinstance(err.value, AirflowFailException) is (not retried)


def test_a_pod_task_defers_to_the_triggerer_and_resumes_on_the_parsed_task(parsed, monkeypatch):
    """The cluster is the boundary: from a created pod, the task hands the wait to a trigger (freeing its
    worker) and names the method Airflow calls on the parsed task when the trigger fires."""
    from datetime import datetime, timezone

    from airflow.sdk.exceptions import TaskDeferred
    from kubernetes.client import models as k8s

    import synthval_pods

    name, dags = parsed
    use_settings(monkeypatch, name)
    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT", json.dumps({"conn_type": "kubernetes", "extra": {}}))
    dag = dags["train_on_synthdet_sample"]
    task = render(dag, dag.task_dict["train"], {"gpus": 1})
    operator = task.pod_operator()
    if name == "gke":  # the cluster's endpoint comes from the GKE API
        operator.__dict__["cluster_info"] = ("https://10.0.0.2", "Y2E=")
    operator.pod = k8s.V1Pod(metadata=k8s.V1ObjectMeta(name="synthval-train-x1", namespace="synthval"))
    ti = type("TI", (), {"start_date": datetime.now(timezone.utc)})()
    with pytest.raises(TaskDeferred) as deferred:
        operator.invoke_defer_method(context={"ti": ti})
    trigger = deferred.value.trigger
    assert (trigger.pod_name, trigger.pod_namespace) == ("synthval-train-x1", "synthval")
    assert trigger.logging_interval == synthval_pods.LOG_INTERVAL_S and trigger.get_logs
    assert trigger.poll_interval == synthval_pods.POLL_INTERVAL_S
    classpath, kwargs = trigger.serialize()  # what the triggerer receives
    assert classpath.startswith("airflow.providers.") and kwargs["pod_name"] == "synthval-train-x1"
    # The deadline stays the task's: a 48-hour training is not cut short by the deferral, nor left running.
    assert deferred.value.timeout.total_seconds() >= task.execution_timeout.total_seconds()
    assert callable(getattr(task, deferred.value.method_name))


def test_pods_are_built_only_when_a_task_runs(parsed):
    """Parsing builds light tasks: no provider operator exists until one is asked for."""
    _, dags = parsed
    for dag in dags.values():
        for task in synthval_tasks_of(dag):
            assert task._pod_operator is None
            with pytest.raises(RuntimeError, match="rendered"):
                task.pod_operator()
