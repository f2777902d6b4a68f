"""The Params every synthval DAG shares, and `recipe_dag`, the DAG defaults.

Params are JSON-schema typed and grouped by ``section``; Airflow validates a run's conf against them
before any task runs (`airflow dags trigger --conf` fails naming the field). Defaults come from the
deployment settings (`synthval_tasks.load_settings`), so the same DAG runs the generated demo data on
CPU locally and the seed's datasets on GPUs in a cluster.

The DAGs render templates as native Python objects: an argv item that renders to a list (an optional
flag group such as ``{{ optional('--max-images', params.real_count) }}``) is spliced into the command
line, so unset params add no flag at all.
"""

from __future__ import annotations

from datetime import timedelta
from airflow.sdk import DAG, Param

from synthval_tasks import MACROS, load_settings

# Mirrors synthval.config.MODEL_NAMES and PRESETS (a contract test keeps them equal; DAG files must not
# import synthval).
MODEL_NAMES = ("resnet50_fpn", "resnet50_fpn_v2", "mobilenet_v3_large_fpn", "mobilenet_v3_large_320_fpn", "tiny")
PRESETS = ("gpu", "cpu-demo")
# The seed's published checkpoints; `synthval` resolves the names (synthval.fetch.NAMED_SOURCES).
PUBLISHED_MODELS = ("real-world-760", "synthetic-400k", "synthetic-and-real-76", "synthetic-and-real-380",
                    "synthetic-and-real-760")
REAL_SPLITS = ("train_small", "train_medium", "train")
URI_PATTERN = r"^((gs|gcs|https?|file)://.+|[/~].*)$"
OVERRIDE_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*=.*$"


def _nullable(kind: str | list[str]) -> list[str]:
    return ["null", *([kind] if isinstance(kind, str) else kind)]


def dataset_param(role: str, default: str) -> Param:
    return Param(
        default, type="string", minLength=1, section="Datasets", title=f"{role.capitalize()} dataset",
        description=f"The {role} dataset: a URI (gs://, https://, a local folder or archive), a named source "
        "(synthdet-sample, groceries-real), usim://PROJECT/RUN_EXECUTION, or generated demo data "
        "(generate://synthetic?num_images=400&image_size=192, generate://real-proxy?...).",
    )


def output_params() -> dict[str, Param]:
    settings = load_settings()
    return {
        "output_root": Param(
            settings.data_root, type="string", minLength=1, section="Outputs", title="Output root",
            description="Root URI of all outputs; this run writes below <output_root>/<dag_id>/<run_id>/.",
        ),
        "checkpoint_dir": Param(
            None, type=_nullable("string"), section="Outputs", title="Checkpoint dir",
            description="Where checkpoints go, as <checkpoint_dir>/<dag_id>/<run_id>/<step>/ (empty: "
            "<output_root>/<dag_id>/<run_id>/checkpoints/<step>/). Stable per run, so a retry resumes.",
        ),
        "tb_log_dir": Param(
            None, type=_nullable("string"), section="Outputs", title="TensorBoard log dir",
            description="Where TensorBoard logs go, as <tb_log_dir>/<dag_id>/<run_id>/<step>/ (empty: "
            "<output_root>/<dag_id>/<run_id>/tensorboard/<step>/).",
        ),
    }


def training_params(*, finetune: bool = False) -> dict[str, Param]:
    settings = load_settings()
    params = {
        "preset": Param(
            settings.default_preset, type="string", enum=list(PRESETS), section="Training",
            description="Named starting config: gpu (full size) or cpu-demo (small images, tiny model).",
        ),
        "model": Param(
            None, type=_nullable("string"), enum=[None, *MODEL_NAMES], section="Training",
            description="Detector architecture (empty: the preset's).",
        ),
        "epochs": Param(None, type=_nullable("integer"), minimum=1, section="Training",
                        description="Training epochs (empty: the preset's)."),
        "learning_rate": Param(None, type=_nullable("number"), exclusiveMinimum=0, section="Training",
                               title="Learning rate", description="Peak learning rate (empty: the preset's)."),
        "batch_size": Param(None, type=_nullable("integer"), minimum=1, section="Training",
                            title="Batch size", description="Images per batch and process (empty: the preset's)."),
        "overrides": Param(
            [], type="array", items={"type": "string", "pattern": OVERRIDE_PATTERN}, section="Training",
            description="Config overrides as key=value, each passed as `--set key=value`, e.g. max_steps=100, "
            "model.min_size=512, schedule.name=cosine.",
        ),
    }
    if finetune:
        params.update({
            "finetune_epochs": Param(None, type=_nullable("integer"), minimum=1, section="Fine-tuning",
                                     description="Fine-tuning epochs (empty: the preset's fine-tuning value)."),
            "finetune_learning_rate": Param(None, type=_nullable("number"), exclusiveMinimum=0,
                                            section="Fine-tuning",
                                            description="Fine-tuning learning rate (empty: the preset's fine-tuning "
                                                        "value, well below the training rate)."),
            "finetune_overrides": Param(
                [], type="array", items={"type": "string", "pattern": OVERRIDE_PATTERN}, section="Fine-tuning",
                description="Overrides for fine-tuning only, applied after `overrides`.",
            ),
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


def test_split_param() -> dict[str, Param]:
    return {"test_split": Param("test", type="string", minLength=1, section="Datasets", title="Test split",
                                description="Split of the real dataset the model is evaluated on.")}


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


def recipe_dag(dag_id: str, doc_md: str | None, params: dict[str, Param], tags: list[str]) -> DAG:
    """Return a manually triggered synthval DAG with the shared macros and defaults."""
    return DAG(
        dag_id=dag_id,
        doc_md=doc_md,
        description=(doc_md or "").strip().splitlines()[0] if doc_md else None,
        schedule=None,
        catchup=False,
        max_active_runs=4,
        params=params,
        tags=["synthval", *tags],
        render_template_as_native_obj=True,
        user_defined_macros=dict(MACROS),
        default_args={"owner": "synthval", "retry_delay": timedelta(minutes=1)},
    )

