"""What each `synthval` step asks of the machine it runs on: CPU, memory, time, retries, GPUs, nodes.

Kept apart from the deployment settings (`synthval_settings`): a step's needs are the same on every
deployment, and both the factory (retries, timeouts) and the pod backends (requests, limits) read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

# The steps that read or write the results store; on a pod backend their pods get its URL from a Secret.
RESULTS_STORE_STEPS = ("publish", "discover", "leaderboard")
# The steps that can run on several nodes (the `nodes` param; dags/synthval_jobs.py).
MULTINODE_STEPS = ("train", "finetune")


@dataclass(frozen=True)
class StepProfile:
    """What one step asks of a pod: CPU and memory requests, time, retries.

    Memory is also the limit (memory cannot be taken back, so a pod must not count on more than it
    asked for). CPU has no limit: the request reserves the cores and a step may use idle ones on top.
    Data-loader workers are bursty; a CPU limit (a CFS quota) throttles them even on an idle node, and
    the GPU then waits for batches.
    """

    cpu: str
    memory: str
    timeout: timedelta
    retries: int
    uses_gpu: bool = False


# Requests per step; a GPU step's CPU and memory are per GPU. Sized for a g2-standard-12 (1 x L4,
# 12 vCPU, 48 GB) node per GPU, leaving room for the kubelet.
STEP_PROFILES: dict[str, StepProfile] = {
    "fetch": StepProfile("2", "8Gi", timedelta(hours=6), retries=3),
    "generate": StepProfile("2", "4Gi", timedelta(hours=2), retries=1),
    "train": StepProfile("8", "40Gi", timedelta(hours=48), retries=3, uses_gpu=True),
    "finetune": StepProfile("8", "40Gi", timedelta(hours=24), retries=3, uses_gpu=True),
    "evaluate": StepProfile("6", "24Gi", timedelta(hours=6), retries=2, uses_gpu=True),
    "publish": StepProfile("500m", "1Gi", timedelta(minutes=30), retries=2),
    "version": StepProfile("100m", "256Mi", timedelta(minutes=10), retries=0),
}
# Any other subcommand (report, leaderboard, discover, ...) runs with this one.
DEFAULT_PROFILE = StepProfile("1", "4Gi", timedelta(hours=2), retries=1)


def step_profile(step: str) -> StepProfile:
    """The resources and retry policy of a `synthval <step>` task."""
    return STEP_PROFILES.get(step, DEFAULT_PROFILE)
