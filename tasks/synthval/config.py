"""Typed, validated configuration: the one place where defaults live.

A config is a tree of dataclasses. It is built from a YAML file (or preset) plus `--set key=value`
overrides; an unknown key, a wrong type or a value out of range raises ConfigError naming the dotted
key, the value and what would be accepted. The resolved config is stored in every checkpoint and
every metrics file as a plain dict.

Types, enums (`Literal`) and ranges (field metadata: `positive`, `fraction`; any other number must not
be negative) are written here once: `validate` enforces them, and `config_schema` publishes them as a
JSON schema (`synthval config-schema`), from which the DAGs build their Params.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from synthval.errors import ConfigError

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")

# Ranges as JSON schema keywords, in the metadata of a dataclass field; a number without one must not be
# negative. `validate` checks them and `config_schema` publishes them.
POSITIVE = {"exclusiveMinimum": 0}
FRACTION = {"minimum": 0, "maximum": 1}  # probabilities and fractions: outside [0, 1] they mean nothing
NON_NEGATIVE = {"minimum": 0}


def positive(default: Any) -> Any:
    """A config field whose value (when set) must be greater than 0: counts, sizes, rates."""
    return field(default=default, metadata=POSITIVE)


def fraction(default: Any) -> Any:
    """A config field whose value must lie in [0, 1]."""
    return field(default=default, metadata=FRACTION)


MODEL_NAMES = (
    "resnet50_fpn",
    "resnet50_fpn_v2",
    "mobilenet_v3_large_fpn",
    "mobilenet_v3_large_320_fpn",
    "tiny",
)


@dataclass
class ModelConfig:
    """Which torchvision Faster R-CNN to build and how big its inputs and heads are."""

    name: Literal[MODEL_NAMES] = "resnet50_fpn"
    # None: random init; "imagenet": torchvision's ImageNet weights, read from the torch hub cache that the
    # training image fills at build time (never downloaded at run time); else a file or URI of a backbone
    # state dict.
    weights_backbone: str | None = None
    # Backbone layers (from the top) that train; None: 3 with backbone weights (torchvision), else all.
    trainable_backbone_layers: int | None = None
    # "frozen": FrozenBatchNorm2d keeps the backbone's batch statistics (torchvision's choice with backbone
    # weights: batches of 2-8 images cannot estimate them); "batch": trainable BatchNorm2d; None: frozen
    # with backbone weights, batch without.
    backbone_norm: Literal["frozen", "batch"] | None = None
    # FrozenBatchNorm2d's eps: torchvision before 0.8, which the seed trained with, used 0 (pytorch/vision#2933).
    frozen_bn_eps: float = 1e-5
    min_size: int = positive(800)
    max_size: int = positive(1333)
    # Box-head knobs: on CPU the heads, not the backbone, decide speed (RoIAlign + 6272x1024 matmul).
    roi_pool_size: int = positive(7)
    box_head_dim: int = positive(1024)
    box_batch_size_per_image: int = positive(512)
    rpn_batch_size_per_image: int = positive(256)
    rpn_pre_nms_top_n_train: int = positive(2000)
    rpn_post_nms_top_n_train: int = positive(2000)
    rpn_pre_nms_top_n_test: int = positive(1000)
    rpn_post_nms_top_n_test: int = positive(1000)
    box_score_thresh: float = fraction(0.05)
    box_detections_per_img: int = positive(100)


@dataclass
class OptimizerConfig:
    # adam: torch.optim.Adam (the seed's); adamw: decoupled weight decay; sgd: with momentum.
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = positive(0.02)
    momentum: float = fraction(0.9)
    weight_decay: float = 1e-4


@dataclass
class ScheduleConfig:
    """Linear warm-up, then a step or cosine decay over the epochs (or a constant rate).

    `warmup_steps` is the warm-up of a run of `warmup_reference_steps` optimizer steps: a shorter run
    warms up over the same fraction of its steps (at least one), so it still reaches the peak rate
    before the first decay. Without a reference the warm-up is `warmup_steps` whatever the run's length.
    """

    name: Literal["step", "cosine", "constant"] = "step"
    warmup_steps: int = 500
    warmup_factor: float = fraction(0.001)
    warmup_reference_steps: int | None = positive(None)
    milestones: list[int] = field(default_factory=lambda: [8, 11])
    gamma: float = fraction(0.1)


@dataclass
class DataConfig:
    # None: the dataset's own train / val split where it defines splits (GroceriesReal), else every image.
    split: str | None = None
    val_split: str | None = None
    # Images per batch in each process.
    batch_size: int = positive(4)
    # Images per optimizer step over all processes; None: batch_size x processes x grad_accum_steps.
    # When set, gradient accumulation is derived from it (see `accumulation_steps`): 1 GPU and 8 GPUs
    # then take the same optimizer steps on the same number of images.
    effective_batch_size: int | None = positive(None)
    num_workers: int = 2
    aspect_ratio_group_factor: int = 3
    hflip_prob: float = fraction(0.5)
    photometric: bool = True
    # Use at most this many training images (deterministic for `seed`); None: all of the split.
    max_images: int | None = positive(None)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    epochs: int = positive(12)
    # Stop after this many optimizer steps in all (None: run every epoch); for smoke tests and demos.
    max_steps: int | None = positive(None)
    # Batches per process summed into one optimizer step; derived when data.effective_batch_size is set.
    grad_accum_steps: int = positive(1)
    # Mixed precision on CUDA: "auto" picks bf16 where supported, else fp16; ignored on CPU.
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    checkpoint_every_steps: int = 0
    # Keep only the newest N checkpoints in the checkpoint dir (0: keep every one).
    keep_checkpoints: int = 2
    log_every_steps: int = positive(20)
    val_every_epochs: int = positive(1)
    seed: int = 0
    device: str = "auto"


@dataclass
class EvalConfig:
    # None: the dataset's own "test" split where it defines splits (GroceriesReal), else every image.
    split: str | None = None
    batch_size: int = positive(8)
    num_workers: int = 2
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    device: str = "auto"
    # Boxes drawn on the few TensorBoard sample images.
    draw_score_thresh: float = fraction(0.5)
    num_sample_images: int = positive(4)
    # 95% bootstrap intervals in metrics.json from this many resamples of the test images (0: none).
    bootstrap_replicates: int = 1000


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `update` into a copy of `base`."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# Named starting points; a config file or --set overrides go on top. The README's recipe table gives the
# source of every seed value (Unity-Technologies/datasetinsights, branch 0.2.x).
_SEED = {
    # configs/faster_rcnn*.yaml: backbone resnet50, pretrained_backbone True, pretrained False;
    # estimators/faster_rcnn.py builds torchvision 0.5's fasterrcnn_resnet50_fpn with 100 detections per
    # image and score threshold 0.05, which freezes batch norm (eps 0) and trains layer2-layer4.
    "model": {"name": "resnet50_fpn", "weights_backbone": "imagenet", "trainable_backbone_layers": 3,
              "backbone_norm": "frozen", "frozen_bn_eps": 0.0, "min_size": 800, "max_size": 1333,
              "box_score_thresh": 0.05, "box_detections_per_img": 100},
    # optimizer: Adam with only lr set, and "use fixed learning rate when using Adam" (LambdaLR of 1.0).
    "optimizer": {"name": "adam", "lr": 2e-4, "weight_decay": 0.0},
    "schedule": {"name": "constant", "warmup_steps": 0},
    # The seed's transforms are ToTensor only; its samplers shuffle without aspect-ratio grouping.
    "data": {"hflip_prob": 0.0, "photometric": False, "aspect_ratio_group_factor": 0},
    "amp": "off",
    "val_every_epochs": 1,
}
_SEED_REAL = {"data": {"batch_size": 8, "effective_batch_size": 64}, "epochs": 100}
_SEED_FINETUNE_CHANGES = {"optimizer": {"lr": 2e-5}, "epochs": 30,
                          "data": {"batch_size": 8, "effective_batch_size": 64, "split": None, "val_split": None}}
# torchvision references/detection: fasterrcnn_resnet50_fpn, 26 epochs, lr 0.02 for 8 GPUs x 2 images,
# milestones 16 and 22, 1000 warm-up iterations from 1/1000 (about 7,330 steps per COCO epoch, 26 epochs).
_MODERN = {
    "model": {"name": "resnet50_fpn", "weights_backbone": "imagenet", "trainable_backbone_layers": 3},
    "optimizer": {"name": "sgd", "lr": 0.02, "momentum": 0.9, "weight_decay": 1e-4},
    "schedule": {"name": "step", "warmup_steps": 1000, "warmup_factor": 0.001,
                 "warmup_reference_steps": 190_580, "milestones": [16, 22], "gamma": 0.1},
    "data": {"batch_size": 2, "effective_batch_size": 16, "hflip_prob": 0.5, "photometric": False,
             "aspect_ratio_group_factor": 3},
    "epochs": 26,
    "amp": "auto",
}


def _seed_preset(*changes: dict[str, Any]) -> dict[str, Any]:
    preset = _SEED
    for change in changes:
        preset = merge(preset, change)
    return preset


PRESETS: dict[str, dict[str, Any]] = {
    # configs/faster_rcnn_synthetic.yaml: SynDetection2D split 90/10 by random_seed 47, batch 4 x 8
    # accumulation, 10 epochs; kubeflow/pipelines.py trains it on 8 GPUs: 256 images per step.
    "seed-synthetic": _seed_preset({"data": {"split": "seed-train", "val_split": "seed-val", "batch_size": 4,
                                             "effective_batch_size": 256}, "epochs": 10}),
    # configs/faster_rcnn_groceries_real.yaml: GroceriesReal v3 train / val, batch 8 x 8 accumulation,
    # 100 epochs, on 1 GPU: 64 images per step.
    "seed-real": _seed_preset(_SEED_REAL),
    # configs/faster_rcnn_fine_tune.yaml: as real, lr 2e-5, 30 epochs.
    "seed-finetune": _seed_preset(_SEED_REAL, _SEED_FINETUNE_CHANGES),
    "modern": _MODERN,
    # Fast on 2 CPU threads: small images, a small backbone and small heads (measured: 2x the step rate).
    "cpu-demo": {
        "model": {
            "name": "tiny",
            "min_size": 192,
            "max_size": 192,
            "roi_pool_size": 5,
            "box_head_dim": 256,
            "box_batch_size_per_image": 64,
            "rpn_pre_nms_top_n_train": 600,
            "rpn_post_nms_top_n_train": 300,
            "rpn_pre_nms_top_n_test": 300,
            "rpn_post_nms_top_n_test": 150,
        },
        "optimizer": {"name": "adamw", "lr": 0.001, "weight_decay": 0.0001},
        # 50 steps of a demo run's 300 (400 images, batch 8, 6 epochs); shorter runs scale it.
        "schedule": {"name": "cosine", "warmup_steps": 50, "warmup_reference_steps": 300},
        "data": {"batch_size": 8, "num_workers": 0},
        "epochs": 6,
        "log_every_steps": 10,
    },
}
# The seed's Unity Simulation pipeline trains with faster_rcnn_synthetic.yaml, on 8 GPUs.
PRESETS["seed-unity-simulation"] = PRESETS["seed-synthetic"]
# The first releases' default preset name; the modern recipe took its place.
PRESETS["gpu"] = PRESETS["modern"]


# What `synthval finetune` changes on top of a preset: a trained detector wants a smaller step and almost
# no warm-up, or its fresh optimizer undoes what it learned. The seed presets fine-tune as the seed did.
# cpu-demo, measured on generated data (400 synthetic, 90 real-proxy images): the preset's own lr made the
# fine-tuned model worse than the synthetic-only one (mAP 0.368 against 0.400); lr 2e-4 with 5 warm-up
# steps made it better (0.507 against 0.437).
FINETUNE_PRESETS: dict[str, dict[str, Any]] = {
    "seed-synthetic": _SEED_FINETUNE_CHANGES,
    "seed-unity-simulation": _SEED_FINETUNE_CHANGES,
    "seed-real": _SEED_FINETUNE_CHANGES,
    "seed-finetune": {},
    "modern": {"optimizer": {"lr": 0.002}},
    "gpu": {"optimizer": {"lr": 0.002}},
    "cpu-demo": {"optimizer": {"lr": 0.0002}, "schedule": {"warmup_steps": 5, "warmup_reference_steps": None},
                 "epochs": 10},
}


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[-1] if errors else f"{key}: {value!r} is not accepted")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not accepted; expected {_type_name(tp)}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: {value!r} is not a list")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} is not a boolean (true or false)")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: {value!r} is not an integer")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads "1e-5" (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: {value!r} is not a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: {value!r} is not a string")
        return value
    raise ConfigError(f"{key}: unsupported config type {tp!r}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a plain dict, rejecting unknown keys and wrong types by name."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]}; {prefix.rstrip('.') or 'the top level'} accepts: "
            + ", ".join(names)
        )
    kwargs = {name: _coerce(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """Return the config as plain, JSON-ready data."""
    return dataclasses.asdict(config)


def parse_override(text: str) -> dict[str, Any]:
    """Turn "a.b.c=value" into {"a": {"b": {"c": value}}}; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected key=value, for example optimizer.lr=0.01")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({exc})") from exc
    nested: dict[str, Any] = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def load_config(
    cls: type,
    preset: str | None = None,
    config_text: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    source: str = "config",
    finetune: bool = False,
) -> Any:
    """Resolve a config: preset (with its fine-tuning changes if `finetune`), then YAML text (named
    `source` in errors), then --set overrides."""
    data: dict[str, Any] = {}
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
    if preset is not None:
        data = merge(data, PRESETS[preset])
    if finetune:
        data = merge(data, FINETUNE_PRESETS[preset or "gpu"])
    if config_text is not None:
        try:
            loaded = yaml.safe_load(config_text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML ({exc})") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level, got {type(loaded).__name__}")
        data = merge(data, loaded)
    for text in overrides:
        data = merge(data, parse_override(text))
    config = from_dict(cls, data)
    validate(config)
    return config


