"""The kubernetes and gke backends as DAGs see them: one light task per step, which becomes the
provider's pod operator (`synthval_pods`) or, for training on several nodes, its Job operator
(`synthval_jobs`) only when it runs.

The provider and the Kubernetes client cost seconds to import, which DAG parsing must not pay: this
module imports neither, and imports those two modules only inside `provider_operator`.
"""

from __future__ import annotations

from typing import Any

from synthval_conf import check_conf
from synthval_operator import SynthvalStepOperator
from synthval_profiles import MULTINODE_STEPS
from synthval_settings import Settings, load_settings


def runs_as_job(task: Any, settings: Settings) -> bool:
    """Whether the rendered ``task`` runs as an Indexed Job (dags/synthval_jobs.py) rather than a pod: a
    training step of a run with ``nodes`` > 1, or any training step when a Kueue queue admits them."""
    return task.step in MULTINODE_STEPS and (int(task.nodes or 1) > 1 or bool(settings.kueue_queue))


def provider_operator(task: Any, settings: Settings, *, as_job: bool | None = None) -> Any:
    """The provider operator that runs the rendered `SynthvalPodTask` ``task``: its pod
    (`synthval_pods.pod_operator`), or, when it `runs_as_job` (or ``as_job``), the Job operator of such
    pods (`synthval_jobs.job_operator`)."""
    import synthval_pods

    pod_arguments = synthval_pods.pod_arguments(task, settings)
    if runs_as_job(task, settings) if as_job is None else as_job:
        import synthval_jobs

        return synthval_jobs.job_operator(task, settings, pod_arguments)
    return synthval_pods.pod_operator(settings, pod_arguments)


class SynthvalPodTask(SynthvalStepOperator):
    """Run one ``synthval <step>`` command as a pod of the training image (kubernetes or gke backend).

    Light while DAGs are parsed: the provider's operator is built by `provider_operator` from the
    rendered task when it runs, and this task hands execution, the trigger's re-entry and kills to
    it. That is a `KubernetesPodOperator` or `GKEStartPodOperator` (deferrable), or, for a training
    step of a run with ``nodes`` > 1 (or every training step when a Kueue queue is set), their
    `KubernetesJobOperator` counterpart running an Indexed Job (dags/synthval_jobs.py).
    """

    template_fields = (*SynthvalStepOperator.template_fields, "storage_gib", "image_tag")
    ui_color = "#e3f4e1"

    def __init__(self, *, storage_gib: Any = "{{ params.storage_gib }}", image_tag: Any = "{{ params.image_tag }}",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.storage_gib = storage_gib
        self.image_tag = image_tag
        self._pod_operator: Any = None

    def pod_operator(self) -> Any:
        """The provider's pod or Job operator for this rendered task (built once)."""
        if self._pod_operator is None:
            self._pod_operator = provider_operator(self, load_settings())
        return self._pod_operator

    def build_pod_request_obj(self, context: Any = None, *, dry_run: bool = False) -> Any:
        """The pod this task creates, as the provider builds it (`dry_run` leaves out the random suffix)."""
        return self.pod_operator().build_pod_request_obj(context, dry_run=dry_run)

    def execute(self, context: Any) -> Any:
        check_conf(context)
        return self.pod_operator().execute(context)

    def trigger_reentry(self, context: Any, event: dict[str, Any]) -> Any:
        """Where a deferred pod task resumes (`KubernetesPodOperator.trigger_reentry`)."""
        return self.pod_operator().trigger_reentry(context, event)

    def finish_job(self, context: Any, event: dict[str, Any]) -> Any:
        """Where a deferred training Job resumes (`synthval_jobs.SynthvalJobMixin.finish_job`): its Job
        operator, even if the settings that chose it (a Kueue queue) changed while the Job ran."""
        if not hasattr(self._pod_operator, "finish_job"):
            self._pod_operator = provider_operator(self, load_settings(), as_job=True)
        return self._pod_operator.finish_job(context, event)

    def on_kill(self) -> None:
        if self._pod_operator is not None:
            self._pod_operator.on_kill()
