"""Tiny evaluations for report, bootstrap and notebook tests, made without training a model.

A "detector" here is the test set's own boxes, jittered, some dropped, some relabelled (class
confusion) and some false alarms added; `synthval evaluate --predictions` scores it like any COCO
results file, so metrics.json and predictions.json are exactly what the pipeline writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from synthval.cli import main
from synthval.data import load_dataset


def fake_detections(index, seed: int = 0, miss_rate: float = 0.2, confuse_rate: float = 0.1,
                    jitter: float = 2.0, false_alarms: float = 1.0) -> list[dict]:
    """COCO results (index image ids, dataset label ids) of a noisy detector over `index`."""
    rng = np.random.default_rng(seed)
    labels = sorted(index.label_names)
    results = []
    for record in index.images:
        for box, label in zip(np.asarray(record.boxes, np.float64), np.asarray(record.labels).tolist()):
            if rng.random() < miss_rate:
                continue
            x1, y1, x2, y2 = (box + rng.normal(0, jitter, 4)).tolist()
            if rng.random() < confuse_rate:
                label = int(rng.choice([c for c in labels if c != label] or labels))
            results.append({"image_id": int(record.image_id), "category_id": int(label),
                            "bbox": [x1, y1, max(1.0, x2 - x1), max(1.0, y2 - y1)],
                            "score": float(rng.uniform(0.4, 1.0))})
        for _ in range(rng.poisson(false_alarms)):
            w, h = rng.uniform(8, 30, 2)
            x, y = rng.uniform(0, max(1, record.width - w)), rng.uniform(0, max(1, record.height - h))
            results.append({"image_id": int(record.image_id), "category_id": int(rng.choice(labels)),
                            "bbox": [float(x), float(y), float(w), float(h)], "score": float(rng.uniform(0.05, 0.9))})
    return results


def generate(kind: str, out: Path, num_images: int, seed: int = 0, image_size: int = 96) -> str:
    """`synthval generate` in-process; returns the dataset folder."""
    xcom = out.parent / f"{out.name}.generate.json"
    code = main(["generate", "--kind", kind, "--out", str(out), "--num-images", str(num_images),
                 "--image-size", str(image_size), "--seed", str(seed), "--xcom-file", str(xcom), "--log-level", "WARNING"])
    assert code == 0, f"synthval generate {kind} failed"
    return str(out)


def evaluate_fake(data: str, out: Path, split: str = "test", seed: int = 0, **noise) -> dict:
    """Score a fake detector on `split` of `data` with `synthval evaluate --predictions`; returns its XCom."""
    index = load_dataset(data, split=split)
    out.mkdir(parents=True, exist_ok=True)
    source = out / "detector.json"
    source.write_text(json.dumps(fake_detections(index, seed=seed, **noise)))
    xcom = out / "evaluate.json"
    code = main(["evaluate", "--predictions", str(source), "--data", data, "--split", split,
                 "--out", str(out), "--xcom-file", str(xcom), "--log-level", "WARNING"])
    assert code == 0, "synthval evaluate --predictions failed"
    return json.loads(xcom.read_text())
