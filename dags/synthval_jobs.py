"""Training on several nodes: an Indexed Job of `nodes` pods with a headless Service, run by the
cncf-kubernetes provider's KubernetesJobOperator and deferred, so no Airflow worker waits on it.

A train or fine-tune task of the pod backends (`synthval_pod_task.SynthvalPodTask`) runs today's single
pod when its run asks for one node (and no Kueue queue is set); with `nodes` > 1 it runs a Job instead,
chosen when the task runs (`synthval_pod_task.runs_as_job`), by `job_operator`:

- **Pods**: each is the step's own pod (`synthval_pods.pod_arguments`: image, per-node GPUs, CPU and
  memory, node pool, volumes, secrets; no XCom sidecar), one per node, `completionMode: Indexed`,
  completions = parallelism = nodes. Pod i is named ``<job>-<i>`` in the subdomain ``<job>`` (the
  headless Service of the same name, which publishes names before pods are ready), and runs::

      torchrun --nnodes N --nproc-per-node G --rdzv-backend c10d \\
               --rdzv-endpoint <job>-0.<job>.<namespace>.svc.<cluster domain>:29400 --rdzv-id <job> \\
               --rdzv-conf join_timeout=<T>,read_timeout=<T> --max-restarts 2 -m synthval.cli train ...

  with T the pods' startup timeout: pods of one Job may start minutes apart on a pool that scales up.

  Pod 0 hosts the rendezvous store: it recognises the endpoint as itself through /etc/hosts (the
  kubelet writes the pod's full name there), so it does not wait for DNS.
- **Same numbers on any shape**: every process reads its own shard (batch i of an epoch goes to rank
  i % world size, synthval.steps.train); the world size is nodes x gpus, and the recipe's
  `data.effective_batch_size` fixes the gradient accumulation from it (`synthval.config.accumulation_steps`).
- **Failures restart the whole group from the last checkpoint**: when a worker fails, its agent
  restarts every worker of the group (torchrun's elastic restart, up to MAX_RESTARTS times), and each
  resumes with `--resume auto` from the newest complete checkpoint, which all ranks read from the same
  shared checkpoint folder. A preempted pod is replaced by the Job controller (its disruption does not
  count against the backoff limit; the replacement waits until the old pod is gone, so one node never
  appears twice) and rejoins under the same name; a pod failing for another reason is retried up to
  BACKOFF_LIMIT_PER_INDEX times, then the Job fails and Airflow's retry starts a new Job that resumes
  from the checkpoint too. A new try first deletes the Jobs of earlier tries of the same task: two
  groups never write one checkpoint folder. A step that rejected its input (exit code 2) fails the Job
  and the task at once, without retries, where the container's exit code is synthval's own (one node,
  one GPU); torchrun reports a worker's exit code 2 as 1.
- **XCom from rank 0 only**: rank 0 writes its result JSON to the container's termination message
  (`/dev/termination-log`, SYNTHVAL_XCOM_FILE); the task returns the one message found on the Job's
  succeeded pods.
- **Logs of every pod** (every attempt still present, in node order, each under a header naming the pod,
  its node and how it ended) reach the task log when the Job ends.
- **Deletion**: the Job is deleted when the task ends, whatever the outcome; its pods and the Service
  (owned by the Job) go with it. A Job left behind by a task that never resumed is removed by the next
  try, or by its TTL.
- **GPU quota** (optional, setting KUEUE_QUEUE): the Job carries the `kueue.x-k8s.io/queue-name` label
  and is created suspended; Kueue admits it, all its pods at once, when the ClusterQueue's quota has
  room, and queues it until then. With a queue set, single-node training runs as a one-pod Job too, so
  that every training run is admitted against the same quota (deploy/kueue/).

Deferred, the task resumes on the parsed `SynthvalPodTask`, whose `finish_job` hands the trigger's
event to this operator, built again from the rendered task.

Imported only when such a task runs (or a test renders one), by `synthval_pod_task.provider_operator`; the GKE
Job operator's class is made on first use (`_gke_job_operator_class`), so that nothing imports the Google
provider on the kubernetes backend.
"""

from __future__ import annotations

import json
import time
from typing import Any

