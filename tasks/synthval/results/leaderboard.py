"""The leaderboard: results from the store as one sortable, filterable table, and what each dataset is worth.

The headline is the **real-image equivalent** of a result: how many real images a model trained on
real images only would need to reach the same mAP on the same test set (same protocol). It is read
off the real-only learning curve, the mAP of real-only models at the budgets the store holds (e.g.
76, 380, 760 images; a model trained on no image at all scores 0, which anchors the curve at 0),
interpolated linearly in log(1 + images) because learning curves are close to straight there.

Its uncertainty comes from the noise of the curve points and of the result itself, by a parametric
bootstrap: each replicate draws every point from a normal around its mAP with its standard error,
makes the curve non-decreasing (more real images never hurt on average), and reads the equivalent
again; the 2.5th and 97.5th percentiles give the interval. A point's standard error is the spread of
repeated runs at that budget (several seeds) where there are some, and never less than the binomial
error sqrt(p (1 - p) / n) over the n test boxes, a rough floor for the sampling noise of a test set.
A result above the curve's last point has an equivalent "more than the largest budget" (reported as
infinite, shown as "> N"); below the first point it is 0.

Rows of the real-only curve itself (role `real`) carry their own budget as equivalent; every other row
(synthetic, synthetic+real, model, model+real: synthval.results.identity) is read off the curve of its own
protocol. Deltas compare each row with the chosen baseline dataset's row of the same recipe, protocol
and real budget.

Output is for people and for programs: `--format json|csv` to stdout is the document and nothing else;
text from datasets (URIs are folder names anyone could pick) never carries terminal control sequences
into a table or CSV (they are shown escaped, `\x1b`), and a CSV text cell that a spreadsheet would run
as a formula (starting with = + - @, tab or CR) is prefixed with a quote.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from synthval.errors import ConfigError
from synthval.results.identity import REAL_ONLY, ROLES
from synthval.scoring.equivalent import real_image_equivalents, standard_error

log = logging.getLogger(__name__)

SORT_KEYS = ("real_equiv", "mAP", "mAP50", "mAR100", "when", "dataset", "real_budget", "recipe")
METRIC_COLUMNS = (("mAP", "map"), ("mAP50", "map50"), ("mAR100", "mar100"))
CSV_COLUMNS = ("dataset", "role", "recipe", "real_budget", "seed", "mAP", "mAP50", "mAR100", "real_equiv",
               "real_equiv_low", "real_equiv_high", "delta_mAP", "delta_mAP50", "delta_mAR100", "delta_real_equiv",
               "when", "protocol", "stale", "run_id", "model_id", "link", "run_link", "tensorboard")
# C0 and C1 control characters and DEL: in a terminal they move the cursor, recolour, retitle, or worse.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# A spreadsheet runs a cell starting with these as a formula (CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


# --- the real-only curve ---------------------------------------------------------------------------------


def real_only_curves(rows: Iterable[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """{protocol: [{"budget", "mAP", "sigma", "n"}, ...] by budget}, from real-only rows with a budget and mAP.

    Budget 0 is added as mAP 0 (no training, no detections) unless a row measured it.
    """
    by_protocol: dict[str, dict[int, list[Mapping[str, Any]]]] = {}
    for row in rows:
        if row["dataset_role"] == REAL_ONLY and row["real_budget"] is not None and row["map"] is not None:
            by_protocol.setdefault(row["protocol"], {}).setdefault(int(row["real_budget"]), []).append(row)
    curves = {}
    for protocol, budgets in by_protocol.items():
        points = []
        for budget, group in sorted(budgets.items()):
            values = [float(r["map"]) for r in group]
            num_gt = group[0]["num_gt"]
            points.append({"budget": budget, "mAP": float(np.mean(values)), "sigma": standard_error(values, num_gt),
                           "n": len(values)})
        if points[0]["budget"] != 0:
            points.insert(0, {"budget": 0, "mAP": 0.0, "sigma": 0.0, "n": 0})
        curves[protocol] = points
    return curves


# --- the table -------------------------------------------------------------------------------------------


def run_root_of(metrics_uri: str | None) -> str | None:
    """`<output_root>/<dag>/<run>` of a DAG's evaluation output `<run root>/eval/...`, else None."""
    if not metrics_uri or "/eval/" not in metrics_uri:
        return None
    return metrics_uri.rsplit("/eval/", 1)[0]


