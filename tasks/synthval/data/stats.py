"""Dataset statistics, and the distance between two datasets' distributions: the domain gap before training.

Everything but the optional pixel statistics comes from the `DatasetIndex` (annotations and image
sizes, never pixels), so statistics of a 20,000-image dataset take about as long as reading its
annotations. Per dataset: image count, objects per label, objects per image, box size (relative:
sqrt(box area / image area); and COCO small/medium/large counts in pixels), per label too, aspect
ratio (width / height), box centre positions (relative, as a heat map), image sizes and, on a sample
of images when asked, brightness, contrast and colour balance (the only statistics that decode pixels).
For Perception and SOLO datasets, what the simulator measured beside the boxes (visible pixels and
visible fraction per box, object counts, iterations, seeds, light and placement) comes from a
separate pass over the metrics (`simulator_stats`).

With a second dataset (typically synthetic beside real), `compare_stats` gives one distance per
statistic: Wasserstein-1 (the earth mover's distance) for 1-D statistics, in the statistic's own unit
and in units of the second dataset's standard deviation so that they can be ranked; total variation
and Jensen-Shannon divergence (base 2, in [0, 1]) for the label distribution and the position heat
map; the box-size distance per shared label. Labels are matched by name. `gap_lines` says the largest
gaps in plain words. The `synthval stats` step (steps/stats.py) writes them out.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from synthval.data.index import DatasetIndex
from synthval.data.simulator import SimulatorMetrics
from synthval.data.simulator_stats import SimulatorStats, simulator_stats

log = logging.getLogger(__name__)

STATS_SCHEMA_VERSION = 2
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
    "contrast": ("image contrast, std of luma (sampled images)", "0-255"),
    "warmth": ("image colour balance, mean red - mean blue (sampled images)", "0-255"),
}
PIXEL_KEYS = ("brightness", "contrast", "warmth")
# How each 1-D statistic reads when the first dataset's is higher / lower, and what would close it then.
GAP_WORDS = {
    "objects_per_image": ("more objects per image", "fewer objects per image",
                          "place fewer objects per scene", "place more objects per scene"),
    "box_size": ("larger boxes", "smaller boxes", "move the camera away or scale the objects down",
                 "move the camera closer or scale the objects up"),
    "log2_aspect_ratio": ("wider boxes", "taller boxes", "vary object poses and camera angles",
                          "vary object poses and camera angles"),
    "center_x": ("boxes further right", "boxes further left", "move the placement area left",
                 "move the placement area right"),
    "center_y": ("boxes lower in the image", "boxes higher in the image", "move the placement area up",
                 "move the placement area down"),
    "brightness": ("brighter images", "darker images", "lower the light intensity", "raise the light intensity"),
    "contrast": ("more contrast", "less contrast", "soften the lighting or calm the backgrounds",
                 "light more from the side or vary the backgrounds more"),
    "warmth": ("warmer (redder) images", "cooler (bluer) images", "shift the light colour towards blue",
               "shift the light colour towards red"),
}
GAP_MIN_STD = 0.25  # gaps smaller than this many standard deviations are not called out
NOISE_REPEATS = 50  # random draws behind each noise floor
NOISE_CAP = 4000  # values per sample in those draws: the floor of larger samples is smaller still
PER_LABEL_MIN_BOXES = 5


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
    box_label: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=object))  # label name per box
    pixel: dict[str, Any] = field(default_factory=dict)
    simulator: SimulatorStats | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def num_boxes(self) -> int:
        return int(self.objects_per_image.sum())

    @property
    def log2_aspect_ratio(self) -> np.ndarray:
        return np.log2(self.aspect_ratio)

    def values(self, key: str) -> np.ndarray | None:
        """The per-image or per-box sample behind a 1-D statistic of ONE_D (None if not measured)."""
        if key in PIXEL_KEYS:
            return np.asarray(self.pixel[key], dtype=np.float64) if self.pixel.get(key) else None
        value = getattr(self, key)
        return None if value is None else np.asarray(value, dtype=np.float64)

    @property
    def visible_fraction(self) -> np.ndarray | None:
        return None if self.simulator is None else self.simulator.visible_fraction

    def per_label(self, values: np.ndarray) -> dict[str, np.ndarray]:
        """A per-box sample split by label name (labels with boxes only; NaN values left out)."""
        values = np.asarray(values, dtype=np.float64)
        out = {}
        for name in self.label_counts:
            sample = values[(self.box_label == name) & ~np.isnan(values)]
            if len(sample):
                out[name] = sample
        return out

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
            "box_size_per_label": {k: _summary(v) for k, v in self.per_label(self.box_size).items()},
            "image_sizes": self.image_sizes,
            "pixel": {k: _summary(np.asarray(v)) if k in PIXEL_KEYS else v for k, v in self.pixel.items()},
            "simulator": None if self.simulator is None else self._simulator_dict(),
            "notes": self.notes + ([] if self.simulator is None else self.simulator.notes),
        }

    def _simulator_dict(self) -> dict[str, Any]:
        sim = self.simulator
        visible: dict[str, Any] | None = None
        if sim.visible_fraction is not None:
            known = sim.visible_fraction[~np.isnan(sim.visible_fraction)]
            visible = {"all": _summary(known) | {"histogram": _histogram(known, 0, 1)},
                       "below_half": int(np.count_nonzero(known < 0.5)),
                       "per_label": {k: _summary(v) for k, v in self.per_label(sim.visible_fraction).items()}}
        return {
            "metrics": sim.definitions,
            "visible_fraction": visible,
            "visible_pixels_per_object": _summary(sim.object_visible_pixels),
            "object_count": None if sim.object_counts is None else
            {"per_image": _summary(sim.object_counts), "per_label": sim.object_count_by_label},
            "scenario_iterations": sim.iterations, "images_with_iteration": sim.images_with_iteration,
            "random_seeds": sim.seeds,
            "generic": {name: {f: _summary(v) | {"histogram": _histogram(v)} for f, v in fields.items()}
                        for name, fields in sim.generic.items()},
        }


def _histogram(values: np.ndarray, low: float | None = None, high: float | None = None, bins: int = 20) -> dict:
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return {"edges": [], "counts": []}
    low = float(values.min()) if low is None else low
    high = float(values.max()) if high is None else high
    counts, edges = np.histogram(np.clip(values, low, high), bins=bins, range=(low, high if high > low else low + 1))
    return {"edges": edges.tolist(), "counts": counts.tolist()}


def _summary(values: np.ndarray) -> dict[str, Any]:
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return {"count": 0}
    q = np.quantile(values, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {"count": int(len(values)), "mean": float(values.mean()), "std": float(values.std()),
            "min": float(values.min()), "p05": float(q[0]), "p25": float(q[1]), "median": float(q[2]),
            "p75": float(q[3]), "p95": float(q[4]), "max": float(values.max())}


def compute_stats(index: DatasetIndex, name: str | None = None, uri: str | None = None,
                  pixel_sample: int = 0, seed: int = 0, bins: int = HEATMAP_BINS,
                  metrics: SimulatorMetrics | None = None) -> DatasetStats:
    """Statistics of `index`; `pixel_sample` > 0 decodes that many images (drawn by `seed`) for brightness,
    contrast and colour; `metrics` (the simulator's, read by `load_simulator_metrics`) adds its section."""
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
        box_label=np.array([names[int(c)].strip() for c in labels.tolist()], dtype=object),
    )
    if pixel_sample > 0 and len(index):
        stats.pixel = pixel_stats(index, pixel_sample, seed)
    if metrics is not None:
        stats.simulator = simulator_stats(index, metrics)
    return stats


