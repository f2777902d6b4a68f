"""`synthval stats`: statistics of a dataset, and its distance to a second one (the domain gap before training).

The statistics are `synthval.data.stats`; this step writes them as stats.json, PNG plots and a
self-contained stats.html.
"""

from __future__ import annotations

import logging
from typing import Any

from synthval.data.stats import STATS_SCHEMA_VERSION, compare_stats, load_stats
from synthval.io import storage
from synthval.render import plots
from synthval.render.report import write_stats_report

log = logging.getLogger(__name__)


def run_stats(data_uri: str, out_uri: str, split: str | None = None, dataset_format: str = "auto",
              bbox_definition_id: str | None = None, skip_broken: bool = False, name: str | None = None,
              compare_data_uri: str | None = None, compare_split: str | None = None,
              compare_format: str = "auto", compare_name: str | None = None, pixel_sample: int = 0,
              seed: int = 0) -> dict[str, Any]:
    """Statistics of a dataset (and its distance to a second one) into `out_uri`.

    Writes `stats.json`, `stats.html` (self-contained, plots embedded) and `plots/*.png`; returns
    {"stats_uri", "report_uri", "plots_uri"}.
    """
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
        storage.write_published(storage.join_uri(plots_uri, f"{key}.png"), pngs[key], "image/png")
    document = {"schema_version": STATS_SCHEMA_VERSION, "datasets": [d.to_dict() for d in datasets],
                "distances": distances}
    stats_uri = storage.join_uri(out_uri, "stats.json")
    report_uri = storage.join_uri(out_uri, "stats.html")
    storage.write_html(report_uri, write_stats_report(datasets, distances, pngs))
    storage.write_json(stats_uri, storage.json_safe(document))
    log.info("wrote %s, %s and %d plots", stats_uri, report_uri, len(pngs))
    return {"stats_uri": stats_uri, "report_uri": report_uri, "plots_uri": plots_uri}