from airflow.providers.cncf.kubernetes.operators.job import KubernetesJobOperator
from airflow.providers.cncf.kubernetes.triggers.job import KubernetesJobTrigger
from kubernetes.client import models as k8s
from kubernetes.client.rest import ApiException

from synthval_launch import XCOM_FILE_ENV, Rendezvous, launch_command
from synthval_pods import BAD_INPUT_EXIT_CODE, cluster_connection, exit_code, terminated_state
from synthval_settings import Settings, load_settings

RDZV_PORT = 29400  # torchrun's default c10d port
MAX_RESTARTS = 2  # whole-group restarts by torchrun within one Job
BACKOFF_LIMIT_PER_INDEX = 2  # replacements of one node's pod for failures other than preemption
JOB_TTL_S = 24 * 3600  # a Job whose task never came back is deleted by Kubernetes after this
POLL_INTERVAL_S = 30.0
TERMINATION_LOG = "/dev/termination-log"
# Every pod's environment besides the step's own. torch 2.14's agents share one TCP store across
# rendezvous rounds, published only in the first round the agent of rank 0 takes part in: a pod that
# replaces a lost node joins a later round and waits forever for its address (measured here:
# tests/test_multinode_training.py; pytorch/pytorch#135712). Without sharing, rank 0 publishes it
# every round.
NODE_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"  # set by the Job controller on its pods
INDEX_KEY = "batch.kubernetes.io/job-completion-index"
STEP_LABEL = "synthval/step"


def rendezvous_host(job_name: str, namespace: str, cluster_domain: str) -> str:
    """The full DNS name of node 0 of the Job (its pods' subdomain is the Service named like the Job)."""
    return f"{job_name}-0.{job_name}.{namespace}.svc.{cluster_domain}"


def node_command(argv: list[str], *, gpus: int, nodes: int, job_name: str, namespace: str,
                 settings: Settings) -> list[str]:
    """The container command of every pod of the Job: torchrun meeting at node 0 (one node: today's)."""
    if nodes <= 1:
        return launch_command(argv, gpus, local=False)
    endpoint = f"{rendezvous_host(job_name, namespace, settings.cluster_domain)}:{RDZV_PORT}"
    return launch_command(argv, gpus, local=False, nodes=nodes, rendezvous=Rendezvous(
        endpoint, job_name, join_timeout_s=settings.startup_timeout_s, max_restarts=MAX_RESTARTS))


def failure_policy(container: str) -> k8s.V1PodFailurePolicy:
    """A node lost to preemption, eviction or a node drain is replaced without counting as a failure;
    a step that rejected its input (exit code 2) fails the Job at once, as it would fail every retry.
    Under torchrun the worker's code 2 reaches the container as torchrun's 1, so only a one-node,
    one-GPU Job (a Kueue-admitted run) sees it."""
    return k8s.V1PodFailurePolicy(rules=[
        k8s.V1PodFailurePolicyRule(action="Ignore", on_pod_conditions=[
            k8s.V1PodFailurePolicyOnPodConditionsPattern(type="DisruptionTarget", status="True")]),
        k8s.V1PodFailurePolicyRule(action="FailJob", on_exit_codes=k8s.V1PodFailurePolicyOnExitCodesRequirement(
            container_name=container, operator="In", values=[BAD_INPUT_EXIT_CODE])),
    ])


def build_service(job: k8s.V1Job) -> k8s.V1Service:
    """The headless Service that gives the Job's pods their DNS names; owned by the Job (when it has a uid)."""
    owner = None
    if job.metadata.uid:
        owner = [k8s.V1OwnerReference(api_version="batch/v1", kind="Job", name=job.metadata.name,
                                      uid=job.metadata.uid)]
    labels = {k: v for k, v in (job.metadata.labels or {}).items() if k != KUEUE_QUEUE_LABEL}
    return k8s.V1Service(
        api_version="v1", kind="Service",
        metadata=k8s.V1ObjectMeta(name=job.metadata.name, namespace=job.metadata.namespace, labels=labels,
                                  owner_references=owner),
        spec=k8s.V1ServiceSpec(
            cluster_ip="None", publish_not_ready_addresses=True, selector={JOB_NAME_LABEL: job.metadata.name},
            ports=[k8s.V1ServicePort(name="rendezvous", port=RDZV_PORT, target_port=RDZV_PORT, protocol="TCP")]),
    )


