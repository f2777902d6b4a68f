"""The recipe steps every synthval DAG is built from: fetch, train / finetune, evaluate, publish.

Each function returns one `synthval_task` whose command line is spelled out here once, so a recipe
file only says which data and checkpoints flow where. Arguments are Jinja templates rendered per run
(see the macros in `synthval_tasks`); URIs arrive from upstream XComs, never data.
"""

from __future__ import annotations

from typing import Any

from synthval_tasks import synthval_task

REAL_DATA = "{{ upstream('fetch_real', 'dataset_uri') }}"
ONE_GPU = "{{ [params.gpus, 1] | min }}"  # inference gains nothing from more GPUs


def fetch_step(task_id: str, source: str, folder: str, **kwargs: Any) -> Any:
    """Fetch `source` into `<run root>/data/<folder>`; pushes {"dataset_uri"}."""
    return synthval_task("fetch", ["synthval", "fetch", source, "--out", f"{{{{ run_root() }}}}/data/{folder}"],
                         task_id=task_id, **kwargs)


def train_step(step: str, train_data: str, *, split_flags: tuple[str, ...] = (), init_checkpoint: str | None = None,
               config: str = "{{ config_flags(params) }}", checkpoint_dir: str | None = None,
               tb_log_dir: str | None = None, **kwargs: Any) -> Any:
    """Train (`step="train"`) or fine-tune on `train_data`; pushes {"checkpoint_uri", ...}.

    The checkpoint folder (default: the run's own, per step) is stable across retries, so a retried
    task resumes (`--resume auto`).
    """
    checkpoint_dir = checkpoint_dir or f"{{{{ checkpoint_dir('{step}') }}}}"
    tb_log_dir = tb_log_dir or f"{{{{ tb_log_dir('{step}') }}}}"
    init = ["--init-checkpoint", init_checkpoint] if init_checkpoint else []
    return synthval_task(step, [
        "synthval", step,
        "--train-data", train_data,
        *split_flags,
        *init,
        "--checkpoint-dir", checkpoint_dir,
        "--tb-log-dir", tb_log_dir,
        "--resume", "auto",
        config,
    ], gpus="{{ params.gpus }}", nodes="{{ params.nodes }}", tb_log_dir=tb_log_dir, **kwargs)


REAL_SPLIT_FLAGS = ("--train-split", "{{ params.real_split }}", "{{ optional('--max-images', params.real_count) }}")


def evaluate_step(checkpoint: str, *, task_id: str = "evaluate", out: str = "{{ run_root() }}/eval",
                  tb_log_dir: str | None = None, extra: tuple[str, ...] = (), **kwargs: Any) -> Any:
    """Score `checkpoint` on the real test split into `out`; pushes {"metrics_uri", "summary", ...}."""
    tb_log_dir = tb_log_dir or f"{{{{ tb_log_dir('{task_id}') }}}}"
    return synthval_task("evaluate", [
        "synthval", "evaluate",
        "--checkpoint", checkpoint,
        "--data", REAL_DATA,
        "--split", "{{ params.test_split }}",
        "--out", out,
        "--tb-log-dir", tb_log_dir,
        *extra,
    ], task_id=task_id, gpus=ONE_GPU, tb_log_dir=tb_log_dir, **kwargs)


def publish_step(checkpoint: str, datasets: tuple[str, ...], budget: tuple[str, ...] = (),
                 metrics: str = "{{ upstream('evaluate', 'metrics_uri') }}", **kwargs: Any) -> Any:
    """Publish the result record of `metrics` (evaluate's) under `<output_root>/results`; pushes {"result_uri"}.

    `datasets` and `budget` are argv items (`"--dataset", "role=URI"` pairs, `"--real-budget", N`, or
    templates rendering to such lists).
    """
    return synthval_task("publish", [
        "synthval", "publish",
        "--metrics", metrics,
        "--results", "{{ params.output_root }}/results",
        "--recipe", "{{ dag.dag_id }}",
        "--run-id", "{{ run_id }}",
        *datasets,
        "--checkpoint", checkpoint,
        *budget,
    ], **kwargs)
