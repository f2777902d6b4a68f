"""The Airflow plugin: the API server's own app (Airflow's auth manager, its plugins manager mounting our
app) serves the store's leaderboard only to authenticated users, with links a browser opens; and (slow) a
real `airflow api-server` answers 401 to the page as it does to /api/v2.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from ports import free_port
import test_dags  # noqa: F401 - throwaway AIRFLOW_HOME, plugins folder = plugins/
from test_dags import PYTHON_BIN, airflow_db  # noqa: F401 - airflow_db: the session's migrated Airflow DB
from test_leaderboard import store_url  # noqa: F401 - a store with a real-only curve and three datasets

from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager
from synthval.results.store import open_store

PREFIX = "/synthval-leaderboard"
PASSWORDS = {"viewer": "viewer-pw", "admin": "admin-pw"}
HIDDEN_RECIPE = "train_on_real_world_dataset"


class HidingAuthManager(SimpleAuthManager):
    """SimpleAuthManager, except that the viewer may not read the runs of one DAG (as FAB or Keycloak allow)."""

    def is_authorized_dag(self, *, method, user, access_entity=None, details=None) -> bool:
        if user.get_name() == "viewer" and details is not None and details.id == HIDDEN_RECIPE:
            return False
        return super().is_authorized_dag(method=method, user=user, access_entity=access_entity, details=details)


def auth_env(home: Path, auth_manager: str) -> dict[str, str]:
    passwords = home / "passwords.json"
    passwords.write_text(json.dumps(PASSWORDS))
    return {"AIRFLOW__CORE__AUTH_MANAGER": auth_manager,
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "viewer:viewer,admin:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__API_AUTH__JWT_SECRET": "test-only-secret-" + "x" * 64}


@pytest.fixture
def api(airflow_db, store_url, tmp_path, monkeypatch):  # noqa: F811
    """Airflow's API server app in-process, as `airflow api-server` builds it."""
    from airflow.api_fastapi.app import create_app, purge_cached_app
    from fastapi.testclient import TestClient

    for key, value in auth_env(tmp_path, f"{__name__}.HidingAuthManager").items():
        monkeypatch.setenv(key, value)
    purge_cached_app()
    try:
        with TestClient(create_app(), base_url="http://localhost") as client:
            yield client
    finally:
        purge_cached_app()


def token(client, user: str) -> dict[str, str]:
    answer = client.post("/auth/token", json={"username": user, "password": PASSWORDS[user]})
    assert answer.status_code == 201, answer.text
    return {"Authorization": f"Bearer {answer.json()['access_token']}"}


