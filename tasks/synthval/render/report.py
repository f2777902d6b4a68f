"""HTML reports people look at: one evaluation (`synthval report`), several side by side (`synthval compare`),
and dataset statistics (the page `synthval stats` writes). The markup lives in Jinja2 templates
(`templates/`, package data) with autoescape on, so a label, URI or path shows as text, never as markup;
this module computes what they show.

Every report is one self-contained HTML file: charts and images are embedded as base64 PNG/JPEG, the
styles are inline, and there is no script, no external stylesheet or font and no link to another
file, so the page reads the same from disk, from `gs://` through a signed URL, or as an e-mail
attachment. On GCS the object is written with Content-Type text/html so a browser shows it rather
than downloading it.

The run report holds: headline metrics with 95% bootstrap intervals over the test images
(`synthval.scoring.bootstrap`), AP per class with intervals, precision-recall curves, class confusions (a
prediction above the score threshold on a true box of another class at IoU >= .5), and a gallery of
the worst and best test images with true positives, false positives and misses drawn (`plots`). The
numbers at the top are metrics.json's; the intervals come from re-scoring the predictions file, whose
unresampled value equals them (a note says so if it does not).
"""

from __future__ import annotations

import base64
import datetime
import functools
import io
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import numpy as np

from synthval import __version__
from synthval.humanize import format_interval, format_number
from synthval.io import storage
from synthval.scoring.analysis import (
    DEFAULT_GALLERY_SIZE,
    CompareEntry,
    RunAnalysis,
    analyze_run,
    load_run_inputs,
    test_set_key,
)
from synthval.scoring.bootstrap import (
    DEFAULT_CONFIDENCE,
    DEFAULT_REPLICATES,
    DEFAULT_SEED,
    SUMMARY_NAMES,
    BootstrapResult,
)
from synthval.scoring.outcomes import OUTCOME_IOU, ImageOutcome

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
COMPARE_FILE = "compare.html"
HEADLINE = (("mAP", "mAP@[.5:.95]"), ("mAP50", "mAP@.5"), ("mAP75", "mAP@.75"), ("mAR100", "mAR@100"))


def draw_outcome(outcome: ImageOutcome, score_threshold: float, display_size: int = 360) -> Any:
    """The test image with its TP / FP / MISS boxes drawn and a caption (a PIL image)."""
    from PIL import Image

    from synthval.render.plots import draw_detections

    with Image.open(outcome.path) as image:
        image.load()
        caption = (f"id {outcome.image_id}: TP {outcome.tp}  FP {outcome.fp}  MISS {outcome.miss}"
                   f"  (score >= {score_threshold:g}, IoU >= {OUTCOME_IOU:g})")
        return draw_detections(image, outcome.items, display_size=display_size, caption=caption)


# --- templates ---------------------------------------------------------------------------------------


