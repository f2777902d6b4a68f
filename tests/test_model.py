"""The detectors: every model name builds, tiny learns, weights load only from where they are asked."""

import dataclasses

import pytest
import torch

from synthval.config import MODEL_NAMES, PRESETS, ModelConfig, TrainConfig, from_dict
from synthval.detection.engine import build_optimizer, build_scheduler, lr_factor, train_one_epoch
from synthval.errors import CheckpointError, ConfigError
from synthval.detection.model import TinyBody, build_model, init_from_checkpoint

SMALL = {"min_size": 96, "max_size": 128}


def cpu_demo_model(**changes) -> ModelConfig:
    return dataclasses.replace(from_dict(ModelConfig, PRESETS["cpu-demo"]["model"]), **SMALL, **changes)


def toy_batch(n=2, size=96, seed=0):
    """Images with bright squares whose colour channel is the class: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for i in range(n):
        image = torch.rand(3, size, size + 16 * i, generator=g) * 0.2
        boxes, labels = [], []
        for label in (1, 2, 3):
            s = int(torch.randint(16, 32, (1,), generator=g))
            x, y = (int(v) for v in torch.randint(0, size - s, (2,), generator=g))
            image[label - 1, y:y + s, x:x + s] = 1.0
            boxes.append([x, y, x + s, y + s])
            labels.append(label)
        images.append(image)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
                        "image_id": i})
    return images, targets


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_name_builds_without_fetching_anything(name, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("a model build tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    model = build_model(ModelConfig(name=name, **SMALL), num_classes=5)
    assert model.roi_heads.box_predictor.cls_score.out_features == 5
    assert model.roi_heads.box_predictor.bbox_pred.out_features == 20


@pytest.mark.parametrize("name", ["tiny", "mobilenet_v3_large_320_fpn"])
def test_forward_train_and_eval_on_a_two_image_batch(name):
    torch.manual_seed(0)
    config = cpu_demo_model(name=name) if name == "tiny" else ModelConfig(name=name, **SMALL)
    model = build_model(config, num_classes=4)
    images, targets = toy_batch()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and out[0]["boxes"].shape[1] == 4


def test_tiny_has_the_small_heads_the_config_asks_for():
    model = build_model(cpu_demo_model(), num_classes=4)
    assert model.roi_heads.box_roi_pool.output_size == (5, 5)
    assert model.roi_heads.box_head.fc7.out_features == 256
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 64
    default_heads = build_model(cpu_demo_model(roi_pool_size=7, box_head_dim=1024, box_batch_size_per_image=512), 4)
    assert default_heads.roi_heads.box_head.fc6.in_features == 64 * 7 * 7


def test_torchvision_defaults_are_torchvision_s_own():
    # The 320 model keeps torchvision's 320 px default unless the config sets a size of its own.
    model = build_model(ModelConfig(name="mobilenet_v3_large_320_fpn"), 3)
    assert model.transform.min_size == (320,) and model.transform.max_size == 640
    model = build_model(ModelConfig(name="resnet50_fpn", box_head_dim=256, roi_pool_size=5), 3)
    assert model.roi_heads.box_head.fc6.in_features == 256 * 5 * 5
    assert model.roi_heads.box_predictor.cls_score.in_features == 256


def test_unknown_model_name_is_a_config_error_naming_the_choices():
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(name="yolov8"), 3)
    assert "yolov8" in str(err.value) and "resnet50_fpn" in str(err.value) and "tiny" in str(err.value)


def test_imagenet_weights_for_tiny_are_a_config_error():
    with pytest.raises(ConfigError, match="ImageNet"):
        build_model(cpu_demo_model(weights_backbone="imagenet"), 3)


def test_backbone_weights_from_a_file(tmp_path):
    body = TinyBody()
    with torch.no_grad():
        for p in body.parameters():
            p.fill_(0.5)
    path = tmp_path / "tiny_backbone.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in body.state_dict().items()}}, path)
    model = build_model(cpu_demo_model(weights_backbone=str(path)), 3)
    assert torch.all(model.backbone.body.stem[0].weight == 0.5)

    torch.save({"something": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a backbone state dict"):
        build_model(cpu_demo_model(weights_backbone=str(tmp_path / "other.pt")), 3)


def test_tiny_overfits_one_batch():
    torch.manual_seed(0)
    config = from_dict(TrainConfig, {
        **PRESETS["cpu-demo"], "model": {**PRESETS["cpu-demo"]["model"], **SMALL},
        "schedule": {"name": "constant", "warmup_steps": 3},
    })
    model = build_model(config.model, num_classes=4)
    batch = toy_batch(n=2, seed=1)
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer, steps_per_epoch=20, total_steps=20)
    losses = []
    stats = train_one_epoch(model, optimizer, scheduler, [batch] * 20, torch.device("cpu"), 0, log_every=100,
                            on_step=lambda info: losses.append(info["loss"]))
    assert stats["steps"] == 20
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses


def test_schedule_warms_up_then_decays():
    config = from_dict(TrainConfig, {"schedule": {"name": "step", "warmup_steps": 10, "warmup_factor": 0.1,
                                                  "milestones": [2], "gamma": 0.1}})
    f = lr_factor(config, steps_per_epoch=20, total_steps=60)
    assert f(0) == pytest.approx(0.1) and f(5) == pytest.approx(0.55) and f(10) == 1.0
    assert f(39) == 1.0 and f(40) == pytest.approx(0.1)
    config = from_dict(TrainConfig, {"schedule": {"name": "cosine", "warmup_steps": 0}})
    f = lr_factor(config, steps_per_epoch=10, total_steps=100)
    assert f(0) == 1.0 and f(50) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)


def test_head_is_mapped_by_label_name():
    torch.manual_seed(0)
    old = build_model(cpu_demo_model(), num_classes=4)  # red, green, blue
    new = build_model(cpu_demo_model(), num_classes=4)  # green, yellow, red
    fresh_yellow = new.roi_heads.box_predictor.cls_score.weight[2].clone()
    mapping = init_from_checkpoint(new, old.state_dict(), ["red", "green", "blue"], ["green", "yellow", "red"], "t")
    assert mapping.mapped == ["green", "red"] and mapping.new == ["yellow"] and mapping.dropped == ["blue"]
    cls_old, cls_new = old.roi_heads.box_predictor.cls_score, new.roi_heads.box_predictor.cls_score
    box_old, box_new = old.roi_heads.box_predictor.bbox_pred, new.roi_heads.box_predictor.bbox_pred
    for new_row, old_row in ((0, 0), (1, 2), (3, 1)):
        assert torch.equal(cls_new.weight[new_row], cls_old.weight[old_row])
        assert torch.equal(cls_new.bias[new_row], cls_old.bias[old_row])
        assert torch.equal(box_new.weight[4 * new_row:4 * new_row + 4], box_old.weight[4 * old_row:4 * old_row + 4])
    assert torch.equal(cls_new.weight[2], fresh_yellow)
    assert torch.equal(new.backbone.body.stem[0].weight, old.backbone.body.stem[0].weight)
    assert "yellow" in mapping.describe() and "blue" in mapping.describe()


def test_weights_of_another_architecture_are_refused():
    tiny = build_model(cpu_demo_model(), num_classes=3)
    other = build_model(cpu_demo_model(box_head_dim=128), num_classes=3)
    with pytest.raises(CheckpointError, match="shapes differ|different box head"):
        init_from_checkpoint(other, tiny.state_dict(), ["a", "b"], ["a", "b"], "ckpt.pt")


def trainable_body_tensors(model) -> int:
    return sum(p.requires_grad for p in model.backbone.body.parameters())


def write_imagenet_file(torch_home, seed=0):
    """A random ResNet-50 classifier state dict where torchvision's cache keeps the ImageNet file."""
    import torchvision

    from synthval.detection.model import imagenet_weights_path

    torch.manual_seed(seed)
    state = torchvision.models.resnet50().state_dict()
    path = imagenet_weights_path("resnet50_fpn")
    assert path.startswith(str(torch_home))
    import os

    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state, path)
    return path, state


