"""Multi-node training up to the cluster's boundary: the Indexed Job, its headless Service and its pods
as the train task of every recipe renders them for 2 nodes x 4 GPUs (kubernetes and gke backends),
validated against the Kubernetes schema; the torchrun command lines; rank 0's result read from the
pods' termination messages; the `nodes` Param and the local backend's refusal.

The parsed task is the light `SynthvalPodTask`; the Job operator is what its `pod_operator()` builds
for a rendered run that asks for several nodes. The Job's pods are built by the provider's own
KubernetesJobOperator code path; its hook reads a kubeconfig that names no reachable cluster (the API
server is the boundary).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any

import kubernetes_validate
import pytest
from kubernetes.client import ApiClient
from kubernetes.client import models as k8s
from test_dags import REQUIRED_CONF, _serialized, load_dags, render, synthval_tasks_of
from test_pods import CLUSTER_SETTINGS, GKE_SETTINGS, K8S_VERSION

KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: none, cluster: {server: "https://127.0.0.1:9"}}]
users: [{name: none, user: {token: unused}}]
contexts: [{name: none, context: {cluster: none, user: none}}]
current-context: none
"""
NODES, GPUS = 2, 4


@pytest.fixture(scope="module", params=["kubernetes", "gke"])
def cluster(request, tmp_path_factory):
    """The DAGs parsed for a pod backend, and an environment in which their operators build objects."""
    path = tmp_path_factory.mktemp("kube") / "config"
    path.write_text(KUBECONFIG)
    settings = GKE_SETTINGS if request.param == "gke" else CLUSTER_SETTINGS
    with pytest.MonkeyPatch.context() as mp:
        dags = load_dags(mp, request.param, **settings)
    return request.param, dags, settings, str(path)


@pytest.fixture
def env(cluster, monkeypatch):
    import synthval_settings

    backend, dags, settings, kubeconfig = cluster
    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT",
                       json.dumps({"conn_type": "kubernetes", "extra": {"kube_config_path": kubeconfig}}))
    monkeypatch.setenv("SYNTHVAL_BACKEND", backend)
    for name, value in settings.items():
        monkeypatch.setenv(f"SYNTHVAL_{name.upper()}", value)
    synthval_settings.load_settings.cache_clear()
    yield cluster
    synthval_settings.load_settings.cache_clear()


def sanitized(obj: Any) -> dict:
    return ApiClient().sanitize_for_serialization(obj)


def build_job(dag: Any, task: Any, conf: dict[str, Any]) -> tuple[Any, dict, dict, dict]:
    """Render ``task`` for a run with ``conf``; return (rendered task, Job, Service, one node's Pod) as
    the Kubernetes API would receive them."""
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

    import synthval_jobs
    import synthval_settings

    task = render(dag, task, {**REQUIRED_CONF.get(dag.dag_id, {}), **conf})
    synthval_settings.load_settings.cache_clear()
    operator = task.pod_operator()
    assert type(operator).__name__ in ("SynthvalJobOperator", "SynthvalGKEJobOperator")
    if type(operator).__name__ == "SynthvalGKEJobOperator":
        # the GKE hook asks Google for the cluster's endpoint; the objects do not depend on it
        operator.__dict__["hook"] = KubernetesHook()
    job = operator.build_job_request_obj(task.test_context)
    job.metadata.uid = "5b0f6b52-0c0e-4bb5-9d4c-2f3c1d6a7e10"  # given by the API server on creation
    template = job.spec.template
    pod = k8s.V1Pod(api_version="v1", kind="Pod", metadata=k8s.V1ObjectMeta(
        name=f"{job.metadata.name}-0-abcde", namespace=job.metadata.namespace, labels=template.metadata.labels),
        spec=template.spec)
    return task, sanitized(job), sanitized(synthval_jobs.build_service(job)), sanitized(pod)


def train_tasks(dags: dict[str, Any]):
    for dag in dags.values():
        for task in synthval_tasks_of(dag):
            if task.step in ("train", "finetune"):
                yield dag, task


