"""Train Faster R-CNN on real images only (GroceriesReal), the baseline synthetic data must beat.

Fetches the real dataset (`groceries-real` in a cluster; generated real-like demo data on the local
backend), trains on a real split (`train_small` ~76 images, `train_medium` ~380, `train` 760, or
`real_count` images of it), evaluates on the real test split and publishes the result record.

Tasks: `fetch_real` -> `train` -> `evaluate` -> `publish`. Each task is one `synthval <step>`
command (see its Rendered Template); XComs carry URIs: train -> evaluate (checkpoint) -> publish
(metrics). Outputs: `<output_root>/train_on_real_world_dataset/<run>/`. The TensorBoard button of
train and evaluate opens their logs.

```
airflow dags trigger train_on_real_world_dataset --conf '{"real_split": "train_small", "epochs": 20}'
```
"""

from synthval_params import (
    compute_params,
    dataset_param,
    output_params,
    real_split_params,
    recipe_dag,
    test_split_param,
    training_params,
)
from synthval_tasks import load_settings, synthval_task

settings = load_settings()

with recipe_dag(
    "train_on_real_world_dataset",
    __doc__,
    params={
        "real_dataset": dataset_param("real", settings.default_real),
        **real_split_params(),
        **test_split_param(),
        **training_params(),
        **output_params(),
        **compute_params(),
    },
    tags=["train"],
) as dag:
    fetch_real = synthval_task("fetch", [
        "synthval", "fetch", "{{ params.real_dataset }}", "--out", "{{ run_root() }}/data/real",
    ], task_id="fetch_real")

    train = synthval_task("train", [
        "synthval", "train",
        "--train-data", "{{ upstream('fetch_real', 'dataset_uri') }}",
        "--train-split", "{{ params.real_split }}",
        "{{ optional('--max-images', params.real_count) }}",
        "--checkpoint-dir", "{{ checkpoint_dir('train') }}",
        "--tb-log-dir", "{{ tb_log_dir('train') }}",
        "--resume", "auto",
        "{{ config_flags(params) }}",
    ], gpus="{{ params.gpus }}", tb_log_dir="{{ tb_log_dir('train') }}")

    evaluate = synthval_task("evaluate", [
        "synthval", "evaluate",
        "--checkpoint", "{{ upstream('train', 'checkpoint_uri') }}",
        "--data", "{{ upstream('fetch_real', 'dataset_uri') }}",
        "--split", "{{ params.test_split }}",
        "--out", "{{ run_root() }}/eval",
        "--tb-log-dir", "{{ tb_log_dir('evaluate') }}",
    ], gpus="{{ [params.gpus, 1] | min }}", tb_log_dir="{{ tb_log_dir('evaluate') }}")

    publish = synthval_task("publish", [
        "synthval", "publish",
        "--metrics", "{{ upstream('evaluate', 'metrics_uri') }}",
        "--results", "{{ params.output_root }}/results",
        "--recipe", "{{ dag.dag_id }}",
        "--run-id", "{{ run_id }}",
        "--dataset", "real={{ params.real_dataset }}",
        "--checkpoint", "{{ upstream('train', 'checkpoint_uri') }}",
        "{{ optional('--real-budget', params.real_count) }}",
    ])

    fetch_real >> train >> evaluate >> publish
