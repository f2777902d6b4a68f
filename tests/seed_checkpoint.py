"""Checkpoints in the seed's exact published format, written here for tests (the real files are 160 MB
downloads): what `datasetinsights` 0.2.x's `FasterRCNN.save` wrote under torch 1.4 and torchvision 0.5.

- `torch.save(..., _use_new_zipfile_serialization=False)`: the legacy, non-zip pickle format torch 1.4 wrote;
- `{"model": state_dict, "config": CfgNode}`, the config a pickled `yacs.config.CfgNode` (yacs is not
  installed: a stand-in class whose __module__ and __qualname__ say yacs.config.CfgNode, importable
  only while saving);
- the model torchvision 0.5 built: FrozenBatchNorm2d throughout the ResNet-50 body (no
  `num_batches_tracked`, eps 0), and the FPN's and RPN head's convolutions under their pre-0.13 names
  (`backbone.fpn.inner_blocks.0.weight`, `rpn.head.conv.weight`).

`reference_model()` is that model as today's torchvision builds it from its public parts, for comparing
predictions.
"""

from __future__ import annotations

import re
import sys
import types
from collections import OrderedDict

import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

SEED_CONFIG = {
    "estimator": "FasterRCNN", "backbone": "resnet50", "num_classes": 64, "task": "object_detection",
    "train": {"epochs": 30, "batch_size": 8, "accumulation_steps": 8,
              "dataset": {"name": "GroceriesReal", "args": {"version": "v3", "split": "train"}}},
    "optimizer": {"name": "Adam", "args": {"lr": 2.0e-5}}, "pretrained": False, "pretrained_backbone": True,
    "checkpoint_file": "None",
}


def fake_yacs_cfgnode(on_run=None):
    """A stand-in for yacs.config.CfgNode that pickles as the real one does: a dict subclass whose __dict__
    holds yacs' bookkeeping, referenced as GLOBAL 'yacs.config CfgNode'. `on_run(name)` is called by any of
    its methods that an unpickler could run (__new__ besides construction, __setstate__, __init__)."""

    class CfgNode(dict):
        def __init__(self, init_dict=None, key_list=None, new_allowed=False):
            if on_run is not None:
                on_run("__init__")
            init_dict = dict(init_dict or {})
            for k, v in init_dict.items():
                if isinstance(v, dict):
                    init_dict[k] = CfgNode(v)
            super().__init__(init_dict)
            self.__dict__["__immutable__"] = True
            self.__dict__["__deprecated_keys__"] = set()
            self.__dict__["__renamed_keys__"] = {"OLD.KEY": ("NEW.KEY", "renamed")}
            self.__dict__["__new_allowed__"] = new_allowed

        def __setstate__(self, state):
            if on_run is not None:
                on_run("__setstate__")
            self.__dict__.update(state)

        def __getattr__(self, name):
            if name in self:
                return self[name]
            raise AttributeError(name)

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    return CfgNode


class fake_yacs_installed:
    """Make `import yacs.config` find the stand-in while the block runs (pickle looks classes up by name)."""

    def __init__(self, on_run=None):
        self.cfgnode = fake_yacs_cfgnode(on_run)

    def __enter__(self):
        package, module = types.ModuleType("yacs"), types.ModuleType("yacs.config")
        module.CfgNode, package.config = self.cfgnode, module
        sys.modules["yacs"], sys.modules["yacs.config"] = package, module
        return self.cfgnode

    def __exit__(self, *exc):
        del sys.modules["yacs"], sys.modules["yacs.config"]


def reference_model(num_classes: int = 64, **kwargs) -> FasterRCNN:
    """torchvision 0.5's fasterrcnn_resnet50_fpn(pretrained_backbone=True) from today's public parts."""
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d,
                                   trainable_layers=3)
    model = FasterRCNN(backbone, num_classes=num_classes, **kwargs)
    overwrite_eps(model, 0.0)  # torchvision's own fix-up for weights trained before pytorch/vision#2933
    return model


def random_seed_state(num_classes: int = 64, seed: int = 0, class_bias: dict[int, float] | None = None
                      ) -> OrderedDict:
    """A seed model's state dict (today's key names): torchvision's random init, with random batch
    statistics (some variances tiny, so FrozenBatchNorm2d's eps shows); each class k of `class_bias` scores
    its bias alone (its classifier row zeroed), the same on every proposal."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = reference_model(num_classes)
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                n = module.running_var.numel()
                module.running_var.copy_(torch.rand(n) * 0.5 + 1e-4)
                module.running_mean.copy_(torch.randn(n) * 0.05)
                module.weight.copy_(module.running_var.sqrt() * (0.5 + 0.5 * torch.rand(n)))
                module.bias.copy_(torch.randn(n) * 0.05)
    state = OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items())
    for k, bias in (class_bias or {}).items():
        state["roi_heads.box_predictor.cls_score.weight"][k] = 0.0
        state["roi_heads.box_predictor.cls_score.bias"][k] = bias
    return state


_TO_LEGACY = ((re.compile(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.0\.(weight|bias)$"), r"\1.\2"),
              (re.compile(r"^(rpn\.head\.conv)\.0\.0\.(weight|bias)$"), r"\1.\2"))


def legacy_names(state: OrderedDict) -> OrderedDict:
    out = OrderedDict()
    for key, value in state.items():
        for pattern, replacement in _TO_LEGACY:
            key = pattern.sub(replacement, key)
        out[key] = value
    return out


def write_seed_estimator(path, state: OrderedDict, config: dict = SEED_CONFIG) -> None:
    """Save `state` (today's key names) as the seed's FasterRCNN.estimator file."""
    with fake_yacs_installed() as cfgnode:
        torch.save({"model": legacy_names(state), "config": cfgnode(config)}, path,
                   _use_new_zipfile_serialization=False)
    data = open(path, "rb").read()
    assert b"yacs.config" in data and not data.startswith(b"PK")  # a pickle naming yacs, not a zip