def node_index(pod: k8s.V1Pod) -> int:
    """The completion index of a pod of an Indexed Job (-1 when it carries none)."""
    meta = pod.metadata
    value = (meta.annotations or {}).get(INDEX_KEY) or (meta.labels or {}).get(INDEX_KEY)
    return int(value) if value not in (None, "") else -1


def describe_pod(pod: k8s.V1Pod, container: str) -> str:
    """One line: pod name, node index, phase, and how its container ended."""
    phase = pod.status.phase if pod.status else "?"
    terminated = terminated_state(pod, container)
    ended = f", exit code {terminated.exit_code} ({terminated.reason})" if terminated else ""
    conditions = [c.type for c in (pod.status.conditions if pod.status else None) or []
                  if c.type == "DisruptionTarget" and c.status == "True"]
    lost = " - disrupted (preempted, evicted or drained)" if conditions else ""
    return f"pod {pod.metadata.name} (node {node_index(pod)}): {phase}{ended}{lost}"


def rank0_result(pods: list[k8s.V1Pod], container: str) -> dict[str, Any]:
    """The result JSON rank 0 wrote to its termination message: exactly one succeeded pod carries one."""
    from airflow.sdk.exceptions import AirflowException

    messages = []
    for pod in pods:
        terminated = terminated_state(pod, container)
        if pod.status and pod.status.phase == "Succeeded" and terminated and (terminated.message or "").strip():
            messages.append((pod.metadata.name, terminated.message))
    if len(messages) != 1:
        found = ", ".join(name for name, _ in messages) or "none"
        raise AirflowException(f"expected the result of rank 0 in the termination message of exactly one "
                               f"succeeded pod, found {len(messages)} ({found})")
    name, text = messages[0]
    try:
        result = json.loads(text)
    except ValueError:
        raise AirflowException(f"pod {name}: its termination message is not the step's JSON result "
                               f"(cut at Kubernetes' 4096-byte limit?): {text[:200]!r}") from None
    if not isinstance(result, dict):
        raise AirflowException(f"pod {name}: result {text[:200]!r} is not a JSON object")
    return result


# ---------------------------------------------------------------------------------------------
# The Job operator


