"""Train Faster R-CNN on real images only (GroceriesReal), the baseline synthetic data must beat.

Fetches the real dataset (`groceries-real` in a cluster; generated real-like demo data on the local
backend), trains on a real split (`train_small` ~76 images, `train_medium` ~380, `train` 760, or
`real_count` images of it) validating on the real `val` split after every epoch, evaluates on the real
test split and publishes the result record. On GPUs the default preset is `seed-real`, the seed's recipe.

Tasks: `fetch_real` -> `train` -> `evaluate` -> `publish`. Each task is one `synthval <step>`
command (see its Rendered Template); XComs carry URIs: train -> evaluate (checkpoint) -> publish
(metrics). Outputs: `<output_root>/train_on_real_world_dataset/<run>/`. The TensorBoard button of
train and evaluate opens their logs.

```
airflow dags trigger train_on_real_world_dataset --conf '{"real_split": "train_small", "epochs": 20}'
```
"""

from synthval_argv import Flag
from synthval_params import (
    compute_params,
    dataset_param,
    output_params,
    real_split_params,
    real_val_split_param,
    recipe_dag,
    test_split_param,
    training_params,
)
from synthval_settings import load_settings
from synthval_steps import (
    REAL_DATA,
    REAL_SPLIT_FLAGS,
    REAL_VAL_FLAGS,
    evaluate_step,
    fetch_step,
    publish_step,
    train_step,
)

settings = load_settings()

with recipe_dag(
    "train_on_real_world_dataset",
    __doc__,
    params={
        "real_dataset": dataset_param("real", settings.default_real),
        **real_split_params(),
        **real_val_split_param(),
        **test_split_param(),
        **training_params(pod_preset="seed-real"),
        **output_params(),
        **compute_params(),
    },
    tags=["train"],
) as dag:
    fetch_real = fetch_step("fetch_real", "{{ params.real_dataset }}", "real")
    train = train_step("train", REAL_DATA, split_flags=REAL_SPLIT_FLAGS, val_flags=REAL_VAL_FLAGS)
    evaluate = evaluate_step("{{ upstream('train', 'checkpoint_uri') }}")
    publish = publish_step(
        "{{ upstream('train', 'checkpoint_uri') }}",
        datasets=(Flag("--dataset", "real={{ params.real_dataset }}"),),
        budget=(Flag("--real-budget", "{{ upstream('train', 'num_train_images') }}"),),
    )

    fetch_real >> train >> evaluate >> publish
