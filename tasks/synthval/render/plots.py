"""Figures for reports, notebooks and TensorBoard: one function per picture, the same picture everywhere.

Charts are matplotlib `Figure`s built without pyplot (no global state, no display needed):
`SummaryWriter.add_figure(tag, fig)` logs them to TensorBoard, `figure_png` turns them into the PNG
bytes the HTML reports embed, and a notebook shows them as they are. Images with boxes drawn are PIL
images (`draw_detections`), also usable in TensorBoard through `image_array`.

Box colours and labels in drawn images (the label text says it too, for readers who cannot tell the
colours apart): true positive green "TP <label> <score>"; false positive orange "FP <label> <score>",
"FP <label> <score> on <true label>" when it lies on a box of another class (class confusion); missed
ground truth red, dashed, "MISS <label>".
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

TP_COLOR = (0, 170, 60)
FP_COLOR = (255, 140, 0)
MISS_COLOR = (220, 20, 60)
GT_COLOR = (30, 120, 255)
DATASET_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b")


def _figure(width: float, height: float, layout: str | None = "constrained") -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout=layout)


def figure_png(fig: Any, dpi: int = 100) -> bytes:
    """PNG bytes of a figure."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def figure_array(fig: Any, dpi: int = 100) -> np.ndarray:
    """HWC uint8 RGB pixels of a figure (for `SummaryWriter.add_image(..., dataformats="HWC")`)."""
    from PIL import Image

    with Image.open(io.BytesIO(figure_png(fig, dpi))) as image:
        return np.asarray(image.convert("RGB"))


def image_array(image: Any) -> np.ndarray:
    """HWC uint8 RGB pixels of a PIL image."""
    return np.asarray(image.convert("RGB"))


# --- evaluation charts -------------------------------------------------------------------------------