def test_every_training_task_renders_a_valid_job_service_and_pod_for_2_nodes_of_4_gpus(env):
    from test_deploy import command_problems

    import synthval_jobs
    from synthval_launch import Rendezvous, launch_command
    from synthval_profiles import step_profile

    backend, dags, settings, _ = env
    seen = set()
    for dag, task in train_tasks(dags):
        where = f"{dag.dag_id}.{task.task_id}"
        rendered, job, service, pod = build_job(dag, task, {"nodes": NODES, "gpus": GPUS})
        for obj in (job, service, pod):
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
        assert namespace == "synthval"
        spec = job["spec"]
        assert spec["completionMode"] == "Indexed"
        assert spec["completions"] == spec["parallelism"] == NODES
        assert spec["backoffLimitPerIndex"] == synthval_jobs.BACKOFF_LIMIT_PER_INDEX and spec["maxFailedIndexes"] == 0
        assert "backoffLimit" not in spec  # per index instead
        assert spec["podReplacementPolicy"] == "Failed"  # a replacement waits until the old pod is gone
        assert spec["podFailurePolicy"]["rules"] == [
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            {"action": "FailJob", "onExitCodes": {"containerName": "base", "operator": "In", "values": [2]}}]
        assert spec["activeDeadlineSeconds"] == step_profile(task.step).timeout.total_seconds()
        assert spec["ttlSecondsAfterFinished"] > 0
        assert "suspend" not in spec  # no Kueue queue set
        assert job["metadata"]["labels"]["synthval/step"] == task.step
        assert {"dag_id", "task_id", "run_id", "try_number"} <= set(job["metadata"]["labels"])

        # The headless Service names the pods: selector on the Job's own pod label, owned by the Job.
        assert service["metadata"]["name"] == name and service["metadata"]["namespace"] == namespace
        assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
        assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": name}
        assert service["metadata"]["ownerReferences"] == [
            {"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": "5b0f6b52-0c0e-4bb5-9d4c-2f3c1d6a7e10"}]

        # Each pod: the step's single-node pod with 4 GPUs, without the XCom sidecar, in the subdomain.
        pspec = pod["spec"]
        assert pspec["subdomain"] == name and pspec["restartPolicy"] == "Never"
        (main,) = pspec["containers"]
        assert main["name"] == "base" and main["image"] == f"{settings['image']}:0.1.0"
        assert main["resources"]["limits"]["nvidia.com/gpu"] == str(GPUS)
        assert pspec["nodeSelector"]["cloud.google.com/gke-nodepool"] == "gpu-pool"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pspec["tolerations"]
        assert "xcom" not in {v["name"] for v in pspec["volumes"]}
        assert {"name": "SYNTHVAL_XCOM_FILE", "value": "/dev/termination-log"} in main["env"]
        assert {"name": "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "value": "1"} in main["env"]
        assert main["terminationMessagePath"] == "/dev/termination-log"
        assert main["terminationMessagePolicy"] == "File"  # never the log tail: only rank 0's JSON
        assert "name" not in pod["spec"].get("metadata", {})
        assert "name" not in job["spec"]["template"]["metadata"]

        # The command: torchrun on every node, meeting at node 0's full DNS name.
        endpoint = f"{name}-0.{name}.synthval.svc.cluster.local:29400"
        argv = rendered.command()
        assert main["command"] + main["args"] == launch_command(
            argv, GPUS, local=False, nodes=NODES, rendezvous=Rendezvous(
                endpoint, name, join_timeout_s=1800, max_restarts=synthval_jobs.MAX_RESTARTS))
        assert main["command"] + main["args"][:16] == [
            "torchrun", "--nnodes", "2", "--nproc-per-node", "4", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", endpoint, "--rdzv-id", name, "--rdzv-conf", "join_timeout=1800,read_timeout=1800",
            "--max-restarts", "2", "-m", "synthval.cli"]
        assert main["args"][16:] == argv[1:], where
        assert "--resume=auto" in argv
        assert command_problems(main["command"], main["args"], ["synthval"]) == [], where
        seen.add((dag.dag_id, task.step))
    assert {"train", "finetune"} == {step for _, step in seen}
    assert len(seen) >= 5


def test_one_node_keeps_todays_single_pod(env):
    backend, dags, _, _ = env
    dag = dags["train_on_synthdet_sample"]
    task = render(dag, dag.task_dict["train"], {"gpus": 2})
    assert task.nodes == "1"
    expected = "SynthvalGKEPodOperator" if backend == "gke" else "SynthvalPodOperator"
    assert type(task.pod_operator()).__name__ == expected
    for other in synthval_tasks_of(dag):  # only training steps take `nodes`
        assert (other.nodes == "{{ params.nodes }}") is (other.step in ("train", "finetune")), other.task_id
        if other.step not in ("train", "finetune"):
            assert other.nodes == 1


def test_the_job_path_is_chosen_when_the_task_runs_and_resumes_on_the_parsed_task(env):
    """Parsing builds no operator; a run's `nodes` picks pod or Job; the Job's deferral names a method of
    the parsed task, which hands the event to the Job operator built again from the rendered task."""
    _, dags, _, _ = env
    dag = dags["train_on_synthetic_and_real_dataset"]
    parsed = dag.task_dict["finetune"]
    assert type(parsed).__name__ == "SynthvalPodTask" and parsed._pod_operator is None
    conf = {**REQUIRED_CONF.get(dag.dag_id, {}), "nodes": 2}
    operator = render(dag, parsed, conf).pod_operator()
    assert type(operator).__name__ in ("SynthvalJobOperator", "SynthvalGKEJobOperator")
    assert (operator.nodes, operator.completions, operator.parallelism) == (2, 2, 2)
    assert callable(parsed.finish_job)
    assert not operator.do_xcom_push  # no sidecar: rank 0's result is the termination message


def test_the_job_module_imports_no_google_provider():
    """On the kubernetes backend a training Job runs without the Google provider's operators, hooks and
    triggers (the GKE Job operator is made on first use). Airflow's provider registry reads every
    installed provider's description (`get_provider_info`); that is not the provider's code."""
    from test_dags import AIRFLOW_ENV, DAGS

    script = (f"import sys; sys.path.insert(0, {str(DAGS)!r}); before = set(sys.modules); import synthval_jobs; "
              "print(sorted(m for m in set(sys.modules) - before if m.startswith('airflow.providers.google.cloud')))")
    env = {**os.environ, **AIRFLOW_ENV}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_kueue_admits_every_training_run_as_a_suspended_labelled_job(env, monkeypatch):
    backend, dags, _, _ = env
    monkeypatch.setenv("SYNTHVAL_KUEUE_QUEUE", "synthval-training")
    dag = dags["train_on_synthdet_sample"]
    for nodes in (1, 3):
        task, job, service, pod = build_job(dag, dag.task_dict["train"], {"nodes": nodes, "gpus": 1})
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)
        assert job["spec"]["suspend"] is True  # Kueue unsuspends it once the quota admits all its pods
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "synthval-training"
        # only the Job is Kueue's workload: a queue label on its pods would make them workloads too
        assert "kueue.x-k8s.io/queue-name" not in pod["metadata"]["labels"]
        assert "kueue.x-k8s.io/queue-name" not in service["metadata"]["labels"]
        main = pod["spec"]["containers"][0]
        assert job["spec"]["completions"] == nodes
        if nodes == 1:  # one pod: today's command, no rendezvous, no subdomain
            assert main["command"] + main["args"] == task.command()
            assert "subdomain" not in pod["spec"]
        else:
            assert main["args"][:2] == ["--nnodes", "3"] and "--rdzv-endpoint" in main["args"]


