"""Scoring a COCO results file end to end: `synthval evaluate --predictions` against pycocotools and
faster-coco-eval, each in a fresh process from its start to a written metrics.json.

    python benchmarks/bench_eval.py                       # 500 / 5,000 / 20,000 images (takes a while)
    python benchmarks/bench_eval.py --sizes 5000:80 --repeat 3
    python benchmarks/bench_eval.py --toy                 # seconds: proves the script works (CI)

For each size it writes a COCO-like ground-truth file (images of COCO's sizes listed in no id order, ~7
boxes per image of a long-tailed class mix, box sizes spread over small / medium / large, each with a
segmentation-like `area` below its box area, 1% crowd regions) and a detector's results file (one to
three jittered detections on 90% of the boxes, mostly of the right class, then low-scoring false alarms
up to the detections per image; scores rounded to 4 decimals, so some tie). Then it runs, in turn:

- synthval: `synthval evaluate --predictions R --data G --out O`, which reads the annotation file alone,
  scores, and adds 95% bootstrap intervals (1000 resamples) of mAP, mAP50, mAP75, mAR100 and per-class
  AP; and the same with `--set bootstrap_replicates=0` (scoring alone);
- pycocotools: COCO(G), loadRes(R), COCOeval evaluate / accumulate / summarize, per-class AP, written
  as metrics.json (no intervals: pycocotools has none);
- faster-coco-eval: the same through its COCO / COCOeval_faster.

It prints wall time (median of --repeat runs) and peak resident memory of each process, the ratios to
synthval with intervals, seconds per 1,000 images (time linear in images?), and whether every tool's 12
summary numbers and per-class AP agree with synthval's (largest difference shown). Not a test: nothing
here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

# pycocotools' summary order, by synthval's names.
SUMMARY_KEYS = ("mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large",
                "mAR1", "mAR10", "mAR100", "mAR_small", "mAR_medium", "mAR_large")
COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
IMAGE_SIZES = [(640, 480), (480, 640), (640, 427), (500, 375), (640, 640), (427, 640), (640, 360)]


def make_coco(num_images: int, num_classes: int, dets_per_image: int, seed: int = 0) -> tuple[dict, list[dict]]:
    """A COCO-like ground-truth dict and a detector's results list (see the module docstring)."""
    rng = np.random.default_rng(seed)
    cats = np.array(COCO_CATEGORY_IDS[:num_classes])
    freq = 1.0 / np.arange(1, num_classes + 1) ** 0.9
    freq /= freq.sum()
    ids = rng.choice(np.arange(1, 60 * num_images + 1), num_images, replace=False)
    sizes = np.array(IMAGE_SIZES)[rng.integers(len(IMAGE_SIZES), size=num_images)]
    images = [{"id": int(i), "file_name": f"{int(i):012d}.jpg", "width": int(w), "height": int(h)}
              for i, (w, h) in zip(ids, sizes)]
    # Ground truth: ~7.3 boxes per image (some images none), long-tailed classes, sizes over 3 decades.
    counts = rng.negative_binomial(2, 2 / (2 + 7.3), num_images)
    img = np.repeat(np.arange(num_images), counts)
    n = len(img)
    w_img, h_img = sizes[img, 0].astype(float), sizes[img, 1].astype(float)
    side, aspect = np.exp(rng.normal(np.log(40), 1.0, n)), np.exp(rng.normal(0, 0.5, n))
    bw = np.minimum(side * np.sqrt(aspect), w_img - 1)
    bh = np.minimum(side / np.sqrt(aspect), h_img - 1)
    boxes = np.round(np.stack([rng.random(n) * (w_img - bw), rng.random(n) * (h_img - bh), bw, bh], axis=1), 2)
    labels = rng.choice(cats, n, p=freq)
    crowd = rng.random(n) < 0.01
    area = np.round(boxes[:, 2] * boxes[:, 3] * rng.uniform(0.35, 0.9, n), 2)
    annotations = [{"id": k + 1, "image_id": int(ids[i]), "category_id": int(c), "bbox": b, "area": float(a),
                    "iscrowd": int(z), "segmentation": []}
                   for k, (i, c, b, a, z) in enumerate(zip(img.tolist(), labels.tolist(), boxes.tolist(),
                                                           area.tolist(), crowd.tolist()))]
    # Detections: 1-3 jittered ones on 90% of the boxes, mostly of the right class, high scores...
    found = np.flatnonzero(rng.random(n) < 0.9)
    src = np.repeat(found, rng.integers(1, 4, len(found)))
    scale = np.repeat(boxes[src, 2:], 2, axis=1)
    near = boxes[src] + rng.normal(0, 0.1, (len(src), 4)) * scale
    near[:, 2:] = np.maximum(near[:, 2:], 1)
    near_labels = np.where(rng.random(len(src)) < 0.85, labels[src], rng.choice(cats, len(src), p=freq))
    near_scores = rng.beta(5, 2, len(src))
    near_img = img[src]
    # ...then low-scoring false alarms up to `dets_per_image` per image.
    extra = np.maximum(dets_per_image - np.bincount(near_img, minlength=num_images), 0)
    far_img = np.repeat(np.arange(num_images), extra)
    m = len(far_img)
    fw, fh = rng.uniform(4, 200, m), rng.uniform(4, 200, m)
    fw, fh = np.minimum(fw, sizes[far_img, 0] - 1), np.minimum(fh, sizes[far_img, 1] - 1)
    far = np.stack([rng.random(m) * (sizes[far_img, 0] - fw), rng.random(m) * (sizes[far_img, 1] - fh), fw, fh], 1)
    det_img = np.concatenate([near_img, far_img])
    det_box = np.round(np.concatenate([near, far]), 2)
    det_label = np.concatenate([near_labels, rng.choice(cats, m, p=freq)])
    det_score = np.round(np.concatenate([near_scores, rng.beta(1, 6, m)]), 4)
    order = np.argsort(det_img, kind="stable")
    keep = order[np.arange(len(order)) - np.searchsorted(det_img[order], det_img[order]) < dets_per_image]
    results = [{"image_id": int(ids[i]), "category_id": int(c), "bbox": b, "score": s}
               for i, c, b, s in zip(det_img[keep].tolist(), det_label[keep].tolist(), det_box[keep].tolist(),
                                     det_score[keep].tolist())]
    rng.shuffle(images)
    gt = {"info": {"description": "bench_eval.py"}, "images": images, "annotations": annotations,
          "categories": [{"id": int(c), "name": f"class_{int(c)}", "supercategory": "thing"} for c in cats]}
    return gt, results


