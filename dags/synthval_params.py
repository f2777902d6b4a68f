"""The Params every synthval DAG shares, how they become config flags, and `recipe_dag`, the DAG defaults.

Params are JSON-schema typed and grouped by ``section``; Airflow validates a run's conf against them
before any task runs (`airflow dags trigger --conf` fails naming the field). Defaults come from the
deployment settings (`synthval_settings.load_settings`), so the same DAG runs the generated demo data on
CPU locally and the seed's datasets on GPUs in a cluster.

A param that sets a config key (`config_param`) takes its type, enum and range from the config's own
JSON schema, ``synthval_config_schema.json`` beside this file, which `synthval config-schema` generates
from tasks/synthval/config.py (a test keeps the two equal): the limits are written once, and a DAG
needs neither the synthval package nor torch to be parsed.

Every string param that reaches a command line is constrained here (an enum, a pattern) so a typo or
a hostile value is refused at trigger, and whatever passes still becomes exactly one argument (the
DAGs render templates as strings, never as native objects; see `synthval_argv`).

"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, Param

from synthval_argv import format_arg, set_flags
from synthval_macros import MACROS
from synthval_settings import load_settings

CONFIG_SCHEMA_PATH = Path(__file__).with_name("synthval_config_schema.json")
# The params that set one config key each (`config_param`), passed as `--set=<key>=<value>`.
TRAINING_PARAM_KEYS = {"model": "model.name", "epochs": "epochs", "learning_rate": "optimizer.lr",
                       "batch_size": "data.batch_size"}
EVALUATION_PARAM_KEYS = {"batch_size": "batch_size"}
# The seed's published checkpoints; `synthval` resolves the names (synthval.io.sources.NAMED_SOURCES).
PUBLISHED_MODELS = ("real-world-760", "synthetic-400k", "synthetic-and-real-76", "synthetic-and-real-380",
                    "synthetic-and-real-760")
REAL_SPLITS = ("train_small", "train_medium", "train")
_TEXT = r"[^\x00-\x1f\x7f]"  # any character but a control character (a NUL cannot reach a process)
# Where things are read from: an absolute local path or a URI.
URI_PATTERN = rf"^((gs|gcs|https?|file)://{_TEXT}+|[/~]{_TEXT}*)$"
# Where outputs go: a local folder or a bucket.
OUTPUT_PATTERN = rf"^((gs|gcs|file)://{_TEXT}+|[/~]{_TEXT}*)$"
# A dataset: a URI, usim://PROJECT/RUN, generate://KIND?..., or a named source.
DATASET_PATTERN = rf"^((gs|gcs|https?|file|usim|generate)://{_TEXT}+|[/~]{_TEXT}*|[A-Za-z0-9][A-Za-z0-9._-]*)$"
# A split name (GroceriesReal's split files are groceries_real_<split>.txt).
SPLIT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
OVERRIDE_PATTERN = rf"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*={_TEXT}*$"


def _nullable(kind: str | list[str]) -> list[str]:
    return ["null", *([kind] if isinstance(kind, str) else kind)]


@functools.cache
def config_schema() -> dict[str, Any]:
    """The configs' JSON schema (`synthval config-schema`), read once per process."""
    return json.loads(CONFIG_SCHEMA_PATH.read_text(encoding="utf-8"))


def config_param(config: str, key: str, **kwargs: Any) -> Param:
    """An optional param that sets ``key`` ("optimizer.lr") of the ``config`` ("train" or "evaluate"):
    the config's type, enum and range, or null (empty in the form) for the preset's value. The schema
    records the key as ``config_key`` ("train.optimizer.lr")."""
    field = config_schema()["$defs"][config]
    for part in key.split("."):
        field = field["properties"][part]
    kinds = field["type"] if isinstance(field["type"], list) else [field["type"]]
    limits = {k: field[k] for k in ("minimum", "maximum", "exclusiveMinimum") if k in field}
    if "enum" in field:
        limits["enum"] = [None, *(v for v in field["enum"] if v is not None)]
    return Param(None, type=_nullable([k for k in kinds if k != "null"]), config_key=f"{config}.{key}",
                 **limits, **kwargs)


def dataset_param(role: str, default: str) -> Param:
    return Param(
        default, type="string", pattern=DATASET_PATTERN, maxLength=4096, section="Datasets",
        title=f"{role.capitalize()} dataset",
        description=f"The {role} dataset: a URI (gs://, https://, a local folder or archive), a named source "
        "(synthdet-sample, groceries-real), usim://PROJECT/RUN_EXECUTION, or generated demo data "
        "(generate://synthetic?num_images=400&image_size=192, generate://real-proxy?...).",
    )


