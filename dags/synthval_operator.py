"""What every synthval task is, whatever backend runs it: a `synthval <step>` command line (`synthval_argv`)
with its GPUs, nodes, TensorBoard folder and whether it gets the Unity Simulation token.

The backends (`synthval_local`, `synthval_pod_task`) subclass it and add only how the command runs.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperator

from synthval_argv import Argv


class SynthvalStepOperator(BaseOperator):
    """A ``synthval <step>`` task; `command()` is its command line once the run's templates are rendered."""

    template_fields: tuple[str, ...] = ("argv", "gpus", "nodes", "tb_log_dir")
    template_fields_renderers = {"argv": "py"}

    def __init__(self, *, step: str, argv: Argv, gpus: Any = 0, nodes: Any = 1, tb_log_dir: str | None = None,
                 usim_token: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.step = step
        self.argv = argv
        self.gpus = gpus
        self.nodes = nodes
        self.tb_log_dir = tb_log_dir
        self.usim_token = usim_token

    def command(self) -> list[str]:
        """The rendered command line, as `synthval ...` (the same for every backend); before rendering
        there is none to run."""
        if isinstance(self.argv, Argv):
            raise RuntimeError(f"task {self.task_id!r}: its command line exists only once its templates are rendered")
        return list(self.argv)