def run_baseline(tool: str, gt_path: str, results_path: str, out_path: str) -> None:
    """pycocotools or faster-coco-eval from the files to a metrics.json (this process is the one timed)."""
    import contextlib
    import io

    if tool == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    else:
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_path)
        ev = COCOeval(gt, gt.loadRes(results_path), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    precision = ev.eval["precision"][:, :, :, 0, -1]
    names = {c["id"]: c["name"] for c in gt.dataset["categories"]}
    per_class = {}
    for k, cat in enumerate(sorted(names)):
        p = precision[:, :, k]
        per_class[names[cat]] = float(np.mean(p[p > -1])) if (p > -1).any() else None
    metrics = {key: (float(v) if v > -1 else None) for key, v in zip(SUMMARY_KEYS, ev.stats)}
    metrics["per_class"] = {name: {"AP": ap} for name, ap in per_class.items()}
    with open(out_path, "w") as f:
        json.dump(metrics, f)


def timed(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, peak resident MiB) of a fresh process running argv; raises if it fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} ... failed:\n{stderr[-3000:]}")
    return seconds, usage.ru_maxrss / 1024


def numbers(metrics_path: str) -> tuple[list[float | None], dict[str, float | None]]:
    with open(metrics_path) as f:
        metrics = json.load(f)
    return [metrics[k] for k in SUMMARY_KEYS], {n: row["AP"] for n, row in metrics["per_class"].items()}