def test_imagenet_backbone_comes_from_the_torch_cache_with_frozen_batch_norm(tmp_path, monkeypatch):
    from torchvision.ops.misc import FrozenBatchNorm2d

    from synthval.config import load_config

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    seed = load_config(TrainConfig, preset="seed-synthetic", overrides=["model.min_size=96", "model.max_size=128"])
    with pytest.raises(CheckpointError) as err:
        build_model(seed.model, num_classes=64)
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet50-0676ba61.pth") in str(err.value)
    assert "never downloads" in str(err.value)

    path, state = write_imagenet_file(tmp_path / "torch")
    model = build_model(seed.model, num_classes=64)
    body = model.backbone.body.state_dict()
    assert all(torch.equal(body[k], state[k]) for k in body if not k.endswith("num_batches_tracked"))
    norms = [m for m in model.backbone.body.modules() if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d))]
    assert all(type(m) is FrozenBatchNorm2d and m.eps == 0.0 for m in norms)
    assert trainable_body_tensors(model) == 42  # layer2-layer4 convolutions, as the seed trained
    modern = build_model(load_config(TrainConfig, preset="modern").model, num_classes=3)
    assert trainable_body_tensors(modern) == 42 and all(
        m.eps == 1e-5 for m in modern.backbone.body.modules() if isinstance(m, FrozenBatchNorm2d))
    # Random init, as the first releases' gpu preset: all 159 tensors train, batch norm included.
    assert trainable_body_tensors(build_model(ModelConfig(), num_classes=3)) == 159


