"""Building the detector, loading its weights, and mapping its classifier head by label name.

Every model is a torchvision `FasterRCNN`. The torchvision names build exactly what torchvision's own
builders build (so the seed's published `fasterrcnn_resnet50_fpn` checkpoints load, their pre-0.13 key
names upgraded); `tiny` is a small convolutional backbone with small heads for CPU demos and tests.
Nothing is ever downloaded: `weights_backbone="imagenet"` reads torchvision's ImageNet file from the torch
hub cache, where the training image puts it at build time, and names the file when it is absent.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import urllib.parse
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torchvision.models import MobileNet_V3_Large_Weights, ResNet50_Weights, mobilenet_v3_large, resnet50
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import (
    BackboneWithFPN,
    _mobilenet_extractor,
    _resnet_fpn_extractor,
)
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import misc as misc_nn_ops

from synthval.config import MODEL_NAMES, ModelConfig
from synthval.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

# Keys of the classifier head whose rows follow the class list (row 0: background).
HEAD_CLS = "roi_heads.box_predictor.cls_score"
HEAD_BOX = "roi_heads.box_predictor.bbox_pred"
# Fields that decide what the weights mean: their shapes, and whether the backbone's batch statistics are
# frozen (trained with weights_backbone) or running. The rest (image size, sampling counts) are free.
ARCHITECTURE_FIELDS = ("name", "roi_pool_size", "box_head_dim", "weights_backbone", "backbone_norm", "frozen_bn_eps")

_DEFAULTS = ModelConfig()
# Values torchvision's own builders use for these models where FasterRCNN's defaults differ.
_BUILDER_DEFAULTS: dict[str, dict[str, Any]] = {
    "mobilenet_v3_large_fpn": {"rpn_score_thresh": 0.05},
    "mobilenet_v3_large_320_fpn": {
        "min_size": 320, "max_size": 640, "rpn_pre_nms_top_n_test": 150, "rpn_post_nms_top_n_test": 150,
        "rpn_score_thresh": 0.05,
    },
}
_FASTERRCNN_KWARGS = (
    "min_size", "max_size", "rpn_batch_size_per_image", "rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train",
    "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test", "box_batch_size_per_image", "box_score_thresh",
    "box_detections_per_img",
)


def build_model(
    config: ModelConfig, num_classes: int, *, load_backbone_weights: bool = True
) -> FasterRCNN:
    """Return the Faster R-CNN named by `config.name` with `num_classes` outputs (background included).

    `load_backbone_weights=False` builds the same structure as with `config.weights_backbone` (frozen
    batch norm and frozen early layers where torchvision does so) without reading any weights: for a
    model whose weights come from a checkpoint next.
    """
    if config.name not in MODEL_NAMES:
        raise ConfigError(f"model.name: unknown model {config.name!r}; choices: {', '.join(MODEL_NAMES)}")
    if num_classes < 2:
        raise ConfigError(f"a detector needs at least one label besides the background, got {num_classes - 1}")
    kwargs = dict(_BUILDER_DEFAULTS.get(config.name, {}))
    for name in _FASTERRCNN_KWARGS:
        value = getattr(config, name)
        # A value left at its default keeps the builder's own default (e.g. 320 px for the 320 model).
        if value != getattr(_DEFAULTS, name) or name not in kwargs:
            kwargs[name] = value
    builder = _tiny if config.name == "tiny" else _torchvision_model
    model = builder(config, num_classes, kwargs, load_backbone_weights)
    log.debug("built %s with %d classes (%.1fM parameters)", config.name, num_classes,
              sum(p.numel() for p in model.parameters()) / 1e6)
    return model


_IMAGENET = {"resnet50_fpn": ResNet50_Weights.IMAGENET1K_V1, "resnet50_fpn_v2": ResNet50_Weights.IMAGENET1K_V1,
             "mobilenet_v3_large_fpn": MobileNet_V3_Large_Weights.IMAGENET1K_V1,
             "mobilenet_v3_large_320_fpn": MobileNet_V3_Large_Weights.IMAGENET1K_V1}


def imagenet_weights_path(name: str) -> str:
    """Where torchvision keeps the ImageNet weights of model `name`'s backbone: the torch hub cache
    (`$TORCH_HOME/hub/checkpoints/`), under the file name of torchvision's URL."""
    if name not in _IMAGENET:
        raise ConfigError(f"model.weights_backbone: {name!r} has no ImageNet weights; "
                          "use a file or URI of a backbone state dict, or leave it empty")
    file_name = os.path.basename(urllib.parse.urlsplit(_IMAGENET[name].url).path)
    return os.path.join(torch.hub.get_dir(), "checkpoints", file_name)


