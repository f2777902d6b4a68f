"""What the recipe DAGs train: the seed's recipe by default on GPUs, the fast demo locally, a validation split
named in Params for every training step, and published models by name wherever a checkpoint goes.

The rendered command lines are resolved by the CLI's own parser and config loader, so a test here fails if
a DAG's default stops being the seed's recipe, or a training step stops validating.
"""

from __future__ import annotations

from typing import Any

import pytest
from test_dags import REQUIRED_CONF, UPSTREAM_XCOMS, load_dags, option, render

from synthval.cli import get_parser
from synthval.config import TrainConfig, load_config

POD_SETTINGS = {"data_root": "gs://bucket/synthval", "image_tag": "0.1.0", "results_db_secret": "synthval-results-db"}
TRAINING_STEPS = {  # (dag, task) -> the seed preset its step resolves to on the pod backends
    ("train_on_synthdet_sample", "train"): "seed-synthetic",
    ("train_on_synthetic_dataset_unity_simulation", "train"): "seed-synthetic",
    ("train_on_real_world_dataset", "train"): "seed-real",
    ("train_on_synthetic_and_real_dataset", "train"): "seed-synthetic",
    ("train_on_synthetic_and_real_dataset", "finetune"): "seed-finetune",
}


@pytest.fixture(scope="module")
def pod_dags():
    import synthval_settings

    with pytest.MonkeyPatch.context() as mp:
        dags = load_dags(mp, "kubernetes", **POD_SETTINGS)
    synthval_settings.load_settings.cache_clear()
    return dags


@pytest.fixture(scope="module")
def local_recipe_dags():
    import synthval_settings

    with pytest.MonkeyPatch.context() as mp:
        dags = load_dags(mp, "local", data_root="/tmp/synthval-test-root")
    synthval_settings.load_settings.cache_clear()
    return dags


def resolved_config(argv: list[str]) -> tuple[Any, TrainConfig]:
    """The parsed command line and the training config `synthval train|finetune` would resolve from it."""
    args = get_parser().parse_args(argv[1:])
    overrides = list(args.overrides) + [f"{k}={v}" for v, k in ((args.train_split, "data.split"),
                                                                (args.val_split, "data.val_split")) if v]
    return args, load_config(TrainConfig, preset=args.preset, overrides=overrides, finetune=args.command == "finetune")


def test_on_gpus_every_recipe_trains_the_seed_s_recipe_and_validates(pod_dags):
    for (dag_id, task_id), preset in TRAINING_STEPS.items():
        dag = pod_dags[dag_id]
        argv = render(dag, dag.task_dict[task_id], REQUIRED_CONF.get(dag_id, {})).command()
        args, config = resolved_config(argv)
        assert config == load_config(TrainConfig, preset=preset, overrides=[
            f"data.split={config.data.split}", f"data.val_split={config.data.val_split}"]), (dag_id, task_id)
        assert (config.optimizer.name, config.model.weights_backbone, config.model.backbone_norm) == (
            "adam", "imagenet", "frozen")
        synthetic = task_id == "train" and dag_id != "train_on_real_world_dataset"
        data = UPSTREAM_XCOMS["fetch_synthetic" if synthetic else "fetch_real"]["dataset_uri"]
        assert args.val_data == data  # validated on the data it trains on, a split of its own
        assert (args.train_split, args.val_split) == (("seed-train", "seed-val") if synthetic else ("train", "val"))
    finetune = resolved_config(render(pod_dags["train_on_synthetic_and_real_dataset"],
                                      pod_dags["train_on_synthetic_and_real_dataset"].task_dict["finetune"]).command())[1]
    assert (finetune.optimizer.lr, finetune.epochs, finetune.data.effective_batch_size) == (2e-5, 30, 64)


def test_locally_the_recipes_keep_the_fast_demo_preset_and_still_validate(local_recipe_dags):
    for (dag_id, task_id) in TRAINING_STEPS:
        dag = local_recipe_dags[dag_id]
        args, config = resolved_config(render(dag, dag.task_dict[task_id], REQUIRED_CONF.get(dag_id, {})).command())
        assert args.preset == "cpu-demo" and config.model.name == "tiny"
        assert args.val_data and args.val_split and args.val_split != args.train_split


def test_the_validation_split_is_a_param(pod_dags):
    dag = pod_dags["train_on_synthetic_and_real_dataset"]
    conf = {"synthetic_val_split": "val", "synthetic_train_split": "train", "real_val_split": "test"}
    train = render(dag, dag.task_dict["train"], conf).command()
    finetune = render(dag, dag.task_dict["finetune"], conf).command()
    assert option(train, "--train-split") == "train"
    assert option(train, "--val-split") == "val" and option(finetune, "--val-split") == "test"


def test_published_models_go_by_name_to_evaluate_and_finetune(pod_dags):
    dag = pod_dags["evaluate_the_model"]
    argv = render(dag, dag.task_dict["evaluate"], {"checkpoint": "synthetic-400k"}).command()
    assert option(argv, "--checkpoint") == "synthetic-400k"
    publish = render(dag, dag.task_dict["publish"], {"checkpoint": "synthetic-400k"}).command()
    assert option(publish, "--checkpoint") == "synthetic-400k"
    dag = pod_dags["train_on_synthetic_and_real_dataset"]
    xcoms = {k: v for k, v in UPSTREAM_XCOMS.items() if k not in ("train", "fetch_synthetic")}
    finetune = render(dag, dag.task_dict["finetune"], {"start_from_checkpoint": "synthetic-400k"}, xcoms).command()
    assert option(finetune, "--init-checkpoint") == "synthetic-400k"
    assert get_parser().parse_args(finetune[1:]).init_checkpoint == "synthetic-400k"
