"""Train Faster R-CNN on the images of a Unity Simulation run, evaluate it on real images.

Fetches the dataset a Unity Simulation run execution produced (`usim://<project_id>/<run_execution_id>`)
and the real test set, trains on the synthetic images (validating on the seed's 10% synthetic
validation split after every epoch), evaluates on the real test split and publishes the result record.
On GPUs the default preset is `seed-unity-simulation`, the seed's synthetic recipe.

**The access token never passes through conf, arguments or logs.** On the kubernetes and gke
backends the fetch pod reads it from the Kubernetes Secret named by the `SYNTHVAL_USIM_SECRET`
setting (default `usim-access-token`, key `token`) through a secretKeyRef:
`kubectl -n synthval create secret generic usim-access-token --from-literal=token=...`.
On the local backend it comes from the Airflow connection `usim_default` (its password), handed to
the process as a 0600 file named by `USIM_ACCESS_TOKEN_FILE`:
`airflow connections add usim_default --conn-type generic --conn-password ...`.

Tasks: `fetch_synthetic`, `fetch_real` -> `train` -> `evaluate` -> `publish`. XComs carry URIs.
Outputs: `<output_root>/train_on_synthetic_dataset_unity_simulation/<run>/`.

```
airflow dags trigger train_on_synthetic_dataset_unity_simulation \\
    --conf '{"project_id": "8a6b...", "run_execution_id": "yJ3kQ2x"}'
```
"""

from airflow.sdk import Param

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
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"

with recipe_dag(
    "train_on_synthetic_dataset_unity_simulation",
    __doc__,
    params={
        "project_id": Param(type="string", pattern=ID_PATTERN, section="Unity Simulation", title="Project id",
                            description="Unity project id the simulation ran under."),
        "run_execution_id": Param(type="string", pattern=ID_PATTERN, section="Unity Simulation",
                                  title="Run execution id", description="The run execution to fetch."),
        "real_dataset": dataset_param("real", settings.default_real),
        **test_split_param(),
        **synthetic_split_params(),
        **training_params(pod_preset="seed-unity-simulation"),
        **output_params(),
        **compute_params(),
    },
    tags=["train", "unity-simulation"],
) as dag:
    fetch_synthetic = fetch_step("fetch_synthetic", "usim://{{ params.project_id }}/{{ params.run_execution_id }}",
                                 "synthetic", usim_token=True)
    fetch_real = fetch_step("fetch_real", "{{ params.real_dataset }}", "real")
    train = train_step("train", SYNTHETIC_DATA, split_flags=SYNTHETIC_SPLIT_FLAGS, val_flags=SYNTHETIC_VAL_FLAGS)
    evaluate = evaluate_step("{{ upstream('train', 'checkpoint_uri') }}")
    publish = publish_step(
        "{{ upstream('train', 'checkpoint_uri') }}",
        datasets=(Flag("--dataset", "synthetic=usim://{{ params.project_id }}/{{ params.run_execution_id }}"),
                  Flag("--dataset", "real={{ params.real_dataset }}")),
        budget=(Flag("--real-budget", 0),),
    )

    fetch_synthetic >> train
    [train, fetch_real] >> evaluate >> publish
