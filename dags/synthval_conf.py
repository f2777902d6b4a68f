"""The check every synthval step makes before it starts anything: the run's conf names only params.

Airflow validates a conf's values against the DAG's Params but lets unknown keys through; a typo
would otherwise run with the default silently.
"""

from __future__ import annotations

from typing import Any


def check_conf(context: Any) -> None:
    """Fail, naming it, on a conf key that is no param of the DAG.

    Airflow's trigger (UI, CLI, REST API) validates the DAG's params but accepts keys it does not know;
    a typo such as ``{"epoch": 3}`` would otherwise train with the default silently. Every synthval
    step calls this before it starts anything, so such a run fails in its first tasks.
    """
    import difflib

    from airflow.sdk.exceptions import AirflowFailException

    dag_run, dag = context.get("dag_run"), context.get("dag")
    conf = getattr(dag_run, "conf", None) or {}
    if dag is None or not isinstance(conf, dict):
        return
    unknown = sorted(set(conf) - set(dag.params))
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(dag.params), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise AirflowFailException(
            f"conf key {unknown[0]!r} is not a param of {dag.dag_id}{hint}; nothing was run. Its params are: "
            f"{', '.join(sorted(dag.params))}")
