"""HTML reports people look at: one evaluation (`synthval report`), several side by side (`synthval compare`),
and dataset statistics (the page `synthval stats` writes).

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
import html
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from synthval import __version__
from synthval.io import storage
from synthval.scoring.analysis import (DEFAULT_GALLERY_SIZE, CompareEntry, RunAnalysis, analyze_run, load_run_inputs,
                                       test_set_key)
from synthval.scoring.bootstrap import (DEFAULT_CONFIDENCE, DEFAULT_REPLICATES, DEFAULT_SEED, SUMMARY_NAMES,
                                        BootstrapResult)
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


# --- HTML building blocks ----------------------------------------------------------------------------

_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1240px;margin:0 auto;padding:20px 28px 48px}
h1{font-size:1.55em;margin:.2em 0 .1em}h2{font-size:1.2em;margin:1.6em 0 .5em;border-bottom:2px solid #dde1e7;padding-bottom:.2em}
.sub{color:#5b6475;margin:.2em 0 1em}
table{border-collapse:collapse;background:#fff;margin:.4em 0 1em;font-size:.92em}
th,td{border:1px solid #dde1e7;padding:4px 9px;text-align:right;vertical-align:top}
th{background:#eef1f5}td.l,th.l{text-align:left}
.big td{font-size:1.15em}.ci{color:#5b6475;font-size:.85em}
.yes{color:#0a7d32;font-weight:600}.no{color:#8a5a00}
.note{background:#fff6e0;border-left:4px solid #f0a800;padding:6px 10px;margin:.6em 0}
.fig{background:#fff;border:1px solid #dde1e7;padding:6px;margin:.4em 0 1em;max-width:100%;height:auto}
.gallery .fig{max-width:calc(50% - 20px);margin:0}
.gallery{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #dde1e7;padding:6px;width:372px}
.card img{width:360px;height:auto;display:block}.card p{margin:.3em 0 0;font-size:.85em;color:#39404d;word-break:break-all}
.legend span{display:inline-block;padding:1px 8px;margin-right:8px;border-radius:3px;color:#fff;font-size:.9em}
details{margin:.4em 0 1em}code{background:#eef1f5;padding:0 3px}h3{font-size:1.02em;margin:1.2em 0 .4em}
.nw{white-space:nowrap}.gaps{background:#fff;border:1px solid #dde1e7;padding:8px 14px 8px 34px;margin:.4em 0 1em}.gaps li{margin:.35em 0}
footer{color:#7a8294;font-size:.85em;margin-top:2em}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _page(title: str, body: str, data: Mapping[str, Any] | None = None) -> str:
    """A whole HTML document: inline styles, no script; `data` is embedded as inert JSON for tools."""
    payload = ""
    if data is not None:
        text = json.dumps(storage.json_safe(data), sort_keys=True).replace("</", "<\\/")
        payload = f'<script type="application/json" id="synthval-data">{text}</script>\n'
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'\">\n"
        f"<link rel=\"icon\" href=\"data:,\">\n<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n"
        f"<body>\n<main>\n{body}\n<footer>synthval {_e(__version__)} &middot; generated {_e(stamp)}</footer>\n"
        f"</main>\n{payload}</body>\n</html>\n"
    )


def _img(data: bytes, alt: str, mime: str = "image/png", css: str = "fig") -> str:
    return (f'<img class="{css}" alt="{_e(alt)}" src="data:{mime};base64,'
            f'{base64.b64encode(data).decode("ascii")}">')


def _jpeg(image: Any, quality: int = 85) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


def format_number(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def format_interval(low: Any, high: Any) -> str:
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return "n/a"
    return f"[{low:.3f}, {high:.3f}]"


def _notes(notes: Sequence[str]) -> str:
    return "".join(f'<p class="note">{_e(n)}</p>' for n in notes)


def _figure_html(fig: Any, alt: str) -> str:
    from synthval.render.plots import figure_png

    return _img(figure_png(fig), alt)


# --- run report --------------------------------------------------------------------------------------


def headline_html(metrics: Mapping[str, Any], boot: BootstrapResult | None) -> str:
    """The headline table (mAP, mAP50, mAP75, mAR100 with intervals) and how the intervals were made."""
    rows = []
    for key, label in HEADLINE:
        value = metrics.get(key)
        low = boot.low.get(key) if boot else None
        high = boot.high.get(key) if boot else None
        finite = boot is not None and low is not None and high is not None and math.isfinite(low) and math.isfinite(high)
        half = f"&plusmn;{(high - low) / 2:.3f}" if finite else "n/a"
        rows.append(f'<tr><td class="l">{_e(label)} <span class="ci">{_e(key)}</span></td><td>{format_number(value)}</td>'
                    f"<td>{format_interval(low, high)}</td><td>{half}</td></tr>")
    pct = int(round((boot.confidence if boot else DEFAULT_CONFIDENCE) * 100))
    out = ('<table class="big"><tr><th class="l">metric</th><th>value</th>'
           f"<th>{pct}% interval</th><th>about</th></tr>{''.join(rows)}</table>")
    if boot is not None:
        out += (f'<p class="sub">Intervals: percentile bootstrap over the {boot.num_items} test images '
                f"({boot.replicates.shape[0]} resamples with replacement, seed {boot.seed}), each resample "
                "scored with COCO's matching and accumulation. A difference between two models smaller "
                "than these half-widths is within the noise of this test set; use <code>synthval compare</code>"
                " for a paired test.</p>")
    return out


def render_run_report(analysis: RunAnalysis, title: str | None = None, gallery_size: int = DEFAULT_GALLERY_SIZE) -> str:
    """The run report of an analysis as one HTML string."""
    from synthval.render import plots

    inputs, metrics = analysis.inputs, analysis.metrics
    boot = analysis.bootstrap
    intervals = boot.to_dict() if boot is not None else None
    title = title or f"synthval evaluation: {storage.basename(inputs.data_uri) or inputs.data_uri} ({inputs.split})"
    checkpoint = metrics.get("checkpoint_uri") or metrics.get("source_predictions_uri") or "n/a"
    parts = [f"<h1>{_e(title)}</h1>",
             f'<p class="sub">{metrics.get("num_images", len(inputs.index))} test images, '
             f'{metrics.get("num_gt", inputs.index.num_boxes)} boxes, {metrics.get("num_predictions", "?")} '
             f"detections scored &middot; model or results: <code>{_e(checkpoint)}</code></p>"]
    parts.append(_notes(inputs.notes))

    parts.append("<h2>Headline metrics</h2>" + headline_html(metrics, boot))
    others = [(k, metrics.get(k)) for k in ("mAP_small", "mAP_medium", "mAP_large", "mAR1", "mAR10",
                                             "mAR_small", "mAR_medium", "mAR_large")]
    parts.append("<details><summary>All COCO summary numbers</summary><table><tr>"
                 + "".join(f"<th>{_e(k)}</th>" for k, _ in others) + "</tr><tr>"
                 + "".join(f"<td>{format_number(v)}</td>" for _, v in others) + "</tr></table></details>")

    match = metrics.get("label_match") or {}
    if match.get("only_in_model") or match.get("only_in_data"):
        parts.append(_notes([
            f"Labels are matched by name: {len(match.get('shared', []))} shared. "
            + (f"Test labels the model cannot predict (AP 0 where they have boxes): {', '.join(match['only_in_data'])}. "
               if match.get("only_in_data") else "")
            + (f"Model classes absent from the test set (not scored): {', '.join(match['only_in_model'])}."
               if match.get("only_in_model") else "")]))

    parts.append("<h2>AP per class</h2>")
    parts.append(_figure_html(plots.per_class_ap_figure(metrics, intervals), "AP per class"))
    parts.append(_per_class_table(metrics, boot))

    parts.append("<h2>Precision-recall curves</h2>")
    parts.append(_figure_html(plots.pr_curves_figure(metrics), "precision-recall curves at IoU .5"))

    parts.append("<h2>Class confusion</h2>")
    if analysis.matches is None:
        parts.append("<p>Needs the predictions file.</p>")
    elif analysis.confusion:
        total = sum(sum(r.values()) for r in analysis.confusion.values())
        parts.append(f"<p>{total} detection(s) with score &ge; {analysis.score_threshold:g} lie on a true box of "
                     "another class (IoU &ge; .5): the model found the object but named it wrongly.</p>")
        parts.append(_figure_html(plots.confusion_figure(analysis.confusion), "class confusion"))
    else:
        parts.append(f"<p>No detection with score &ge; {analysis.score_threshold:g} lies on a true box of another "
                     "class (IoU &ge; .5).</p>")

    parts.append("<h2>Worst and best test images</h2>")
    if analysis.matches is None:
        parts.append("<p>Needs the predictions file.</p>")
    else:
        parts.append(_legend(analysis.score_threshold))
        worst = analysis.worst(gallery_size)
        best = analysis.best(gallery_size, exclude=worst)
        parts.append("<h3>Worst (lowest F1 at the threshold)</h3>" + _gallery(worst, analysis.score_threshold))
        parts.append("<h3>Best (highest F1)</h3>" + _gallery(best, analysis.score_threshold))

    parts.append("<h2>Provenance</h2>")
    prov = [("metrics", inputs.metrics_uri), ("predictions", inputs.predictions_uri),
            ("test set", f"{inputs.data_uri} (split {inputs.split}, {inputs.index.format})"),
            ("checkpoint", metrics.get("checkpoint_uri")), ("results file scored", metrics.get("source_predictions_uri")),
            ("evaluated at", metrics.get("created_at")), ("evaluated by synthval", metrics.get("synthval_version"))]
    parts.append("<table>" + "".join(f'<tr><th class="l">{_e(k)}</th><td class="l"><code>{_e(v)}</code></td></tr>'
                                     for k, v in prov if v) + "</table>")
    data = {"kind": "run_report", "metrics_uri": inputs.metrics_uri,
            "metrics": {k: metrics.get(k) for k, _ in HEADLINE}, "intervals": intervals,
            "score_threshold": analysis.score_threshold, "confusion": analysis.confusion}
    return _page(title, "\n".join(parts), data)


def _legend(threshold: float) -> str:
    from synthval.render.plots import FP_COLOR, MISS_COLOR, TP_COLOR

    def swatch(color: tuple[int, int, int], text: str, dark: bool = False) -> str:
        fg = "#000" if dark else "#fff"
        return f'<span style="background:rgb{color};color:{fg}">{_e(text)}</span>'

    return ('<p class="legend">' + swatch(TP_COLOR, "TP: detection matching a true box")
            + swatch(FP_COLOR, "FP: detection matching none (\u201con X\u201d: on a box of class X)", dark=True)
            + swatch(MISS_COLOR, "MISS: true box found by no detection (dashed)")
            + f"<br>Detections drawn: score &ge; <b>{threshold:g}</b>; matched at IoU &ge; {OUTCOME_IOU:g}. "
            "Images ranked by F1 = 2TP / (2TP + FP + MISS).</p>")


def _gallery(outcomes: Sequence[ImageOutcome], threshold: float) -> str:
    if not outcomes:
        return "<p>No images.</p>"
    cards = []
    for o in outcomes:
        try:
            picture = _img(_jpeg(draw_outcome(o, threshold)), f"test image {o.image_id}", "image/jpeg", css="")
        except Exception as exc:  # one unreadable image must not lose the whole report
            log.warning("gallery: %s skipped (%s)", o.path, exc)
            picture = f"<p>image unreadable: {_e(exc)}</p>"
        cards.append(f'<div class="card">{picture}<p>F1 {format_number(o.f1, 2)} &middot; TP {o.tp}, FP {o.fp} '
                     f"({o.confused} on another class), MISS {o.miss}<br><code>{_e(o.path)}</code></p></div>")
    return '<div class="gallery">' + "".join(cards) + "</div>"


def _per_class_table(metrics: Mapping[str, Any], boot: BootstrapResult | None) -> str:
    per_class = metrics.get("per_class") or {}
    from synthval.render.plots import _class_order

    rows = []
    for name in _class_order(per_class):
        row = per_class[name]
        ap_ci = format_interval(boot.low.get(f"AP/{name}"), boot.high.get(f"AP/{name}")) if boot else "n/a"
        ap50_ci = format_interval(boot.low.get(f"AP50/{name}"), boot.high.get(f"AP50/{name}")) if boot else "n/a"
        rows.append(f'<tr><td class="l">{_e(name)}</td><td>{row.get("num_gt", "")}</td><td>{row.get("num_predictions", "")}</td>'
                    f'<td>{format_number(row.get("AP"))} <span class="ci">{ap_ci}</span></td>'
                    f'<td>{format_number(row.get("AP50"))} <span class="ci">{ap50_ci}</span></td>'
                    f'<td>{format_number(row.get("AR100"))}</td></tr>')
    return ('<details><summary>Table</summary><table><tr><th class="l">class</th><th>test boxes</th><th>detections</th>'
            "<th>AP@[.5:.95] [95%]</th><th>AP@.5 [95%]</th><th>AR@100</th></tr>" + "".join(rows) + "</table></details>")


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
        import os

        return os.path.join(os.path.dirname(storage.local_path(uri)), name)
    return uri.split("?", 1)[0].rsplit("/", 1)[0] + "/" + name


# --- comparison report -------------------------------------------------------------------------------


def render_compare_report(entries: Sequence[CompareEntry], differences: Sequence[Mapping[str, Any]],
                          confidence: float = DEFAULT_CONFIDENCE, title: str = "synthval comparison") -> str:
    """The comparison page as one HTML string."""
    from synthval.render import plots

    pct = int(round(confidence * 100))
    parts = [f"<h1>{_e(title)}</h1>",
             f'<p class="sub">{len(entries)} results &middot; {pct}% bootstrap intervals over test images</p>']
    test_sets = {test_set_key(e.metrics) for e in entries}
    if len(test_sets) > 1:
        parts.append(_notes(["These results were scored on different test sets: their numbers are not directly "
                             "comparable, and differences are tested without pairing."]))
    head = "".join(f"<th>{_e(e.name)}</th>" for e in entries)
    rows = []
    for key, label in HEADLINE:
        cells = []
        for e in entries:
            value = e.metrics.get(key)
            ci = format_interval(e.bootstrap.low.get(key), e.bootstrap.high.get(key)) if e.bootstrap else "n/a"
            cells.append(f'<td>{format_number(value)}<br><span class="ci">{ci}</span></td>')
        rows.append(f'<tr><td class="l">{_e(label)}</td>{"".join(cells)}</tr>')
    rows.append('<tr><td class="l">test images</td>' + "".join(f"<td>{e.metrics.get('num_images', '')}</td>"
                                                               for e in entries) + "</tr>")
    parts.append(f'<h2>Metrics</h2><table class="big"><tr><th class="l">metric</th>{head}</tr>{"".join(rows)}</table>')
    figure_rows = [(e.name, (e.bootstrap.to_dict(list(SUMMARY_NAMES))["values"] if e.bootstrap else
                             {k: {"value": e.metrics.get(k)} for k in SUMMARY_NAMES})) for e in entries]
    parts.append(_figure_html(plots.metric_intervals_figure(figure_rows), "metrics with intervals"))

    parts.append("<h2>Differences: larger than the noise?</h2>")
    parts.append(f"<p>Each difference <i>a &minus; b</i> with its {pct}% bootstrap interval. Paired: both results "
                 "were scored on the same test images, resampled together, so what an image's difficulty adds to both "
                 "cancels. A difference is <b>larger than its noise</b> when its interval excludes 0.</p>")
    drows = []
    for d in differences:
        verdict = ('<span class="yes">yes</span>' if d["significant"]
                   else '<span class="no">no, within noise</span>' if d["low"] is not None else "untested")
        drows.append(f'<tr><td class="l">{_e(d["a"])}</td><td class="l">{_e(d["b"])}</td><td class="l">{_e(d["metric"])}</td>'
                     f'<td>{format_number(d["difference"])}</td><td>{format_interval(d["low"], d["high"])}</td><td class="l">{verdict}</td>'
                     f'<td class="l">{_e(d["method"])}</td></tr>')
    parts.append('<table><tr><th class="l">a</th><th class="l">b</th><th class="l">metric</th><th>a &minus; b</th>'
                 f'<th>{pct}% interval</th><th class="l">larger than noise?</th><th class="l">bootstrap</th></tr>'
                 + "".join(drows) + "</table>")

    names = list(dict.fromkeys(n for e in entries for n in (e.metrics.get("per_class") or {})))
    if names:
        prow = []
        for n in names:
            cells = "".join(f"<td>{format_number(((e.metrics.get('per_class') or {}).get(n) or {}).get('AP50'))}</td>" for e in entries)
            prow.append(f'<tr><td class="l">{_e(n)}</td>{cells}</tr>')
        parts.append(f'<h2>AP@.5 per class</h2><details><summary>Table</summary><table><tr><th class="l">class</th>{head}</tr>'
                     + "".join(prow) + "</table></details>")
    parts.append("<h2>Sources</h2><table>" + "".join(
        f'<tr><th class="l">{_e(e.name)}</th><td class="l"><code>{_e(e.metrics_uri)}</code></td></tr>' for e in entries)
        + "</table>")
    data = {"kind": "compare_report", "results": [{"name": e.name, "metrics_uri": e.metrics_uri,
                                                   "intervals": e.bootstrap.to_dict(list(SUMMARY_NAMES)) if e.bootstrap else None}
                                                  for e in entries], "differences": list(differences)}
    return _page(title, "\n".join(parts), data)


# --- dataset statistics report -----------------------------------------------------------------------


def _row(label: str, cells: Sequence[Any]) -> str:
    return f'<tr><td class="l">{_e(label)}</td>' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def _quantiles(values: Any, digits: int = 3) -> str:
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return "n/a"
    p = np.quantile(values, [0.05, 0.5, 0.95])
    return (f"{np.mean(values):.{digits}f} <span class=\"ci\">(median {p[1]:.{digits}f}; "
            f"5-95%: {p[0]:.{digits}f} to {p[2]:.{digits}f})</span>")


_PIXEL_ROWS = (("brightness", "brightness, sampled images (0-255)"), ("contrast", "contrast: std of luma (0-255)"),
               ("warmth", "colour balance: mean red - mean blue"))


def stats_summary_html(datasets: Sequence[Any]) -> str:
    """A table of one or more `stats.DatasetStats` side by side."""
    head = "".join(f"<th>{_e(d.name)}</th>" for d in datasets)
    q = _quantiles
    rows = [_row("images", [d.num_images for d in datasets]), _row("boxes", [d.num_boxes for d in datasets]),
            _row("labels with boxes", [sum(1 for v in d.label_counts.values() if v) for d in datasets]),
            _row("objects per image: mean", [q(d.objects_per_image.astype(float), 2) for d in datasets]),
            _row("images without boxes", [int(np.count_nonzero(d.objects_per_image == 0)) for d in datasets]),
            _row("box size sqrt(area / image area)", [q(d.box_size) for d in datasets]),
            _row("box width (px)", [q(d.box_width_px, 1) for d in datasets]),
            _row("box aspect ratio w/h", [q(d.aspect_ratio, 2) for d in datasets]),
            _row("COCO small / medium / large boxes", ["{small} / {medium} / {large}".format(**d.size_counts())
                                                       for d in datasets]),
            _row("image sizes", [", ".join(f"{k} ({v})" for k, v in list(d.image_sizes.items())[:3])
                                 + (" ..." if len(d.image_sizes) > 3 else "") for d in datasets])]
    for key, label in _PIXEL_ROWS:
        if any(d.pixel.get(key) for d in datasets):
            rows.append(_row(label, [q(d.pixel[key], 1) + f" <span class=\"ci\">n={d.pixel['sampled_images']}</span>"
                                     if d.pixel.get(key) else "not measured" for d in datasets]))
    if any(d.simulator for d in datasets):
        rows.append(_row("visible fraction (simulator)", [
            q(d.visible_fraction) if d.visible_fraction is not None else "not recorded" for d in datasets]))
        rows.append(_row("objects per image by ObjectCount (simulator)", [
            q(d.simulator.object_counts, 2) if d.simulator and d.simulator.object_counts is not None
            else "not recorded" for d in datasets]))
    return f'<table><tr><th class="l">statistic</th>{head}</tr>{"".join(rows)}</table>'


def gaps_html(distances: Mapping[str, Any]) -> str:
    """The largest gaps of `stats.compare_stats`, one plain sentence each, largest first."""
    if not distances.get("gaps"):
        return (f"<p>No gap stands out: every statistic of {_e(distances['a'])} is within sampling noise or a quarter "
                f"of a standard deviation of {_e(distances['b'])}'s, and the label and position mixes agree within "
                "20% or within noise. With few images the noise is large: compare with a bigger sample.</p>")
    return '<ol class="gaps">' + "".join(f"<li>{_e(g['text'])}</li>" for g in distances["gaps"]) + "</ol>"


def _beyond(flag: Any) -> str:
    return '<span class="yes">yes</span>' if flag else '<span class="no">no</span>'


def distances_html(distances: Mapping[str, Any]) -> str:
    """The domain-gap table of `stats.compare_stats`, with what the distances mean."""
    parts = ["<p>How far apart the two datasets' distributions are, before any training. Wasserstein-1 is "
             "the average distance values must move to turn one distribution into the other, in the "
             f"statistic's unit, and in standard deviations of {_e(distances['b'])} to rank them; total "
             "variation (share of mass that differs) and Jensen-Shannon divergence (base 2) lie in [0, 1] "
             "and are 0 for identical distributions.</p>"]
    parts.append("<p>Sampling noise: the distance two random draws of these sizes from one pooled sample reach "
                 "99% of the time. A distance below it cannot be told from chance; only distances beyond it are "
                 "called gaps above.</p>")
    drows = []
    for _, r in sorted(distances["one_d"].items(), key=lambda kv: -(kv[1]["w1_std"] or 0)):
        drows.append(f'<tr><td class="l">{_e(r["title"])}</td><td class="l nw">Wasserstein-1</td><td>{r["w1"]:.4g} '
                     f'<span class="ci">{_e(r["unit"])}</span></td><td>{format_number(r["w1_std"], 2)}</td>'
                     f'<td>{format_number(r["noise"], 3)}</td><td>{_beyond(r["beyond_noise"])}</td>'
                     f'<td>{r["median_a"]:.3g} vs {r["median_b"]:.3g}</td></tr>')
    lab = distances["labels"]
    drows.append(f'<tr><td class="l">objects per label (share of boxes)</td><td class="l nw">TV / JS</td>'
                 f'<td>{lab["tv"]:.3f} / {lab["js"]:.3f}</td><td></td><td>{format_number(lab["tv_noise"], 3)}</td>'
                 f'<td>{_beyond(lab["beyond_noise"])}</td><td></td></tr>')
    if "position_heatmap" in distances:
        pos = distances["position_heatmap"]
        drows.append(f'<tr><td class="l">box centre position (heat map, {pos.get("bins", "")}x{pos.get("bins", "")} '
                     f'cells)</td><td class="l nw">TV / JS</td><td>{pos["tv"]:.3f} / {pos["js"]:.3f}</td><td></td>'
                     f'<td>{format_number(pos["tv_noise"], 3)}</td><td>{_beyond(pos["beyond_noise"])}</td><td></td></tr>')
    size = distances["coco_size_share"]
    drows.append(f'<tr><td class="l">COCO size class share (small/medium/large)</td><td class="l">TV</td>'
                 f'<td>{size["tv"]:.3f}</td><td></td><td></td><td></td><td>'
                 + " / ".join(f"{size['a'][k]:.2f}" for k in ("small", "medium", "large")) + " vs "
                 + " / ".join(f"{size['b'][k]:.2f}" for k in ("small", "medium", "large")) + "</td></tr>")
    parts.append('<table><tr><th class="l">statistic</th><th class="l">distance</th><th>value</th>'
                 f'<th>in std of {_e(distances["b"])}</th><th>sampling noise (99%)</th><th>beyond noise</th>'
                 "<th>median a vs b</th></tr>" + "".join(drows) + "</table>")
    per_label = distances.get("box_size_per_label") or {}
    if per_label:
        prows = [f'<tr><td class="l">{_e(n)}</td><td>{r["w1"]:.3g}</td><td>{format_number(r["w1_std"], 2)}</td>'
                 f'<td>{format_number(r["noise"], 3)}</td><td>{_beyond(r["beyond_noise"])}</td>'
                 f'<td>{r["median_a"]:.3g} vs {r["median_b"]:.3g}</td><td>{r["n_a"]} / {r["n_b"]}</td></tr>'
                 for n, r in per_label.items()]
        parts.append("<details><summary>Box size per label: Wasserstein-1, largest gap first</summary>"
                     '<table><tr><th class="l">label</th><th>W1</th><th>in std</th><th>sampling noise</th>'
                     "<th>beyond noise</th><th>median a vs b</th><th>boxes a / b</th></tr>" + "".join(prows)
                     + "</table></details>")
    if lab["only_in_a"] or lab["only_in_b"]:
        parts.append(_notes([f"Labels only in {distances['a']}: {', '.join(lab['only_in_a']) or 'none'}. "
                             f"Labels only in {distances['b']}: {', '.join(lab['only_in_b']) or 'none'}. "
                             "Labels are matched by name; unmatched ones are neither trained nor scored together."]))
    return "".join(parts)


def simulator_html(datasets: Sequence[Any], pngs: Mapping[str, bytes]) -> str:
    """What the simulator measured (`simulator_stats.SimulatorStats` of each dataset): what was read, the
    visible fraction per label, object counts, iterations and seeds, and each generic metric's fields."""
    from synthval.render.plots import metric_slug, varying_fields
    from synthval.data.simulator_stats import NO_RENDERED_OBJECT_INFO

    measured = [d for d in datasets if d.simulator is not None]
    parts = ["<p>Read from the dataset's own metrics (Perception <code>metrics_*.json</code>, SOLO frame "
             "<code>metrics</code>), beside the boxes; only images of the chosen split count. The visible "
             "fraction of a box is its object's visible pixels (RenderedObjectInfo) over the box area: near 1 "
             "for an object seen whole that fills its box, low for an occluded, cropped or thin one.</p>"]
    for d in measured:
        sim = d.simulator
        rows = "".join(f'<tr><td class="l">{_e(m["name"])}</td><td class="l">{_e(m["kind"].replace("_", " "))}</td>'
                       f'<td>{m["records"]}</td><td>{m["values"]}</td><td>{m["attached_records"]}</td></tr>'
                       for m in sim.definitions)
        facts = []
        if sim.object_counts is not None:
            facts.append(f"ObjectCount: {np.mean(sim.object_counts):.2f} objects per image "
                         f"({d.num_boxes / max(1, d.num_images):.2f} boxes per image)")
        if sim.images_with_iteration:
            facts.append(f"{sim.iterations} scenario iterations over {sim.images_with_iteration} images")
        if sim.seeds:
            facts.append("random seed " + ", ".join(f"{s:.0f}" for s in sim.seeds[:5])
                         + (f" and {len(sim.seeds) - 5} more" if len(sim.seeds) > 5 else ""))
        parts.append(f"<h3>{_e(d.name)}: metrics read</h3>"
                     + (f"<p>{_e('; '.join(facts))}.</p>" if facts else "")
                     + '<table><tr><th class="l">metric</th><th class="l">kind</th><th>records</th><th>values</th>'
                     "<th>records on an image</th></tr>" + rows + "</table>"
                     + _notes([n for n in sim.notes if n != NO_RENDERED_OBJECT_INFO]))  # said at the top
    if "visible_fraction_per_label" in pngs:
        lines = [_occlusion_line(d) for d in measured if d.visible_fraction is not None]
        parts.append("<h3>Visible fraction</h3>" + "".join(f"<p>{_e(line)}</p>" for line in lines)
                     + '<div class="gallery">' + _img(pngs["visible_fraction"], "visible fraction histogram")
                     + _img(pngs["visible_fraction_per_label"], "visible fraction per label") + "</div>")
        names = list(dict.fromkeys(n for d in measured if d.visible_fraction is not None
                                   for n in d.per_label(d.visible_fraction)))
        with_fraction = [d for d in measured if d.visible_fraction is not None]
        vrows = [_row(n, [_visible_cell(d.per_label(d.visible_fraction).get(n)) for d in with_fraction])
                 for n in names]
        parts.append("<details><summary>Visible fraction per label: median, 5th-95th percentile, share of boxes "
                     "under half visible</summary><table><tr><th class=\"l\">label</th>"
                     + "".join(f"<th>{_e(d.name)}</th>" for d in with_fraction) + "</tr>" + "".join(vrows)
                     + "</table></details>")
    generic = list(dict.fromkeys(n for d in measured for n in d.simulator.generic))
    for name in generic:
        key = f"metric_{metric_slug(name)}"
        fields: dict[str, list[np.ndarray]] = {}
        for d in measured:
            for f, v in d.simulator.generic.get(name, {}).items():
                fields.setdefault(f, []).append(v)
        _, constant, repeats = varying_fields({f: np.concatenate(v) for f, v in fields.items()})
        said = [f"{_e(f)} = {fields[f][0][0]:g}" for f in constant] + [f"{_e(f)} = {_e(g)}" for f, g in repeats.items()]
        fixed = f'<p class="ci">Not drawn, the same throughout: {", ".join(said)}.</p>' if said else ""
        parts.append(f"<h3>{_e(name)}</h3>" + (_img(pngs[key], f"{name} fields") if key in pngs else "") + fixed)
    return "".join(parts)


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