def _significant(value: Any, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


@functools.cache
def _templates() -> jinja2.Environment:
    """The report templates (package data beside this module), escaping every value they show."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("synthval.render", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters.update(num=format_number, interval=format_interval, g=_significant,
                       percent=lambda share: f"{share:.0%}",
                       b64=lambda data: base64.b64encode(data).decode("ascii"))
    return env


def _page(template: str, title: str, data: Mapping[str, Any] | None = None, **context: Any) -> str:
    """A whole HTML document: inline styles, no script; `data` is embedded as inert JSON for tools."""
    data_json = None
    if data is not None:
        data_json = json.dumps(storage.json_safe(data), sort_keys=True).replace("</", "<\\/")
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return _templates().get_template(template).render(title=title, version=__version__, stamp=stamp,
                                                      data_json=data_json, **context) + "\n"


def _macro(template: str, name: str, *args: Any) -> str:
    """One macro of a template rendered alone, as escaped markup (the notebooks show report pieces one by one,
    and a page template takes a rendered piece as it is)."""
    return getattr(_templates().get_template(template).module, name)(*args)


def _jpeg(image: Any, quality: int = 85) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


# --- run report --------------------------------------------------------------------------------------


def _headline(metrics: Mapping[str, Any], boot: BootstrapResult | None) -> tuple[list[dict], dict[str, Any]]:
    rows = []
    for key, label in HEADLINE:
        low = boot.low.get(key) if boot else None
        high = boot.high.get(key) if boot else None
        finite = low is not None and high is not None and math.isfinite(low) and math.isfinite(high)
        rows.append({"key": key, "label": label, "value": metrics.get(key), "low": low, "high": high,
                     "half": (high - low) / 2 if finite else None})
    about = {"percent": int(round((boot.confidence if boot else DEFAULT_CONFIDENCE) * 100)),
             "num_items": boot.num_items if boot else None,
             "replicates": boot.replicates.shape[0] if boot else None, "seed": boot.seed if boot else None}
    return rows, about


def headline_html(metrics: Mapping[str, Any], boot: BootstrapResult | None) -> str:
    """The headline table (mAP, mAP50, mAP75, mAR100 with intervals) and how the intervals were made."""
    return _macro("blocks.html", "headline", *_headline(metrics, boot))


def render_run_report(analysis: RunAnalysis, title: str | None = None, gallery_size: int = DEFAULT_GALLERY_SIZE) -> str:
    """The run report of an analysis as one HTML string."""
    from synthval.render import plots

    inputs, metrics = analysis.inputs, analysis.metrics
    boot = analysis.bootstrap
    intervals = boot.to_dict() if boot is not None else None
    title = title or f"synthval evaluation: {storage.basename(inputs.data_uri) or inputs.data_uri} ({inputs.split})"
    match = metrics.get("label_match") or {}
    label_note = None
    if match.get("only_in_model") or match.get("only_in_data"):
        label_note = (f"Labels are matched by name: {len(match.get('shared', []))} shared. "
                      + (f"Test labels the model cannot predict (AP 0 where they have boxes): "
                         f"{', '.join(match['only_in_data'])}. " if match.get("only_in_data") else "")
                      + (f"Model classes absent from the test set (not scored): {', '.join(match['only_in_model'])}."
                         if match.get("only_in_model") else ""))
    per_class = metrics.get("per_class") or {}
    class_rows = []
    for name in plots.class_order(per_class):
        row = per_class[name]
        class_rows.append({
            "name": name, "num_gt": row.get("num_gt", ""), "num_predictions": row.get("num_predictions", ""),
            "AP": row.get("AP"), "AP50": row.get("AP50"), "AR100": row.get("AR100"),
            "ap_ci": format_interval(boot.low.get(f"AP/{name}"), boot.high.get(f"AP/{name}")) if boot else "n/a",
            "ap50_ci": format_interval(boot.low.get(f"AP50/{name}"), boot.high.get(f"AP50/{name}")) if boot else "n/a",
        })
    scored = analysis.matches is not None
    galleries = []
    if scored:
        worst = analysis.worst(gallery_size)
        best = analysis.best(gallery_size, exclude=worst)
        galleries = [("Worst (lowest F1 at the threshold)", _cards(worst, analysis.score_threshold)),
                     ("Best (highest F1)", _cards(best, analysis.score_threshold))]
    legend = [{"color": plots.TP_COLOR, "fg": "#fff", "text": "TP: detection matching a true box"},
              {"color": plots.FP_COLOR, "fg": "#000",
               "text": "FP: detection matching none (\u201con X\u201d: on a box of class X)"},
              {"color": plots.MISS_COLOR, "fg": "#fff", "text": "MISS: true box found by no detection (dashed)"}]
    provenance = [("metrics", inputs.metrics_uri), ("predictions", inputs.predictions_uri),
                  ("test set", f"{inputs.data_uri} (split {inputs.split}, {inputs.index.format})"),
                  ("checkpoint", metrics.get("checkpoint_uri")),
                  ("results file scored", metrics.get("source_predictions_uri")),
                  ("evaluated at", metrics.get("created_at")), ("evaluated by synthval", metrics.get("synthval_version"))]
    headline_rows, about = _headline(metrics, boot)
    data = {"kind": "run_report", "metrics_uri": inputs.metrics_uri,
            "metrics": {k: metrics.get(k) for k, _ in HEADLINE}, "intervals": intervals,
            "score_threshold": analysis.score_threshold, "confusion": analysis.confusion}
    return _page(
        "run_report.html", title, data,
        num_images=metrics.get("num_images", len(inputs.index)), num_gt=metrics.get("num_gt", inputs.index.num_boxes),
        num_predictions=metrics.get("num_predictions", "?"),
        checkpoint=metrics.get("checkpoint_uri") or metrics.get("source_predictions_uri") or "n/a",
        notes=inputs.notes, headline_rows=headline_rows, boot=about,
        others=[(k, metrics.get(k)) for k in ("mAP_small", "mAP_medium", "mAP_large", "mAR1", "mAR10",
                                               "mAR_small", "mAR_medium", "mAR_large")],
        label_note=label_note, per_class=class_rows,
        per_class_png=plots.figure_png(plots.per_class_ap_figure(metrics, intervals)),
        pr_png=plots.figure_png(plots.pr_curves_figure(metrics)),
        scored=scored, confused=sum(sum(r.values()) for r in analysis.confusion.values()),
        confusion_png=plots.figure_png(plots.confusion_figure(analysis.confusion)) if analysis.confusion else None,
        threshold=f"{analysis.score_threshold:g}", iou=f"{OUTCOME_IOU:g}", legend=legend, galleries=galleries,
        provenance=[(k, v) for k, v in provenance if v],
    )


def _cards(outcomes: Sequence[ImageOutcome], threshold: float) -> list[dict[str, Any]]:
    cards = []
    for o in outcomes:
        card = {"image_id": o.image_id, "f1": o.f1, "tp": o.tp, "fp": o.fp, "confused": o.confused, "miss": o.miss,
                "path": o.path, "jpeg": None, "error": None}
        try:
            card["jpeg"] = _jpeg(draw_outcome(o, threshold))
        except Exception as exc:  # one unreadable image must not lose the whole report
            log.warning("gallery: %s skipped (%s)", o.path, exc)
            card["error"] = str(exc)
        cards.append(card)
    return cards


def write_run_report(metrics_uri: str, out_uri: str, predictions_uri: str | None = None, data_uri: str | None = None,
                     split: str | None = None, dataset_format: str = "auto", bbox_definition_id: str | None = None,
                     skip_broken: bool = False, score_threshold: float | None = None,
                     replicates: int = DEFAULT_REPLICATES, seed: int = DEFAULT_SEED,
                     confidence: float = DEFAULT_CONFIDENCE, gallery_size: int = DEFAULT_GALLERY_SIZE,
                     title: str | None = None) -> dict[str, Any]:
    """Write the run report of the evaluation at `metrics_uri` to the HTML file `out_uri`.

    The call publish makes. Returns {"report_uri", "intervals"} where "intervals" is
    `BootstrapResult.to_dict()` of the headline metrics (None without predictions).
    """
    inputs = load_run_inputs(metrics_uri, predictions_uri, data_uri, split, dataset_format, bbox_definition_id,
                             skip_broken)
    analysis = analyze_run(inputs, score_threshold, replicates, seed, confidence)
    storage.write_html(out_uri, render_run_report(analysis, title, gallery_size))
    boot = analysis.bootstrap
    if boot is not None:
        log.info("run report: %s", ", ".join(f"{k} {format_number(boot.estimate[k])} {format_interval(*boot.interval(k))}"
                                              for k in ("mAP", "mAP50", "mAR100")))
    log.info("wrote %s", out_uri)
    return {"report_uri": out_uri, "intervals": boot.to_dict(list(SUMMARY_NAMES)) if boot else None}


def report_file_uri(out_uri: str, default_name: str) -> str:
    """`out_uri` itself when it names an .html file, else `<out_uri>/<default_name>`."""
    if out_uri.lower().endswith((".html", ".htm")):
        return storage.local_path(out_uri) if storage.is_local(out_uri) else out_uri
    return storage.join_uri(out_uri, default_name)


def sibling_uri(uri: str, name: str) -> str:
    """The URI of `name` in the folder holding `uri` (e.g. report.html beside metrics.json)."""
    if storage.is_local(uri):
        return os.path.join(os.path.dirname(storage.local_path(uri)), name)
    return uri.split("?", 1)[0].rsplit("/", 1)[0] + "/" + name


# --- comparison report -------------------------------------------------------------------------------


def render_compare_report(entries: Sequence[CompareEntry], differences: Sequence[Mapping[str, Any]],
                          confidence: float = DEFAULT_CONFIDENCE, title: str = "synthval comparison") -> str:
    """The comparison page as one HTML string."""
    from synthval.render import plots

    metric_rows = []
    for key, label in HEADLINE:
        cells = [{"value": e.metrics.get(key),
                  "ci": format_interval(e.bootstrap.low.get(key), e.bootstrap.high.get(key)) if e.bootstrap else "n/a"}
                 for e in entries]
        metric_rows.append({"label": label, "cells": cells})
    figure_rows = [(e.name, (e.bootstrap.to_dict(list(SUMMARY_NAMES))["values"] if e.bootstrap else
                             {k: {"value": e.metrics.get(k)} for k in SUMMARY_NAMES})) for e in entries]
    names = list(dict.fromkeys(n for e in entries for n in (e.metrics.get("per_class") or {})))
    class_rows = [(n, [((e.metrics.get("per_class") or {}).get(n) or {}).get("AP50") for e in entries]) for n in names]
    data = {"kind": "compare_report", "results": [{"name": e.name, "metrics_uri": e.metrics_uri,
                                                   "intervals": e.bootstrap.to_dict(list(SUMMARY_NAMES)) if e.bootstrap else None}
                                                  for e in entries], "differences": list(differences)}
    return _page("compare_report.html", title, data, entries=entries, percent=int(round(confidence * 100)),
                 mixed_test_sets=len({test_set_key(e.metrics) for e in entries}) > 1, metric_rows=metric_rows,
                 intervals_png=plots.figure_png(plots.metric_intervals_figure(figure_rows)),
                 differences=differences, class_rows=class_rows)


# --- dataset statistics report -----------------------------------------------------------------------


def _spread(values: Any, digits: int = 3) -> dict[str, Any]:
    """A distribution cell: mean, median and 5th-95th percentiles (None when nothing is known)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return {"spread": None, "digits": digits}
    p = np.quantile(values, [0.05, 0.5, 0.95])
    return {"spread": {"mean": float(np.mean(values)), "median": p[1], "p5": p[0], "p95": p[2]}, "digits": digits}


_PIXEL_ROWS = (("brightness", "brightness, sampled images (0-255)"), ("contrast", "contrast: std of luma (0-255)"),
               ("warmth", "colour balance: mean red - mean blue"))


def _summary_rows(datasets: Sequence[Any]) -> list[tuple[str, list[Any]]]:
    rows = [("images", [d.num_images for d in datasets]), ("boxes", [d.num_boxes for d in datasets]),
            ("labels with boxes", [sum(1 for v in d.label_counts.values() if v) for d in datasets]),
            ("objects per image: mean", [_spread(d.objects_per_image.astype(float), 2) for d in datasets]),
            ("images without boxes", [int(np.count_nonzero(d.objects_per_image == 0)) for d in datasets]),
            ("box size sqrt(area / image area)", [_spread(d.box_size) for d in datasets]),
            ("box width (px)", [_spread(d.box_width_px, 1) for d in datasets]),
            ("box aspect ratio w/h", [_spread(d.aspect_ratio, 2) for d in datasets]),
            ("COCO small / medium / large boxes", ["{small} / {medium} / {large}".format(**d.size_counts())
                                                   for d in datasets]),
            ("image sizes", [", ".join(f"{k} ({v})" for k, v in list(d.image_sizes.items())[:3])
                             + (" ..." if len(d.image_sizes) > 3 else "") for d in datasets])]
    for key, label in _PIXEL_ROWS:
        if any(d.pixel.get(key) for d in datasets):
            rows.append((label, [{**_spread(d.pixel[key], 1), "n": d.pixel["sampled_images"]}
                                 if d.pixel.get(key) else "not measured" for d in datasets]))
    if any(d.simulator for d in datasets):
        rows.append(("visible fraction (simulator)", [
            _spread(d.visible_fraction) if d.visible_fraction is not None else "not recorded" for d in datasets]))
        rows.append(("objects per image by ObjectCount (simulator)", [
            _spread(d.simulator.object_counts, 2) if d.simulator and d.simulator.object_counts is not None
            else "not recorded" for d in datasets]))
    return rows


def stats_summary_html(datasets: Sequence[Any]) -> str:
    """A table of one or more `data.stats.DatasetStats` side by side."""
    return _macro("stats.html", "summary", [d.name for d in datasets], _summary_rows(datasets))


def gaps_html(distances: Mapping[str, Any]) -> str:
    """The largest gaps of `data.stats.compare_stats`, one plain sentence each, largest first."""
    return _macro("stats.html", "gaps", distances)


def _one_d_rows(distances: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [r for _, r in sorted(distances["one_d"].items(), key=lambda kv: -(kv[1]["w1_std"] or 0))]


def distances_html(distances: Mapping[str, Any]) -> str:
    """The domain-gap table of `data.stats.compare_stats`, with what the distances mean."""
    return _macro("stats.html", "distances_table", distances, _one_d_rows(distances))


def simulator_html(datasets: Sequence[Any], pngs: Mapping[str, bytes]) -> str:
    """What the simulator measured (`simulator_stats.SimulatorStats` of each dataset): what was read, the
    visible fraction per label, object counts, iterations and seeds, and each generic metric's fields."""
    from synthval.data.simulator_stats import NO_RENDERED_OBJECT_INFO
    from synthval.render.plots import metric_slug, varying_fields

    measured = [d for d in datasets if d.simulator is not None]
    blocks = []
    for d in measured:
        sim = d.simulator
        facts = []
        if sim.object_counts is not None:
            facts.append(f"ObjectCount: {np.mean(sim.object_counts):.2f} objects per image "
                         f"({d.num_boxes / max(1, d.num_images):.2f} boxes per image)")
        if sim.images_with_iteration:
            facts.append(f"{sim.iterations} scenario iterations over {sim.images_with_iteration} images")
        if sim.seeds:
            facts.append("random seed " + ", ".join(f"{s:.0f}" for s in sim.seeds[:5])
                         + (f" and {len(sim.seeds) - 5} more" if len(sim.seeds) > 5 else ""))
        blocks.append({"name": d.name, "facts": facts, "definitions": sim.definitions,
                       "notes": [n for n in sim.notes if n != NO_RENDERED_OBJECT_INFO]})  # said at the top
    visible = None
    if "visible_fraction_per_label" in pngs:
        with_fraction = [d for d in measured if d.visible_fraction is not None]
        names = list(dict.fromkeys(n for d in with_fraction for n in d.per_label(d.visible_fraction)))
        visible = {"lines": [_occlusion_line(d) for d in with_fraction],
                   "histogram_png": pngs["visible_fraction"], "per_label_png": pngs["visible_fraction_per_label"],
                   "names": [d.name for d in with_fraction],
                   "rows": [(n, [_visible_cell(d.per_label(d.visible_fraction).get(n)) for d in with_fraction])
                            for n in names]}
    generic = []
    for name in dict.fromkeys(n for d in measured for n in d.simulator.generic):
        key = f"metric_{metric_slug(name)}"
        fields: dict[str, list[np.ndarray]] = {}
        for d in measured:
            for f, v in d.simulator.generic.get(name, {}).items():
                fields.setdefault(f, []).append(v)
        _, constant, repeats = varying_fields({f: np.concatenate(v) for f, v in fields.items()})
        fixed = [f"{f} = {fields[f][0][0]:g}" for f in constant] + [f"{f} = {g}" for f, g in repeats.items()]
        generic.append({"name": name, "png": pngs.get(key), "fixed": fixed})
    return _macro("stats.html", "simulator", blocks, visible, generic)


def _occlusion_line(d: Any) -> str:
    """One sentence on how hidden the boxed objects are, and what to change when few are."""
    known = d.visible_fraction[~np.isnan(d.visible_fraction)]
    if not len(known):
        return f"{d.name}: no box has a known visible fraction."
    low = float(np.mean(known < 0.5))
    line = (f"{d.name}: median visible fraction {np.median(known):.2f}; {low:.0%} of boxes are less than half "
            f"visible.")
    if low < 0.05:
        line += (" Few objects are heavily hidden: if the real images show crowded shelves or hands in front of "
                 "products, add occluders or place objects closer together.")
    return line


def _visible_cell(values: Any) -> dict[str, Any] | None:
    if values is None or len(values) == 0:
        return None
    p = np.quantile(values, [0.05, 0.5, 0.95])
    return {"visible": {"p50": p[1], "p5": p[0], "p95": p[2], "under_half": float(np.mean(values < 0.5)),
                        "n": len(values)}}


def write_stats_report(datasets: Sequence[Any], distances: Mapping[str, Any] | None, pngs: Mapping[str, bytes],
                       title: str = "synthval dataset statistics") -> str:
    """The statistics page (one or two `data.stats.DatasetStats`, their distances, the plots' PNG bytes) as HTML.

    Order: the largest gaps in words, the summary, what could not be measured, the distances, the
    distributions, per label, what the simulator measured, positions, labels.
    """
    from synthval.data.simulator_stats import NO_RENDERED_OBJECT_INFO

    lacking = [f"{d.name}: {n}" for d in datasets for n in d.notes]
    lacking += [f"{d.name}: {NO_RENDERED_OBJECT_INFO}" for d in datasets
                if d.simulator and NO_RENDERED_OBJECT_INFO in d.simulator.notes]
    captions = {"objects_per_image": "Objects per image", "box_size": "Box size", "aspect_ratio": "Box aspect ratio",
                "brightness": "Brightness", "contrast": "Contrast", "warmth": "Colour balance"}
    labels = list(dict.fromkeys(n for d in datasets for n in d.label_counts))
    label_rows = [(n, [{"count": d.label_counts[n], "images": d.images_per_label.get(n, 0)}
                       if n in d.label_counts else None for d in datasets]) for n in labels]
    simulator = simulator_html(datasets, pngs) if any(d.simulator for d in datasets) else None
    return _page("stats_report.html", title, {"kind": "stats_report", "distances": distances},
                 datasets=datasets, distances=distances, names=[d.name for d in datasets],
                 summary_rows=_summary_rows(datasets), lacking=lacking,
                 one_d=_one_d_rows(distances) if distances else [],
                 distributions=[(pngs[k], caption) for k, caption in captions.items() if k in pngs],
                 box_size_per_label_png=pngs.get("box_size_per_label"), simulator=simulator,
                 position_png=pngs.get("position_heatmap"), labels_png=pngs.get("objects_per_label"),
                 label_rows=label_rows)