def test_cluster_domain_setting_reaches_the_endpoint(env, monkeypatch):
    _, dags, _, _ = env
    monkeypatch.setenv("SYNTHVAL_CLUSTER_DOMAIN", "corp.example")
    dag = dags["train_on_real_world_dataset"]
    _, job, _, pod = build_job(dag, dag.task_dict["train"], {"nodes": 2, "gpus": 1})
    args = pod["spec"]["containers"][0]["args"]
    name = job["metadata"]["name"]
    assert args[args.index("--rdzv-endpoint") + 1] == f"{name}-0.{name}.synthval.svc.corp.example:29400"
    assert args[args.index("--nproc-per-node") + 1] == "1"


# ---------------------------------------------------------------------------------------------
# Rank 0's result and the end of each pod, as the Job's pods report them


def job_pod(index: int, phase: str, *, exit_code: int | None = None, message: str | None = None,
            disrupted: bool = False, attempt: str = "a") -> k8s.V1Pod:
    terminated = None
    if exit_code is not None:
        terminated = k8s.V1ContainerStateTerminated(exit_code=exit_code, message=message,
                                                    reason="Completed" if exit_code == 0 else "Error")
    conditions = [k8s.V1PodCondition(type="DisruptionTarget", status="True")] if disrupted else None
    return k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name=f"job-synthval-train-x-{index}-{attempt}",
                                  annotations={"batch.kubernetes.io/job-completion-index": str(index)}),
        status=k8s.V1PodStatus(phase=phase, conditions=conditions, container_statuses=[k8s.V1ContainerStatus(
            name="base", image="i", image_id="", ready=False, restart_count=0,
            state=k8s.V1ContainerState(terminated=terminated))]))