def output_params() -> dict[str, Param]:
    settings = load_settings()
    return {
        "output_root": Param(
            settings.data_root, type="string", pattern=OUTPUT_PATTERN, section="Outputs", title="Output root",
            description="Root URI of all outputs (an absolute local path or gs://); this run writes below "
            "<output_root>/<dag_id>/<run_id>/.",
        ),
        "checkpoint_dir": Param(
            None, type=_nullable("string"), pattern=OUTPUT_PATTERN, section="Outputs", title="Checkpoint dir",
            description="Where checkpoints go, as <checkpoint_dir>/<dag_id>/<run_id>/<step>/ (empty: "
            "<output_root>/<dag_id>/<run_id>/checkpoints/<step>/). Stable per run, so a retry resumes.",
        ),
        "tb_log_dir": Param(
            None, type=_nullable("string"), pattern=OUTPUT_PATTERN, section="Outputs", title="TensorBoard log dir",
            description="Where TensorBoard logs go, as <tb_log_dir>/<dag_id>/<run_id>/<step>/ (empty: "
            "<output_root>/<dag_id>/<run_id>/tensorboard/<step>/).",
        ),
    }


def overrides_param(section: str, description: str) -> Param:
    """A list of key=value config overrides, each passed as one `--set=key=value` argument.

    Nullable only so that the trigger form does not mark it required; empty and null add nothing.
    """
    return Param([], type=["array", "null"], items={"type": "string", "pattern": OVERRIDE_PATTERN},
                 section=section, description=description)


def training_params(*, finetune: bool = False, pod_preset: str = "seed-synthetic") -> dict[str, Param]:
    """The training knobs; the preset defaults to the recipe's seed preset `pod_preset` on the pod backends
    (the number Unity's pipeline would have given) and to the fast cpu-demo one on the local backend."""
    settings = load_settings()
    params = {
        "preset": Param(
            pod_preset if settings.is_pod_backend else settings.default_preset, type="string",
            enum=config_schema()["$defs"]["preset"]["enum"], config_key="preset", section="Training",
            description="Named recipe: seed-synthetic, seed-real, seed-finetune, seed-unity-simulation (the seed's "
                        "recipes, comparable with its published numbers), modern (torchvision's reference recipe, "
                        "for the best number), cpu-demo (small images, tiny model). `synthval finetune` applies the "
                        "preset's fine-tuning variant (a seed preset fine-tunes as the seed did).",
        ),
        "model": config_param(
            "train", TRAINING_PARAM_KEYS["model"], section="Training",
            # The trigger form shows an enum's values as they are, `null` included, unless told otherwise.
            values_display={"null": "(the preset's)"},
            description="Detector architecture (empty: the preset's).",
        ),
        "epochs": config_param("train", TRAINING_PARAM_KEYS["epochs"], section="Training",
                               description="Training epochs (empty: the preset's)."),
        "learning_rate": config_param("train", TRAINING_PARAM_KEYS["learning_rate"], section="Training",
                                      title="Learning rate", description="Peak learning rate (empty: the preset's)."),
        "batch_size": config_param("train", TRAINING_PARAM_KEYS["batch_size"], section="Training", title="Batch size",
                                   description="Images per batch and process (empty: the preset's)."),
        "overrides": overrides_param(
            "Training", "Config overrides as key=value, each passed as `--set key=value`, e.g. max_steps=100, "
            "model.min_size=512, schedule.name=cosine."),
    }
    if finetune:
        params.update({
            "finetune_epochs": config_param("train", TRAINING_PARAM_KEYS["epochs"], section="Fine-tuning",
                                            description="Fine-tuning epochs (empty: the preset's fine-tuning value)."),
            "finetune_learning_rate": config_param(
                "train", TRAINING_PARAM_KEYS["learning_rate"], section="Fine-tuning",
                description="Fine-tuning learning rate (empty: the preset's fine-tuning value, well below the "
                            "training rate)."),
            "finetune_overrides": overrides_param(
                "Fine-tuning", "Overrides for fine-tuning only, applied after `overrides`."),
        })
    return params


def real_split_params(section: str = "Datasets") -> dict[str, Param]:
    return {
        "real_split": Param(
            "train", type="string", enum=list(REAL_SPLITS), section=section, title="Real training split",
            description="GroceriesReal split to train on: train_small (~76 images), train_medium (~380), train (760).",
        ),
        "real_count": config_param(  # the steps' --max-images
            "train", "data.max_images", section=section, title="Real image count",
            description="Use only this many images of the split (empty: all of it).",
        ),
    }


def synthetic_split_params() -> dict[str, Param]:
    return {
        "synthetic_train_split": Param(
            "seed-train", type="string", pattern=SPLIT_PATTERN, section="Validation", title="Synthetic training split",
            description="Split of the synthetic dataset to train on; seed-train / seed-val are the seed's 90/10 "
                        "split (scikit-learn's train_test_split, random_state 47).",
        ),
        "synthetic_val_split": Param(
            "seed-val", type="string", pattern=SPLIT_PATTERN, section="Validation", title="Synthetic validation split",
            description="Split of the synthetic dataset validated on after every epoch (loss and mAP to "
                        "TensorBoard; the best checkpoint is kept beside the last).",
        ),
    }


def real_val_split_param() -> dict[str, Param]:
    return {"real_val_split": Param(
        "val", type="string", pattern=SPLIT_PATTERN, section="Validation", title="Real validation split",
        description="Split of the real dataset validated on after every epoch of training on real images (loss "
                    "and mAP to TensorBoard; the best checkpoint is kept beside the last).",
    )}