def backbone_weights_uri(config: ModelConfig) -> str | None:
    """The file or URI the backbone's weights load from, or None for a random init.

    "imagenet" is the torch hub cache file, which must exist: training never downloads (a cluster node
    may have no internet, and an unpinned download could change the weights between runs).
    """
    spec = config.weights_backbone
    if not spec:
        return None
    if spec != "imagenet":
        return spec
    path = imagenet_weights_path(config.name)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{path}: the ImageNet weights of {config.name}'s backbone (model.weights_backbone=imagenet) are not "
            "there, and synthval never downloads at run time. The training image puts them there when it is "
            "built; elsewhere copy the file there (torchvision's URL: "
            f"{_IMAGENET[config.name].url}) or set TORCH_HOME to a folder holding hub/checkpoints/ with it")
    return path


def _backbone_weights(config: ModelConfig, load: bool) -> tuple[bool, str | None]:
    """Return (is_pretrained, file URI to load or None)."""
    if not config.weights_backbone:
        return False, None
    return True, (backbone_weights_uri(config) if load else None)


def _norm_layer(config: ModelConfig, pretrained: bool) -> Any:
    kind = config.backbone_norm
    if kind is None:
        # torchvision: frozen statistics with backbone weights, except v2, which keeps batch norm.
        kind = "frozen" if pretrained and config.name != "resnet50_fpn_v2" else "batch"
    if kind == "batch":
        return nn.BatchNorm2d
    return functools.partial(misc_nn_ops.FrozenBatchNorm2d, eps=config.frozen_bn_eps)


def _trainable_layers(config: ModelConfig, pretrained: bool, max_value: int) -> int:
    if not pretrained:
        return max_value  # nothing to keep from a random init: train every layer, as torchvision does
    value = 3 if config.trainable_backbone_layers is None else config.trainable_backbone_layers
    if not 0 <= value <= max_value:
        raise ConfigError(f"model.trainable_backbone_layers: {value} is out of range for {config.name} "
                          f"(0 to {max_value})")
    return value


def _torchvision_model(config: ModelConfig, num_classes: int, kwargs: dict, load: bool) -> FasterRCNN:
    name = config.name
    is_resnet = name.startswith("resnet50")
    if config.weights_backbone == "imagenet":
        imagenet_weights_path(name)  # a model without ImageNet weights is a config error, loaded or not
    pretrained, weights_uri = _backbone_weights(config, load)
    norm_layer = _norm_layer(config, pretrained)
    body = resnet50(norm_layer=norm_layer) if is_resnet else mobilenet_v3_large(norm_layer=norm_layer)
    if weights_uri is not None:
        load_backbone_state(body, weights_uri, ignore_prefixes=("fc.", "classifier."))

    pool, dim = config.roi_pool_size, config.box_head_dim
    custom_head = (pool, dim) != (_DEFAULTS.roi_pool_size, _DEFAULTS.box_head_dim)
    if name == "resnet50_fpn":
        backbone = _resnet_fpn_extractor(body, _trainable_layers(config, pretrained, 5))
        extra: dict[str, Any] = {}
    elif name == "resnet50_fpn_v2":
        backbone = _resnet_fpn_extractor(body, _trainable_layers(config, pretrained, 5), norm_layer=nn.BatchNorm2d)
        anchors = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
        extra = {
            "rpn_anchor_generator": anchors,
            "rpn_head": RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0], conv_depth=2),
            "box_head": FastRCNNConvFCHead((backbone.out_channels, pool, pool), [256, 256, 256, 256], [dim],
                                           norm_layer=nn.BatchNorm2d),
        }
    else:
        backbone = _mobilenet_extractor(body, True, _trainable_layers(config, pretrained, 6))
        sizes = ((32, 64, 128, 256, 512),) * 3
        extra = {"rpn_anchor_generator": AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))}
    if custom_head:
        featmaps = [k for k in _feature_names(backbone) if k != "pool"]
        extra["box_roi_pool"] = MultiScaleRoIAlign(featmap_names=featmaps, output_size=pool, sampling_ratio=2)
        if "box_head" not in extra:
            extra["box_head"] = TwoMLPHead(backbone.out_channels * pool**2, dim)
        extra["box_predictor"] = FastRCNNPredictor(dim, num_classes)
        return FasterRCNN(backbone, num_classes=None, **extra, **kwargs)
    return FasterRCNN(backbone, num_classes=num_classes, **extra, **kwargs)


