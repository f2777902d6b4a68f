"""The templating helpers every synthval DAG registers as macros: where a run's outputs go, and what an
upstream step pushed.

Each returns one string, so a template that uses them still renders to exactly one argument
(`synthval_argv`). Every path is below ``<output_root>/<dag_id>/<run>``, stable across a step's retries.
"""

from __future__ import annotations

import re
from typing import Any


def run_slug(run_id: str) -> str:
    """Return a run id made safe as one path segment of any URI scheme.

    ``manual__2026-11-24T14:20:42.222917+00:00`` -> ``manual__2026-11-24T14-20-42.222917``.
    """
    run_id = re.sub(r"\+00:?00$", "", run_id)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", run_id).strip("-")


def _root_uri(base: str, context: Any) -> str:
    return f"{str(base).rstrip('/')}/{context['dag'].dag_id}/{run_slug(context['run_id'])}"


def _pass_context(fn):
    import jinja2

    return jinja2.pass_context(fn)


@_pass_context
def run_root(context: Any) -> str:
    """``<output_root>/<dag_id>/<run>``: every output of this run lives below it."""
    return _root_uri(context["params"]["output_root"], context)


@_pass_context
def checkpoint_dir(context: Any, step: str) -> str:
    """Stable per run and step, so a retried step finds its checkpoints and `--resume auto` continues."""
    base = context["params"].get("checkpoint_dir") or context["params"]["output_root"]
    suffix = "/checkpoints" if not context["params"].get("checkpoint_dir") else ""
    return f"{_root_uri(base, context)}{suffix}/{step}"


@_pass_context
def tb_log_dir(context: Any, step: str) -> str:
    """TensorBoard log dir of one step of this run."""
    base = context["params"].get("tb_log_dir") or context["params"]["output_root"]
    suffix = "/tensorboard" if not context["params"].get("tb_log_dir") else ""
    return f"{_root_uri(base, context)}{suffix}/{step}"


@_pass_context
def upstream(context: Any, task_id: str, key: str) -> Any:
    """``key`` of the JSON an upstream step pushed; fails naming the task and key when absent."""
    result = context["ti"].xcom_pull(task_ids=task_id)
    if not isinstance(result, dict) or result.get(key) in (None, ""):
        raise KeyError(f"upstream task {task_id!r} pushed no {key!r} in its XCom (got {result!r})")
    return result[key]


MACROS = {
    "run_root": run_root,
    "checkpoint_dir": checkpoint_dir,
    "tb_log_dir": tb_log_dir,
    "upstream": upstream,
}
