"""The pod backends of `synthval_tasks.synthval_task`: one pod shape, two operators.

`SynthvalPodOperator` (a KubernetesPodOperator) runs the step in the cluster Airflow reaches through
its Kubernetes connection; `SynthvalGKEPodOperator` (a GKEStartPodOperator) builds the same pod and
authenticates to a GKE cluster through a Google Cloud connection, for an Airflow outside it.

The pod: the training image at a pinned tag, the step's `synthval` command (torchrun for more than
one GPU), CPU/memory requests per step, and for GPU steps the GPU node pool, the nvidia.com/gpu
toleration and limit and a memory-backed /dev/shm; scratch space (TMPDIR) on a generic ephemeral
volume sized by the `storage_gib` param; secrets only by secretKeyRef; the result JSON through the
XCom sidecar; the pod deleted whatever the outcome (on_kill deletes it when the task is marked failed
or times out).

Imported only when a pod backend is selected: the Kubernetes client costs seconds to import.
"""

from __future__ import annotations

import re
from typing import Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.cncf.kubernetes.secret import Secret
from airflow.providers.google.cloud.operators.kubernetes_engine import GKEStartPodOperator
from kubernetes.client import models as k8s

from synthval_tasks import (
    USIM_TOKEN_ENV,
    Settings,
    check_conf,
    flatten_argv,
    launch_command,
    load_settings,
    step_profile,
)


class SynthvalPodMixin:
    """Builds synthval's pod once templates are rendered (GPU count and volume size are params)."""

    extra_template_fields = ("argv", "gpus", "tb_log_dir", "storage_gib")

    def _set_step(self, step: str, argv: list[Any], gpus: Any, tb_log_dir: str | None, storage_gib: Any) -> None:
        self.step = step
        self.argv = argv
        self.gpus = gpus
        self.tb_log_dir = tb_log_dir
        self.storage_gib = storage_gib

    def command(self) -> list[str]:
        """The rendered command line, as `synthval ...` (the same for every backend)."""
        return flatten_argv(self.argv)

    def execute(self, context: Any) -> Any:
        check_conf(context)
        return super().execute(context)

    def cleanup(self, pod: k8s.V1Pod, remote_pod: k8s.V1Pod, *args: Any, **kwargs: Any) -> None:
        # The provider retries every failed pod; a step that rejected its input (exit code 2: bad conf,
        # malformed dataset, checksum mismatch) fails the same way on every try, so it fails for good.
        from airflow.sdk.exceptions import AirflowException, AirflowFailException

        try:
            super().cleanup(pod, remote_pod, *args, **kwargs)
        except AirflowException as exc:
            if exit_code(remote_pod, self.base_container_name) == BAD_INPUT_EXIT_CODE:
                raise AirflowFailException(f"synthval {self.step} rejected its input (exit code 2); "
                                           f"not retried. {exc}") from exc
            raise

    def build_pod_request_obj(self, context: Any = None, *, dry_run: bool = False) -> k8s.V1Pod:
        self._restore_strings()
        settings = load_settings()
        profile = step_profile(self.step)
        gpus = int(self.gpus or 0) if profile.uses_gpu else 0
        cmd = launch_command(self.command(), gpus, local=False)
        self.cmds, self.arguments = cmd[:1], cmd[1:]
        scale = max(gpus, 1)
        cpu, memory = _scale(profile.cpu, scale), _scale(profile.memory, scale)
        limits = {"cpu": cpu, "memory": memory}
        if gpus:
            limits["nvidia.com/gpu"] = str(gpus)
        self.container_resources = k8s.V1ResourceRequirements(requests={"cpu": cpu, "memory": memory},
                                                              limits=limits)
        self.node_selector, self.tolerations = placement(settings, gpus)
        self.volumes, self.volume_mounts = volumes(settings, gpus, int(self.storage_gib))
        return super().build_pod_request_obj(context, dry_run=dry_run)

    def _restore_strings(self) -> None:
        # The DAGs render templates as native objects, which turns a value like "1" into the int 1;
        # the Kubernetes API wants strings in these fields.
        for env in self.env_vars or []:
            if isinstance(env, k8s.V1EnvVar) and env.value is not None:
                env.value = str(env.value)
        for name in ("labels", "annotations", "node_selector"):
            mapping = getattr(self, name, None)
            if isinstance(mapping, dict):
                setattr(self, name, {k: str(v) for k, v in mapping.items()})
        for name in ("image", "name", "namespace"):
            if getattr(self, name, None) is not None:
                setattr(self, name, str(getattr(self, name)))