def validate(config: Any, prefix: str = "") -> None:
    """Range checks that types alone cannot express: finite numbers within each field's range."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            validate(value, prefix=f"{key}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                _check_number(f"{key}[{i}]", item, bounds(f))
        else:
            _check_number(key, value, bounds(f))


def bounds(f: dataclasses.Field) -> dict[str, Any]:
    """The range of a config field's numbers, as JSON schema keywords."""
    return dict(f.metadata) or NON_NEGATIVE


def _check_number(key: str, value: Any, limits: dict[str, Any]) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not math.isfinite(value):
        raise ConfigError(f"{key}: {value!r} is not a finite number")
    low, high, above = limits.get("minimum"), limits.get("maximum"), limits.get("exclusiveMinimum")
    if low is not None and high is not None and not low <= value <= high:
        raise ConfigError(f"{key}: {value!r} must be between {low} and {high}")
    if above is not None and value <= above:
        raise ConfigError(f"{key}: {value!r} must be greater than {above}")
    if low is not None and value < low:
        raise ConfigError(f"{key}: {value!r} " + ("must not be negative" if low == 0 else f"must be at least {low}"))
    if high is not None and value > high:
        raise ConfigError(f"{key}: {value!r} must be at most {high}")


# ---------------------------------------------------------------------------------------------
# The JSON schema of the configs, for the DAG Params (dags/synthval_config_schema.json)

