"""Train Faster R-CNN on a synthetic dataset (the SynthDet sample by default), evaluate it on real images.

The seed's first question: how well does a detector trained on synthetic images alone do on real
ones? This recipe fetches the synthetic dataset (`synthdet-sample` in a cluster; generated demo data
on the local backend; any dataset URI by param) and the real test set, trains on the synthetic
images (validating on the seed's 10% synthetic validation split after every epoch), evaluates on the
real test split and publishes the result record. On GPUs the default preset is `seed-synthetic`, the
seed's recipe (its effective batch of 256 on any number of GPUs); `modern` is torchvision's.

Tasks: `fetch_synthetic`, `fetch_real` -> `train` -> `evaluate` -> `publish`. Each task is one
`synthval <step>` command (see its Rendered Template); XComs carry URIs: train -> evaluate
(checkpoint) -> publish (metrics). Outputs: `<output_root>/train_on_synthdet_sample/<run>/`. The
TensorBoard button of train and evaluate opens their logs.

```
airflow dags trigger train_on_synthdet_sample --conf '{"epochs": 12, "gpus": 1}'
airflow dags trigger train_on_synthdet_sample --conf '{"synthetic_dataset": "gs://bucket/my-synthetic-set"}'
```
"""

from synthval_argv import Flag
from synthval_params import (
    compute_params,
    dataset_param,
    output_params,
    recipe_dag,
    synthetic_split_params,
    test_split_param,
    training_params,
)
from synthval_settings import load_settings
from synthval_steps import (
    SYNTHETIC_DATA,
    SYNTHETIC_SPLIT_FLAGS,
    SYNTHETIC_VAL_FLAGS,
    evaluate_step,
    fetch_step,
    publish_step,
    train_step,
)

settings = load_settings()

with recipe_dag(
    "train_on_synthdet_sample",
    __doc__,
    params={
        "synthetic_dataset": dataset_param("synthetic", settings.default_synthetic),
        "real_dataset": dataset_param("real", settings.default_real),
        **test_split_param(),
        **synthetic_split_params(),
        **training_params(pod_preset="seed-synthetic"),
        **output_params(),
        **compute_params(),
    },
    tags=["train"],
) as dag:
    fetch_synthetic = fetch_step("fetch_synthetic", "{{ params.synthetic_dataset }}", "synthetic")
    fetch_real = fetch_step("fetch_real", "{{ params.real_dataset }}", "real")
    train = train_step("train", SYNTHETIC_DATA, split_flags=SYNTHETIC_SPLIT_FLAGS, val_flags=SYNTHETIC_VAL_FLAGS)
    evaluate = evaluate_step("{{ upstream('train', 'checkpoint_uri') }}")
    publish = publish_step(
        "{{ upstream('train', 'checkpoint_uri') }}",
        datasets=(Flag("--dataset", "synthetic={{ params.synthetic_dataset }}"),
                  Flag("--dataset", "real={{ params.real_dataset }}")),
        budget=(Flag("--real-budget", 0),),
    )

    fetch_synthetic >> train
    [train, fetch_real] >> evaluate >> publish
