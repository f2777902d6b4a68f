"""Dataset statistics, and the distance between two datasets' distributions: the domain gap before training.

Everything but the optional pixel statistics comes from the `DatasetIndex` (annotations and image
sizes, never pixels), so statistics of a 20,000-image dataset take about as long as reading its
annotations. Per dataset: image count, objects per label, objects per image, box size (relative:
sqrt(box area / image area); and COCO small/medium/large counts in pixels), aspect ratio (width /
height), box centre positions (relative, as a heat map), image sizes and, on a sample of images when
asked, brightness and colour (the only statistics that decode pixels).

With a second dataset (typically synthetic beside real), `compare_stats` gives one distance per
statistic: Wasserstein-1 (the earth mover's distance) for 1-D statistics, in the statistic's own unit
and in units of the second dataset's standard deviation so that they can be ranked; total variation
and Jensen-Shannon divergence (base 2, in [0, 1]) for the label distribution and the position heat
map. Labels are matched by name.

`run_stats` is the `synthval stats` step: stats.json, PNG plots and a self-contained stats.html.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from synthval.datasets.index import DatasetIndex

log = logging.getLogger(__name__)

STATS_SCHEMA_VERSION = 1
HEATMAP_BINS = 24
DISTANCE_BINS = 6  # heat map cells per side when comparing positions
# COCO's area ranges in pixels^2 (pycocotools Params): small < 32^2 <= medium < 96^2 <= large.
COCO_SMALL, COCO_LARGE = 32 ** 2, 96 ** 2
# 1-D statistics compared with Wasserstein-1: key -> (title, unit).
ONE_D = {
    "objects_per_image": ("objects per image", "objects"),
    "box_size": ("box size, sqrt(box area / image area)", "fraction of image side"),
    "log2_aspect_ratio": ("box aspect ratio, log2(width / height)", "log2 units"),
    "center_x": ("box centre x / image width", "fraction of width"),
    "center_y": ("box centre y / image height", "fraction of height"),
    "brightness": ("image brightness (sampled images)", "0-255"),
}


@dataclass
class DatasetStats:
    """Statistics of one dataset (or split). Arrays hold one value per image or per box."""

    name: str
    uri: str
    format: str
    num_images: int
    label_counts: dict[str, int]
    images_per_label: dict[str, int]
    objects_per_image: np.ndarray
    box_size: np.ndarray
    box_width_px: np.ndarray
    box_height_px: np.ndarray
    aspect_ratio: np.ndarray
    center_x: np.ndarray
    center_y: np.ndarray
    heatmap: np.ndarray
    image_sizes: dict[str, int]
    pixel: dict[str, Any] = field(default_factory=dict)

    @property
    def num_boxes(self) -> int:
        return int(self.objects_per_image.sum())

    @property
    def log2_aspect_ratio(self) -> np.ndarray:
        return np.log2(self.aspect_ratio)

    def values(self, key: str) -> np.ndarray | None:
        """The per-image or per-box sample behind a 1-D statistic of ONE_D (None if not measured)."""
        if key == "brightness":
            return np.asarray(self.pixel["brightness"]) if self.pixel.get("brightness") else None
        return np.asarray(getattr(self, key), dtype=np.float64)

    def size_counts(self) -> dict[str, int]:
        """Boxes per COCO area range (pixels^2), as the evaluation splits mAP_small/medium/large."""
        area = self.box_width_px * self.box_height_px
        return {"small": int(np.count_nonzero(area < COCO_SMALL)),
                "medium": int(np.count_nonzero((area >= COCO_SMALL) & (area < COCO_LARGE))),
                "large": int(np.count_nonzero(area >= COCO_LARGE))}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary: counts, quantiles and histograms (not the per-box arrays)."""
        return {
            "name": self.name, "uri": self.uri, "format": self.format,
            "num_images": self.num_images, "num_boxes": self.num_boxes,
            "labels": {"objects": self.label_counts, "images": self.images_per_label},
            "objects_per_image": _summary(self.objects_per_image)
            | {"histogram": np.bincount(self.objects_per_image.astype(np.int64)).tolist()
               if len(self.objects_per_image) else []},
            "box_size": _summary(self.box_size),
            "box_width_px": _summary(self.box_width_px),
            "box_height_px": _summary(self.box_height_px),
            "aspect_ratio": _summary(self.aspect_ratio),
            "center_x": _summary(self.center_x),
            "center_y": _summary(self.center_y),
            "coco_size_counts": self.size_counts(),
            "position_heatmap": {"bins": int(self.heatmap.shape[0]), "counts": self.heatmap.astype(int).tolist(),
                                 "rows": "centre y / height, top to bottom", "cols": "centre x / width"},
            "image_sizes": self.image_sizes,
            "pixel": {k: v for k, v in self.pixel.items() if k != "brightness"}
            | ({"brightness": _summary(np.asarray(self.pixel["brightness"]))} if self.pixel.get("brightness") else {}),
        }