_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string"}


def _type_schema(tp: Any, limits: dict[str, Any]) -> dict[str, Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [t for t in typing.get_args(tp) if t is not type(None)]
        if len(options) != 1:
            raise TypeError(f"no JSON schema for {tp!r}")
        schema = _type_schema(options[0], limits)
        schema["type"] = [schema["type"], "null"]
        if "enum" in schema:
            schema["enum"] = [*schema["enum"], None]
        return schema
    if origin is Literal:
        values = list(typing.get_args(tp))
        return {"type": _JSON_TYPES[type(values[0])], "enum": values}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        return {"type": "array", "items": _type_schema(item_tp, limits)}
    if dataclasses.is_dataclass(tp):
        return _object_schema(tp)
    schema: dict[str, Any] = {"type": _JSON_TYPES[tp]}
    if tp in (int, float):
        schema.update(limits)
        if tp is int and "exclusiveMinimum" in schema:
            # The same limit for whole numbers, in the form a form's number field shows.
            schema["minimum"] = math.floor(schema.pop("exclusiveMinimum")) + 1
    return schema


def _object_schema(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    properties = {}
    for f in dataclasses.fields(cls):
        schema = _type_schema(hints[f.name], bounds(f))
        if not dataclasses.is_dataclass(hints[f.name]):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            schema["default"] = default
        properties[f.name] = schema
    return {"type": "object", "additionalProperties": False, "properties": properties}


def config_schema() -> dict[str, Any]:
    """The JSON schema of the training and evaluation configs and the preset names: every type, enum,
    range and default as `load_config` accepts them (finite numbers only)."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": "Generated by `synthval config-schema` from tasks/synthval/config.py; do not edit.",
        "title": "synthval configuration",
        "$defs": {
            "preset": {"type": "string", "enum": list(PRESETS)},
            "train": _object_schema(TrainConfig),
            "evaluate": _object_schema(EvalConfig),
        },
    }


def config_schema_text() -> str:
    """`config_schema` as the checked-in file holds it: indented JSON, keys in source order, a final newline."""
    return json.dumps(config_schema(), indent=2) + "\n"


def accumulation_steps(config: Any, world_size: int) -> int:
    """Batches each process accumulates per optimizer step, for `world_size` processes.

    With `data.effective_batch_size` set: effective / (data.batch_size x world_size), which must be a
    whole number (ConfigError naming the numbers otherwise); else `grad_accum_steps`.
    """
    effective, batch = config.data.effective_batch_size, config.data.batch_size
    if effective is None:
        return config.grad_accum_steps
    per_pass = batch * world_size
    accum, rest = divmod(effective, per_pass)
    if rest or accum < 1:
        raise ConfigError(
            f"data.effective_batch_size={effective} is not a whole multiple of data.batch_size={batch} x "
            f"{world_size} process(es) = {per_pass}; choose a batch size and process count whose product "
            f"divides {effective}")
    if config.grad_accum_steps not in (1, accum):
        raise ConfigError(
            f"grad_accum_steps={config.grad_accum_steps} contradicts data.effective_batch_size={effective} with "
            f"data.batch_size={batch} x {world_size} process(es), which needs {accum}; set only one of them")
    return accum
