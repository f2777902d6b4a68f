"""The recipe steps every synthval DAG is built from: fetch, train / finetune, evaluate, publish.

Each function returns one `synthval_task` whose command line is spelled out here once, so a recipe
file only says which data and checkpoints flow where. Arguments are argv items (`synthval_argv`):
templates rendered per run, each to exactly one argument; URIs arrive from upstream XComs, never data.
"""

from __future__ import annotations

from typing import Any

from synthval_argv import Computed, Flag, ParamFlag
from synthval_params import finetune_config, training_config
from synthval_tasks import synthval_task

REAL_DATA = "{{ upstream('fetch_real', 'dataset_uri') }}"
ONE_GPU = "{{ [params.gpus, 1] | min }}"  # inference gains nothing from more GPUs


def fetch_step(task_id: str, source: Any, folder: str, **kwargs: Any) -> Any:
    """Fetch `source` into `<run root>/data/<folder>`; pushes {"dataset_uri"}."""
    # The source is the positional argument, after "--": whatever it holds, it cannot pass for an option.
    return synthval_task("fetch", ["synthval", "fetch", Flag("--out", f"{{{{ run_root() }}}}/data/{folder}"),
                                   "--", source], task_id=task_id, **kwargs)


def train_step(step: str, train_data: Any, *, split_flags: tuple[Any, ...] = (), val_flags: tuple[Any, ...] = (),
               init_checkpoint: Any = None, config: Computed | None = None, checkpoint_dir: Any = None,
               tb_log_dir: Any = None, **kwargs: Any) -> Any:
    """Train (`step="train"`) or fine-tune on `train_data`, validating per `val_flags`; pushes
    {"checkpoint_uri", "best_checkpoint_uri", ...}.

    The checkpoint folder (default: the run's own, per step) is stable across retries, so a retried
    task resumes (`--resume auto`). `config` defaults to the training (or fine-tuning) params.
    """
    checkpoint_dir = checkpoint_dir or f"{{{{ checkpoint_dir('{step}') }}}}"
    tb_log_dir = tb_log_dir or f"{{{{ tb_log_dir('{step}') }}}}"
    config = config or Computed(finetune_config if step == "finetune" else training_config)
    init = [Flag("--init-checkpoint", init_checkpoint)] if init_checkpoint else []
    return synthval_task(step, [
        "synthval", step,
        Flag("--train-data", train_data),
        *split_flags,
        *val_flags,
        *init,
        Flag("--checkpoint-dir", checkpoint_dir),
        Flag("--tb-log-dir", tb_log_dir),
        "--resume=auto",
        config,
    ], gpus="{{ params.gpus }}", nodes="{{ params.nodes }}", tb_log_dir=tb_log_dir, **kwargs)


REAL_SPLIT_FLAGS = (Flag("--train-split", "{{ params.real_split }}"), ParamFlag("--max-images", "real_count"))
REAL_VAL_FLAGS = (Flag("--val-data", REAL_DATA), Flag("--val-split", "{{ params.real_val_split }}"))
SYNTHETIC_DATA = "{{ upstream('fetch_synthetic', 'dataset_uri') }}"
SYNTHETIC_SPLIT_FLAGS = (Flag("--train-split", "{{ params.synthetic_train_split }}"),)
SYNTHETIC_VAL_FLAGS = (Flag("--val-data", SYNTHETIC_DATA), Flag("--val-split", "{{ params.synthetic_val_split }}"))


def evaluate_step(checkpoint: Any, *, task_id: str = "evaluate", out: Any = "{{ run_root() }}/eval",
                  tb_log_dir: Any = None, extra: tuple[Any, ...] = (), **kwargs: Any) -> Any:
    """Score `checkpoint` on the real test split into `out`; pushes {"metrics_uri", "summary", ...}."""
    tb_log_dir = tb_log_dir or f"{{{{ tb_log_dir('{task_id}') }}}}"
    return synthval_task("evaluate", [
        "synthval", "evaluate",
        Flag("--checkpoint", checkpoint),
        Flag("--data", REAL_DATA),
        Flag("--split", "{{ params.test_split }}"),
        Flag("--out", out),
        Flag("--tb-log-dir", tb_log_dir),
        *extra,
    ], task_id=task_id, gpus=ONE_GPU, tb_log_dir=tb_log_dir, **kwargs)


def publish_step(checkpoint: Any, datasets: tuple[Any, ...], budget: tuple[Any, ...] = (),
                 metrics: Any = "{{ upstream('evaluate', 'metrics_uri') }}", **kwargs: Any) -> Any:
    """Publish the result record of `metrics` (evaluate's) under `<output_root>/results`; pushes {"result_uri"}.

    `datasets` and `budget` are argv items (`Flag("--dataset", "role=URI")`, `Flag("--real-budget", N)`,
    or a `Computed` list of them).
    """
    return synthval_task("publish", [
        "synthval", "publish",
        Flag("--metrics", metrics),
        Flag("--results", "{{ params.output_root }}/results"),
        Flag("--recipe", "{{ dag.dag_id }}"),
        Flag("--run-id", "{{ run_id }}"),
        *datasets,
        Flag("--checkpoint", checkpoint),
        *budget,
    ], **kwargs)