def test_split_param() -> dict[str, Param]:
    return {"test_split": Param(
        "test", type="string", pattern=SPLIT_PATTERN, examples=["test", "val", "all"], section="Datasets",
        title="Test split", description="Split of the real dataset the model is evaluated on: test (GroceriesReal's, "
        "or 10% of any other dataset), val, all, or a split file's name.")}


MAX_NODES = 64


def compute_params(*, training: bool = True) -> dict[str, Param]:
    """GPUs, image tag, scratch size; with `training`, the number of nodes of the train/fine-tune steps."""
    settings = load_settings()
    nodes = {
        "nodes": Param(
            1, type="integer", minimum=1, maximum=MAX_NODES if settings.is_pod_backend else 1, section="Compute",
            title="Nodes", description="Machines for training and fine-tuning, each with `gpus` GPUs. More than "
            "one: an Indexed Job of that many pods, one torchrun group across them (kubernetes and gke "
            "backends only; the local backend accepts 1). The effective batch stays the recipe's.",
        ),
    } if training else {}
    return {
        "gpus": Param(
            settings.default_gpus, type="integer", minimum=0, maximum=16, section="Compute", title="GPUs",
            description="GPUs per node of a training step (more than one: torchrun, one process per GPU); "
            "evaluation uses at most one. 0 runs on CPU.",
        ),
        **nodes,
        "image_tag": Param(
            settings.image_tag, type="string", pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$",
            **{"not": {"const": "latest"}}, section="Compute", title="Image tag",
            description=f"Tag of {settings.image} for pods (pinned, never latest). Unused by the local backend.",
        ),
        "storage_gib": Param(
            100 if settings.is_pod_backend else 10, type="integer", minimum=1, maximum=10000, section="Compute",
            title="Scratch storage (GiB)", description="Size of each pod's scratch volume (downloads, staging).",
        ),
    }


@contextlib.contextmanager
def synthval_dag(params: dict[str, Param], **dag_kwargs: Any) -> Iterator[DAG]:
    """``with synthval_dag(params, dag_id=..., ...) as dag:`` a DAG whose params are attached once its tasks exist.

    Airflow gives each task a deep copy of the DAG's params when the task is created and validates every
    copy twice when it serializes the DAG: for a DAG of 16 tasks and 24 params that is 0.3 CPU-s of each
    parse, the whole budget. A task needs no copy: at run time Airflow starts from the DAG's params and
    lays the task's own (none here) and the run's conf over them (`airflow.sdk.definitions.param.
    process_params`), and triggers validate conf against the DAG's params. So they are attached after
    the tasks, and each task carries none.
    """
    with DAG(**dag_kwargs) as dag:
        yield dag
    dag.params = params


def recipe_dag(dag_id: str, doc_md: str | None, params: dict[str, Param], tags: list[str]):
    """``with recipe_dag(...) as dag:`` a manually triggered synthval DAG with the shared macros and defaults.

    Templates render to strings (never native objects), so a param's value stays one argument.
    """
    return synthval_dag(
        params,
        dag_id=dag_id,
        doc_md=doc_md,
        description=(doc_md or "").strip().splitlines()[0] if doc_md else None,
        schedule=None,
        catchup=False,
        max_active_runs=4,
        tags=["synthval", *tags],
        user_defined_macros=dict(MACROS),
        default_args={"owner": "synthval", "retry_delay": timedelta(minutes=1)},
    )


def config_flags(params: Any, prefix: str = "") -> list[str]:
    """The training config flags from the DAG params: preset, model, epochs, lr, batch size, overrides.

    With ``prefix="finetune_"`` the fine-tune params (``finetune_epochs`` ...) are used; an empty
    fine-tune epochs or learning rate leaves the preset's fine-tuning value (`synthval finetune`
    lowers the rate), never the training one. ``finetune_overrides`` come after ``overrides``.
    """

    def pick(name: str) -> Any:
        if not prefix:
            return params.get(name)
        value = params.get(prefix + name)
        own_only = name in ("epochs", "learning_rate")
        return value if value not in (None, "") or own_only else params.get(name)

    overrides = list(params.get("overrides") or []) + (list(params.get(prefix + "overrides") or []) if prefix else [])
    keys = {key: pick(name) for name, key in TRAINING_PARAM_KEYS.items()}
    return [f"--preset={format_arg(params['preset'])}", *set_flags(keys, overrides)]


def training_config(context: Any) -> list[str]:
    """`config_flags` of a run's params (a `Computed` item of train steps)."""
    return config_flags(context["params"])


def finetune_config(context: Any) -> list[str]:
    """`config_flags` of a run's fine-tuning params (a `Computed` item of fine-tune steps)."""
    return config_flags(context["params"], prefix="finetune_")


def evaluation_config(context: Any) -> list[str]:
    """``--set`` flags of a run's evaluation params (batch_size, overrides)."""
    params = context["params"]
    return set_flags({key: params.get(name) for name, key in EVALUATION_PARAM_KEYS.items()}, params.get("overrides"))