def _default_name(root: str) -> str:
    return os.path.basename(os.path.normpath(root)) or root


def pixel_stats(index: DatasetIndex, sample: int, seed: int = 0, thumb: int = 128) -> dict[str, Any]:
    """Per sampled image: brightness (mean luma, 0-255), contrast (luma std) and warmth (mean red - mean
    blue); over the sample: mean RGB and the luma histogram.

    Images are decoded at reduced size (JPEG draft mode, then a thumbnail): colour statistics do not
    need full resolution. Unreadable images are skipped with a warning.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(index), size=min(sample, len(index)), replace=False).tolist())
    brightness, contrast, warmth, means = [], [], [], []
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
        mean = rgb.reshape(-1, 3).mean(axis=0)
        warmth.append(float(mean[0] - mean[2]))
        means.append(mean)
        hist += np.histogram(luma, bins=32, range=(0, 256))[0]
    if not brightness:
        return {}
    return {"sampled_images": len(brightness), "brightness": brightness, "contrast": contrast, "warmth": warmth,
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
    deviations of `b`, "mean_a", "mean_b", "median_a", "median_b"}; the label distribution (over label
    names) and the position heat map (on a 6 x 6 grid): {"tv", "js"}; "labels": names only in a, only in
    b, shared; "box_size_per_label": W1 per shared label; "gaps": `gap_lines`. Every distance comes with
    its sampling-noise floor (`noise_floor`: "noise" or "tv_noise") and whether it lies "beyond_noise".
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
        noise = noise_floor(va, vb, wasserstein1)
        out["one_d"][key] = {"title": title, "unit": unit, "w1": w1, "w1_std": w1 / sd if sd > 0 else None,
                             "noise": noise, "beyond_noise": w1 > noise,
                             "mean_a": float(np.mean(va)), "mean_b": float(np.mean(vb)),
                             "median_a": float(np.median(va)), "median_b": float(np.median(vb)),
                             "std_a": float(np.std(va)), "std_b": sd}
    names = list(dict.fromkeys([*a.label_counts, *b.label_counts]))
    pa = [a.label_counts.get(n, 0) for n in names]
    pb = [b.label_counts.get(n, 0) for n in names]
    codes = {n: i for i, n in enumerate(names)}
    label_noise = noise_floor(np.array([codes[n] for n in a.box_label], np.int64),
                              np.array([codes[n] for n in b.box_label], np.int64), _tv_of_codes(len(names)))
    out["labels"] = {"tv": total_variation(pa, pb), "js": jensen_shannon(pa, pb), "tv_noise": label_noise,
                     "shared": [n for n in names if n in a.label_counts and n in b.label_counts],
                     "only_in_a": [n for n in names if n not in b.label_counts],
                     "only_in_b": [n for n in names if n not in a.label_counts]}
    out["labels"]["beyond_noise"] = out["labels"]["tv"] > label_noise
    if a.heatmap.shape == b.heatmap.shape:
        # On a coarse grid: distances between sparse fine histograms mostly measure sampling noise.
        ca, cb = coarse_heatmap(a.heatmap), coarse_heatmap(b.heatmap)
        tv = total_variation(ca, cb)
        noise = noise_floor(_cells(a), _cells(b), _tv_of_codes(DISTANCE_BINS ** 2))
        out["position_heatmap"] = {"tv": tv, "js": jensen_shannon(ca, cb), "bins": int(ca.shape[0]),
                                   "tv_noise": noise, "beyond_noise": tv > noise}
    out["coco_size_share"] = {
        "a": _shares(a.size_counts()), "b": _shares(b.size_counts()),
        "tv": total_variation(list(a.size_counts().values()), list(b.size_counts().values())),
    }
    out["box_size_per_label"] = per_label_distances(a.per_label(a.box_size), b.per_label(b.box_size))
    out["gaps"] = gap_lines(out)
    return out


def noise_floor(va: np.ndarray, vb: np.ndarray, distance: Any, repeats: int = NOISE_REPEATS, seed: int = 0,
                cap: int = NOISE_CAP) -> float:
    """The distance sampling alone gives: the 99th percentile of `distance` between two random draws from
    the pooled samples, sized as `va` and `vb` (each at most `cap`). Two samples of one distribution are
    this far apart 99% of the time or less, so a measured distance above it is a gap and one below it
    cannot be told from chance at these sample sizes."""
    va, vb = np.asarray(va), np.asarray(vb)
    if len(va) == 0 or len(vb) == 0:
        return float("nan")
    rng = np.random.default_rng(seed)
    pooled = np.concatenate([va, vb])
    na, nb = min(len(va), cap), min(len(vb), cap)
    draws = []
    for _ in range(repeats):
        pick = rng.choice(len(pooled), size=na + nb, replace=False)
        draws.append(distance(pooled[pick[:na]], pooled[pick[na:]]))
    return float(np.quantile(draws, 0.99))


def _tv_of_codes(size: int) -> Any:
    """Total variation between the histograms of two arrays of integer codes in [0, size)."""
    return lambda x, y: total_variation(np.bincount(x, minlength=size), np.bincount(y, minlength=size))


def _cells(stats: DatasetStats, bins: int = DISTANCE_BINS) -> np.ndarray:
    """Each box centre's cell on the coarse position grid, as one integer code."""
    row = np.clip((stats.center_y * bins).astype(np.int64), 0, bins - 1)
    col = np.clip((stats.center_x * bins).astype(np.int64), 0, bins - 1)
    return row * bins + col