def links(row: Mapping[str, Any], airflow_url: str | None = None, tensorboard_url: str | None = None
          ) -> dict[str, str | None]:
    """The result record, its Airflow run and its TensorBoard logs, where they can be told."""
    from urllib.parse import quote

    run_root = run_root_of(row.get("metrics_uri"))
    tensorboard = None
    if run_root:
        if tensorboard_url:
            parts = run_root.rstrip("/").split("/")
            tensorboard = f"{tensorboard_url.rstrip('/')}/?runFilter={quote('/'.join(parts[-2:]), safe='')}#timeseries"
        else:
            tensorboard = f"{run_root}/tensorboard"
    run_link = None
    if airflow_url and row.get("run_id"):
        run_link = f"{airflow_url.rstrip('/')}/dags/{quote(row['recipe'], safe='')}/runs/{quote(row['run_id'], safe='')}"
    return {"link": row.get("result_uri"), "run_link": run_link, "tensorboard": tensorboard}


def build_leaderboard(rows: Iterable[Mapping[str, Any]], *, recipe: str | None = None,
                      dataset_contains: str | None = None, budgets: Sequence[int] | None = None,
                      roles: Sequence[str] | None = None, include_stale: bool = False, sort: str = "real_equiv",
                      descending: bool = True, baseline: str | None = None, limit: int | None = None,
                      airflow_url: str | None = None, tensorboard_url: str | None = None) -> list[dict[str, Any]]:
    """Leaderboard entries (dicts with CSV_COLUMNS) of store rows (`ResultsStore.rows()`), filtered and sorted.

    `baseline` names a dataset (its URI, or a unique substring of it); ConfigError if none or several match.
    """
    if sort not in SORT_KEYS:
        raise ConfigError(f"leaderboard: sort key {sort!r} is unknown; expected one of {', '.join(SORT_KEYS)}")
    unknown = sorted(set(roles or ()) - set(ROLES))
    if unknown:
        raise ConfigError(f"leaderboard: role {unknown[0]!r} is unknown; expected one of {', '.join(ROLES)}")
    rows = list(rows)
    curves = real_only_curves(r for r in rows if not r["stale"])
    entries = []
    for row in rows:
        if row["stale"] and not include_stale:
            continue
        if recipe is not None and row["recipe"] != recipe:
            continue
        if roles is not None and row["dataset_role"] not in roles:
            continue
        if dataset_contains and dataset_contains not in row["dataset"]:
            continue
        if budgets is not None and row["real_budget"] not in budgets:
            continue
        entries.append(_entry(row, airflow_url, tensorboard_url))
    _add_equivalents(entries, curves)
    if baseline is not None:
        _add_deltas(entries, _baseline_dataset(entries, baseline))
    present = [e for e in entries if e[sort] is not None]
    absent = [e for e in entries if e[sort] is None]
    present.sort(key=lambda e: (e[sort], e["mAP"] or 0.0), reverse=descending)
    ordered = present + absent
    return ordered[:limit] if limit is not None else ordered


def _entry(row: Mapping[str, Any], airflow_url: str | None, tensorboard_url: str | None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "dataset": row["dataset"], "role": row["dataset_role"], "recipe": row["recipe"],
        "real_budget": row["real_budget"], "seed": row["seed"],
        **{name: row[column] for name, column in METRIC_COLUMNS},
        "real_equiv": None, "real_equiv_low": None, "real_equiv_high": None,
        "delta_mAP": None, "delta_mAP50": None, "delta_mAR100": None, "delta_real_equiv": None,
        "when": row["updated_at"], "protocol": row["protocol"], "stale": bool(row["stale"]),
        "run_id": row.get("run_id"), "model_id": row["model_id"], "row_id": row["id"], "num_gt": row["num_gt"],
        **links(row, airflow_url, tensorboard_url),
    }
    if row["dataset_role"] == REAL_ONLY and row["real_budget"] is not None:
        entry["real_equiv"] = entry["real_equiv_low"] = entry["real_equiv_high"] = float(row["real_budget"])
    return entry


def _add_equivalents(entries: list[dict[str, Any]], curves: Mapping[str, list[dict[str, Any]]]) -> None:
    """The real-image equivalent of every entry off the real-only curve of its protocol, one batch per curve."""
    by_protocol: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        curve = curves.get(entry["protocol"])
        if entry["real_equiv"] is None and entry["mAP"] is not None and curve is not None and len(curve) > 1:
            by_protocol.setdefault(entry["protocol"], []).append(entry)
    for protocol, group in by_protocol.items():
        maps = [float(e["mAP"]) for e in group]
        sigmas = [standard_error([m], e["num_gt"]) for m, e in zip(maps, group, strict=True)]
        for entry, equiv in zip(group, real_image_equivalents(curves[protocol], maps, sigmas), strict=True):
            entry.update(real_equiv=equiv["value"], real_equiv_low=equiv["low"], real_equiv_high=equiv["high"])


def _baseline_dataset(entries: Sequence[Mapping[str, Any]], baseline: str) -> str:
    names = sorted({e["dataset"] for e in entries})
    if baseline in names:
        return baseline
    matches = [n for n in names if baseline in n]
    if len(matches) != 1:
        found = "none" if not matches else ", ".join(matches)
        raise ConfigError(f"leaderboard: --baseline {baseline!r} must name one dataset on the board; matches: {found}")
    return matches[0]