# Each operator defines its own __init__: BaseOperator's metaclass wraps only those (default_args).
class SynthvalPodOperator(SynthvalPodMixin, KubernetesPodOperator):
    template_fields = (*KubernetesPodOperator.template_fields, *SynthvalPodMixin.extra_template_fields)
    template_fields_renderers = {**KubernetesPodOperator.template_fields_renderers, "argv": "py"}

    def __init__(self, *, step: str, argv: list[Any], gpus: Any = 0, tb_log_dir: str | None = None,
                 storage_gib: Any = 50, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._set_step(step, argv, gpus, tb_log_dir, storage_gib)


class SynthvalGKEPodOperator(SynthvalPodMixin, GKEStartPodOperator):
    template_fields = (*GKEStartPodOperator.template_fields, *SynthvalPodMixin.extra_template_fields)
    template_fields_renderers = {**GKEStartPodOperator.template_fields_renderers, "argv": "py"}

    def __init__(self, *, step: str, argv: list[Any], gpus: Any = 0, tb_log_dir: str | None = None,
                 storage_gib: Any = 50, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._set_step(step, argv, gpus, tb_log_dir, storage_gib)


BAD_INPUT_EXIT_CODE = 2  # synthval's exit code for bad input or usage (tasks/synthval/cli.py)


def exit_code(remote_pod: k8s.V1Pod | None, container: str) -> int | None:
    """The exit code of `container` in a finished pod, None while it has none."""
    statuses = (remote_pod.status.container_statuses if remote_pod and remote_pod.status else None) or []
    status = next((s for s in statuses if s.name == container), None)
    terminated = status.state.terminated if status and status.state else None
    return terminated.exit_code if terminated else None


def _scale(quantity: str, factor: int) -> str:
    match = re.fullmatch(r"(\d+)(m|Mi|Gi)?", quantity)
    if not match or factor == 1:
        return quantity
    return f"{int(match.group(1)) * factor}{match.group(2) or ''}"


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


TRAINING_IMAGE_UID = 10001


def pod_task(settings: Settings, *, step: str, usim_token: bool, **common: Any) -> KubernetesPodOperator:
    """Return the pod operator of ``step`` for the kubernetes or gke backend."""
    profile = step_profile(step)
    kwargs: dict[str, Any] = dict(
        image=f"{settings.image}:{{{{ params.image_tag }}}}",
        image_pull_policy="IfNotPresent",
        name=f"synthval-{step}",
        namespace=settings.namespace,
        service_account_name=settings.service_account,
        labels={"app.kubernetes.io/name": "synthval", "synthval/step": step},
        env_vars={"TMPDIR": "/scratch", "PYTHONUNBUFFERED": "1"},
        secrets=[Secret("env", USIM_TOKEN_ENV, settings.usim_secret, settings.usim_secret_key)] if usim_token else [],
        storage_gib="{{ params.storage_gib }}",
        do_xcom_push=True,
        get_logs=True,
        log_events_on_failure=True,
        on_finish_action="delete_pod",
        on_kill_action="delete_pod",
        # A GPU node pool scaled to zero takes minutes to add a node and pull the image.
        startup_timeout_seconds=settings.startup_timeout_s,
        schedule_timeout_seconds=settings.startup_timeout_s,
        active_deadline_seconds=int(profile.timeout.total_seconds()),
        termination_grace_period=60,
        # The training image's non-root user (images/training/Dockerfile: uid 10001, gid 0); fsGroup makes
        # the scratch and data volumes writable for it.
        security_context=k8s.V1PodSecurityContext(
            run_as_non_root=True, run_as_user=TRAINING_IMAGE_UID, run_as_group=0, fs_group=TRAINING_IMAGE_UID,
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault")),
        container_security_context=k8s.V1SecurityContext(
            allow_privilege_escalation=False, capabilities=k8s.V1Capabilities(drop=["ALL"])),
    )
    if settings.backend == "gke":
        cls: type = SynthvalGKEPodOperator
        kwargs.update(project_id=settings.gke_project, location=settings.gke_location,
                      cluster_name=settings.gke_cluster, gcp_conn_id=settings.gcp_conn_id)
    else:
        cls = SynthvalPodOperator
        kwargs.update(kubernetes_conn_id=settings.kubernetes_conn_id)
    if "nodes" in common:  # train / fine-tune: an Indexed Job when a run asks for several nodes
        from synthval_jobs import multinode_class

        cls = multinode_class(cls)
    return cls(step=step, **kwargs, **common)