def test_no_token_no_leaderboard(api):
    """Every route of the plugin answers as /api/v2 does: 401 without a token, a login redirect for a browser."""
    assert api.get("/api/v2/dags").status_code == 401
    for path in ("/api/leaderboard", "/api/curves", "/records/1", "/reports/1", "/"):
        answer = api.get(PREFIX + path, follow_redirects=False)
        assert answer.status_code == 401, path
        assert "mAP" not in answer.text
    page = api.get(PREFIX + "/", headers={"Accept": "text/html"}, follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"].startswith("/auth/login?next=")
    forged = {"Authorization": "Bearer not-a-jwt"}
    assert api.get(PREFIX + "/api/leaderboard", headers=forged).status_code in (401, 403)
    # The UI's session cookie is a credential too, as for /api/v2.
    api.cookies.set("_token", token(api, "admin")["Authorization"].split()[1])
    assert api.get(PREFIX + "/api/leaderboard").status_code == 200


def test_api_returns_the_store_leaderboard(api, store_url):  # noqa: F811
    admin = token(api, "admin")
    answer = api.get(PREFIX + "/api/leaderboard", params={"role": ["synthetic", "synthetic+real"],
                                                          "baseline": "/data/synth-c"}, headers=admin)
    assert answer.status_code == 200
    entries = answer.json()
    rows = {(r["dataset"], r["real_budget"]): r for r in open_store(store_url).rows()
            if r["dataset_role"].startswith("synthetic")}
    assert {(e["dataset"], e["real_budget"]) for e in entries} == set(rows)
    # mAP 1.0 matches the real-only model of 40 images; mAP 0 matches none.
    assert [e["real_equiv"] for e in entries] == pytest.approx([40, 40, 10, 0])
    for e in entries:
        assert e["mAP"] == rows[(e["dataset"], e["real_budget"])]["map"]
    assert api.get(PREFIX + "/api/leaderboard", params={"sort": "speed"}, headers=admin).status_code == 400
    curves = api.get(PREFIX + "/api/curves", headers=admin).json()
    assert [p["budget"] for p in curves["datasets"]["/data/synth-a"]["points"]] == [0, 40]
    assert [p["budget"] for p in next(iter(curves["real_only"].values()))] == [0, 10, 40]


def test_every_link_opens_in_a_browser(api, store_url, tmp_path, monkeypatch):  # noqa: F811
    admin = token(api, "admin")
    entries = api.get(PREFIX + "/api/leaderboard", headers=admin).json()
    page = api.get(PREFIX + "/", params={"baseline": "synth-c"}, headers=admin)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "file://" not in page.text and "file://" not in json.dumps(entries)
    assert page.text.count("<svg") == 3  # one real-budget curve per synthetic dataset
    assert 'href="/dags/evaluate_new_synthetic_datasets/runs/r1"' in page.text
    assert "&Delta;mAP" in page.text and "+1.000" in page.text
    for entry in entries:
        record = api.get(entry["link"], headers=admin)  # served through the page, from the store
        assert record.status_code == 200 and record.json()["record_id"]
        assert record.json()["metrics"]["mAP"] == entry["mAP"]
        report = api.get(entry["report"], headers=admin)  # the run report publish wrote
        assert report.status_code == 200 and "<html" in report.text.lower()
        assert "sandbox" in report.headers["content-security-policy"]
        assert entry["tensorboard"] is None  # no TensorBoard server configured: no link to a folder
    assert api.get(PREFIX + "/records/99999", headers=admin).status_code == 404
    # With a TensorBoard server configured, its links.
    monkeypatch.setenv("SYNTHVAL_TENSORBOARD_URL", "http://tensorboard.example:6006")
    store = open_store(store_url)
    with store.engine.begin() as conn:  # as a DAG's evaluation would have it: <run root>/eval/...
        conn.execute(store.results.update().values(metrics_uri="/data/root/dag/run-1/eval/test/metrics.json"))
    entries = api.get(PREFIX + "/api/leaderboard", headers=admin).json()
    assert {e["tensorboard"] for e in entries} == {"http://tensorboard.example:6006/?runFilter=dag%2Frun-1#timeseries"}


def test_names_in_the_store_are_text_on_the_page(api, store_url):  # noqa: F811
    """The page comes from a Jinja2 template with autoescape: a dataset or run named like markup shows as
    that text, and runs no script and adds no element."""
    hostile = '/data/<script>alert(1)</script>"><img src=x onerror=alert(2)>'
    store = open_store(store_url)
    with store.engine.begin() as conn:
        conn.execute(store.results.update().where(store.results.c.dataset == "/data/synth-a").values(
            dataset=hostile, run_id='r1"><b>bold</b>'))
    page = api.get(PREFIX + "/", headers=token(api, "admin")).text
    assert "<script>" not in page and "<img" not in page and "<b>" not in page
    assert "/data/&lt;script&gt;alert(1)&lt;/script&gt;&#34;&gt;&lt;img src=x onerror=alert(2)&gt;" in page
    assert page.count("<svg") == 3 and page.count("<figcaption>") == 3


def test_users_see_only_recipes_whose_runs_they_may_read(api, store_url, tmp_path):  # noqa: F811
    from test_results import evaluate

    from synthval.cli import main

    metrics = evaluate(tmp_path, "hidden-model", keep_labels=(1, 2))
    assert main(["publish", "--metrics", metrics, "--results", str(tmp_path / "results"), "--recipe", HIDDEN_RECIPE,
                 "--dataset", "real=/data/real", "--real-budget", "40", "--xcom-file", str(tmp_path / "x")]) == 0
    hidden = next(r for r in open_store(store_url).rows() if r["recipe"] == HIDDEN_RECIPE)
    seen = {role: {e["recipe"] for e in api.get(PREFIX + "/api/leaderboard", params={"include_stale": True},
                                                 headers=token(api, role)).json()} for role in ("viewer", "admin")}
    assert HIDDEN_RECIPE in seen["admin"] and HIDDEN_RECIPE not in seen["viewer"]
    assert seen["viewer"] == seen["admin"] - {HIDDEN_RECIPE}
    assert api.get(f"{PREFIX}/records/{hidden['id']}", headers=token(api, "viewer")).status_code == 404
    assert api.get(f"{PREFIX}/records/{hidden['id']}", headers=token(api, "admin")).status_code == 200


def test_the_plugin_loads_through_airflows_plugins_manager():
    from airflow import plugins_manager

    apps, _ = plugins_manager.get_fastapi_plugins()
    assert not {k: v for k, v in plugins_manager.get_import_errors().items() if "synthval" in k}
    assert PREFIX in {a["url_prefix"] for a in apps}
    views, _ = plugins_manager._get_ui_plugins()
    assert any(v["href"] == PREFIX + "/" and v["destination"] == "nav" for v in views)


# --- a real api-server ------------------------------------------------------------------------------


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, dict[str, str]]:
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.build_opener(NoRedirect).open(request, timeout=30) as answer:
            return answer.status, answer.read().decode(), dict(answer.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)
    except urllib.error.URLError:  # not listening yet
        return 0, "", {}


