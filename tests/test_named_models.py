"""Published models by name, wherever a checkpoint goes: `evaluate --checkpoint synthetic-400k` and
`finetune --init-checkpoint synthetic-400k`, through the one source table in synthval.io.sources, downloaded
from a loopback HTTP server that serves a checkpoint in the seed's exact format (see seed_checkpoint.py).
"""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from seed_checkpoint import random_seed_state, write_seed_estimator

from synthval.io import sources
from synthval.detection.checkpoint import load_checkpoint
from synthval.cli import main
from synthval.demo.generator import REAL_LABEL_IDS, generate_dataset

MODEL = "synthetic-400k"
PATH = "/datasetinsights/models/Synthetic/FasterRCNN.estimator"
# The seed's classes are GroceriesReal's 63 label ids. Class 1 and class 40 score high on every proposal:
# the demo data's labels are ids 1..10, so class 1 is scored and class 40 has no label in the test set.
SEED_CLASS_BIAS = {1: 9.0, 40: 9.0}


@pytest.fixture(scope="module")
def seed_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("seed")
    state = random_seed_state(class_bias=SEED_CLASS_BIAS)
    write_seed_estimator(root / "FasterRCNN.estimator", state)
    real = generate_dataset(kind="real-proxy", out_uri=str(root / "real"), num_images=12, image_size=64, seed=1,
                        layout="perception")["dataset_uri"]
    return {"bytes": (root / "FasterRCNN.estimator").read_bytes(), "state": state, "real": real}


@pytest.fixture
def published(seed_file, http_server, monkeypatch, tmp_path):
    """synthetic-400k served by the loopback server, downloads cached under tmp_path."""
    url = http_server.serve(PATH, seed_file["bytes"])
    monkeypatch.setitem(sources.NAMED_SOURCES[MODEL], "url", url)
    monkeypatch.setattr(sources, "DATA_CACHE_ROOT", str(tmp_path / "cache"))
    return http_server


@pytest.mark.slow
def test_evaluate_scores_a_published_model_by_name_and_counts_what_it_cannot_score(
        seed_file, published, tmp_path, caplog):
    out = tmp_path / "eval"
    with caplog.at_level(logging.WARNING, logger="synthval"):
        code = main(["evaluate", "--checkpoint", MODEL, "--data", seed_file["real"], "--out", str(out),
                     "--xcom-file", str(tmp_path / "x.json")])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["checkpoint_uri"] == MODEL  # a name stays a name in provenance, never <cwd>/name
    assert metrics["checkpoint"]["source_format"] == "datasetinsights" and metrics["checkpoint"]["num_classes"] == 64
    assert metrics["num_predictions"] > 0 and isinstance(metrics["mAP50"], float)  # class 1 is scored
    unscored = metrics["unscored_detections"]
    assert set(unscored["by_class"]) == {"class 40"} and unscored["total"] == unscored["by_class"]["class 40"] > 0
    assert re.search(rf"{unscored['total']} detection\(s\) of 1 model class\(es\) with no label id in the test set "
                     r"are not scored .*class 40", caplog.text)
    assert len(published.requests_for(PATH)) == 1

    assert main(["evaluate", "--checkpoint", MODEL, "--data", seed_file["real"], "--out", str(tmp_path / "again"),
                 "--xcom-file", str(tmp_path / "y.json")]) == 0
    assert len(published.requests_for(PATH)) == 1  # downloaded once, then read from the cache


@pytest.mark.slow
def test_finetune_starts_from_a_published_model_by_name_with_the_seed_s_frozen_backbone(
        seed_file, published, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="synthval"):
        code = main(["finetune", "--train-data", seed_file["real"], "--init-checkpoint", MODEL,
                     "--checkpoint-dir", str(tmp_path / "ckpt"), "--tb-log-dir", str(tmp_path / "tb"),
                     "--xcom-file", str(tmp_path / "x.json"), "--preset", "seed-finetune",
                     "--set", "model.min_size=128", "--set", "model.max_size=128", "--set", "data.batch_size=2",
                     "--set", "data.effective_batch_size=2", "--set", "max_steps=1", "--set", "data.num_workers=0"])
    assert code == 0
    assert "10 kept" in caplog.text
    result = json.loads((tmp_path / "x.json").read_text())
    tuned, seed = load_checkpoint(result["checkpoint_uri"])["model"], seed_file["state"]

    # One Adam step moved exactly the seed's 42 trainable body tensors (layer2-layer4 convolutions); the
    # stem, layer1 and every frozen batch-norm statistic are the seed's, and none grew a step counter.
    body = [k for k in seed if k.startswith("backbone.body.")]
    moved = [k for k in body if not torch.equal(tuned[k], seed[k])]
    assert len(moved) == 42 and all(re.match(r"backbone\.body\.layer[234]\..*(conv\d|downsample\.0)\.weight$", k)
                                    for k in moved)
    assert not any(k.endswith("num_batches_tracked") for k in tuned)

    # The head was mapped by label id: the seed's class k is GroceriesReal's label id k.
    names = load_checkpoint(result["checkpoint_uri"])["label_names"]
    for row, name in enumerate(names, start=1):
        seed_row = seed["roi_heads.box_predictor.cls_score.weight"][REAL_LABEL_IDS[name]]
        assert torch.allclose(tuned["roi_heads.box_predictor.cls_score.weight"][row], seed_row, atol=1e-3)