def per_label_distances(a: dict[str, np.ndarray], b: dict[str, np.ndarray],
                        min_boxes: int = PER_LABEL_MIN_BOXES) -> dict[str, dict[str, Any]]:
    """W1 (and its noise floor) per label name both samples hold at least `min_boxes` of, largest gap
    (in std of b) first."""
    rows = {}
    for name in a:
        if name in b and len(a[name]) >= min_boxes and len(b[name]) >= min_boxes:
            w1, sd = wasserstein1(a[name], b[name]), float(np.std(b[name]))
            noise = noise_floor(a[name], b[name], wasserstein1)
            rows[name] = {"w1": w1, "w1_std": w1 / sd if sd > 0 else None, "noise": noise,
                          "beyond_noise": w1 > noise, "median_a": float(np.median(a[name])),
                          "median_b": float(np.median(b[name])), "n_a": len(a[name]), "n_b": len(b[name])}
    return dict(sorted(rows.items(), key=lambda kv: -(kv[1]["w1_std"] or 0)))


def gap_lines(distances: dict[str, Any], top: int = 3) -> list[dict[str, Any]]:
    """The largest gaps between the two datasets, each as {"key", "size", "text"}: one sentence a person can
    act on. Only distances above their sampling-noise floor count. 1-D statistics rank by W1 in standard
    deviations of the second dataset (at least GAP_MIN_STD); labels and positions by total variation (at
    least 0.2); the per-label box size adds its worst label."""
    a, b = distances["a"], distances["b"]
    lines = []
    for key, row in distances["one_d"].items():
        size = row["w1_std"]
        if size is None or size < GAP_MIN_STD or key not in GAP_WORDS or not row["beyond_noise"]:
            continue
        higher, lower, act_higher, act_lower = GAP_WORDS[key]
        degree = "slightly " if size < 0.5 else "" if size < 1 else "far "
        shift = row["median_a"] - row["median_b"]
        if abs(shift) >= 0.5 * row["w1"]:
            text = (f"{a} has {degree}{higher if shift > 0 else lower} than {b}: median {_g(row['median_a'])} vs "
                    f"{_g(row['median_b'])} ({row['unit']})")
            act = act_higher if shift > 0 else act_lower
        elif abs(row["std_a"] - row["std_b"]) >= 0.25 * max(row["std_b"], 1e-12):  # the centres agree
            wider = row["std_a"] > row["std_b"]
            text = (f"{a}'s {_short_title(row)} is {degree}{'more' if wider else 'less'} spread out than {b}'s: "
                    f"standard deviation {_g(row['std_a'])} vs {_g(row['std_b'])} ({row['unit']}), medians "
                    f"{_g(row['median_a'])} and {_g(row['median_b'])}")
            act = f"{'narrow' if wider else 'widen'} the range the simulator draws it from"
        else:
            text = (f"{a}'s {_short_title(row)} differs {degree}in shape from {b}'s though medians "
                    f"({_g(row['median_a'])}, {_g(row['median_b'])}) and spreads agree")
            act = "compare the two histograms"
        lines.append({"key": key, "size": size, "text": (
            f"{text}; {size:.1f} standard deviations of {b} apart (Wasserstein-1). To close it, {act}.")})
    lines.sort(key=lambda line: -line["size"])
    lines = lines[:top]
    labels = distances["labels"]
    if labels["tv"] >= 0.2 and labels["beyond_noise"]:
        lines.append({"key": "labels", "size": labels["tv"], "text": (
            f"The label mix differs: {labels['tv']:.0%} of {a}'s boxes would have to change label to match "
            f"{b}'s shares; reweight the classes the simulator spawns.")})
    position = distances.get("position_heatmap")
    if position and position["tv"] >= 0.2 and position["beyond_noise"]:
        lines.append({"key": "position", "size": position["tv"], "text": (
            f"Objects sit in other parts of the image: {position['tv']:.0%} of the box-centre mass lies in other "
            f"cells of the {position['bins']}x{position['bins']} grid; compare the heat maps.")})
    worst = next((item for item in distances.get("box_size_per_label", {}).items() if item[1]["beyond_noise"]), None)
    if worst and (worst[1]["w1_std"] or 0) >= GAP_MIN_STD:
        name, row = worst
        lines.append({"key": "box_size_per_label", "size": row["w1_std"], "text": (
            f"Per label, box sizes differ most for {name}: median {_g(row['median_a'])} in {a} vs "
            f"{_g(row['median_b'])} in {b} (sqrt of box area / image area), {row['w1_std']:.1f} standard deviations "
            f"apart; compare its models' scale with the real objects'.")})
    return lines


