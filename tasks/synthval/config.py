"""Typed, validated configuration: the one place where defaults live.

A config is a tree of dataclasses. It is built from a YAML file (or preset) plus `--set key=value`
overrides; an unknown key, a wrong type or a value out of range raises ConfigError naming the dotted
key, the value and what would be accepted. The resolved config is stored in every checkpoint and
every metrics file as a plain dict.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from synthval.errors import ConfigError

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")

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
    # None: random init; "imagenet": torchvision's own weights (baked into the training image);
    # anything else: a file or URI holding a backbone state dict.
    weights_backbone: str | None = None
    trainable_backbone_layers: int | None = None
    min_size: int = 800
    max_size: int = 1333
    # Box-head knobs: on CPU the heads, not the backbone, decide speed (RoIAlign + 6272x1024 matmul).
    roi_pool_size: int = 7
    box_head_dim: int = 1024
    box_batch_size_per_image: int = 512
    rpn_batch_size_per_image: int = 256
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    box_score_thresh: float = 0.05
    box_detections_per_img: int = 100


@dataclass
class OptimizerConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4


@dataclass
class ScheduleConfig:
    """Linear warm-up for `warmup_steps`, then a step or cosine decay over the epochs."""

    name: Literal["step", "cosine", "constant"] = "step"
    warmup_steps: int = 500
    warmup_factor: float = 0.001
    milestones: list[int] = field(default_factory=lambda: [8, 11])
    gamma: float = 0.1


@dataclass
class DataConfig:
    # None: the dataset's own train / val split where it defines splits (GroceriesReal), else every image.
    split: str | None = None
    val_split: str | None = None
    batch_size: int = 4
    num_workers: int = 2
    aspect_ratio_group_factor: int = 3
    hflip_prob: float = 0.5
    photometric: bool = True
    # Use at most this many training images (deterministic for `seed`); None: all of the split.
    max_images: int | None = None


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    epochs: int = 12
    # Stop after this many optimizer steps in all (None: run every epoch); for smoke tests and demos.
    max_steps: int | None = None
    grad_accum_steps: int = 1
    # Mixed precision on CUDA: "auto" picks bf16 where supported, else fp16; ignored on CPU.
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    checkpoint_every_steps: int = 0
    # Keep only the newest N checkpoints in the checkpoint dir (0: keep every one).
    keep_checkpoints: int = 2
    log_every_steps: int = 20
    val_every_epochs: int = 1
    seed: int = 0
    device: str = "auto"


@dataclass
class EvalConfig:
    # None: the dataset's own "test" split where it defines splits (GroceriesReal), else every image.
    split: str | None = None
    batch_size: int = 8
    num_workers: int = 2
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    device: str = "auto"
    # Boxes drawn on the few TensorBoard sample images.
    draw_score_thresh: float = 0.5
    num_sample_images: int = 4
    # 95% bootstrap intervals in metrics.json from this many resamples of the test images (0: none).
    bootstrap_replicates: int = 1000


# Named starting points; a config file or --set overrides go on top.
PRESETS: dict[str, dict[str, Any]] = {
    "gpu": {},
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
        "schedule": {"name": "cosine", "warmup_steps": 50},
        "data": {"batch_size": 8, "num_workers": 0},
        "epochs": 6,
        "log_every_steps": 10,
    },
}


# What `synthval finetune` changes on top of a preset: a trained detector wants a smaller step and almost
# no warm-up, or its fresh optimizer undoes what it learned. Measured with cpu-demo on generated data
# (400 synthetic, 90 real-proxy images): the preset's own lr made the fine-tuned model worse than the
# synthetic-only one (mAP 0.368 against 0.400); lr 2e-4 with 5 warm-up steps made it better (0.507 against 0.437).
FINETUNE_PRESETS: dict[str, dict[str, Any]] = {
    "gpu": {"optimizer": {"lr": 0.002}, "schedule": {"warmup_steps": 100}},
    "cpu-demo": {"optimizer": {"lr": 0.0002}, "schedule": {"warmup_steps": 5}, "epochs": 10},
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


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `update` into a copy of `base`."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


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
    """Range checks that types alone cannot express."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            validate(value, prefix=f"{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            positive = {"lr", "batch_size", "epochs", "grad_accum_steps", "min_size", "max_size",
                        "roi_pool_size", "box_head_dim", "box_batch_size_per_image", "max_steps",
                        "max_images", "log_every_steps", "val_every_epochs"}
            if f.name in positive and value <= 0:
                raise ConfigError(f"{key}: {value!r} must be greater than 0")
            if value < 0:
                raise ConfigError(f"{key}: {value!r} must not be negative")