RESULT = {"checkpoint_uri": "gs://b/ckpt/checkpoint-000120.pt", "steps": 120, "num_train_images": 400}


def test_rank0_result_is_the_one_termination_message_of_a_succeeded_pod():
    from synthval_jobs import rank0_result

    pods = [job_pod(0, "Failed", exit_code=1, message="", disrupted=True),  # the preempted first attempt
            job_pod(0, "Succeeded", exit_code=0, message=json.dumps(RESULT), attempt="b"),
            job_pod(1, "Succeeded", exit_code=0, message="")]
    assert rank0_result(pods, "base") == RESULT


@pytest.mark.parametrize("messages, needle", [
    (["", ""], "found 0"),
    ([json.dumps(RESULT), json.dumps(RESULT)], "found 2"),
    ([json.dumps(RESULT)[:30], ""], "4096-byte"),
    (["[1, 2]", ""], "not a JSON object"),
])
def test_rank0_result_refuses_anything_but_exactly_one_json_object(messages, needle):
    from airflow.sdk.exceptions import AirflowException

    from synthval_jobs import rank0_result

    pods = [job_pod(i, "Succeeded", exit_code=0, message=m) for i, m in enumerate(messages)]
    with pytest.raises(AirflowException, match=needle):
        rank0_result(pods, "base")


def test_each_pod_is_described_by_node_phase_and_end():
    from synthval_jobs import describe_pod, node_index

    lost = job_pod(1, "Failed", exit_code=143, disrupted=True)
    assert node_index(lost) == 1
    assert describe_pod(lost, "base") == ("pod job-synthval-train-x-1-a (node 1): Failed, exit code 143 (Error)"
                                          " - disrupted (preempted, evicted or drained)")
    assert describe_pod(job_pod(0, "Pending"), "base") == "pod job-synthval-train-x-0-a (node 0): Pending"


# ---------------------------------------------------------------------------------------------
# The `nodes` Param and the local backend


@pytest.fixture(scope="module")
def local_dags():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SYNTHVAL_DATA_ROOT", "/tmp/synthval-test-root")
        return load_dags(mp, "local", data_root="/tmp/synthval-test-root")


def test_nodes_param_sits_beside_gpus_in_every_training_dag(local_dags, cluster):
    from airflow.sdk.exceptions import ParamValidationError

    _, pod_dags, _, _ = cluster
    for dags, maximum in ((local_dags, 1), (pod_dags, 64)):
        for dag_id, dag in dags.items():
            trains = any(t.step in ("train", "finetune") for t in synthval_tasks_of(dag))
            assert ("nodes" in dag.params) is trains, dag_id
            if not trains:
                continue
            param = dag.params.get_param("nodes")
            assert param.value == 1 and param.schema["section"] == dag.params.get_param("gpus").schema["section"]
            assert param.schema["maximum"] == maximum
            required = REQUIRED_CONF.get(dag_id, {})
            params = _serialized(dag).params  # the check every trigger goes through (test_dags)
            params.deep_merge({**required, "nodes": maximum}).validate()
            too_many = rf"param nodes\b.*{maximum + 1} is greater than the maximum"
            with pytest.raises(ParamValidationError, match=too_many):
                params.deep_merge({**required, "nodes": maximum + 1}).validate()


def test_local_backend_refuses_several_nodes_clearly():
    from airflow.sdk.exceptions import AirflowFailException

    from synthval_argv import Argv
    from synthval_local import SynthvalLocalOperator

    op = SynthvalLocalOperator(task_id="train", step="train", argv=Argv(["synthval", "train"]), nodes=2)
    with pytest.raises(AirflowFailException, match=r"nodes=2: the local backend .* SYNTHVAL_BACKEND=kubernetes or gke"):
        op.execute({})


def test_nodes_is_only_for_training_steps():
    from synthval_tasks import synthval_task

    with pytest.raises(ValueError, match="nodes applies to train, finetune"):
        synthval_task("evaluate", ["synthval", "evaluate"], nodes=2)


