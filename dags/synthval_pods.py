"""The pod of a synthval step, and the two provider operators that run it (kubernetes and gke backends).

`SynthvalPodOperator` (a KubernetesPodOperator) runs the step in the cluster Airflow reaches through
its Kubernetes connection; `SynthvalGKEPodOperator` (a GKEStartPodOperator) builds the same pod and
authenticates to a GKE cluster through a Google Cloud connection, for an Airflow outside it.

The pod: the training image at a pinned tag, the step's `synthval` command (torchrun for more than
one GPU), CPU/memory requests per step (memory limited, CPU not: see `synthval_profiles.StepProfile`),
and for GPU steps the GPU node pool, the nvidia.com/gpu toleration and limit and a memory-backed
/dev/shm; scratch space (TMPDIR) on a generic ephemeral volume sized by the `storage_gib` param;
secrets only by secretKeyRef; the result JSON through the XCom sidecar; the pod deleted whatever the
outcome (on_kill deletes it when the task is marked failed or times out).

Deferrable: once the pod is created, the task hands the wait to a trigger in Airflow's triggerer and
frees its worker slot (a training runs for up to two days); the triggerer copies the container's log
into the task log every `LOG_INTERVAL_S`, and a worker picks the task up again only when the pod ends,
to read its result and clean up.

A training step that runs on several nodes (or under a Kueue queue) runs as an Indexed Job of this same
pod instead (`synthval_pod_task.runs_as_job`; dags/synthval_jobs.py builds it from `pod_arguments`).

Imported only when a pod task runs (or a test renders one), by `synthval_pod_task.provider_operator`:
the provider and the Kubernetes client cost seconds to import, which DAG parsing must not pay.
"""

from __future__ import annotations

import re
from typing import Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.cncf.kubernetes.secret import Secret
from kubernetes.client import models as k8s

from synthval_launch import RESULTS_DB_ENV, USIM_TOKEN_ENV, launch_command
from synthval_profiles import RESULTS_STORE_STEPS, step_profile
from synthval_settings import Settings

BAD_INPUT_EXIT_CODE = 2  # synthval's exit code for bad input or usage (tasks/synthval/cli.py)
TRAINING_IMAGE_UID = 10001
LOG_INTERVAL_S = 120  # how often a deferred task's log gets the pod's new lines
POLL_INTERVAL_S = 30  # how often the trigger looks at the pod


class SynthvalPodMixin:
    """A synthval step's pod: fails for good when the step rejected its input."""

    step: str

    def cleanup(self, pod: k8s.V1Pod, remote_pod: k8s.V1Pod, *args: Any, **kwargs: Any) -> None:
        # The provider retries every failed pod; a step that rejected its input (exit code 2: bad conf,
        # malformed dataset, checksum mismatch) fails the same way on every try, so it fails for good.
        from airflow.sdk.exceptions import AirflowException, AirflowFailException

        try:
            super().cleanup(pod, remote_pod, *args, **kwargs)  # type: ignore[misc]
        except AirflowException as exc:
            if exit_code(remote_pod, self.base_container_name) == BAD_INPUT_EXIT_CODE:  # type: ignore[attr-defined]
                raise AirflowFailException(f"synthval {self.step} rejected its input (exit code 2); "
                                           f"not retried. {exc}") from exc
            raise


