"""The Airflow plugin: Airflow's plugins manager loads it, and its FastAPI app serves the store's leaderboard."""

from __future__ import annotations

import pytest
import test_dags  # noqa: F401 - throwaway AIRFLOW_HOME, plugins folder = plugins/
from test_leaderboard import store_url  # noqa: F401 - a store with a real-only curve and three datasets

from synthval.results import open_store


@pytest.fixture
def client(store_url):  # noqa: F811
    from airflow import plugins_manager
    from fastapi.testclient import TestClient

    apps, _ = plugins_manager.get_fastapi_plugins()
    assert not {k: v for k, v in plugins_manager.get_import_errors().items() if "synthval" in k}
    mounted = {a["url_prefix"]: a for a in apps}
    assert "/synthval-leaderboard" in mounted
    views, _ = plugins_manager._get_ui_plugins()
    assert any(v["href"] == "/synthval-leaderboard/" and v["destination"] == "nav" for v in views)
    return TestClient(mounted["/synthval-leaderboard"]["app"])


def test_api_returns_the_store_leaderboard(client, store_url):  # noqa: F811
    answer = client.get("/api/leaderboard", params={"role": "synthetic", "baseline": "/data/synth-c"})
    assert answer.status_code == 200
    entries = answer.json()
    rows = {(r["dataset"], r["real_budget"]): r for r in open_store(store_url).rows(dataset_role="synthetic")}
    assert {(e["dataset"], e["real_budget"]) for e in entries} == set(rows)
    # mAP 1.0 matches the real-only model of 40 images; mAP 0 matches none.
    assert [e["real_equiv"] for e in entries] == pytest.approx([40, 40, 10, 0])
    for e in entries:
        assert e["mAP"] == rows[(e["dataset"], e["real_budget"])]["map"]
    assert client.get("/api/leaderboard", params={"sort": "speed"}).status_code == 400
    curves = client.get("/api/curves").json()
    assert [p["budget"] for p in curves["datasets"]["/data/synth-a"]["points"]] == [0, 40]
    assert [p["budget"] for p in next(iter(curves["real_only"].values()))] == [0, 10, 40]


def test_page_shows_table_curves_and_links(client):
    page = client.get("/", params={"baseline": "synth-c"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    text = page.text
    for dataset in ("/data/synth-a", "/data/synth-b", "/data/synth-c"):
        assert dataset in text
    assert text.count("<svg") == 3  # one real-budget curve per synthetic dataset
    assert 'href="/dags/evaluate_new_synthetic_datasets/runs/r1"' in text
    assert "&Delta;mAP" in text and "+1.000" in text
