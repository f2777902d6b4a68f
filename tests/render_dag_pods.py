"""Render every task of every DAG in dags/ as the deployment would run it, as JSON.

    SYNTHVAL_BACKEND=kubernetes ... python tests/render_dag_pods.py OUT.json [--gpus N ...]

Run by tests/test_deploy.py in a subprocess whose environment holds the settings of
deploy/helm/values.yaml, so that the DAG modules read them at import exactly as in a worker pod.
For each task: the rendered `synthval ...` argv (templates rendered with the DAG's own Jinja
environment, params at their defaults, and upstream XComs answered with placeholder URIs) and, on a
pod backend, the pod the operator would create (`build_pod_request_obj(dry_run=True)`), as the
Kubernetes API would receive it; tasks that are not synthval steps (a branch) only by name.
Not collected by pytest (no test_ prefix).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DAGS = ROOT / "dags"


class _AnyKey(dict):
    """An upstream XCom that has every key: `<task>/<key>` placeholder URIs, and counts for `num_*` keys."""

    def __init__(self, task_id: str) -> None:
        super().__init__()
        self.task_id = task_id

    def get(self, key: str, default: Any = None) -> Any:
        return self[key]

    def __missing__(self, key: str) -> Any:
        if key.startswith("num_"):
            return 76
        return f"gs://xcom-placeholder/{self.task_id}/{key}"


class _FakeTI:
    """What the templates and the pod operator read of a task instance."""

    def __init__(self, dag_id: str, task_id: str, run_id: str) -> None:
        self.dag_id, self.task_id, self.run_id = dag_id, task_id, run_id
        self.try_number, self.map_index, self.start_date = 1, -1, None

    def xcom_pull(self, task_ids: Any = None, key: str = "return_value", **_: Any) -> Any:
        return _AnyKey(str(task_ids))


def _param_value(param: Any) -> Any:
    """The param's default, else its first example, else a placeholder (a required param)."""
    from airflow.sdk.exceptions import ParamValidationError

    try:
        return param.resolve()
    except ParamValidationError:
        examples = param.schema.get("examples") or ["placeholder-1"]
        return examples[0]


def _dags() -> list[Any]:
    from airflow.sdk import DAG

    sys.path.insert(0, str(DAGS))  # as Airflow does for the DAG folder
    found = []
    for path in sorted(DAGS.glob("*.py")):
        module = importlib.import_module(path.stem)
        found += [v for v in vars(module).values() if isinstance(v, DAG)]
    return found


def render(gpus: int | None) -> list[dict[str, Any]]:
    from kubernetes.client import ApiClient

    out = []
    for dag in _dags():
        params = {k: _param_value(dag.params.get_param(k)) for k in dag.params}
        if gpus is not None and "gpus" in params:
            params["gpus"] = gpus
        for task in dag.tasks:
            run_id = "manual__2026-01-01T00:00:00+00:00"
            context = {"params": params, "dag": dag, "task": task, "run_id": run_id, "ds": "2026-01-01",
                       "ti": _FakeTI(dag.dag_id, task.task_id, run_id)}
            item: dict[str, Any] = {"dag_id": dag.dag_id, "task_id": task.task_id,
                                    "operator": type(task).__name__}
            if not hasattr(task, "command"):  # not a synthval step (e.g. a branch)
                out.append(item)
                continue
            if task.get_closest_mapped_task_group() is not None:
                # Its arguments exist only once the group is expanded at run time; the recipes' unmapped
                # steps come from the same factory and cover the pod's shape.
                out.append({**item, "mapped": True})
                continue
            task = copy.deepcopy(task)  # rendering replaces the templates in place
            context["task"] = task
            task.render_template_fields(context)
            item["argv"] = task.command()
            if hasattr(task, "build_pod_request_obj"):
                pod = task.build_pod_request_obj(context, dry_run=True)
                item["pod"] = ApiClient().sanitize_for_serialization(pod)
            out.append(item)
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path, help="JSON file to write")
    parser.add_argument("--gpus", type=int, action="append", default=[],
                        help="render again with this `gpus` param (repeatable); default: the param's default")
    args = parser.parse_args()
    result = {str(g): render(g) for g in (args.gpus or [None])}
    args.out.write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