def largest_difference(a: tuple, b: tuple) -> float:
    """Largest |a - b| over the 12 summary numbers and every class's AP (inf where one is null only)."""
    pairs = list(zip(a[0], b[0])) + [(a[1][n], b[1].get(n)) for n in a[1]]
    worst = 0.0
    for x, y in pairs:
        if (x is None) != (y is None):
            return float("inf")
        if x is not None:
            worst = max(worst, abs(x - y))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["500:10", "5000:80", "20000:80"],
                        help="IMAGES:CLASSES per size (default: 500:10 5000:80 20000:80)")
    parser.add_argument("--dets", type=int, default=100, help="detections per image (default 100)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each tool per size; the median is shown")
    parser.add_argument("--tools", nargs="+", default=["synthval", "synthval-no-intervals", "faster-coco-eval",
                                                       "pycocotools"])
    parser.add_argument("--toy", action="store_true", help="30 images, 5 classes, 20 detections: a quick check")
    parser.add_argument("--keep", default=None, metavar="DIR", help="write the files here and keep them")
    parser.add_argument("--baseline", nargs=4, metavar=("TOOL", "GT", "RESULTS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline:
        run_baseline(*args.baseline)
        return
    if args.toy:
        args.sizes, args.dets = ["30:5"], 20
    work = args.keep or tempfile.mkdtemp(prefix="bench-eval-")
    os.makedirs(work, exist_ok=True)
    print(f"synthval evaluate --predictions, end to end (process start to metrics.json), {args.dets} detections "
          f"per image; {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"median of {args.repeat}")
    print(f"{'images':>7} {'classes':>7} {'tool':<22} {'seconds':>8} {'peak MiB':>9} {'s/1k img':>9} "
          f"{'vs synthval':>11}  same numbers (largest |diff|)")
    for size in args.sizes:
        num_images, num_classes = (int(v) for v in size.split(":"))
        gt, results = make_coco(num_images, num_classes, args.dets)
        gt_path, results_path = os.path.join(work, f"gt-{size}.json"), os.path.join(work, f"results-{size}.json")
        with open(gt_path, "w") as f:
            json.dump(gt, f)
        with open(results_path, "w") as f:
            json.dump(results, f)
        del gt, results
        rows = {}
        for tool in args.tools:
            out = os.path.join(work, f"{tool}-{size}")
            if tool.startswith("synthval"):
                argv = [sys.executable, "-m", "synthval.cli", "evaluate", "--predictions", results_path,
                        "--data", gt_path, "--out", out, "--xcom-file", os.path.join(out + ".xcom.json"),
                        "--log-level", "WARNING"]
                if tool == "synthval-no-intervals":
                    argv += ["--set", "bootstrap_replicates=0"]
                metrics_path = os.path.join(out, "metrics.json")
            else:
                os.makedirs(out, exist_ok=True)
                metrics_path = os.path.join(out, "metrics.json")
                argv = [sys.executable, os.path.abspath(__file__), "--baseline", tool, gt_path, results_path,
                        metrics_path]
            runs = [timed(argv) for _ in range(args.repeat)]
            rows[tool] = (statistics.median(r[0] for r in runs), max(r[1] for r in runs), numbers(metrics_path))
        reference = rows.get("synthval") or next(iter(rows.values()))
        for tool, (seconds, peak, found) in rows.items():
            diff = largest_difference(reference[2], found)
            same = "yes" if diff <= 1e-12 else "NO"
            print(f"{num_images:>7} {num_classes:>7} {tool:<22} {seconds:>8.2f} {peak:>9.0f} "
                  f"{seconds / num_images * 1000:>9.3f} {seconds / reference[0]:>10.2f}x  {same} ({diff:.1e})")
        sys.stdout.flush()
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