# ---------------------------------------------------------------------------------------------
# Rank 0 writes its result into a file mounted on its own, as /dev/termination-log is in a pod


def _can_mount() -> bool:
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0


@pytest.mark.skipif(not _can_mount(), reason="needs unshare and user namespaces to bind-mount a file")
def test_result_reaches_a_file_mounted_like_the_termination_log(tmp_path):
    """As in a pod: the file is a mount of its own, in a folder the step cannot write (/dev, read-only
    here as it is to the image's non-root user), so the result is written through, never renamed over
    it, and the check of the outputs before the step starts probes no temporary file beside it."""
    host_file, dev = tmp_path / "host-termination-log", tmp_path / "dev"
    host_file.write_text("")
    dev.mkdir()
    mounted = dev / "termination-log"
    mounted.write_text("")
    synthval = os.path.join(os.path.dirname(sys.executable), "synthval")
    script = (f"mount --bind {dev} {dev} && mount -o remount,bind,ro {dev} && mount --bind {host_file} {mounted} && "
              f"! touch {dev}/probe 2>/dev/null && "
              f"SYNTHVAL_XCOM_FILE={mounted} {synthval} version >/dev/null && grep -c {mounted} /proc/self/mountinfo")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "1"  # still a mount: written through, not renamed over
    from synthval import __version__

    assert json.loads(host_file.read_text()) == {"version": __version__}


# ---------------------------------------------------------------------------------------------
# The operator's flow against a stand-in for the Kubernetes API server (a real one cannot run here):
# the real provider, hook and client code make the calls; the stand-in keeps the objects, records the
# requests and answers as the API server's REST interface does.


