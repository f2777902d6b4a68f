"""The results store: publish writes rows, idempotent per key, stale protocols, concurrent publishes.

The records come from the real chain (`synthval evaluate --predictions` on a small COCO set, then
`synthval publish`), and PostgreSQL is a real server this module starts with the Debian package's
initdb/pg_ctl on loopback (skipped, with the reason, where the package is not installed).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_publish import write_coco

from synthval.cli import main
from synthval.results import default_url, open_store, redact_url

RECIPE = "evaluate_new_synthetic_datasets"


# --- fixtures ------------------------------------------------------------------------------------


def evaluate(tmp_path: Path, name: str, keep_labels: tuple[int, ...] = (1,), split: str = "all") -> str:
    """metrics.json of a detector that finds exactly the boxes of `keep_labels` on a 3-image COCO set."""
    data = tmp_path / "real"
    if not data.exists():
        write_coco(data)
    doc = json.loads((data / "annotations" / "instances.json").read_text())
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in doc["annotations"] if a["category_id"] in keep_labels]
    (tmp_path / f"{name}.json").write_text(json.dumps(results))
    out = tmp_path / "eval" / name
    assert main(["evaluate", "--predictions", str(tmp_path / f"{name}.json"), "--data", str(data),
                 "--split", split, "--out", str(out), "--xcom-file", str(tmp_path / f"{name}.xcom")]) == 0
    return str(out / "metrics.json")


def publish_args(metrics_uri: str, results: Path, dataset: str, budget: int | None = 0, run_id: str = "r1",
                 recipe: str = RECIPE) -> list[str]:
    args = ["publish", "--metrics", metrics_uri, "--results", str(results), "--recipe", recipe,
            "--run-id", run_id, "--dataset", f"synthetic={dataset}", "--dataset", "real=/data/real"]
    return args + (["--real-budget", str(budget)] if budget is not None else [])


@pytest.fixture
def metrics_uri(tmp_path):
    return evaluate(tmp_path, "soup")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


@pytest.fixture(scope="session")
def postgres_url():
    """A PostgreSQL server of its own on a loopback port (env SYNTHVAL_TEST_POSTGRES_URL: use that one)."""
    given = os.environ.get("SYNTHVAL_TEST_POSTGRES_URL")
    if given:
        yield given
        return
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL is not installed (no initdb/pg_ctl; .ci/run installs Debian's postgresql package)")
    # The server refuses to run as root: there it runs as the package's `postgres` user.
    as_user: list[str] = []
    folder = tempfile.mkdtemp(prefix="synthval-pg-")
    if os.geteuid() == 0:
        import pwd

        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run the server as")
        os.chown(folder, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = os.path.join(folder, "data"), _free_port()
    log_file = os.path.join(folder, "server.log")
    try:
        subprocess.run([*as_user, initdb, "-D", data, "-U", "synthval", "--auth=trust", "-E", "UTF8"],
                       check=True, capture_output=True, text=True)
        subprocess.run([*as_user, pg_ctl, "-D", data, "-l", log_file, "-w", "-t", "60", "-o",
                        f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c max_connections=60", "start"],
                       check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {exc.stderr or exc.stdout}")
    try:
        yield f"postgresql+psycopg://synthval@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", data, "-m", "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store' / 'results.db'}"
    url = request.getfixturevalue("postgres_url")
    store = open_store(url)  # one server per session: start each test from empty tables
    with store.engine.begin() as conn:
        conn.execute(store.results.delete())
        conn.execute(store.protocols.delete())
    return url


# --- tests ---------------------------------------------------------------------------------------


def test_publish_writes_one_row_per_key_and_a_rerun_updates_it(metrics_uri, tmp_path, db_url, monkeypatch):
    monkeypatch.setenv("SYNTHVAL_RESULTS_DB_URL", db_url)
    results = tmp_path / "results"
    assert main([*publish_args(metrics_uri, results, "/data/synth-a", run_id="scheduled__1"),
                 "--xcom-file", str(tmp_path / "x")]) == 0
    # A DAG re-run (another run id) and a task retry of the same evaluation: still one row.
    for run_id in ("scheduled__2", "scheduled__2"):
        assert main([*publish_args(metrics_uri, results, "/data/synth-a/", run_id=run_id),
                     "--xcom-file", str(tmp_path / "x")]) == 0
    store = open_store(db_url)
    rows = store.rows()
    assert len(rows) == 1
    row = rows[0]
    assert row["dataset"] == "/data/synth-a" and row["real_budget"] == 0 and row["run_id"] == "scheduled__2"
    assert row["map"] == pytest.approx(json.loads(Path(metrics_uri).read_text())["mAP"])
    assert row["record"]["recipe"] == RECIPE and not row["stale"]
    # Another budget and another dataset are other keys.
    for args in (publish_args(metrics_uri, results, "/data/synth-a", budget=76),
                 publish_args(metrics_uri, results, "/data/synth-b")):
        assert main([*args, "--xcom-file", str(tmp_path / "x")]) == 0
    assert store.count() == 3
    assert store.evaluated_datasets(RECIPE, row["protocol"], [0]) == {"/data/synth-a", "/data/synth-b"}
    assert store.evaluated_datasets(RECIPE, row["protocol"], [0, 76]) == {"/data/synth-a"}


def test_default_store_sits_beside_local_results(metrics_uri, tmp_path, monkeypatch):
    monkeypatch.delenv("SYNTHVAL_RESULTS_DB_URL", raising=False)
    results = tmp_path / "out" / "results"
    assert main([*publish_args(metrics_uri, results, "/data/synth-a"), "--xcom-file", str(tmp_path / "x")]) == 0
    assert default_url(str(results)) == f"sqlite:///{tmp_path / 'out' / 'results.db'}"
    assert open_store(default_url(str(results))).count() == 1
    assert all(p.suffix == ".json" for p in results.iterdir())  # the record folder keeps only records
    assert default_url("gs://bucket/results") == f"sqlite:///{Path.home() / '.synthval' / 'results.db'}"


def test_a_new_protocol_makes_old_rows_stale_not_gone(tmp_path, db_url, monkeypatch):
    monkeypatch.setenv("SYNTHVAL_RESULTS_DB_URL", db_url)
    store = open_store(db_url)
    old = evaluate(tmp_path, "old", split="all")
    assert main([*publish_args(old, tmp_path / "results", "/data/synth-a"), "--xcom-file", str(tmp_path / "x")]) == 0
    time.sleep(0.01)
    new = evaluate(tmp_path, "new", split="train")  # another test split: another protocol
    assert main([*publish_args(new, tmp_path / "results", "/data/synth-b"), "--xcom-file", str(tmp_path / "x")]) == 0
    rows = {r["dataset"]: r for r in store.rows()}
    assert rows["/data/synth-a"]["stale"] and not rows["/data/synth-b"]["stale"]
    assert rows["/data/synth-a"]["protocol"] != rows["/data/synth-b"]["protocol"]
    assert [r["dataset"] for r in store.rows(include_stale=False)] == ["/data/synth-b"]
    # A late publish of the old protocol lands, and is stale at once.
    assert main([*publish_args(old, tmp_path / "results", "/data/synth-c"), "--xcom-file", str(tmp_path / "x")]) == 0
    assert {r["dataset"]: r["stale"] for r in store.rows()}["/data/synth-c"] is True


def _publish_at_once(barrier, args: list[str]) -> None:
    barrier.wait(timeout=120)
    sys.exit(main(args))


def test_twenty_concurrent_publishes_all_land(metrics_uri, tmp_path, db_url, monkeypatch):
    import multiprocessing

    monkeypatch.setenv("SYNTHVAL_RESULTS_DB_URL", db_url)
    results = tmp_path / "results"
    # 20 processes, released together: 16 distinct keys, and 4 more publishes of key 0 racing on its row.
    ctx = multiprocessing.get_context("fork")  # children start with synthval imported: the race is the writes
    barrier = ctx.Barrier(20)
    procs = []
    for i in range(20):
        dataset = f"/data/synth-{i:02d}" if i < 16 else "/data/synth-00"
        args = [*publish_args(metrics_uri, results, dataset, run_id=f"run-{i}"), "--xcom-file",
                str(tmp_path / f"x{i}.json")]
        procs.append(ctx.Process(target=_publish_at_once, args=(barrier, args)))
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * 20
    store = open_store(db_url)
    rows = store.rows()
    assert len(rows) == 16
    assert sorted(r["dataset"] for r in rows) == [f"/data/synth-{i:02d}" for i in range(16)]
    assert all(r["map"] is not None for r in rows)


def test_bad_urls_and_records_fail_clearly(tmp_path):
    from synthval.errors import ConfigError
    from synthval.results import StoreError, row_from_record

    with pytest.raises(ConfigError, match="mysql"):
        open_store("mysql://user:secret@db/results")
    with pytest.raises(StoreError, match="protocol_fingerprint"):
        row_from_record({"record_id": "x", "recipe": "r", "datasets": {}, "metrics": {}, "created_at": "t"})
    assert "secret" not in redact_url("postgresql+psycopg://user:secret@db/results")