def test_a_seed_checkpoint_rebuilds_the_seed_s_frozen_structure_for_fine_tuning(monkeypatch):
    from synthval.detection.checkpoint import describe, model_config_from

    monkeypatch.setenv("TORCH_HOME", "/nonexistent")  # structure only: no ImageNet file is read
    info = describe({"model": {}, "config": {"backbone": "resnet50"}}, "FasterRCNN.estimator")
    model = build_model(model_config_from(info["model_config"], "x"), 64, load_backbone_weights=False)
    assert trainable_body_tensors(model) == 42
    assert not any(k.endswith("num_batches_tracked") for k in model.backbone.body.state_dict())


def test_pre_0_13_torchvision_key_names_load():
    from synthval.detection.model import canonical_state, load_model_state

    model = build_model(ModelConfig(name="resnet50_fpn", **SMALL), 3)
    state = model.state_dict()
    old = {k.replace("inner_blocks.0.0.", "inner_blocks.0.").replace("layer_blocks.3.0.", "layer_blocks.3.")
           .replace("rpn.head.conv.0.0.", "rpn.head.conv."): v for k, v in state.items()}
    assert "backbone.fpn.inner_blocks.0.weight" in old and "rpn.head.conv.weight" in old
    assert canonical_state({f"module.{k}": v for k, v in old.items()}).keys() == state.keys()
    fresh = build_model(ModelConfig(name="resnet50_fpn", **SMALL), 3)
    load_model_state(fresh, old, "old.pt")
    assert torch.equal(fresh.rpn.head.conv[0][0].weight, model.rpn.head.conv[0][0].weight)


def test_warm_up_is_scaled_to_a_short_run_and_reaches_the_peak_rate(caplog):
    from synthval.config import load_config
    from synthval.detection.engine import warmup_length

    # train_small (76 images) with the modern recipe: 4 steps an epoch, 104 in all; 1000 of 190,580 steps
    # of warm-up scale to 1, and the rate peaks at 1.0 before the first milestone (epoch 16).
    modern = load_config(TrainConfig, preset="modern")
    f = lr_factor(modern, steps_per_epoch=4, total_steps=104)
    assert warmup_length(modern, 4, 104) == 1 and max(f(s) for s in range(104)) == 1.0
    assert f(0) == pytest.approx(0.001) and f(64) == pytest.approx(0.1) and f(88) == pytest.approx(0.01)
    demo = load_config(TrainConfig, preset="cpu-demo")
    assert warmup_length(demo, 50, 300) == 50 and warmup_length(demo, 10, 60) == 10  # 1/6 of either run
    # The case: 500 absolute warm-up steps, 12 epochs of 19 steps, decay at epoch 8 (step 152).
    # Clipped, it peaked at 0.67 x lr; fitted, it ends half-way to the decay and says so.
    old = from_dict(TrainConfig, {"schedule": {"warmup_steps": 500, "milestones": [8, 11]}, "epochs": 12})
    with caplog.at_level("WARNING", logger="synthval"):
        f = lr_factor(old, steps_per_epoch=19, total_steps=228)
    assert max(f(s) for s in range(228)) == 1.0 and f(76) == 1.0 and f(75) < 1.0
    assert "warmup_steps=500 would not end before the first lr decay at step 152" in caplog.text
