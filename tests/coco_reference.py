"""pycocotools run directly, the reference every scoring test compares with, and random COCO files.

`random_coco` writes what real COCO files hold and what trips scorers up: crowd regions (some large
over several objects, some exact copies of an object's box), given `area`s unlike the box area (some
exactly on the 32^2 and 96^2 bounds, some absent), `ignore` flags, `iscrowd` absent, exact duplicate
boxes and detections, scores that tie, images without boxes or detections, classes without boxes or
detections, more than 100 detections of one class in one image, float and integer coordinates, and
image ids in no order and beyond 32 bits.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np


def pycocotools_eval(gt_doc: dict, results: list[dict]):
    """COCOeval (bbox) evaluated, accumulated and summarized on a ground-truth dict and results list."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = reference_doc(gt_doc)
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(copy.deepcopy(results)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def reference_doc(gt_doc: dict) -> dict:
    """The ground truth as pycocotools needs it: it requires `area` and `iscrowd` on every annotation
    (synthval reads an absent `area` as the box area and an absent `iscrowd` as 0, so fill those in)."""
    doc = copy.deepcopy(gt_doc)
    for a in doc["annotations"]:
        a.setdefault("area", a["bbox"][2] * a["bbox"][3])
        a.setdefault("iscrowd", 0)
    return doc


def write_json(path: Path, doc) -> str:
    path.write_text(json.dumps(doc))
    return str(path)


def random_coco(seed: int, n_images: int = 16, n_cats: int = 4, max_gt: int = 8, max_det: int = 30,
                crowd: float = 0.15, many: bool = False, ties: bool = True) -> tuple[dict, list[dict]]:
    """A random COCO ground-truth dict and results list (see the module docstring); `ties=False`: no
    two detections share a score."""
    rng = np.random.default_rng(seed)
    cats = sorted(int(c) for c in rng.choice(np.arange(1, 91), n_cats, replace=False))
    ids = [int(i) for i in rng.choice(np.arange(1, 10**6), n_images, replace=False)]
    if rng.random() < 0.3:
        ids[0] = 2**40 + 7  # beyond 32 bits
    doc = {"images": [], "annotations": [],
           "categories": [{"id": c, "name": f"c{c}", "supercategory": "x"} for c in cats]}
    results = []
    for image_id in ids:
        doc["images"].append({"id": image_id, "file_name": f"{image_id}.jpg", "width": 320, "height": 240})
        n = int(rng.integers(0, max_gt + 1)) if rng.random() > 0.15 else 0
        boxes = []
        for _ in range(n):
            side = float(rng.choice([6, 20, 31, 32, 33, 60, 95, 96, 97, 150]))
            w, h = side * rng.uniform(0.6, 1.6), side * rng.uniform(0.6, 1.6)
            if rng.random() < 0.5:
                w, h = round(w), max(1, round(h))
            x, y = float(rng.integers(0, 250)), float(rng.integers(0, 200))
            if rng.random() < 0.3:
                x += 0.37
            boxes.append(([x, y, w, h], int(rng.choice(cats)), bool(rng.random() < crowd)))
        if boxes and rng.random() < 0.3:  # an exact duplicate of a box, sometimes as a crowd region
            bbox, cat, _ = boxes[int(rng.integers(len(boxes)))]
            boxes.append((bbox, cat, bool(rng.random() < 0.5)))
        if rng.random() < crowd * 2:  # a crowd region over several objects
            boxes.append(([float(rng.integers(0, 100)), float(rng.integers(0, 80)), 200.0, 150.0], int(rng.choice(cats)),
                          True))
        for bbox, cat, is_crowd in boxes:
            ann = {"id": len(doc["annotations"]) + 1, "image_id": image_id, "category_id": cat, "bbox": list(bbox),
                   "segmentation": []}
            if is_crowd or rng.random() > 0.2:
                ann["iscrowd"] = int(is_crowd)
            area_kind = rng.random()
            if area_kind < 0.5:
                ann["area"] = float(bbox[2] * bbox[3] * rng.uniform(0.3, 1.0))
            elif area_kind < 0.65:
                ann["area"] = float(rng.choice([32**2, 96**2]))
            elif area_kind < 0.85:
                ann["area"] = bbox[2] * bbox[3]
            if rng.random() < 0.2:
                ann["ignore"] = int(rng.integers(0, 2))
            doc["annotations"].append(ann)
        if rng.random() < 0.1:
            continue  # no detections on this image
        m = int(rng.integers(0, max_det + 1))
        if many and rng.random() < 0.5:
            m = 130  # over 100 detections of one class
        for j in range(m):
            if boxes and rng.random() < 0.7:
                bbox, cat, _ = boxes[int(rng.integers(len(boxes)))]
                jitter = rng.choice([0, 0, 1, 2, 4, 8, 16], size=4) * rng.choice([-1, 1], size=4)
                det = [bbox[0] + jitter[0], bbox[1] + jitter[1], max(1.0, bbox[2] + jitter[2]), max(1.0, bbox[3] + jitter[3])]
                if rng.random() < 0.2:
                    cat = int(rng.choice(cats))
            else:
                det = [float(rng.integers(0, 300)), float(rng.integers(0, 220)), float(rng.integers(1, 120)),
                       float(rng.integers(1, 120))]
                cat = int(rng.choice(cats))
            if many and m == 130:
                cat = cats[0]
            score = float(np.round(rng.random(), 1) if ties and rng.random() < 0.5 else rng.random())
            results.append({"image_id": image_id, "category_id": cat, "bbox": [float(v) for v in det], "score": score})
            if ties and rng.random() < 0.05:
                results.append(dict(results[-1]))  # an exact duplicate detection
    rng.shuffle(doc["images"])
    return doc, results