class SynthvalPodOperator(SynthvalPodMixin, KubernetesPodOperator):
    def __init__(self, *, step: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.step = step


def _gke_operator_class() -> type:
    from airflow.providers.google.cloud.operators.kubernetes_engine import GKEStartPodOperator

    class SynthvalGKEPodOperator(SynthvalPodMixin, GKEStartPodOperator):
        def __init__(self, *, step: str, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.step = step

    return SynthvalGKEPodOperator


def terminated_state(pod: k8s.V1Pod | None, container: str) -> k8s.V1ContainerStateTerminated | None:
    """How `container` of `pod` ended (exit code, reason, termination message), None while it runs."""
    statuses = (pod.status.container_statuses if pod and pod.status else None) or []
    status = next((s for s in statuses if s.name == container), None)
    return status.state.terminated if status and status.state else None


def exit_code(remote_pod: k8s.V1Pod | None, container: str) -> int | None:
    """The exit code of `container` in a finished pod, None while it has none."""
    terminated = terminated_state(remote_pod, container)
    return terminated.exit_code if terminated else None


def _scale(quantity: str, factor: int) -> str:
    match = re.fullmatch(r"(\d+)(m|Mi|Gi)?", quantity)
    if not match or factor == 1:
        return quantity
    return f"{int(match.group(1)) * factor}{match.group(2) or ''}"


def resources(step: str, gpus: int) -> k8s.V1ResourceRequirements:
    """Requests per step (per GPU for GPU steps); memory and GPUs limited, CPU not."""
    profile = step_profile(step)
    scale = max(gpus, 1)
    cpu, memory = _scale(profile.cpu, scale), _scale(profile.memory, scale)
    limits = {"memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    return k8s.V1ResourceRequirements(requests={"cpu": cpu, "memory": memory}, limits=limits)


def placement(settings: Settings, gpus: int) -> tuple[dict[str, str], list[k8s.V1Toleration]]:
    """Node selector and tolerations: the GPU node pool for GPU steps, else the CPU pool if set."""
    if not gpus:
        return ({"cloud.google.com/gke-nodepool": settings.cpu_node_pool} if settings.cpu_node_pool else {}), []
    selector = {}
    if settings.gpu_node_pool:
        selector["cloud.google.com/gke-nodepool"] = settings.gpu_node_pool
    if settings.gpu_accelerator:
        selector["cloud.google.com/gke-accelerator"] = settings.gpu_accelerator
    # GKE taints GPU nodes with nvidia.com/gpu=present:NoSchedule.
    return selector, [k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]


def volumes(settings: Settings, gpus: int, storage_gib: int) -> tuple[list[k8s.V1Volume], list[k8s.V1VolumeMount]]:
    """Scratch (TMPDIR) on a generic ephemeral volume, /dev/shm for GPU steps, the data PVC if set."""
    # Downloads, archive extraction and the staging of remote writes go to TMPDIR; a generic ephemeral
    # volume is created with the pod and deleted with it, so nothing is left behind.
    claim = k8s.V1PersistentVolumeClaimSpec(
        access_modes=["ReadWriteOnce"],
        storage_class_name=settings.storage_class,
        resources=k8s.V1VolumeResourceRequirements(requests={"storage": f"{storage_gib}Gi"}),
    )
    vols = [k8s.V1Volume(name="scratch", ephemeral=k8s.V1EphemeralVolumeSource(
        volume_claim_template=k8s.V1PersistentVolumeClaimTemplate(
            metadata=k8s.V1ObjectMeta(labels={"app.kubernetes.io/name": "synthval"}), spec=claim)))]
    mounts = [k8s.V1VolumeMount(name="scratch", mount_path="/scratch")]
    if gpus:
        # Data loader workers pass batches through /dev/shm; a container gets 64 MiB by default.
        vols.append(k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(
            medium="Memory", size_limit=settings.shm_size)))
        mounts.append(k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"))
    if settings.data_pvc:
        vols.append(k8s.V1Volume(name="data", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
            claim_name=settings.data_pvc)))
        mounts.append(k8s.V1VolumeMount(name="data", mount_path="/data"))
    return vols, mounts


def pod_operator(settings: Settings, pod_arguments: dict[str, Any]) -> KubernetesPodOperator:
    """The provider's pod operator of a step (`pod_arguments`) in the cluster the settings name."""
    if settings.backend == "gke":
        return _gke_operator_class()(**cluster_connection(settings), **pod_arguments)
    return SynthvalPodOperator(**cluster_connection(settings), **pod_arguments)


def cluster_connection(settings: Settings) -> dict[str, Any]:
    """How an operator reaches the cluster: a GKE cluster through a Google Cloud connection, else the
    Kubernetes connection."""
    if settings.backend == "gke":
        return dict(project_id=settings.gke_project, location=settings.gke_location,
                    cluster_name=settings.gke_cluster, gcp_conn_id=settings.gcp_conn_id)
    return dict(kubernetes_conn_id=settings.kubernetes_conn_id)


def pod_arguments(task: Any, settings: Settings) -> dict[str, Any]:
    """The pod operator's arguments for the rendered ``task``: its pod, how it is watched and cleaned up."""
    argv = task.command()  # fails on a task whose templates are not rendered
    step = task.step
    profile = step_profile(step)
    gpus = int(task.gpus or 0) if profile.uses_gpu else 0
    cmd = launch_command(argv, gpus, local=False)
    node_selector, tolerations = placement(settings, gpus)
    pod_volumes, mounts = volumes(settings, gpus, int(task.storage_gib))
    secrets = [Secret("env", USIM_TOKEN_ENV, settings.usim_secret, settings.usim_secret_key)] if task.usim_token else []
    if step in RESULTS_STORE_STEPS:
        secrets.append(Secret("env", RESULTS_DB_ENV, settings.results_db_secret, settings.results_db_secret_key))
    kwargs: dict[str, Any] = dict(
        task_id=task.task_id,
        step=step,
        image=f"{settings.image}:{task.image_tag}",
        image_pull_policy="IfNotPresent",
        cmds=cmd[:1],
        arguments=cmd[1:],
        name=f"synthval-{step}",
        namespace=settings.namespace,
        service_account_name=settings.service_account,
        labels={"app.kubernetes.io/name": "synthval", "synthval/step": step},
        env_vars={"TMPDIR": "/scratch", "PYTHONUNBUFFERED": "1"},
        secrets=secrets,
        container_resources=resources(step, gpus),
        node_selector=node_selector,
        tolerations=tolerations,
        volumes=pod_volumes,
        volume_mounts=mounts,
        do_xcom_push=True,
        get_logs=True,
        log_events_on_failure=True,
        on_finish_action="delete_pod",
        on_kill_action="delete_pod",
        deferrable=True,
        poll_interval=POLL_INTERVAL_S,
        logging_interval=LOG_INTERVAL_S,
        # A GPU node pool scaled to zero takes minutes to add a node and pull the image.
        startup_timeout_seconds=settings.startup_timeout_s,
        schedule_timeout_seconds=settings.startup_timeout_s,
        active_deadline_seconds=int(profile.timeout.total_seconds()),
        execution_timeout=task.execution_timeout,
        termination_grace_period=60,
        # The training image's non-root user (images/training/Dockerfile: uid 10001, gid 0); fsGroup makes
        # the scratch and data volumes writable for it.
        security_context=k8s.V1PodSecurityContext(
            run_as_non_root=True, run_as_user=TRAINING_IMAGE_UID, run_as_group=0, fs_group=TRAINING_IMAGE_UID,
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault")),
        container_security_context=k8s.V1SecurityContext(
            allow_privilege_escalation=False, capabilities=k8s.V1Capabilities(drop=["ALL"])),
    )
    return kwargs