def class_order(per_class: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Classes by AP, best first; classes with no box in the test set (AP null) last."""
    return sorted(per_class, key=lambda n: (per_class[n].get("AP") is None, -(per_class[n].get("AP") or 0.0), n))


def per_class_ap_figure(metrics: Mapping[str, Any], intervals: Mapping[str, Any] | None = None) -> Any:
    """Horizontal bars of AP@[.5:.95] and AP@.5 per class (from metrics.json), best first.

    `intervals` (a `BootstrapResult.to_dict()`) adds 95% interval whiskers from "AP/<label>" and
    "AP50/<label>". Classes with no box in the test set are marked n/a.
    """
    per_class = metrics.get("per_class") or {}
    names = class_order(per_class)
    fig = _figure(8.0, max(2.2, 0.28 * len(names) + 1.2))
    ax = fig.add_subplot()
    if not names:
        ax.text(0.5, 0.5, "no classes", ha="center", va="center")
        ax.set_axis_off()
        return fig
    y = np.arange(len(names))
    values = (intervals or {}).get("values", {})
    for offset, key, color, label in ((-0.2, "AP", "#1f77b4", "AP@[.5:.95]"), (0.2, "AP50", "#9ecae1", "AP@.5")):
        ap = np.array([per_class[n].get(key) if per_class[n].get(key) is not None else np.nan for n in names])
        err = None
        ci = [values.get(f"{key}/{n}") for n in names]
        if any(c and c.get("low") is not None for c in ci):
            lo = np.array([c["low"] if c and c.get("low") is not None else np.nan for c in ci])
            hi = np.array([c["high"] if c and c.get("high") is not None else np.nan for c in ci])
            err = np.vstack([np.clip(ap - lo, 0, None), np.clip(hi - ap, 0, None)])
            err = np.where(np.isfinite(err), err, 0)
        ax.barh(y + offset, np.nan_to_num(ap), height=0.4, color=color, label=label, xerr=err,
                error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "#444"})
        for yi, v in zip(y, ap):
            if np.isnan(v) and key == "AP":
                ax.text(0.01, yi, "n/a (no box in the test set)", va="center", fontsize=8, color="gray")
    ax.set_yticks(y, [f"{n} ({per_class[n].get('num_gt', 0)})" for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("average precision" + (" (whiskers: 95% bootstrap interval)" if intervals else ""))
    ax.set_title("AP per class (test boxes in brackets)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def pr_curves_figure(metrics: Mapping[str, Any], max_legend: int = 12) -> Any:
    """Precision-recall curves at IoU .5 per class (thin) and their mean (thick), from metrics.json."""
    curves = metrics.get("pr_curves") or {}
    fig = _figure(7.0, 5.0)
    ax = fig.add_subplot()
    per_class = metrics.get("per_class") or {}
    ordered = [n for n in class_order(per_class) if n in curves] + [n for n in curves if n not in per_class]
    cmap = _cmap("tab20")
    for i, name in enumerate(ordered):
        curve = curves[name]
        precision = np.array([np.nan if p is None else p for p in curve["precision"]], dtype=np.float64)
        label = name if len(ordered) <= max_legend else None
        ax.plot(curve["recall"], precision, lw=1, alpha=0.8, color=cmap(i % 20), label=label)
    overall = metrics.get("pr_curve") or {}
    if overall.get("precision") and overall["precision"][0] is not None:
        ax.plot(overall["recall"], overall["precision"], lw=3, color="black", label="mean over classes")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision (interpolated, as COCO AP@.5)")
    ax.set_title("precision-recall at IoU .5")
    ax.grid(alpha=0.3)
    if ordered or overall:
        ax.legend(fontsize=7, loc="lower left", ncol=2 if len(ordered) > 6 else 1)
    return fig


def _cmap(name: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name]


def confusion_figure(counts: Mapping[str, Mapping[str, int]]) -> Any:
    """Heat map of class confusions: rows true class, columns predicted class, cells the count."""
    true_names = sorted(counts)
    pred_names = sorted({p for row in counts.values() for p in row})
    matrix = np.array([[counts[t].get(p, 0) for p in pred_names] for t in true_names], dtype=np.float64)
    fig = _figure(max(4.0, 0.5 * len(pred_names) + 2.5), max(2.5, 0.4 * len(true_names) + 1.8))
    ax = fig.add_subplot()
    if matrix.size == 0:
        ax.text(0.5, 0.5, "no class confusion", ha="center", va="center")
        ax.set_axis_off()
        return fig
    image = ax.imshow(matrix, cmap="Oranges", aspect="auto")
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            if matrix[i, j]:
                ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    ax.set_xticks(range(len(pred_names)), pred_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(true_names)), true_names, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("detections on a true box\nof another class (IoU >= .5)", fontsize=10)
    from matplotlib.ticker import MaxNLocator

    fig.colorbar(image, ax=ax, shrink=0.8, ticks=MaxNLocator(integer=True), label="detections")
    return fig


def metric_intervals_figure(results: Sequence[tuple[str, Mapping[str, Any]]],
                            keys: Sequence[str] = ("mAP", "mAP50", "mAR100")) -> Any:
    """Grouped bars per metric, one bar per result, with 95% interval whiskers.

    `results` holds (name, {metric: {"value", "low", "high"}}) pairs.
    """
    fig = _figure(max(5.0, 1.2 * len(keys) * max(1, len(results)) ** 0.5 + 2), 3.8)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(results))
    x = np.arange(len(keys))
    for i, (name, values) in enumerate(results):
        v = np.array([_get(values, k, "value") for k in keys])
        lo = np.array([_get(values, k, "low") for k in keys])
        hi = np.array([_get(values, k, "high") for k in keys])
        err = np.vstack([np.clip(v - lo, 0, None), np.clip(hi - v, 0, None)])
        err = np.where(np.isfinite(err), err, 0)
        ax.bar(x - 0.4 + width * (i + 0.5), np.nan_to_num(v), width=width * 0.95, yerr=err, capsize=3,
               color=DATASET_COLORS[i % len(DATASET_COLORS)], label=name)
    ax.set_xticks(x, list(keys))
    ax.set_ylim(0, 1)
    ax.set_ylabel("value (whiskers: 95% bootstrap interval)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _get(values: Mapping[str, Any], key: str, field: str) -> float:
    entry = values.get(key) or {}
    value = entry.get(field)
    return np.nan if value is None else float(value)


# --- dataset statistics ------------------------------------------------------------------------------


PIXEL_FIGURES = {"brightness": "mean image brightness (sampled images)",
                 "contrast": "image contrast: std of luma (sampled images)",
                 "warmth": "colour balance: mean red - mean blue (sampled images)"}


def stats_figures(datasets: Sequence[Any]) -> dict[str, Any]:
    """The statistics plots of one or more `data.stats.DatasetStats`, overlaid: {file stem: Figure}.

    Stems: objects_per_label, objects_per_image, box_size, aspect_ratio, position_heatmap,
    box_size_per_label; with pixel statistics brightness, contrast, warmth; with simulator metrics
    visible_fraction, visible_fraction_per_label (where RenderedObjectInfo joins the boxes) and one
    metric_<name> per generic metric (light, placement, ...).
    """
    figures = {
        "objects_per_label": label_counts_figure(datasets),
        "objects_per_image": histogram_figure(datasets, "objects_per_image", "objects per image", discrete=True),
        "box_size": histogram_figure(datasets, "box_size", "box size: sqrt(box area / image area)"),
        "aspect_ratio": histogram_figure(datasets, "log2_aspect_ratio", "box aspect ratio: log2(width / height)"),
        "position_heatmap": heatmap_figure(datasets),
        "box_size_per_label": per_label_figure(datasets, "box_size", "box size per label",
                                               "sqrt(box area / image area)"),
    }
    for key, title in PIXEL_FIGURES.items():
        if all(d.pixel.get(key) for d in datasets):
            figures[key] = histogram_figure(datasets, key, title)
    measured = [d for d in datasets if d.visible_fraction is not None]
    if measured:
        figures["visible_fraction"] = histogram_figure(measured, "visible_fraction",
                                                       "visible fraction: visible pixels / box area")
        figures["visible_fraction_per_label"] = per_label_figure(
            measured, "visible_fraction", "visible fraction per label (RenderedObjectInfo)",
            "visible pixels / box area", limits=(0, 1.02))
    names = list(dict.fromkeys(n for d in datasets if d.simulator for n in d.simulator.generic))
    for name in names:
        figures[f"metric_{metric_slug(name)}"] = metric_fields_figure(datasets, name)
    return figures


def metric_slug(name: str) -> str:
    """A file-name-safe stem for a metric name ("lighting info" -> "lighting_info")."""
    slug = "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
    return "_".join(part for part in slug.split("_") if part)[:48] or "metric"


def varying_fields(fields: Mapping[str, np.ndarray], limit: int = 12
                   ) -> tuple[list[str], list[str], dict[str, str]]:
    """(fields worth a histogram, at most `limit`; fields holding one value throughout; {field: the earlier
    field it repeats value for value}, as a uniform scale's y and z repeat its x)."""
    varying, constant, repeats = [], [], {}
    for f, v in fields.items():
        if not len(v):
            continue
        if np.ptp(v) == 0:
            constant.append(f)
            continue
        same = next((g for g in varying if len(fields[g]) == len(v) and np.array_equal(fields[g], v)), None)
        if same:
            repeats[f] = same
        else:
            varying.append(f)
    return varying[:limit], constant, repeats


def metric_fields_figure(datasets: Sequence[Any], name: str, columns: int = 3) -> Any:
    """Small multiples: one histogram per varying numeric field of generic metric `name`, datasets overlaid."""
    fields: dict[str, dict[str, np.ndarray]] = {}
    for d in datasets:
        for f, v in (d.simulator.generic.get(name, {}) if d.simulator else {}).items():
            fields.setdefault(f, {})[d.name] = v
    shown, _, _ = varying_fields({f: np.concatenate(list(v.values())) for f, v in fields.items()})
    rows = max(1, -(-len(shown) // columns))
    height = 2.4 * rows + 0.6
    fig = _figure(3.2 * columns, height, layout=None)  # fixed margins: constrained layout costs ~1 s here
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.35 / height, top=1 - 0.55 / height, hspace=0.45, wspace=0.28)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, f in zip(axes, shown):
        pooled = np.concatenate(list(fields[f].values()))
        bins = np.linspace(pooled.min(), pooled.max(), 21)
        for i, d in enumerate(datasets):
            if d.name in fields[f]:
                ax.hist(fields[f][d.name], bins=bins, density=True, histtype="step", lw=2,
                        color=DATASET_COLORS[i % len(DATASET_COLORS)], label=d.name)
        ax.set_title(f, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(shown):]:
        ax.set_axis_off()
    if not shown:
        axes[0].text(0.5, 0.5, "every field holds one value", ha="center", va="center")
    fig.suptitle(f"{name} (simulator metric): distribution of each field", fontsize=10)
    if len(datasets) > 1:
        axes[0].legend(fontsize=7)
    return fig


def per_label_figure(datasets: Sequence[Any], key: str, title: str, xlabel: str,
                     limits: tuple[float, float] | None = None) -> Any:
    """Box plots of a per-box statistic (`DatasetStats.values(key)`) per label, one box per dataset beside
    the others, all labels first; whiskers at the 5th and 95th percentiles, no outlier dots."""
    samples = [(i, d, d.per_label(d.values(key))) for i, d in enumerate(datasets)]
    drawn = 0
    names = list(dict.fromkeys(n for _, _, per in samples for n in per))
    rows = ["all labels", *names]
    fig = _figure(7.5, max(2.4, 0.26 * len(rows) * max(1, len(datasets)) ** 0.6 + 1.3))
    ax = fig.add_subplot()
    height = 0.8 / max(1, len(datasets))
    for i, d, per in samples:
        whole = d.values(key)
        data = {"all labels": whole[~np.isnan(whole)], **per}
        present = [(y, data[n]) for y, n in enumerate(rows) if n in data and len(data[n])]
        if not present:
            continue
        colour = DATASET_COLORS[i % len(DATASET_COLORS)]
        ax.boxplot([v for _, v in present], positions=[y - 0.4 + height * (i + 0.5) for y, _ in present],
                   widths=height * 0.8, orientation="horizontal", whis=(5, 95), showfliers=False, patch_artist=True,
                   boxprops={"facecolor": colour, "alpha": 0.35, "edgecolor": colour},
                   medianprops={"color": colour, "lw": 2}, whiskerprops={"color": colour},
                   capprops={"color": colour}, manage_ticks=False)
        ax.plot([], [], color=colour, lw=6, alpha=0.5, label=d.name)
        drawn += 1
    ax.set_yticks(range(len(rows)), rows, fontsize=7 if len(rows) > 20 else 8)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    if limits:
        ax.set_xlim(*limits)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    if drawn:
        fig.legend(fontsize=8, loc="outside lower center", ncol=drawn)
    else:
        ax.text(0.5, 0.5, "no boxes", ha="center", va="center", transform=ax.transAxes)
    return fig


def label_counts_figure(datasets: Sequence[Any]) -> Any:
    """Share of boxes per label name, one bar per dataset (counts in the HTML table)."""
    names = list(dict.fromkeys(n for d in datasets for n in d.label_counts))
    fig = _figure(8.0, max(2.2, 0.22 * len(names) * max(1, len(datasets)) ** 0.5 + 1.2))
    ax = fig.add_subplot()
    y = np.arange(len(names))
    height = 0.8 / max(1, len(datasets))
    for i, d in enumerate(datasets):
        total = max(1, d.num_boxes)
        share = [d.label_counts.get(n, 0) / total for n in names]
        ax.barh(y - 0.4 + height * (i + 0.5), share, height=height * 0.95,
                color=DATASET_COLORS[i % len(DATASET_COLORS)], label=f"{d.name} ({d.num_boxes} boxes)")
    ax.set_yticks(y, names, fontsize=7 if len(names) > 20 else 8)
    ax.invert_yaxis()
    ax.set_xlabel("share of boxes")
    ax.set_title("objects per label")
    ax.grid(axis="x", alpha=0.3)
    fig.legend(fontsize=8, loc="outside lower center", ncol=len(datasets))
    return fig


def histogram_figure(datasets: Sequence[Any], key: str, title: str, discrete: bool = False) -> Any:
    """Normalised histograms of one statistic (`DatasetStats.values(key)`), one step line per dataset."""
    fig = _figure(6.5, 3.6)
    ax = fig.add_subplot()
    samples = [(d, d.values(key)) for d in datasets]
    samples = [(d, v[np.isfinite(v)]) for d, v in samples if v is not None]
    pooled = np.concatenate([v for _, v in samples]) if samples else np.zeros(0)
    if len(pooled) == 0:
        ax.text(0.5, 0.5, "no data", ha="center", va="center")
        ax.set_axis_off()
        return fig
    if discrete:
        top = int(pooled.max())
        bins = np.arange(-0.5, top + 1.5, max(1, int(np.ceil((top + 1) / 40))))
    else:
        lo, hi = np.quantile(pooled, [0.001, 0.999])
        count = int(np.clip(2 * np.sqrt(min(len(v) for _, v in samples)), 10, 50))
        bins = np.linspace(lo, hi if hi > lo else lo + 1, count + 1)
    for i, (d, v) in enumerate(samples):
        ax.hist(np.clip(v, bins[0], bins[-1]), bins=bins, density=True, histtype="step", lw=2,
                color=DATASET_COLORS[i % len(DATASET_COLORS)],
                label=f"{d.name}: mean {np.mean(v):.3g}, n={len(v)}")
    ax.set_title(title)
    ax.set_ylabel("density")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def heatmap_figure(datasets: Sequence[Any]) -> Any:
    """Box centre positions (relative to the image) per dataset, side by side, top of image at the top."""
    fig = _figure(4.4 * len(datasets) + 0.4, 3.8)
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    for ax, d in zip(axes, datasets):
        total = d.heatmap.sum()
        share = d.heatmap / total if total else d.heatmap
        image = ax.imshow(share, extent=(0, 1, 1, 0), cmap="viridis", interpolation="nearest")
        ax.set_title(f"{d.name}\nbox centres", fontsize=9)
        ax.set_xlabel("x / width")
        ax.set_ylabel("y / height")
        fig.colorbar(image, ax=ax, shrink=0.75, label="share of boxes")
    return fig


# --- drawn detections --------------------------------------------------------------------------------


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow built without FreeType sizes
        return ImageFont.load_default()


def _dashed_rectangle(draw: Any, box: Sequence[float], color: tuple[int, int, int], width: int, dash: int = 6) -> None:
    x1, y1, x2, y2 = box
    for (ax, ay, bx, by) in ((x1, y1, x2, y1), (x2, y1, x2, y2), (x2, y2, x1, y2), (x1, y2, x1, y1)):
        length = max(abs(bx - ax), abs(by - ay))
        steps = max(1, int(length // dash))
        for s in range(0, steps, 2):
            t0, t1 = s / steps, min(1.0, (s + 1) / steps)
            draw.line([(ax + (bx - ax) * t0, ay + (by - ay) * t0), (ax + (bx - ax) * t1, ay + (by - ay) * t1)],
                      fill=color, width=width)


def draw_detections(image: Any, items: Sequence[Mapping[str, Any]], display_size: int = 512,
                    caption: str | None = None) -> Any:
    """A copy of PIL `image`, scaled so its longer side is `display_size`, with `items` drawn.

    Each item: {"box": xyxy in image pixels, "kind": "TP" | "FP" | "MISS" | "GT", "text": label}.
    Misses are dashed; every box carries its text on a filled tag. `caption` is written at the bottom.
    """
    from PIL import ImageDraw

    image = image.convert("RGB")
    scale = display_size / max(image.size)
    if abs(scale - 1) > 1e-3:
        from PIL import Image

        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    font = _font(max(10, display_size // 40))
    colors = {"TP": TP_COLOR, "FP": FP_COLOR, "MISS": MISS_COLOR, "GT": GT_COLOR}
    order = {"GT": 0, "MISS": 1, "FP": 2, "TP": 3}
    for item in sorted(items, key=lambda it: order.get(it["kind"], 0)):
        box = [float(v) * scale for v in item["box"]]
        color = colors.get(item["kind"], GT_COLOR)
        if item["kind"] == "MISS":
            _dashed_rectangle(draw, box, color, width=2)
        else:
            draw.rectangle(box, outline=color, width=2)
    for item in sorted(items, key=lambda it: order.get(it["kind"], 0)):
        text = item.get("text")
        if not text:
            continue
        box = [float(v) * scale for v in item["box"]]
        color = colors.get(item["kind"], GT_COLOR)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        x = min(max(0, box[0]), image.width - tw - 4)
        # misses label below their box's top edge so they do not hide a prediction's tag above it
        y = box[1] - th - 4 if item["kind"] != "MISS" else box[3] - th - 4
        y = min(max(0, y), image.height - th - 4)
        draw.rectangle([x, y, x + tw + 4, y + th + 4], fill=color)
        draw.text((x + 2 - left, y + 2 - top), text, fill="white" if item["kind"] != "FP" else "black", font=font)
    if caption:
        left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
        draw.rectangle([0, image.height - (bottom - top) - 6, image.width, image.height], fill=(0, 0, 0))
        draw.text((3 - left, image.height - (bottom - top) - 3 - top), caption, fill="white", font=font)
    return image