class StandInApiServer:
    """Jobs, Services and pods of one namespace behind the Kubernetes REST paths the operator uses."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import parse_qs, urlparse

        self.jobs: dict[str, dict] = {}
        self.services: dict[str, dict] = {}
        self.pods: list[dict] = []
        self.logs: dict[str, str] = {}
        self.requests: list[tuple[str, str, dict]] = []  # method, path, query and body parameters
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, code: int, body: Any, content_type: str = "application/json") -> None:
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> Any:
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length)) if length else None

            def _route(self, method: str) -> None:
                url = urlparse(self.path)
                parts = url.path.strip("/").split("/")
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                body = self._body() if method in ("POST", "DELETE") else None
                server.requests.append((method, url.path, {**query, **(body or {})}))
                at = parts.index("namespaces") if "namespaces" in parts else len(parts)
                kind = parts[at + 2] if len(parts) > at + 2 else ""
                name = parts[at + 3] if len(parts) > at + 3 else None
                if kind in ("jobs", "services", "pods"):
                    store = {"jobs": server.jobs, "services": server.services}.get(kind)
                    if kind == "pods" and name and parts[-1] == "log":
                        return self._reply(200, server.logs.get(name, ""), "text/plain")
                    if kind == "pods":
                        items = [p for p in server.pods if server.selects(query.get("labelSelector", ""), p)]
                        return self._reply(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
                    if method == "POST":
                        body["metadata"]["uid"] = f"uid-{body['metadata']['name']}"
                        store[body["metadata"]["name"]] = body
                        return self._reply(201, body)
                    if method == "GET" and name:
                        found = store.get(name)
                        return self._reply(200, found) if found else self._reply(404, {"kind": "Status", "code": 404})
                    if method == "GET":
                        items = [o for o in store.values() if server.selects(query.get("labelSelector", ""), o)]
                        return self._reply(200, {"kind": "JobList", "apiVersion": "batch/v1", "metadata": {},
                                                 "items": items})
                    if method == "DELETE" and store.pop(name, None) is not None:
                        return self._reply(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
                    return self._reply(404, {"kind": "Status", "apiVersion": "v1", "code": 404, "reason": "NotFound"})
                return self._reply(404, {"kind": "Status", "apiVersion": "v1", "code": 404})

            def do_GET(self) -> None:
                self._route("GET")

            def do_POST(self) -> None:
                self._route("POST")

            def do_DELETE(self) -> None:
                self._route("DELETE")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @staticmethod
    def selects(selector: str, obj: dict) -> bool:
        labels = obj["metadata"].get("labels") or {}
        return all(labels.get(k) == v for k, v in (term.split("=", 1) for term in selector.split(",") if term))

    def add_pod(self, job: str, index: int, phase: str, *, exit_code: int, message: str = "", log: str = "",
                attempt: str = "a") -> None:
        name = f"{job}-{index}-{attempt}"
        self.pods.append({"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": name, "namespace": "synthval", "creationTimestamp": f"2026-01-01T00:00:0{len(self.pods)}Z",
            "labels": {"batch.kubernetes.io/job-name": job, "batch.kubernetes.io/job-completion-index": str(index)}},
            "status": {"phase": phase, "containerStatuses": [{
                "name": "base", "image": "i", "imageID": "", "ready": False, "restartCount": 0,
                "state": {"terminated": {"exitCode": exit_code, "message": message,
                                         "reason": "Completed" if exit_code == 0 else "Error"}}}]}})
        self.logs[name] = log


class RecordingTI:
    def __init__(self, dag_id: str, task_id: str, run_id: str) -> None:
        self.dag_id, self.task_id, self.run_id = dag_id, task_id, run_id
        self.try_number, self.map_index, self.start_date = 2, -1, None
        self.pushed: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value

    def xcom_pull(self, task_ids: Any = None, **_: Any) -> Any:
        from test_dags import UPSTREAM_XCOMS

        return UPSTREAM_XCOMS.get(task_ids)


@pytest.fixture
def api(env, tmp_path, monkeypatch):
    server = StandInApiServer()
    config = tmp_path / "kubeconfig"
    config.write_text(KUBECONFIG.replace("https://127.0.0.1:9", server.url))
    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT",
                       json.dumps({"conn_type": "kubernetes", "extra": {"kube_config_path": str(config)}}))
    yield server
    server.httpd.shutdown()


def connected(task: Any, backend: str) -> Any:
    """``task`` as it runs; on gke its Job operator reaches the stand-in too. The GKE hooks ask Google's
    API for the cluster's endpoint and authenticate with Google credentials (the boundary on gke): here
    the operator's hook is the Kubernetes connection's, and the trigger gets a made-up endpoint."""
    if backend != "gke":
        return task
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

    import synthval_settings
    from synthval_pod_task import provider_operator

    operator = provider_operator(task, synthval_settings.load_settings(), as_job=True)
    operator.__dict__["hook"] = KubernetesHook()
    operator.__dict__["cluster_info"] = ("https://10.0.0.2", "Y2E=")
    task._pod_operator = operator
    return task


def test_a_multinode_task_creates_job_and_service_defers_then_returns_rank0s_result(env, api):
    from airflow.providers.cncf.kubernetes.triggers.job import KubernetesJobTrigger
    from airflow.sdk.exceptions import TaskDeferred
    from structlog.testing import capture_logs

    backend, dags, _, _ = env
    dag = dags["train_on_synthdet_sample"]
    task = connected(render(dag, dag.task_dict["train"], {"nodes": 2, "gpus": 4}), backend)
    ti = RecordingTI(dag.dag_id, "train", task.test_context["run_id"])
    context = {**task.test_context, "ti": ti, "task_instance": ti}
    # A Job the first try left behind (its worker died while the trigger waited): same task, same run.
    earlier = build_job(dag, dag.task_dict["train"], {"nodes": 2, "gpus": 4})[1]
    earlier["metadata"]["name"] = "job-synthval-train-earlier"
    api.jobs[earlier["metadata"]["name"]] = earlier

    with pytest.raises(TaskDeferred) as deferred:
        task.execute(context)
    assert "job-synthval-train-earlier" not in api.jobs  # deleted before this try's Job exists
    deletes = [(path, body) for method, path, body in api.requests if method == "DELETE"]
    assert deletes[0][0].endswith("/jobs/job-synthval-train-earlier")
    assert deletes[0][1]["propagationPolicy"] == "Foreground"  # with its pods
    (name,) = api.jobs
    job, service = api.jobs[name], api.services[name]
    assert service["metadata"]["ownerReferences"] == [
        {"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": f"uid-{name}"}]
    assert job["metadata"]["labels"]["try_number"] == "2"
    assert {k: ti.pushed.pop(k) for k in ("job_name", "job_namespace")} == {"job_name": name,
                                                                            "job_namespace": "synthval"}
    trigger = deferred.value.trigger
    assert deferred.value.method_name == "finish_job"
    assert (trigger.job_name, trigger.job_namespace, trigger.pod_names) == (name, "synthval", [])
    assert not trigger.do_xcom_push and not trigger.get_logs  # the Job alone is watched
    if backend == "gke":
        from airflow.providers.google.cloud.triggers.kubernetes_engine import GKEJobTrigger

        assert isinstance(trigger, GKEJobTrigger) and trigger.cluster_url == "https://10.0.0.2"
        # The Job's console link, under the key the parsed task's "Kubernetes Job" button reads.
        links = {link.name: link.xcom_key for link in dag.task_dict["train"].operator_extra_links}
        assert ti.pushed.pop(links["Kubernetes Job"]) == {
            "project_id": "proj", "location": "europe-west4", "cluster_name": "synthval", "namespace": "synthval",
            "job_name": name}
    else:
        assert isinstance(trigger, KubernetesJobTrigger)
    assert ti.pushed == {}

    # The trigger fired: the Job completed after node 1 was preempted once and replaced.
    api.add_pod(name, 1, "Failed", exit_code=137, log="rank 1 step 40", attempt="first")
    api.add_pod(name, 0, "Succeeded", exit_code=0, message=json.dumps(RESULT), log="training done: 120 steps")
    api.add_pod(name, 1, "Succeeded", exit_code=0, log="rank 1 step 120", attempt="second")
    event = {"status": "success", "message": "Job completed successfully", "name": name, "namespace": "synthval",
             "pod_names": [], "pod_namespace": "synthval", "job": job, "xcom_result": None}
    fresh = connected(render(dag, dag.task_dict["train"], {"nodes": 2, "gpus": 4}), backend)  # a new object
    with capture_logs() as logged:
        assert fresh.resume_execution("finish_job", {"event": event}, context) == RESULT
    text = "\n".join(e["event"] % tuple(e.get("positional_args", ())) for e in logged)
    order = [text.index(f"pod {name}-{i}") for i in ("0-a", "1-first", "1-second")]
    assert order == sorted(order)  # node order, attempts in creation order
    for line in ("training done: 120 steps", "rank 1 step 40", "rank 1 step 120", "exit code 137"):
        assert line in text
    assert name not in api.jobs  # deleted when done; the Service goes with it (owned by the Job)


def test_a_failed_job_fails_the_task_naming_each_pod_and_is_deleted(env, api):
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    backend, dags, _, _ = env
    dag = dags["train_on_synthdet_sample"]
    name = "job-synthval-train-failed"
    api.jobs[name] = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": "synthval"}}
    api.add_pod(name, 0, "Failed", exit_code=1, log="RuntimeError: CUDA out of memory")
    api.add_pod(name, 1, "Failed", exit_code=1)
    event = {"status": "error", "message": "Job failed with error: FailedIndexes", "name": name,
             "namespace": "synthval", "pod_names": [], "pod_namespace": "synthval", "job": {}, "xcom_result": None}
    task = connected(render(dag, dag.task_dict["train"], {"nodes": 2, "gpus": 4}), backend)
    with pytest.raises(AirflowException, match=r"FailedIndexes.*node 0\): Failed, exit code 1.*node 1\)") as err:
        task.resume_execution("finish_job", {"event": event}, task.test_context)
    assert not isinstance(err.value, AirflowFailException)  # Airflow retries it: a new Job resumes
    assert name not in api.jobs


def test_a_job_whose_step_rejected_its_input_fails_without_retry(env, api):
    from airflow.sdk.exceptions import AirflowFailException

    backend, dags, _, _ = env
    dag = dags["train_on_real_world_dataset"]
    name = "job-synthval-train-badconf"
    api.jobs[name] = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": "synthval"}}
    api.add_pod(name, 0, "Failed", exit_code=2, log="synthval train: error: --set epochs=many: not an integer")
    event = {"status": "error", "message": "Job failed with error: PodFailurePolicy", "name": name,
             "namespace": "synthval", "pod_names": [], "pod_namespace": "synthval", "job": {}, "xcom_result": None}
    # One node: a Job only because a Kueue queue was set when it started (the worker that resumes it
    # need not have the setting any more); its container's exit code is synthval's own.
    task = connected(render(dag, dag.task_dict["train"], {"nodes": 1}), backend)
    with pytest.raises(AirflowFailException, match="rejected its input .*not retried"):
        task.resume_execution("finish_job", {"event": event}, task.test_context)
    assert name not in api.jobs
