"""Inference that does not bend the number: boxes are decoded in float32 under any autocast.

CPU autocast supports bfloat16, so the very quantisation a GPU run with `amp: auto` suffers (an 8-bit
mantissa puts every coordinate in 512..1024 px on a 4 px grid) shows here too.
"""

import dataclasses

import numpy as np
import pytest
import torch

from synthval.detection import engine
from synthval.config import PRESETS, ModelConfig, from_dict
from synthval.detection.model import build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = dataclasses.replace(from_dict(ModelConfig, PRESETS["cpu-demo"]["model"]), min_size=1024, max_size=1024)
    model = build_model(config, num_classes=3, load_backbone_weights=False).eval()
    model.roi_heads.score_thresh = 0.0  # random weights: keep every box, there is nothing to threshold
    return model


def batch():
    generator = torch.Generator().manual_seed(1)
    return [([torch.rand(3, 1024, 1024, generator=generator)], [{"image_id": 0}])]


def on_4px_grid(boxes: np.ndarray) -> float:
    """Share of coordinates above 512 px that are multiples of 4 (bfloat16's spacing there)."""
    large = boxes[boxes > 512]
    assert len(large) > 20, "the test needs boxes reaching past 512 px"
    return float(np.mean(np.mod(large, 4) == 0))


def test_plain_autocast_bends_the_boxes(model):
    """Why the fix exists: torchvision decodes in the regression outputs' dtype."""
    images, _ = batch()[0]
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        boxes = model(images)[0]["boxes"].float().numpy()
    assert on_4px_grid(boxes) == 1.0


def test_predict_decodes_in_float32_under_bfloat16_autocast(model, monkeypatch):
    seen = []
    for coder in (model.rpn.box_coder, model.roi_heads.box_coder):
        decode = coder.decode_single

        def spy(rel_codes, boxes, decode=decode):
            seen.append((rel_codes.dtype, boxes.dtype))
            return decode(rel_codes, boxes)

        monkeypatch.setattr(coder, "decode_single", spy)
    out = engine.predict(model, batch(), torch.device("cpu"), amp_dtype=torch.bfloat16)[0]
    assert len(seen) == 2 and set(seen) == {(torch.float32, torch.float32)}  # anchors and proposals too
    assert out["boxes"].dtype == np.float32
    assert on_4px_grid(out["boxes"]) < 0.5  # about 1/4 for float32 coordinates
    # The network itself did run in bfloat16: its boxes are not the float32 run's.
    full = engine.predict(model, batch(), torch.device("cpu"))[0]
    assert full["boxes"].shape != out["boxes"].shape or not np.array_equal(full["boxes"], out["boxes"])
    # and nothing stays hooked after predict
    assert not model.rpn.head._forward_hooks and not model.roi_heads.box_predictor._forward_hooks
    assert not model.rpn.anchor_generator._forward_pre_hooks