def _summary(values: np.ndarray) -> dict[str, Any]:
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return {"count": 0}
    q = np.quantile(values, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {"count": int(len(values)), "mean": float(values.mean()), "std": float(values.std()),
            "min": float(values.min()), "p05": float(q[0]), "p25": float(q[1]), "median": float(q[2]),
            "p75": float(q[3]), "p95": float(q[4]), "max": float(values.max())}


def compute_stats(index: DatasetIndex, name: str | None = None, uri: str | None = None,
                  pixel_sample: int = 0, seed: int = 0, bins: int = HEATMAP_BINS) -> DatasetStats:
    """Statistics of `index`; `pixel_sample` > 0 decodes that many images (drawn by `seed`) for brightness."""
    names = index.label_names
    counts = np.array([len(r.labels) for r in index.images], dtype=np.int64)
    if index.images:
        boxes = np.concatenate([np.asarray(r.boxes, np.float64).reshape(-1, 4) for r in index.images])
        labels = np.concatenate([np.asarray(r.labels, np.int64).reshape(-1) for r in index.images])
    else:
        boxes, labels = np.zeros((0, 4)), np.zeros(0, np.int64)
    width = np.repeat([r.width for r in index.images], counts).astype(np.float64)
    height = np.repeat([r.height for r in index.images], counts).astype(np.float64)
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx = (boxes[:, 0] + boxes[:, 2]) / 2 / np.maximum(width, 1)
    cy = (boxes[:, 1] + boxes[:, 3]) / 2 / np.maximum(height, 1)
    # Names, not ids: two datasets number the same label differently. A name shared by two ids counts once.
    label_counts = {n.strip(): 0 for _, n in sorted(names.items())}
    images_per_label = dict(label_counts)
    by_id = np.bincount(labels, minlength=max(names, default=0) + 1) if len(labels) else np.zeros(0, np.int64)
    for label_id, label_name in names.items():
        if label_id < len(by_id):
            label_counts[label_name.strip()] += int(by_id[label_id])
    for record in index.images:
        for label_name in {names[int(c)].strip() for c in np.asarray(record.labels).reshape(-1)}:
            images_per_label[label_name] += 1
    heatmap, _, _ = np.histogram2d(np.clip(cy, 0, 1 - 1e-9), np.clip(cx, 0, 1 - 1e-9), bins=bins,
                                   range=[[0, 1], [0, 1]])
    sizes: dict[str, int] = {}
    for record in index.images:
        key = f"{record.width}x{record.height}"
        sizes[key] = sizes.get(key, 0) + 1
    stats = DatasetStats(
        name=name or _default_name(index.root), uri=uri or index.root, format=index.format,
        num_images=len(index), label_counts=label_counts, images_per_label=images_per_label,
        objects_per_image=counts, box_size=np.sqrt(np.maximum(bw * bh, 0) / np.maximum(width * height, 1)),
        box_width_px=bw, box_height_px=bh, aspect_ratio=bw / np.maximum(bh, 1e-9),
        center_x=cx, center_y=cy, heatmap=heatmap,
        image_sizes=dict(sorted(sizes.items(), key=lambda kv: -kv[1])),
    )
    if pixel_sample > 0 and len(index):
        stats.pixel = pixel_stats(index, pixel_sample, seed)
    return stats


def _default_name(root: str) -> str:
    return os.path.basename(os.path.normpath(root)) or root


def pixel_stats(index: DatasetIndex, sample: int, seed: int = 0, thumb: int = 128) -> dict[str, Any]:
    """Brightness (mean luma, 0-255) per sampled image, and mean RGB and luma histogram over the sample.

    Images are decoded at reduced size (JPEG draft mode, then a thumbnail): colour statistics do not
    need full resolution. Unreadable images are skipped with a warning.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(index), size=min(sample, len(index)), replace=False).tolist())
    brightness, contrast, means = [], [], []
    hist = np.zeros(32, dtype=np.int64)
    for i in chosen:
        path = index.images[i].path
        try:
            with Image.open(path) as image:
                image.draft("RGB", (thumb, thumb))
                image = image.convert("RGB")
                image.thumbnail((thumb, thumb))
                rgb = np.asarray(image, dtype=np.float64)
        except Exception as exc:  # a statistic must not fail on one bad file
            log.warning("pixel statistics: %s skipped (%s)", path, exc)
            continue
        luma = rgb @ np.array([0.299, 0.587, 0.114])
        brightness.append(float(luma.mean()))
        contrast.append(float(luma.std()))
        means.append(rgb.reshape(-1, 3).mean(axis=0))
        hist += np.histogram(luma, bins=32, range=(0, 256))[0]
    if not brightness:
        return {}
    return {"sampled_images": len(brightness), "brightness": brightness, "contrast_mean": float(np.mean(contrast)),
            "mean_rgb": [float(v) for v in np.mean(means, axis=0)], "luma_histogram": hist.tolist()}


# --- distances ---------------------------------------------------------------------------------------


def wasserstein1(a: Sequence[float], b: Sequence[float]) -> float:
    """Wasserstein-1 distance between two empirical 1-D distributions: the area between their CDFs."""
    a = np.sort(np.asarray(a, dtype=np.float64))
    b = np.sort(np.asarray(b, dtype=np.float64))
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    points = np.sort(np.concatenate([a, b]))
    gaps = np.diff(points)
    cdf_a = np.searchsorted(a, points[:-1], side="right") / len(a)
    cdf_b = np.searchsorted(b, points[:-1], side="right") / len(b)
    return float(np.sum(np.abs(cdf_a - cdf_b) * gaps))


def total_variation(p: Sequence[float], q: Sequence[float]) -> float:
    """Total variation distance of two histograms (normalised here), in [0, 1]."""
    p, q = _normalised(p), _normalised(q)
    return float(0.5 * np.abs(p - q).sum())


def jensen_shannon(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen-Shannon divergence (base 2) of two histograms (normalised here), in [0, 1]."""
    p, q = _normalised(p), _normalised(q)
    m = (p + q) / 2

    def kl(x: np.ndarray) -> float:
        nz = x > 0
        return float(np.sum(x[nz] * np.log2(x[nz] / m[nz])))

    return max(0.0, 0.5 * kl(p) + 0.5 * kl(q))


def _normalised(h: Sequence[float]) -> np.ndarray:
    h = np.asarray(h, dtype=np.float64).ravel()
    total = h.sum()
    return h / total if total > 0 else h


def compare_stats(a: DatasetStats, b: DatasetStats) -> dict[str, Any]:
    """Distances between `a` (e.g. synthetic) and `b` (e.g. real), one per statistic.

    1-D statistics: {"w1": Wasserstein-1 in the statistic's unit, "w1_std": the same in standard
    deviations of `b`, "mean_a", "mean_b"}; the label distribution (over label names) and the position
    heat map (on a 6 x 6 grid): {"tv", "js"}; "labels": names only in a, only in b, shared.
    """
    out: dict[str, Any] = {"a": a.name, "b": b.name, "one_d": {}}
    for key, (title, unit) in ONE_D.items():
        va, vb = a.values(key), b.values(key)
        if va is None or vb is None or len(va) == 0 or len(vb) == 0:
            continue
        if key == "log2_aspect_ratio":
            va, vb = va[np.isfinite(va)], vb[np.isfinite(vb)]
        w1 = wasserstein1(va, vb)
        sd = float(np.std(vb))
        out["one_d"][key] = {"title": title, "unit": unit, "w1": w1, "w1_std": w1 / sd if sd > 0 else None,
                             "mean_a": float(np.mean(va)), "mean_b": float(np.mean(vb))}
    names = list(dict.fromkeys([*a.label_counts, *b.label_counts]))
    pa = [a.label_counts.get(n, 0) for n in names]
    pb = [b.label_counts.get(n, 0) for n in names]
    out["labels"] = {"tv": total_variation(pa, pb), "js": jensen_shannon(pa, pb),
                     "shared": [n for n in names if n in a.label_counts and n in b.label_counts],
                     "only_in_a": [n for n in names if n not in b.label_counts],
                     "only_in_b": [n for n in names if n not in a.label_counts]}
    if a.heatmap.shape == b.heatmap.shape:
        # On a coarse grid: distances between sparse fine histograms mostly measure sampling noise.
        ca, cb = coarse_heatmap(a.heatmap), coarse_heatmap(b.heatmap)
        out["position_heatmap"] = {"tv": total_variation(ca, cb), "js": jensen_shannon(ca, cb), "bins": int(ca.shape[0])}
    out["coco_size_share"] = {
        "a": _shares(a.size_counts()), "b": _shares(b.size_counts()),
        "tv": total_variation(list(a.size_counts().values()), list(b.size_counts().values())),
    }
    return out


def coarse_heatmap(heatmap: np.ndarray, bins: int = DISTANCE_BINS) -> np.ndarray:
    """Sum a square heat map into `bins` x `bins` cells (its size must be a multiple of `bins`)."""
    n = heatmap.shape[0]
    if n % bins:
        return heatmap
    f = n // bins
    return heatmap.reshape(bins, f, bins, f).sum(axis=(1, 3))


def _shares(counts: dict[str, int]) -> dict[str, float]:
    total = sum(counts.values())
    return {k: (v / total if total else 0.0) for k, v in counts.items()}


# --- the step ----------------------------------------------------------------------------------------


def load_stats(uri: str, split: str | None = None, dataset_format: str = "auto", name: str | None = None,
               bbox_definition_id: str | None = None, skip_broken: bool = False, pixel_sample: int = 0,
               seed: int = 0) -> DatasetStats:
    """Read the dataset at `uri` (any supported format; remote ones are fetched) and compute its statistics."""
    from synthval.datasets import load_dataset
    from synthval.fetch import local_dataset

    index = load_dataset(local_dataset(uri), format=dataset_format, split=split,
                         bbox_definition_id=bbox_definition_id, skip_broken=skip_broken)
    shown = name or _default_name(uri)
    if split not in (None, "all") and not name:
        shown = f"{shown} ({split})"
    log.info("stats of %s: %d images, %d boxes, %d labels", uri, len(index), index.num_boxes, len(index.label_names))
    return compute_stats(index, name=shown, uri=uri, pixel_sample=pixel_sample, seed=seed)


def run_stats(data_uri: str, out_uri: str, split: str | None = None, dataset_format: str = "auto",
              bbox_definition_id: str | None = None, skip_broken: bool = False, name: str | None = None,
              compare_data_uri: str | None = None, compare_split: str | None = None,
              compare_format: str = "auto", compare_name: str | None = None, pixel_sample: int = 0,
              seed: int = 0) -> dict[str, Any]:
    """Statistics of a dataset (and its distance to a second one) into `out_uri`.

    Writes `stats.json`, `stats.html` (self-contained, plots embedded) and `plots/*.png`; returns
    {"stats_uri", "report_uri", "plots_uri"}.
    """
    from synthval import plots, storage
    from synthval.report import write_html, write_published, write_stats_report

    first = load_stats(data_uri, split, dataset_format, name, bbox_definition_id, skip_broken, pixel_sample, seed)
    datasets = [first]
    distances = None
    if compare_data_uri:
        second = load_stats(compare_data_uri, compare_split, compare_format, compare_name, None, skip_broken,
                            pixel_sample, seed)
        if second.name == first.name:
            second.name = f"{second.name} (2)"
        datasets.append(second)
        distances = compare_stats(first, second)
        for key, row in distances["one_d"].items():
            log.info("distance %s: W1 %.4g %s (%s std of %s)", key, row["w1"], row["unit"],
                     "n/a" if row["w1_std"] is None else f"{row['w1_std']:.2f}", second.name)
    figures = plots.stats_figures(datasets)
    plots_uri = storage.join_uri(out_uri, "plots")
    pngs: dict[str, bytes] = {}
    for key, fig in figures.items():
        pngs[key] = plots.figure_png(fig)
        write_published(storage.join_uri(plots_uri, f"{key}.png"), pngs[key], "image/png")
    document = {"schema_version": STATS_SCHEMA_VERSION, "datasets": [d.to_dict() for d in datasets],
                "distances": distances}
    stats_uri = storage.join_uri(out_uri, "stats.json")
    report_uri = storage.join_uri(out_uri, "stats.html")
    write_html(report_uri, write_stats_report(datasets, distances, pngs))
    storage.write_json(stats_uri, _finite(document))
    log.info("wrote %s, %s and %d plots", stats_uri, report_uri, len(pngs))
    return {"stats_uri": stats_uri, "report_uri": report_uri, "plots_uri": plots_uri}


def _finite(obj: Any) -> Any:
    """JSON has no NaN: turn non-finite floats into None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