def _visible_cell(values: Any) -> str:
    if values is None or len(values) == 0:
        return "&ndash;"
    p = np.quantile(values, [0.05, 0.5, 0.95])
    return (f"{p[1]:.2f} <span class=\"ci\">({p[0]:.2f}-{p[2]:.2f}; "
            f"{np.mean(values < 0.5):.0%} under 0.5; n={len(values)})</span>")


def write_stats_report(datasets: Sequence[Any], distances: Mapping[str, Any] | None, pngs: Mapping[str, bytes],
                       title: str = "synthval dataset statistics") -> str:
    """The statistics page (one or two `stats.DatasetStats`, their distances, the plots' PNG bytes) as HTML.

    Order: the largest gaps in words, the summary, what could not be measured, the distances, the
    distributions, per label, what the simulator measured, positions, labels.
    """
    from synthval.data.simulator_stats import NO_RENDERED_OBJECT_INFO

    head = "".join(f"<th>{_e(d.name)}</th>" for d in datasets)
    parts = [f"<h1>{_e(title)}</h1>",
             '<p class="sub">' + " &middot; ".join(f"{_e(d.name)}: <code>{_e(d.uri)}</code> ({_e(d.format)})"
                                                   for d in datasets) + "</p>"]
    if distances:
        parts.append(f"<h2>Largest gaps: {_e(distances['a'])} vs {_e(distances['b'])}</h2>" + gaps_html(distances))
    parts.append("<h2>Summary</h2>" + stats_summary_html(datasets))
    lacking = [f"{d.name}: {n}" for d in datasets for n in d.notes]
    lacking += [f"{d.name}: {NO_RENDERED_OBJECT_INFO}" for d in datasets
                if d.simulator and NO_RENDERED_OBJECT_INFO in d.simulator.notes]
    parts.append(_notes(lacking))
    if distances:
        parts.append(f"<h2>Domain gap: {_e(distances['a'])} vs {_e(distances['b'])}</h2>" + distances_html(distances))
    captions = {"objects_per_image": "Objects per image", "box_size": "Box size", "aspect_ratio": "Box aspect ratio",
                "brightness": "Brightness", "contrast": "Contrast", "warmth": "Colour balance"}
    small = [k for k in captions if k in pngs]
    parts.append('<h2>Distributions</h2><div class="gallery">'
                 + "".join(_img(pngs[k], captions[k]) for k in small) + "</div>")
    if "box_size_per_label" in pngs:
        parts.append("<h2>Box size per label</h2>" + _img(pngs["box_size_per_label"], "box size per label"))
    if any(d.simulator for d in datasets):
        parts.append("<h2>What the simulator measured</h2>" + simulator_html(datasets, pngs))
    if "position_heatmap" in pngs:
        parts.append("<h2>Position heat map</h2>" + _img(pngs["position_heatmap"], "position heat map"))
    if "objects_per_label" in pngs:
        parts.append("<h2>Objects per label</h2>" + _img(pngs["objects_per_label"], "objects per label"))
    names = list(dict.fromkeys(n for d in datasets for n in d.label_counts))
    lrows = [_row(n, [f"{d.label_counts[n]} <span class=\"ci\">in {d.images_per_label.get(n, 0)} images</span>"
                      if n in d.label_counts else "&ndash;" for d in datasets]) for n in names]
    parts.append(f'<details><summary>Objects per label: table</summary><table><tr><th class="l">label</th>{head}</tr>'
                 + "".join(lrows) + "</table></details>")
    return _page(title, "\n".join(parts), {"kind": "stats_report", "distances": distances})
