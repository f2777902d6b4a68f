"""Airflow plugin: the synthval leaderboard as a page of the Airflow UI, behind Airflow's own login.

A FastAPI app mounted under the API server at `/synthval-leaderboard` serves the same table as
`synthval leaderboard` (plain HTML, the real-budget curves as inline SVG) and the same data as JSON
(`/api/leaderboard`, `/api/curves`). An `external_views` entry puts the page in the UI's Browse menu.

Authentication is the REST API's: the JWT of the `Authorization: Bearer` header, else the UI's session
cookie, checked by `airflow.api_fastapi.core_api.security.get_user` with the deployment's auth manager.
Without one the JSON answers 401 and the page sends the browser to the auth manager's login. A user
sees the results of the recipes (DAGs) whose runs they may read.

Every link opens in a browser: a result's record (`/records/<row>`) and its run report
(`/reports/<row>`, sandboxed) are served through this app from the store and the results storage, the
run is the Airflow UI's own page, and TensorBoard links go to the server `SYNTHVAL_TENSORBOARD_URL`
names (none without one: a log folder on a worker's disk opens nothing in a browser).

The store: env `SYNTHVAL_RESULTS_DB_URL`, else the Airflow connection `synthval_results_db` (its URI,
e.g. `postgresql+psycopg://user:pw@host/db`), else the DAGs' default `<SYNTHVAL_DATA_ROOT>/results.db`.
synthval and Airflow's API security are imported only when a page is asked for, so a missing install
cannot break the API server and other Airflow processes do not pay for the import.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any
from urllib.parse import quote

from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

URL_PREFIX = "/synthval-leaderboard"
TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")
CONN_ID = "synthval_results_db"
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
# A run report is synthval's own self-contained HTML; served from the Airflow origin it still gets no
# script, no network and no cookies (a sandboxed, unique origin).
REPORT_POLICY = "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def store_url() -> str:
    """Where the results store is, by the order the module docstring gives."""
    url = os.environ.get("SYNTHVAL_RESULTS_DB_URL", "").strip()
    if url:
        return url
    try:
        from airflow.models.connection import Connection

        conn = Connection.get_connection_from_secrets(CONN_ID)
        return conn.get_uri().replace("postgres://", "postgresql+psycopg://", 1)
    except Exception:  # noqa: BLE001 - no such connection (AirflowNotFoundException) or no metadata DB
        pass
    from synthval.results.store import default_url

    root = os.environ.get("SYNTHVAL_DATA_ROOT", "").strip() or os.path.expanduser("~/synthval-data")
    return default_url(f"{root.rstrip('/')}/results")


_bearer = HTTPBearer(auto_error=False)


async def current_user(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Any:
    """The caller, authenticated exactly as `/api/v2` does it (bearer token, else the UI's cookie); 401 if none."""
    from airflow.api_fastapi.core_api.security import get_user

    return await get_user(request, None, credentials)


def may_read(user: Any, recipe: str) -> bool:
    """Whether the deployment's auth manager lets `user` read the runs of the DAG `recipe`."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails

    return get_auth_manager().is_authorized_dag(method="GET", access_entity=DagAccessEntity.RUN,
                                                details=DagDetails(id=recipe), user=user)


def readable_rows(user: Any) -> list[dict[str, Any]]:
    """The store's rows of the recipes whose DAG runs `user` may read."""
    from synthval.results.store import open_store

    rows = open_store(store_url()).rows(with_records=False)
    allowed = {recipe for recipe in {r["recipe"] for r in rows} if may_read(user, recipe)}
    return [r for r in rows if r["recipe"] in allowed]


def _board(user: Any, recipe: str | None, sort: str, baseline: str | None, include_stale: bool,
           role: list[str] | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from synthval.errors import SynthvalError
    from synthval.results.leaderboard import build_leaderboard

    rows = readable_rows(user)
    try:
        entries = build_leaderboard(rows, recipe=recipe, sort=sort, baseline=baseline, include_stale=include_stale,
                                    roles=role, tensorboard_url=os.environ.get("SYNTHVAL_TENSORBOARD_URL") or None)
    except SynthvalError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    by_id = {r["id"]: r for r in rows}
    for entry in entries:
        entry.update(browser_links(entry, by_id[entry["row_id"]]))
    return entries, rows


def browser_links(entry: dict[str, Any], row: dict[str, Any]) -> dict[str, str | None]:
    """The links of an entry, as a browser opens them: through this app, the Airflow UI, or a TensorBoard server."""
    tensorboard = entry.get("tensorboard")
    return {
        "link": f"{URL_PREFIX}/records/{row['id']}",
        "report": f"{URL_PREFIX}/reports/{row['id']}" if row.get("report_uri") else None,
        "run_link": (f"/dags/{quote(row['recipe'], safe='')}/runs/{quote(row['run_id'], safe='')}"
                     if row.get("run_id") else None),
        "tensorboard": tensorboard if tensorboard and tensorboard.startswith(("http://", "https://")) else None,
    }


app = FastAPI(title="synthval leaderboard", description=__doc__.split("\n\n")[0])


@app.exception_handler(HTTPException)
async def _login_first(request: Request, exc: HTTPException) -> Response:
    # A browser asking for the page is sent to the login; programs get the 401 the REST API gives.
    if exc.status_code == 401 and "text/html" in request.headers.get("accept", ""):
        from airflow.api_fastapi.app import get_auth_manager

        return RedirectResponse(get_auth_manager().get_url_login(next_url=str(request.url)), status_code=303)
    return await http_exception_handler(request, exc)


@app.get("/api/leaderboard")
def leaderboard_json(user: Any = Depends(current_user), recipe: str | None = None, sort: str = "real_equiv",
                     baseline: str | None = None, include_stale: bool = False,
                     role: list[str] | None = Query(None)) -> list[dict[str, Any]]:
    """The leaderboard entries, as `synthval leaderboard --format json` writes them, with browser links."""
    from synthval.results.leaderboard import jsonable

    entries, _ = _board(user, recipe, sort, baseline, include_stale, role)
    return [jsonable(e) for e in entries]


@app.get("/api/curves")
def curves_json(user: Any = Depends(current_user)) -> dict[str, Any]:
    """mAP by real budget per dataset (current benchmarks), and the real-only learning curves."""
    from synthval.results.leaderboard import dataset_curves, real_only_curves

    rows = [r for r in readable_rows(user) if not r["stale"]]
    return {"datasets": dataset_curves(rows), "real_only": real_only_curves(rows)}


def _row(user: Any, row_id: int) -> dict[str, Any]:
    from synthval.results.store import open_store

    store = open_store(store_url())
    with store.engine.connect() as conn:
        found = conn.execute(store.results.select().where(store.results.c.id == row_id)).mappings().first()
    if found is None or not may_read(user, found["recipe"]):
        raise HTTPException(status_code=404, detail=f"no result {row_id}")
    return dict(found)


@app.get("/records/{row_id}")
def record(row_id: int, user: Any = Depends(current_user)) -> Response:
    """The result record of one row, as published (JSON)."""
    return Response(_row(user, row_id)["record"], media_type="application/json")


@app.get("/reports/{row_id}", response_class=HTMLResponse)
def report(row_id: int, user: Any = Depends(current_user)) -> Response:
    """The run report of one row (synthval's self-contained HTML), read from where publish wrote it."""
    from synthval.io import storage
    from synthval.errors import SynthvalError

    uri = _row(user, row_id).get("report_uri")
    if not uri:
        raise HTTPException(status_code=404, detail=f"result {row_id} has no run report")
    try:
        text = storage.read_text(uri)
    except (SynthvalError, OSError) as exc:
        raise HTTPException(status_code=404, detail=f"the run report of result {row_id} cannot be read: {exc}") from None
    return HTMLResponse(text, headers={"Content-Security-Policy": REPORT_POLICY})


@app.get("/", response_class=HTMLResponse)
def page(user: Any = Depends(current_user), recipe: str | None = None, sort: str = "real_equiv",
         baseline: str | None = None, include_stale: bool = False) -> str:
    """The leaderboard page: the table, then the real-budget curve of each dataset."""
    from synthval.results.leaderboard import dataset_curves, format_equiv, real_only_curves

    entries, rows = _board(user, recipe, sort, baseline, include_stale, None)
    current = [r for r in rows if not r["stale"]]
    curves, real_only = dataset_curves(current), real_only_curves(current)
    return _html(entries, curves, real_only, baseline, format_equiv)


def _chart(dataset: str, points: list[dict[str, Any]], reference: list[dict[str, Any]] | None,
           color: str) -> dict[str, Any]:
    """Geometry of one dataset's mAP-by-real-images chart (log scale), over the real-only curve (grey)."""
    width, height, pad = 320, 180, 34
    series = list(points) + list(reference or [])
    top_budget = max([p["budget"] for p in series] + [1])
    top_map = max([p["mAP"] for p in series] + [0.05])

    def placed(p: dict[str, Any]) -> dict[str, Any]:
        x = pad + (width - 2 * pad) * math.log1p(p["budget"]) / math.log1p(top_budget)
        y = height - pad - (height - 2 * pad) * p["mAP"] / top_map
        return {"x": round(x, 1), "y": round(y, 1), "budget": p["budget"], "mAP": p["mAP"]}

    lines = [{"stroke": stroke, "points": [placed(p) for p in line]}
             for line, stroke in ((reference, "#999"), (points, color)) if line]
    return {"dataset": dataset, "width": width, "height": height, "pad": pad, "top_map": top_map, "lines": lines}


@functools.cache
def _templates() -> Any:
    """The page's template folder, loaded once per API server (Jinja2 keeps the parsed template)."""
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                              undefined=jinja2.StrictUndefined)


def _html(entries: list[dict[str, Any]], curves: dict[str, Any], real_only: dict[str, Any], baseline: str | None,
          format_equiv: Any) -> str:
    """The page, from templates/synthval_leaderboard.html (Jinja2, autoescaped: names are data)."""
    charts = [_chart(dataset, curve["points"], real_only.get(curve["protocol"]), COLORS[i % len(COLORS)])
              for i, (dataset, curve) in enumerate(sorted(curves.items())) if curve["role"] == "synthetic"]
    return _templates().get_template("synthval_leaderboard.html").render(
        entries=[{**e, "equivalent": format_equiv(e)} for e in entries], charts=charts, baseline=baseline)


class SynthvalLeaderboardPlugin(AirflowPlugin):
    name = "synthval_leaderboard"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "synthval leaderboard"}]
    external_views = [{"name": "Synthval leaderboard", "href": f"{URL_PREFIX}/", "destination": "nav",
                       "category": "browse", "url_route": "synthval-leaderboard"}]
