"""Evaluate a trained model on the real test split and publish its result record.

The model is a checkpoint URI (for instance the `checkpoint_uri` a training run pushed) or one of
the seed's published models by name: `real-world-760`, `synthetic-400k`, `synthetic-and-real-76`,
`synthetic-and-real-380`, `synthetic-and-real-760` (`synthval` resolves the names to their
storage.googleapis.com/datasetinsights/models/... URLs, so this needs network access).

Tasks: `fetch_real` -> `evaluate` -> `publish`. `evaluate` writes metrics.json and the predictions
under `<output_root>/evaluate_the_model/<run>/eval/`, logs the metrics summary and pushes it in its
XCom; its TensorBoard button opens the sample detections.

```
airflow dags trigger evaluate_the_model --conf '{"checkpoint": "synthetic-and-real-380"}'
airflow dags trigger evaluate_the_model --conf '{"checkpoint": "gs://bucket/runs/.../checkpoints/finetune/last.pt"}'
```
"""

from airflow.sdk import Param

from synthval_argv import Computed, Flag
from synthval_params import (
    EVALUATION_PARAM_KEYS,
    PUBLISHED_MODELS,
    URI_PATTERN,
    compute_params,
    config_param,
    dataset_param,
    evaluation_config,
    output_params,
    overrides_param,
    recipe_dag,
    test_split_param,
)
from synthval_settings import load_settings
from synthval_steps import evaluate_step, fetch_step, publish_step

settings = load_settings()


with recipe_dag(
    "evaluate_the_model",
    __doc__,
    params={
        "checkpoint": Param(
            type="string", anyOf=[{"enum": list(PUBLISHED_MODELS)}, {"pattern": URI_PATTERN}],
            examples=list(PUBLISHED_MODELS), section="Model", title="Checkpoint",
            description="Checkpoint URI (gs://, https://, local path) or a published model name.",
        ),
        "real_dataset": dataset_param("real", settings.default_real),
        **test_split_param(),
        "batch_size": config_param("evaluate", EVALUATION_PARAM_KEYS["batch_size"], section="Evaluation",
                                   title="Batch size", description="Images per batch (empty: the default)."),
        "overrides": overrides_param(
            "Evaluation", "Evaluation config overrides as key=value (`--set`), e.g. draw_score_thresh=0.3."),
        **output_params(),
        **compute_params(training=False),
    },
    tags=["evaluate"],
) as dag:
    fetch_real = fetch_step("fetch_real", "{{ params.real_dataset }}", "real")
    evaluate = evaluate_step("{{ params.checkpoint }}", extra=(Computed(evaluation_config),))
    publish = publish_step("{{ params.checkpoint }}", datasets=(Flag("--dataset", "model={{ params.checkpoint }}"),
                                                                Flag("--dataset", "real={{ params.real_dataset }}")))

    fetch_real >> evaluate >> publish