class SynthvalJobMixin:
    """Where this differs from the provider's KubernetesJobOperator, and why:

    - `execute` creates the Job and Service and defers on the provider's Job trigger watching the Job
      alone. The provider lists the Job's pods right after creating it and binds its trigger to their
      names: that fails outright for a Job Kueue holds suspended (no pods yet) and never sees the pod the
      Job controller creates in place of a preempted one.
    - The provider's XCom sidecar keeps every pod running until the operator has read it, so a failed
      pod is never replaced and the Job never ends by itself. Here rank 0 writes its result to its
      termination message, read from the pod's status once the Job has ended (`finish_job`).
    - `build_job_request_obj` gives the pods their subdomain and rendezvous endpoint, which name the
      Job, whose name the provider picks there; `create_job` adds the Service, owned by the Job.
    - `finish_job` writes the log of every pod, attempts included, with a header naming it, and deletes
      the Job whatever the outcome (the provider deletes it only on kill).
    """

    base_container_name: str
    namespace: str

    def _set_nodes(self, *, step: str, argv: list[str], gpus: int, nodes: int, queue: str | None) -> None:
        self.step = step
        self.argv = argv
        self.gpus = gpus
        self.nodes = nodes
        self.queue = queue

    def build_job_request_obj(self, context: Any = None) -> k8s.V1Job:
        job = super().build_job_request_obj(context)
        name = job.metadata.name
        spec = job.spec.template.spec
        main = next(c for c in spec.containers if c.name == self.base_container_name)
        cmd = node_command(self.argv, gpus=self.gpus, nodes=self.nodes, job_name=name,
                           namespace=job.metadata.namespace, settings=load_settings())
        main.command, main.args = cmd[:1], cmd[1:]
        # Rank 0's result (SYNTHVAL_XCOM_FILE) goes to the termination message, readable after the pod
        # ended; "File" only: the log's tail is never taken for it.
        main.termination_message_path = TERMINATION_LOG
        main.termination_message_policy = "File"
        if self.nodes > 1:
            spec.subdomain = name
        job.spec.template.metadata.name = None  # the Job controller names its pods <job>-<index>-<random>
        job.spec.backoff_limit_per_index = BACKOFF_LIMIT_PER_INDEX
        job.spec.max_failed_indexes = 0
        job.spec.pod_failure_policy = failure_policy(self.base_container_name)
        job.spec.pod_replacement_policy = "Failed"
        labels = {**self._get_ti_pod_labels(context, include_try_number=True), **(job.metadata.labels or {})}
        if self.queue:
            labels[KUEUE_QUEUE_LABEL] = self.queue
        job.metadata.labels = labels
        return job

    def create_job(self, job_request_obj: k8s.V1Job) -> k8s.V1Job:
        job = super().create_job(job_request_obj)
        if self.nodes > 1:
            meta = job.metadata
            try:
                created = self.job_client.read_namespaced_job(meta.name, meta.namespace)
                self.client.create_namespaced_service(meta.namespace, build_service(created))
            except Exception:
                self._delete_job(meta.name, meta.namespace)
                raise
        return job

    def execute(self, context: Any) -> None:
        """Delete earlier tries' Jobs, create this try's Job and Service, defer until the Job ends."""
        self._delete_earlier_tries(context)
        self.job_request_obj = self.build_job_request_obj(context)
        self.job = self.create_job(self.job_request_obj)
        meta = self.job.metadata
        context["ti"].xcom_push(key="job_name", value=meta.name)
        context["ti"].xcom_push(key="job_namespace", value=meta.namespace)
        where = f" in Kueue queue {self.queue!r} until admitted" if self.queue else ""
        self.log.info("Job %s/%s: %d node(s) x %d GPU(s)%s; waiting for it to end", meta.namespace,
                      meta.name, self.nodes, self.gpus, where)
        self.defer(trigger=self.job_trigger(meta.name, meta.namespace), method_name="finish_job")

    def finish_job(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        """Write every pod's log, then return rank 0's result or fail naming each pod's end; delete the Job."""
        from airflow.sdk.exceptions import AirflowException, AirflowFailException

        name, namespace = event["name"], event["namespace"]
        container = self.base_container_name
        try:
            pods = self.job_pods(name, namespace)
            for pod in pods:
                self.log.info("==== %s ====", describe_pod(pod, container))
                try:
                    self._write_logs(pod)
                except ApiException as exc:
                    self.log.warning("no log of pod %s: %s", pod.metadata.name, exc.reason)
            if event.get("status") != "success":
                ends = "; ".join(describe_pod(p, container) for p in pods) or "no pods left"
                message = f"Job {namespace}/{name}: {event.get('message')}. {ends}"
                if any(exit_code(p, container) == BAD_INPUT_EXIT_CODE for p in pods):
                    raise AirflowFailException(f"synthval {self.step} rejected its input (exit code 2); "
                                               f"not retried. {message}")
                raise AirflowException(message)
            return rank0_result(pods, container)
        finally:
            self._delete_job(name, namespace)

    def job_pods(self, name: str, namespace: str) -> list[k8s.V1Pod]:
        pods = self.client.list_namespaced_pod(namespace, label_selector=f"{JOB_NAME_LABEL}={name}").items
        return sorted(pods, key=lambda p: (node_index(p), str(p.metadata.creation_timestamp or "")))

    def _delete_job(self, name: str, namespace: str) -> None:
        # Foreground: the Job goes once its pods and Service (owned by it) are gone.
        try:
            self.job_client.delete_namespaced_job(name, namespace, propagation_policy="Foreground")
            self.log.info("Deleted Job %s/%s with its pods and Service", namespace, name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def _delete_earlier_tries(self, context: Any) -> None:
        labels = {**self._get_ti_pod_labels(context, include_try_number=False), STEP_LABEL: self.step}
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        namespace = self.namespace
        stale = self.job_client.list_namespaced_job(namespace, label_selector=selector).items
        for job in stale:
            self.log.warning("Deleting Job %s of an earlier try first: two process groups must never train "
                             "into the same checkpoint folder", job.metadata.name)
            self._delete_job(job.metadata.name, namespace)
        deadline = time.monotonic() + (self.termination_grace_period or 30) + 120
        while stale and time.monotonic() < deadline:
            stale = self.job_client.list_namespaced_job(namespace, label_selector=selector).items
            if stale:
                time.sleep(2)
        if stale:
            from airflow.sdk.exceptions import AirflowException

            raise AirflowException(f"Job {stale[0].metadata.name} of an earlier try is still being deleted")


class SynthvalJobOperator(SynthvalJobMixin, KubernetesJobOperator):
    """The Job of a training step in the cluster Airflow reaches through its Kubernetes connection."""

    def __init__(self, *, step: str, argv: list[str], gpus: int, nodes: int, queue: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._set_nodes(step=step, argv=argv, gpus=gpus, nodes=nodes, queue=queue)

    def job_trigger(self, name: str, namespace: str) -> KubernetesJobTrigger:
        return KubernetesJobTrigger(
            job_name=name, job_namespace=namespace, pod_names=[], pod_namespace=namespace,
            base_container_name=self.base_container_name, kubernetes_conn_id=self.kubernetes_conn_id,
            cluster_context=self.cluster_context, config_file=self.config_file, in_cluster=self.in_cluster,
            poll_interval=self.job_poll_interval, get_logs=False, do_xcom_push=False)


def _gke_job_operator_class() -> type:
    from airflow.providers.google.cloud.operators.kubernetes_engine import GKEStartJobOperator
    from airflow.providers.google.cloud.triggers.kubernetes_engine import GKEJobTrigger

    class SynthvalGKEJobOperator(SynthvalJobMixin, GKEStartJobOperator):
        """The same Job in a GKE cluster reached through a Google Cloud connection."""

        def __init__(self, *, step: str, argv: list[str], gpus: int, nodes: int, queue: str | None = None,
                     **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._set_nodes(step=step, argv=argv, gpus=gpus, nodes=nodes, queue=queue)

        def execute(self, context: Any) -> None:
            self._job_link_context = context  # GKEStartJobOperator.create_job stores the Job's console link
            try:
                super().execute(context)
            finally:
                self._job_link_context = None

        def job_trigger(self, name: str, namespace: str) -> GKEJobTrigger:
            return GKEJobTrigger(
                cluster_url=self.cluster_url, ssl_ca_cert=self.ssl_ca_cert, job_name=name, job_namespace=namespace,
                pod_names=[], pod_namespace=namespace, base_container_name=self.base_container_name,
                gcp_conn_id=self.gcp_conn_id, poll_interval=self.job_poll_interval,
                impersonation_chain=self.impersonation_chain, get_logs=False, do_xcom_push=False,
                use_dns_endpoint=self.use_dns_endpoint)

    return SynthvalGKEJobOperator


def job_operator(task: Any, settings: Settings, pod_arguments: dict[str, Any]) -> KubernetesJobOperator:
    """The Job operator that runs the rendered `synthval_pod_task.SynthvalPodTask` ``task``: its pod
    (``pod_arguments``, `synthval_pods.pod_arguments`), one per node, with no XCom sidecar (rank 0's
    result goes to the termination message)."""
    nodes = int(task.nodes or 1)
    env = {**pod_arguments["env_vars"], XCOM_FILE_ENV: TERMINATION_LOG, **NODE_ENV}
    kwargs: dict[str, Any] = dict(
        pod_arguments, env_vars=env, do_xcom_push=False,
        argv=task.command(), gpus=int(task.gpus or 0), nodes=nodes, queue=settings.kueue_queue,
        completion_mode="Indexed", completions=nodes, parallelism=nodes,
        # Kueue unsuspends the Job once admitted; without a queue it starts at once.
        suspend=True if settings.kueue_queue else None,
        ttl_seconds_after_finished=JOB_TTL_S, wait_until_job_complete=True, deferrable=True,
        job_poll_interval=POLL_INTERVAL_S, on_kill_propagation_policy="Foreground",
    )
    cls = _gke_job_operator_class() if settings.backend == "gke" else SynthvalJobOperator
    return cls(**cluster_connection(settings), **kwargs)
