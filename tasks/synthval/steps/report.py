"""`synthval report`: the HTML run report of one evaluation, with bootstrap intervals and a gallery."""

from __future__ import annotations

from typing import Any

from synthval.render.report import REPORT_FILE, report_file_uri, write_run_report
from synthval.scoring.analysis import DEFAULT_GALLERY_SIZE
from synthval.scoring.bootstrap import DEFAULT_REPLICATES, DEFAULT_SEED, check_replicates


def run_report(metrics_uri: str, out_uri: str, predictions_uri: str | None = None, data_uri: str | None = None,
               split: str | None = None, dataset_format: str = "auto", bbox_definition_id: str | None = None,
               skip_broken: bool = False, score_threshold: float | None = None,
               replicates: int = DEFAULT_REPLICATES, seed: int = DEFAULT_SEED,
               gallery_size: int = DEFAULT_GALLERY_SIZE) -> dict[str, Any]:
    """`synthval report`: the run report at `out_uri` (an .html file, or a folder for report.html).

    Returns {"report_uri", "summary": {metric: {"value", "low", "high"}}}.
    """
    check_replicates(replicates)
    target = report_file_uri(out_uri, REPORT_FILE)
    result = write_run_report(metrics_uri, target, predictions_uri, data_uri, split, dataset_format,
                              bbox_definition_id, skip_broken, score_threshold, replicates, seed,
                              gallery_size=gallery_size)
    summary = (result["intervals"] or {}).get("values")
    return {"report_uri": target, "summary": summary}