def _g(value: float) -> str:
    return f"{value:.3g}"


def _short_title(row: dict[str, Any]) -> str:
    """"image contrast, std of luma (sampled images)" -> "image contrast"."""
    return row["title"].split(",")[0].split(" (")[0]


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


def load_stats(uri: str, split: str | None = None, dataset_format: str = "auto", name: str | None = None,
               bbox_definition_id: str | None = None, skip_broken: bool = False, pixel_sample: int = 0,
               seed: int = 0) -> DatasetStats:
    """Read the dataset at `uri` (any supported format; remote ones are fetched) and compute its statistics."""
    from synthval.data import load_dataset
    from synthval.io.sources import local_dataset

    path = local_dataset(uri)
    index = load_dataset(path, format=dataset_format, split=split, bbox_definition_id=bbox_definition_id,
                         skip_broken=skip_broken)
    metrics = load_simulator_metrics(path, index.format, bbox_definition_id)
    shown = name or _default_name(uri)
    if split not in (None, "all") and not name:
        shown = f"{shown} ({split})"
    log.info("stats of %s: %d images, %d boxes, %d labels", uri, len(index), index.num_boxes, len(index.label_names))
    stats = compute_stats(index, name=shown, uri=uri, pixel_sample=pixel_sample, seed=seed, metrics=metrics)
    if metrics is None:
        stats.notes.append(f"No simulator metrics: a {index.format} dataset records none (only Perception and "
                           "SOLO datasets do).")
    return stats


def load_simulator_metrics(path: str, dataset_format: str, bbox_definition_id: str | None = None
                           ) -> SimulatorMetrics | None:
    """The simulator's metrics of the local dataset at `path` (None for formats that record none).

    A pass of its own over the dataset's JSON (about as long again as indexing it): only statistics ask.
    """
    from synthval.data.readers.perception import read_perception_metrics
    from synthval.data.readers.solo import read_solo_metrics

    reader = {"perception": read_perception_metrics, "solo": read_solo_metrics}.get(dataset_format)
    if reader is None:
        return None
    start = time.monotonic()
    metrics = reader(path, bbox_definition_id)
    log.info("read %d metric records of %d definitions (%d image captures) in %.1f s",
             sum(d.records for d in metrics.definitions), len(metrics.definitions), len(metrics.image_paths),
             time.monotonic() - start)
    return metrics
