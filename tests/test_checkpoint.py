"""Checkpoints: the seed's published files load without yacs and without running pickled code."""

import os
import pickle

import pytest
import torch
from seed_checkpoint import SEED_CONFIG, fake_yacs_installed, random_seed_state, reference_model, write_seed_estimator

from synthval.detection.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    remove_partial_checkpoints,
    save_checkpoint,
)
from synthval.config import ModelConfig
from synthval.errors import CheckpointError
from synthval.detection.inference import load_model_for_inference
from synthval.detection.model import build_model

def test_seed_estimator_file_loads_as_the_seed_built_it_without_running_pickled_code(tmp_path):
    import zipfile

    from torchvision.ops.misc import FrozenBatchNorm2d

    state = random_seed_state()
    path = tmp_path / "FasterRCNN.estimator"
    write_seed_estimator(path, state)
    assert not zipfile.is_zipfile(path) and b"inner_blocks.0.weight" in path.read_bytes()

    ran = []  # yacs importable, its CfgNode booby-trapped: the loader must build plain dicts instead
    with fake_yacs_installed(on_run=ran.append):
        loaded = load_checkpoint(str(path))
        model, space, metadata = load_model_for_inference(str(path), "cpu")
    assert ran == [] and loaded["config"] == SEED_CONFIG and type(loaded["config"]["train"]) is dict
    assert space is None and metadata["num_classes"] == 64 and metadata["source_format"] == "datasetinsights"
    assert metadata["config"]["backbone"] == "resnet50" and not model.training

    # torchvision 0.5's model: frozen batch norm with eps 0 throughout the body, no trainable BatchNorm2d.
    norms = [m for m in model.backbone.body.modules() if isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d))]
    assert len(norms) == 53 and all(type(m) is FrozenBatchNorm2d and m.eps == 0.0 for m in norms)
    ours = model.state_dict()
    assert set(ours) == set(state) and all(torch.equal(ours[k], v) for k, v in state.items())

    image = [torch.rand(3, 120, 160, generator=torch.Generator().manual_seed(3))]
    reference = reference_model().eval()
    reference.load_state_dict(state)
    with torch.no_grad():
        features, expected = model.backbone(image[0][None]), reference.backbone(image[0][None])
        assert all(torch.equal(features[k], expected[k]) for k in expected)
        for m in reference.modules():  # today's default eps would change the features: the test can tell
            if isinstance(m, FrozenBatchNorm2d):
                m.eps = 1e-5
        assert not torch.allclose(model.backbone(image[0][None])["0"], reference.backbone(image[0][None])["0"])


def test_a_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    class SubtlerPayload:  # a module torch does not block by name: only the allow-list stops it
        def __reduce__(self):
            import subprocess

            return (subprocess.call, (["touch", str(marker)],))

    torch.save({"model": {}, "config": Payload()}, tmp_path / "evil.pt")
    torch.save({"model": {"x": torch.zeros(1)}, "config": SubtlerPayload()}, tmp_path / "evil2.pt")
    with open(tmp_path / "evil.pkl", "wb") as f:  # a bare pickle, as a pre-zip torch.save would write
        pickle.dump({"model": {}, "config": Payload()}, f, protocol=2)
    for name in ("evil.pt", "evil2.pt", "evil.pkl"):
        with pytest.raises(CheckpointError, match="evil"):
            load_checkpoint(str(tmp_path / name))
        with pytest.raises(CheckpointError):
            load_model_for_inference(str(tmp_path / name), "cpu")
    assert not marker.exists()


def test_not_a_checkpoint_and_missing_files_are_checkpoint_errors(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(str(tmp_path / "junk.pt"))
    with pytest.raises(CheckpointError, match="nope.pt"):
        load_checkpoint(str(tmp_path / "nope.pt"))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no Faster R-CNN weights"):
        load_model_for_inference(str(tmp_path / "other.pt"), "cpu")


@pytest.mark.parametrize("base", ["local", "memory"])
def test_save_is_atomic_and_latest_is_found_by_listing(tmp_path, base):
    folder = str(tmp_path / "ckpt") if base == "local" else f"memory://ckpt-{os.getpid()}"
    assert list_checkpoints(folder) == []
    for step in (2, 10, 4):
        save_checkpoint(f"{folder}/checkpoint-{step}.pt", {"step": step, "w": torch.full((2,), float(step))})
    if base == "local":
        (tmp_path / "ckpt" / ".checkpoint-12.pt.abc.tmp").write_bytes(b"half")  # a write cut short
        assert sorted(os.listdir(tmp_path / "ckpt")) == [".checkpoint-12.pt.abc.tmp", "checkpoint-10.pt",
                                                          "checkpoint-2.pt", "checkpoint-4.pt"]
    latest = list_checkpoints(folder)[-1][1]
    assert latest.endswith("checkpoint-10.pt")
    remove_partial_checkpoints(folder)
    if base == "local":
        assert not (tmp_path / "ckpt" / ".checkpoint-12.pt.abc.tmp").exists()
    assert load_checkpoint(latest)["step"] == 10
    prune_checkpoints(folder, keep=2)
    assert [step for step, _ in list_checkpoints(folder)] == [4, 10]


def test_synthval_checkpoint_gives_back_model_and_label_space(tmp_path):
    from synthval import __version__
    from synthval.detection.checkpoint import FORMAT, FORMAT_VERSION
    from synthval.config import TrainConfig, load_config, to_dict

    config = load_config(TrainConfig, preset="cpu-demo")
    model = build_model(config.model, num_classes=3)
    uri = str(tmp_path / "checkpoint-7.pt")
    save_checkpoint(uri, {"format": FORMAT, "format_version": FORMAT_VERSION, "synthval_version": __version__,
                          "model": model.state_dict(), "config": to_dict(config), "label_names": ["a", "b"],
                          "step": 7, "epoch": 1})
    loaded, space, metadata = load_model_for_inference(uri, torch.device("cpu"))
    assert space.names == ("a", "b") and metadata["step"] == 7 and metadata["model_config"]["name"] == "tiny"
    assert loaded.roi_heads.box_roi_pool.output_size == (5, 5)

    save_checkpoint(uri, {"format": FORMAT, "format_version": FORMAT_VERSION + 1, "model": model.state_dict(),
                          "config": to_dict(config), "label_names": ["a", "b"]})
    with pytest.raises(CheckpointError, match="newer"):
        load_model_for_inference(uri, "cpu")


def test_imagenet_structured_checkpoint_loads_without_downloading(tmp_path, monkeypatch):
    # A model trained from ImageNet weights stores weights_backbone="imagenet"; loading it for inference
    # must rebuild that structure from the checkpoint alone.
    def no_download(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    from synthval.detection.checkpoint import FORMAT, FORMAT_VERSION

    config = ModelConfig(name="mobilenet_v3_large_320_fpn", weights_backbone="imagenet")
    model = build_model(config, num_classes=3, load_backbone_weights=False)
    uri = str(tmp_path / "checkpoint-1.pt")
    save_checkpoint(uri, {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model.state_dict(),
                          "config": {"model": {**vars(config)}}, "label_names": ["a", "b"]})
    loaded, _, _ = load_model_for_inference(uri, "cpu")
    assert type(loaded.backbone.body["0"][1]).__name__ == "FrozenBatchNorm2d"