def _feature_names(backbone: BackboneWithFPN) -> list[str]:
    names = list(backbone.body.return_layers.values())
    return names + ["pool"]


# --- tiny --------------------------------------------------------------------------------------------


def _conv(cin: int, cout: int, stride: int, norm_layer: Any) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), norm_layer(cout), nn.ReLU(inplace=True)
    )


class TinyBody(nn.Sequential):
    """Five conv stages, each halving the resolution: features at strides 4, 8, 16 and 32."""

    def __init__(self, widths: Sequence[int] = (16, 32, 64, 96, 128), norm_layer: Any = nn.BatchNorm2d) -> None:
        w = list(widths)
        conv = functools.partial(_conv, norm_layer=norm_layer)
        super().__init__(OrderedDict([
            ("stem", conv(3, w[0], 2)),
            ("stage1", nn.Sequential(conv(w[0], w[1], 2), conv(w[1], w[1], 1))),
            ("stage2", nn.Sequential(conv(w[1], w[2], 2), conv(w[2], w[2], 1))),
            ("stage3", nn.Sequential(conv(w[2], w[3], 2), conv(w[3], w[3], 1))),
            ("stage4", nn.Sequential(conv(w[3], w[4], 2), conv(w[4], w[4], 1))),
        ]))
        self.widths = w
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


TINY_FPN_CHANNELS = 64


def _tiny(config: ModelConfig, num_classes: int, kwargs: dict, load: bool) -> FasterRCNN:
    if config.weights_backbone == "imagenet":
        imagenet_weights_path(config.name)
    pretrained, weights_uri = _backbone_weights(config, load)
    body = TinyBody(norm_layer=_norm_layer(config, pretrained))
    if weights_uri is not None:
        load_backbone_state(body, weights_uri)
    if pretrained and config.trainable_backbone_layers is not None:
        stages = ["stage4", "stage3", "stage2", "stage1", "stem"][: _trainable_layers(config, True, 5)]
        for name, p in body.named_parameters():
            if not any(name.startswith(s) for s in stages):
                p.requires_grad_(False)
    # FPN on strides 8, 16, 32 plus a max-pooled stride-64 level: objects in 96-256 px demo images
    # span about 8 to 150 px, and the stride-4 level would only cost time.
    return_layers = {"stage2": "0", "stage3": "1", "stage4": "2"}
    w = body.widths
    backbone = BackboneWithFPN(body, return_layers, [w[2], w[3], w[4]], TINY_FPN_CHANNELS)
    anchors = AnchorGenerator(((16, 24), (32, 48), (64, 96), (128, 192)), ((0.5, 1.0, 2.0),) * 4)
    rpn_head = RPNHead(TINY_FPN_CHANNELS, anchors.num_anchors_per_location()[0])
    pool, dim = config.roi_pool_size, config.box_head_dim
    roi_pool = MultiScaleRoIAlign(featmap_names=["0", "1", "2"], output_size=pool, sampling_ratio=2)
    box_head = TwoMLPHead(TINY_FPN_CHANNELS * pool**2, dim)
    return FasterRCNN(
        backbone, num_classes=None, rpn_anchor_generator=anchors, rpn_head=rpn_head, box_roi_pool=roi_pool,
        box_head=box_head, box_predictor=FastRCNNPredictor(dim, num_classes), **kwargs,
    )


# --- weights -----------------------------------------------------------------------------------------