def _add_deltas(entries: list[dict[str, Any]], baseline: str) -> None:
    base = {(e["recipe"], e["protocol"], e["real_budget"]): e for e in entries if e["dataset"] == baseline}
    for entry in entries:
        ref = base.get((entry["recipe"], entry["protocol"], entry["real_budget"]))
        if ref is None:
            continue
        for key in ("mAP", "mAP50", "mAR100", "real_equiv"):
            a, b = entry[key], ref[key]
            if a is not None and b is not None and math.isfinite(a) and math.isfinite(b):
                entry[f"delta_{key}"] = a - b


def dataset_curves(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """{dataset: {"role", "protocol", "points": [{"budget", "mAP", "mAP50", "n"}]}} of current rows, for plots.

    `role` is what the dataset is (synthetic, model or real); points at one budget are averaged (several
    seeds or models). A dataset scored under several protocols is drawn under the one with most rows.
    """
    groups: dict[str, dict[str, dict[int, list[Mapping[str, Any]]]]] = {}
    for row in rows:
        if row["stale"] or row["real_budget"] is None or row["map"] is None:
            continue
        groups.setdefault(row["dataset"], {}).setdefault(row["protocol"], {}).setdefault(
            int(row["real_budget"]), []).append(row)
    curves: dict[str, dict[str, Any]] = {}
    for dataset, by_protocol in groups.items():
        protocol, budgets = max(by_protocol.items(), key=lambda item: sum(map(len, item[1].values())))
        first = next(iter(budgets.values()))[0]
        points = [{"budget": budget, "mAP": float(np.mean([r["map"] for r in group])),
                   "mAP50": _mean_or_none([r["map50"] for r in group]), "n": len(group)}
                  for budget, group in sorted(budgets.items())]
        curves[dataset] = {"role": first["dataset_role"].split("+")[0], "protocol": protocol, "points": points}
    return curves


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


# --- output ----------------------------------------------------------------------------------------------


def format_equiv(entry: Mapping[str, Any]) -> str:
    value = entry["real_equiv"]
    if value is None:
        return ""
    if math.isinf(value):
        return "> max"
    low, high = entry["real_equiv_low"], entry["real_equiv_high"]
    if low == high:
        return f"{value:.0f}"
    high_text = "inf" if math.isinf(high) else f"{high:.0f}"
    return f"{value:.0f} [{low:.0f}-{high_text}]"


def _num(value: float | None, signed: bool = False) -> str:
    if value is None:
        return ""
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def printable(text: str) -> str:
    """`text` with control characters shown as `\\xNN`, so printing it cannot drive a terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def format_table(entries: Sequence[Mapping[str, Any]], with_deltas: bool = False) -> str:
    """A plain-text table for a terminal; one line per entry, no control characters from the data."""
    header = ["#", "dataset", "recipe", "real", "mAP", "mAP@.5", "mAR@100", "real-equiv [95%]"]
    if with_deltas:
        header += ["dmAP", "dmAP@.5", "dmAR@100"]
    header += ["when", "link"]
    lines = [header]
    for i, e in enumerate(entries, 1):
        line = [str(i), e["dataset"] + (" (stale)" if e["stale"] else ""), e["recipe"],
                "" if e["real_budget"] is None else str(e["real_budget"]),
                _num(e["mAP"]), _num(e["mAP50"]), _num(e["mAR100"]), format_equiv(e)]
        if with_deltas:
            line += [_num(e["delta_mAP"], True), _num(e["delta_mAP50"], True), _num(e["delta_mAR100"], True)]
        line += [(e["when"] or "")[:19].replace("T", " "), e["link"] or ""]
        lines.append([printable(cell) for cell in line])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in lines)


def jsonable(entry: Mapping[str, Any]) -> dict[str, Any]:
    # JSON has no infinity: an equivalent beyond the curve is written as null with "beyond_curve": true.
    out = dict(entry)
    for key in ("real_equiv", "real_equiv_low", "real_equiv_high"):
        if out[key] is not None and math.isinf(out[key]):
            out[key] = None
            out[f"{key}_beyond_curve"] = True
    return out


def to_json(entries: Sequence[Mapping[str, Any]]) -> str:
    return json.dumps([jsonable(e) for e in entries], indent=2, sort_keys=True) + "\n"


def to_csv(entries: Sequence[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for entry in entries:
        writer.writerow({k: _csv_cell(entry.get(k)) for k in CSV_COLUMNS})
    return buffer.getvalue()


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if not isinstance(value, str):
        return value  # numbers and booleans: a negative delta stays a number
    text = printable(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