@pytest.mark.slow
def test_a_real_api_server_guards_the_page_like_the_rest_api(airflow_db, store_url, tmp_path):  # noqa: F811
    port = free_port()
    env = dict(airflow_db, **auth_env(tmp_path, "airflow.api_fastapi.auth.managers.simple.simple_auth_manager."
                                                "SimpleAuthManager"),
               SYNTHVAL_RESULTS_DB_URL=store_url, AIRFLOW__API__BASE_URL=f"http://127.0.0.1:{port}")
    log = (tmp_path / "api-server.log").open("w")
    server = subprocess.Popen([str(PYTHON_BIN / "airflow"), "api-server", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while _get(base + "/api/v2/version")[0] != 200:
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "api-server.log").read_text()[-3000:]
            time.sleep(1)
        assert _get(base + "/api/v2/dags")[0] == 401
        status, body, _ = _get(base + PREFIX + "/api/leaderboard")
        assert status == 401 and "mAP" not in body
        status, _, headers = _get(base + PREFIX + "/", {"Accept": "text/html"})
        assert status == 303 and headers["location"].startswith("/auth/login?next=")
        request = urllib.request.Request(base + "/auth/token", method="POST", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"username": "viewer", "password": PASSWORDS["viewer"]}).encode())
        with urllib.request.urlopen(request, timeout=30) as answer:
            bearer = {"Authorization": "Bearer " + json.loads(answer.read())["access_token"]}
        assert _get(base + "/api/v2/dags", bearer)[0] == 200
        status, body, _ = _get(base + PREFIX + "/api/leaderboard", bearer)
        assert status == 200
        assert {e["dataset"] for e in json.loads(body)} == {r["dataset"] for r in open_store(store_url).rows()}
        status, body, _ = _get(base + PREFIX + "/", bearer)
        assert status == 200 and "/data/synth-a" in body and "file://" not in body
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)
        log.close()


def test_the_airflow_image_has_everything_the_plugin_imports():
    """The cluster's Airflow image installs pyproject's `airflow` extra and synthval without dependencies:
    every package the plugin's pages import must come from that extra (or what it pulls in), never torch."""
    import importlib.metadata as md
    import sys

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from test_dags import ROOT

    sys.path.insert(0, str(ROOT / "images"))
    from pyproject_deps import requirements

    code = ("import sys; before = set(sys.modules)\n"
            "import synthval.results.leaderboard, synthval.results.store, synthval.results.identity, synthval.io.storage, synthval.io.sources\n"
            "import sqlalchemy.dialects.postgresql, psycopg, gcsfs\n"
            "print(' '.join(sorted({m.split('.')[0] for m in set(sys.modules) - before})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    imported = {m for m in proc.stdout.split() if m not in sys.stdlib_module_names and not m.startswith("_")}
    assert "torch" not in imported and "torchvision" not in imported
    providers = md.packages_distributions()
    # Modules of no distribution (cython_runtime, mypyc's compiled helpers) come with the packages that made them.
    needed = {canonicalize_name(d) for m in imported for d in providers.get(m, [])} - {"synthval"}
    assert {"numpy", "sqlalchemy", "psycopg", "fsspec"} <= needed

    available: set[str] = set()
    todo = [Requirement(r) for r in requirements(ROOT / "pyproject.toml", "airflow")]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in available:
            continue
        available.add(name)
        try:
            requires = md.distribution(name).requires or []
        except md.PackageNotFoundError:
            continue
        for raw in requires:
            sub = Requirement(raw)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in req.extras | {""}):
                todo.append(sub)
    assert needed <= available, sorted(needed - available)