def _strip_prefixes(state: Mapping[str, torch.Tensor], prefixes: Sequence[str]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = value
    return out


# torchvision 0.13 wrapped the FPN's and the RPN head's convolutions in Conv2dNormActivation; checkpoints
# saved before (the seed's, torchvision 0.5) name them one level up.
_LEGACY_KEYS = (
    (re.compile(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$"), r"\1.0.\2"),
    (re.compile(r"^(rpn\.head\.conv)\.(weight|bias)$"), r"\1.0.0.\2"),
)


def canonical_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A detector state dict with DDP's `module.` prefix removed and pre-0.13 torchvision names upgraded."""
    out = {}
    for key, value in _strip_prefixes(state, ("module.",)).items():
        for pattern, replacement in _LEGACY_KEYS:
            key = pattern.sub(replacement, key)
        out[key] = value
    return out


def _ignorable(key: str) -> bool:
    # BatchNorm2d has a step counter that FrozenBatchNorm2d lacks; it never changes a prediction.
    return key.endswith("num_batches_tracked")


def load_backbone_state(body: nn.Module, uri: str, ignore_prefixes: Sequence[str] = ()) -> None:
    """Load a classification network's state dict (a file or URI, loaded safely) into `body`."""
    from synthval.detection.checkpoint import load_checkpoint

    state = load_checkpoint(uri)
    for key in ("model", "state_dict"):
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
    state = _strip_prefixes(state, ("module.backbone.body.", "backbone.body.", "module.", "body."))
    state = {k: v for k, v in state.items() if not any(k.startswith(p) for p in ignore_prefixes)}
    missing, unexpected = body.load_state_dict(state, strict=False)
    # The classifier (fc) is not part of the detector's backbone: missing or not, it is dropped later.
    missing = [k for k in missing if not _ignorable(k) and not any(k.startswith(p) for p in ignore_prefixes)]
    unexpected = [k for k in unexpected if not _ignorable(k)]
    if missing or unexpected:
        raise CheckpointError(
            f"{uri}: not a backbone state dict for this model: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )
    log.info("loaded backbone weights from %s (%d tensors)", uri, len(state))


def load_model_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load a whole detector state dict; a key or shape that does not fit raises CheckpointError."""
    state = canonical_state(state)
    own = model.state_dict()
    bad_shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if bad_shapes:
        raise CheckpointError(f"{source}: weights do not fit the model: {len(bad_shapes)} shapes differ, "
                              f"e.g. {bad_shapes[:3]}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not _ignorable(k)]
    unexpected = [k for k in unexpected if not _ignorable(k)]
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not fit the model: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )


def num_classes_in_state(state: Mapping[str, torch.Tensor]) -> int:
    """Return the class count (background included) of a detector state dict."""
    state = canonical_state(state)
    key = f"{HEAD_CLS}.weight"
    if key not in state:
        raise CheckpointError(f"the checkpoint holds no Faster R-CNN classifier ({key} is missing)")
    return int(state[key].shape[0])


@dataclasses.dataclass
class HeadMapping:
    """Which labels a fine-tuned head took over from its checkpoint, which are new, which were dropped."""

    mapped: list[str]
    new: list[str]
    dropped: list[str]

    def describe(self) -> str:
        def names(items: list[str]) -> str:
            return ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "") or "none"

        return (f"classifier head mapped by label name: {len(self.mapped)} kept ({names(self.mapped)}); "
                f"{len(self.new)} new, initialized fresh ({names(self.new)}); "
                f"{len(self.dropped)} in the checkpoint but not in the training data, dropped ({names(self.dropped)})")


def init_from_checkpoint(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    old_names: Sequence[str | None],
    new_names: Sequence[str],
    source: str,
) -> HeadMapping:
    """Load `state` into `model`, mapping the classifier's rows from `old_names` to `new_names`.

    Class k of either model is names[k-1]; row 0 is the background. Rows of labels the checkpoint
    does not know keep the model's fresh initialization. Returns what was mapped, new and dropped.
    """
    state = canonical_state(state)
    n_old = num_classes_in_state(state)
    if n_old != len(old_names) + 1:
        raise CheckpointError(f"{source}: the classifier has {n_old} classes but {len(old_names)} label names "
                              "(plus the background) were given")
    target = model.state_dict()
    merged = {k: v for k, v in state.items() if not k.startswith((HEAD_CLS, HEAD_BOX))}
    old_row = {name: i + 1 for i, name in enumerate(old_names) if name is not None}
    mapping = HeadMapping(mapped=[], new=[], dropped=[])
    pairs = [(0, 0)]  # background
    for k, name in enumerate(new_names, start=1):
        if name in old_row:
            pairs.append((k, old_row[name]))
            mapping.mapped.append(name)
        else:
            mapping.new.append(name)
    kept = set(new_names)
    mapping.dropped = [n for n in old_names if n is not None and n not in kept]
    for prefix, rows_per_class in ((HEAD_CLS, 1), (HEAD_BOX, 4)):
        for part in ("weight", "bias"):
            key = f"{prefix}.{part}"
            if key not in target:
                raise CheckpointError(f"the model has no {key}")
            fresh = target[key].clone()
            old = state[key]
            if old.shape[1:] != fresh.shape[1:]:
                raise CheckpointError(f"{source}: {key} has shape {tuple(old.shape)}, the model expects rows of "
                                      f"{tuple(fresh.shape[1:])}: a different box head")
            for new_k, old_k in pairs:
                r = rows_per_class
                fresh[new_k * r:(new_k + 1) * r] = old[old_k * r:(old_k + 1) * r]
            merged[key] = fresh
    load_model_state(model, merged, source)
    return mapping
