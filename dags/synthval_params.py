"""The Params every synthval DAG shares, and `recipe_dag`, the DAG defaults.

Params are JSON-schema typed and grouped by ``section``; Airflow validates a run's conf against them
before any task runs (`airflow dags trigger --conf` fails naming the field). Defaults come from the
deployment settings (`synthval_tasks.load_settings`), so the same DAG runs the generated demo data on
CPU locally and the seed's datasets on GPUs in a cluster.

Every string param that reaches a command line is constrained here (an enum, a pattern) so a typo or
a hostile value is refused at trigger, and whatever passes still becomes exactly one argument (the
DAGs render templates as strings, never as native objects; see `synthval_tasks`).

"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from airflow.sdk import DAG, Param

from synthval_tasks import MACROS, load_settings

# Mirrors synthval.config.MODEL_NAMES and PRESETS (a contract test keeps them equal; DAG files must not
# import synthval).
MODEL_NAMES = ("resnet50_fpn", "resnet50_fpn_v2", "mobilenet_v3_large_fpn", "mobilenet_v3_large_320_fpn", "tiny")
PRESETS = ("seed-synthetic", "seed-real", "seed-finetune", "seed-unity-simulation", "modern", "gpu", "cpu-demo")
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
            pod_preset if settings.is_pod_backend else settings.default_preset, type="string", enum=list(PRESETS),
            section="Training",
            description="Named recipe: seed-synthetic, seed-real, seed-finetune, seed-unity-simulation (the seed's "
                        "recipes, comparable with its published numbers), modern (torchvision's reference recipe, "
                        "for the best number), cpu-demo (small images, tiny model). `synthval finetune` applies the "
                        "preset's fine-tuning variant (a seed preset fine-tunes as the seed did).",
        ),
        "model": Param(
            None, type=_nullable("string"), enum=[None, *MODEL_NAMES], section="Training",
            # The trigger form shows an enum's values as they are, `null` included, unless told otherwise.
            values_display={"null": "(the preset's)"},
            description="Detector architecture (empty: the preset's).",
        ),
        "epochs": Param(None, type=_nullable("integer"), minimum=1, section="Training",
                        description="Training epochs (empty: the preset's)."),
        "learning_rate": Param(None, type=_nullable("number"), exclusiveMinimum=0, section="Training",
                               title="Learning rate", description="Peak learning rate (empty: the preset's)."),
        "batch_size": Param(None, type=_nullable("integer"), minimum=1, section="Training",
                            title="Batch size", description="Images per batch and process (empty: the preset's)."),
        "overrides": overrides_param(
            "Training", "Config overrides as key=value, each passed as `--set key=value`, e.g. max_steps=100, "
            "model.min_size=512, schedule.name=cosine."),
    }
    if finetune:
        params.update({
            "finetune_epochs": Param(None, type=_nullable("integer"), minimum=1, section="Fine-tuning",
                                     description="Fine-tuning epochs (empty: the preset's fine-tuning value)."),
            "finetune_learning_rate": Param(None, type=_nullable("number"), exclusiveMinimum=0,
                                            section="Fine-tuning",
                                            description="Fine-tuning learning rate (empty: the preset's fine-tuning "
                                                        "value, well below the training rate)."),
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
        "real_count": Param(
            None, type=_nullable("integer"), minimum=1, section=section, title="Real image count",
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
