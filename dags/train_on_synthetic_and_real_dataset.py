"""Train Faster R-CNN on a synthetic dataset, then fine-tune it on a budget of real images.

How much is a synthetic dataset worth when real labels are scarce? This recipe trains on the
synthetic dataset, fine-tunes that model on a real split (`train_small` ~76 images, `train_medium`
~380, `train` 760, or `real_count` images of it), evaluates **both** the synthetic-only and the
fine-tuned model on the real test split, and publishes the fine-tuned result. Training validates on the
seed's 10% synthetic validation split, fine-tuning on the real `val` split, after every epoch. On GPUs
the default preset is `seed-synthetic`: training is the seed's synthetic recipe and fine-tuning its
fine-tuning one (Adam 2e-5, 30 epochs, 64 images per step).

**Start from a synthetic checkpoint**: set `start_from_checkpoint` (a URI, or a published model such
as `synthetic-400k`) and the synthetic fetch and training are skipped (shown as skipped in the grid).

Tasks: `choose_start` -> (`fetch_synthetic` -> `train` | `use_given_checkpoint`), `fetch_real` ->
`evaluate_synthetic`, `finetune` -> `evaluate` -> `publish`. Each task is one `synthval <step>`
command (see its Rendered Template); XComs carry URIs: train -> finetune (checkpoint) -> evaluate
(checkpoint) -> publish (metrics). Outputs: `<output_root>/train_on_synthetic_and_real_dataset/<run>/`.
The TensorBoard button of train, finetune and evaluate opens their logs.

```
airflow dags trigger train_on_synthetic_and_real_dataset --conf '{"real_split": "train_small"}'
airflow dags trigger train_on_synthetic_and_real_dataset \\
    --conf '{"start_from_checkpoint": "synthetic-400k", "real_split": "train_medium", "gpus": 2}'
```
"""

from airflow.sdk import Param, task

from synthval_argv import Computed, Flag
from synthval_conf import check_conf
from synthval_params import (
    PUBLISHED_MODELS,
    URI_PATTERN,
    compute_params,
    dataset_param,
    output_params,
    real_split_params,
    real_val_split_param,
    recipe_dag,
    synthetic_split_params,
    test_split_param,
    training_params,
)
from synthval_settings import load_settings
from synthval_steps import (
    REAL_DATA,
    REAL_SPLIT_FLAGS,
    REAL_VAL_FLAGS,
    SYNTHETIC_DATA,
    SYNTHETIC_SPLIT_FLAGS,
    SYNTHETIC_VAL_FLAGS,
    evaluate_step,
    fetch_step,
    publish_step,
    train_step,
)

settings = load_settings()


def trained_on(context) -> list[str]:
    """What the fine-tuned model was trained on before the real images, as publish records it (its role on
    the leaderboard): the given checkpoint, or the synthetic dataset."""
    params = context["params"]
    if params["start_from_checkpoint"]:
        return [f"--dataset=model={params['start_from_checkpoint']}"]
    return [f"--dataset=synthetic={params['synthetic_dataset']}"]


with recipe_dag(
    "train_on_synthetic_and_real_dataset",
    __doc__,
    params={
        "synthetic_dataset": dataset_param("synthetic", settings.default_synthetic),
        "real_dataset": dataset_param("real", settings.default_real),
        **real_split_params(),
        **real_val_split_param(),
        **synthetic_split_params(),
        **test_split_param(),
        "start_from_checkpoint": Param(
            None, type=["null", "string"], anyOf=[{"type": "null"}, {"enum": list(PUBLISHED_MODELS)},
                                                  {"type": "string", "pattern": URI_PATTERN}],
            examples=list(PUBLISHED_MODELS), section="Fine-tuning", title="Start from checkpoint",
            description="Skip synthetic training and fine-tune this checkpoint (URI or published model name).",
        ),
        **training_params(finetune=True, pod_preset="seed-synthetic"),
        **output_params(),
        **compute_params(),
    },
    tags=["train", "finetune"],
) as dag:

    @task.branch
    def choose_start(params=None, **context) -> str:
        """Train on synthetic data, unless a synthetic checkpoint to start from was given."""
        check_conf(context)
        return "use_given_checkpoint" if params["start_from_checkpoint"] else "fetch_synthetic"

    @task
    def use_given_checkpoint(params=None) -> dict:
        """Hand the given checkpoint on like `train` would."""
        return {"checkpoint_uri": params["start_from_checkpoint"]}

    start = choose_start()
    given = use_given_checkpoint()

    fetch_synthetic = fetch_step("fetch_synthetic", "{{ params.synthetic_dataset }}", "synthetic")
    fetch_real = fetch_step("fetch_real", "{{ params.real_dataset }}", "real")
    train = train_step("train", SYNTHETIC_DATA, split_flags=SYNTHETIC_SPLIT_FLAGS, val_flags=SYNTHETIC_VAL_FLAGS)

    # The checkpoint fine-tuning starts from: the given one, or the one `train` just wrote.
    start_checkpoint = "{{ params.start_from_checkpoint or upstream('train', 'checkpoint_uri') }}"
    after_either = "none_failed_min_one_success"

    evaluate_synthetic = evaluate_step(start_checkpoint, task_id="evaluate_synthetic",
                                       out="{{ run_root() }}/eval/synthetic", trigger_rule=after_either)
    finetune = train_step("finetune", REAL_DATA, split_flags=REAL_SPLIT_FLAGS, val_flags=REAL_VAL_FLAGS,
                          init_checkpoint=start_checkpoint, trigger_rule=after_either)
    evaluate = evaluate_step("{{ upstream('finetune', 'checkpoint_uri') }}", out="{{ run_root() }}/eval/finetuned")
    publish = publish_step(
        "{{ upstream('finetune', 'checkpoint_uri') }}",
        datasets=(Computed(trained_on), Flag("--dataset", "real={{ params.real_dataset }}")),
        budget=(Flag("--real-budget", "{{ upstream('finetune', 'num_train_images') }}"),),
    )

    start >> [fetch_synthetic, given]
    fetch_synthetic >> train
    [train, given, fetch_real] >> evaluate_synthetic
    [train, given, fetch_real] >> finetune >> evaluate >> publish
