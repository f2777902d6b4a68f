"""The one task factory behind every synthval DAG: `synthval_task(step, argv, ...)`.

A DAG step is one `synthval <step> ...` command line (`synthval_argv`); this turns it into an Airflow
task on the backend the deployment picks (`synthval_settings`), and DAG files never branch on it:

- ``local``: a child process of the worker (`synthval_local.SynthvalLocalOperator`);
- ``kubernetes``: a pod of the shared training image in the cluster that Airflow's Kubernetes
  connection reaches; ``gke``: the same pod in a GKE cluster reached through a Google Cloud connection
  (`synthval_pod_task.SynthvalPodTask`, which becomes `synthval_pods`' operator, or `synthval_jobs`'
  for training on several nodes, when it runs).

Retries and timeouts come from the step's profile (`synthval_profiles`), buttons from `synthval_links`.
Cheap to import and to parse DAGs with (Airflow's guideline: well under a second per file): no torch,
no synthval, and no Kubernetes client or provider on any backend.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import BaseOperatorLink

from synthval_argv import Argv
from synthval_links import GKEJobLink, GKEPodLink, TensorBoardLink
from synthval_local import SynthvalLocalOperator
from synthval_operator import SynthvalStepOperator
from synthval_pod_task import SynthvalPodTask
from synthval_profiles import MULTINODE_STEPS, step_profile
from synthval_settings import load_settings


def synthval_task(step: str, argv: list[Any], *, task_id: str | None = None, gpus: Any = 0, nodes: Any = None,
                  tb_log_dir: str | None = None, usim_token: bool = False, **kwargs: Any) -> SynthvalStepOperator:
    """Return the task that runs ``argv`` (``["synthval", step, ...]``, argv items) on the set backend.

    ``gpus`` (a number or template) applies to train/fine-tune/evaluate; with more than one, torchrun
    starts one process per GPU. ``nodes`` (train/fine-tune; a number or template) above 1 runs the
    step on that many pods of ``gpus`` GPUs each, as one Indexed Job (dags/synthval_jobs.py); the
    local backend refuses it. ``tb_log_dir`` feeds the TensorBoard link. ``usim_token`` gives the
    process the Unity Simulation token: from the Kubernetes Secret (env USIM_ACCESS_TOKEN via
    secretKeyRef) in a pod, from the Airflow connection (a 0600 file named by USIM_ACCESS_TOKEN_FILE)
    locally. Other keyword arguments go to the operator (trigger_rule, retries, ...).
    """
    if argv[:2] != ["synthval", step]:
        raise ValueError(f"argv of step {step!r} must start with ['synthval', {step!r}], got {argv[:2]!r}")
    settings = load_settings()
    profile = step_profile(step)
    common: dict[str, Any] = dict(
        task_id=task_id or step,
        step=step,
        argv=Argv(argv),
        gpus=gpus if profile.uses_gpu else 0,
        tb_log_dir=tb_log_dir,
        usim_token=usim_token,
        # A pod's failure is often the node's (preemption, eviction), worth retrying with --resume auto;
        # a local one is usually deterministic, so it is retried once.
        retries=profile.retries if settings.is_pod_backend else min(profile.retries, 1),
        retry_delay=timedelta(minutes=1),
        retry_exponential_backoff=True,
        execution_timeout=profile.timeout,
    )
    if nodes is not None:
        if step not in MULTINODE_STEPS:
            raise ValueError(f"step {step!r} runs on one node; nodes applies to {', '.join(MULTINODE_STEPS)}")
        common["nodes"] = nodes
    common.update(kwargs)
    links: tuple[BaseOperatorLink, ...] = (TensorBoardLink(),) if tb_log_dir else ()
    if settings.backend == "local":
        op: SynthvalStepOperator = SynthvalLocalOperator(**common)
    else:
        op = SynthvalPodTask(**common)
        if settings.backend == "gke":
            links += (GKEPodLink(), GKEJobLink()) if step in MULTINODE_STEPS else (GKEPodLink(),)
    if links:
        op.operator_extra_links = links
    return op
