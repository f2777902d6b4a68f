"""The results store: one row per (model, protocol), stale benchmarks, concurrent publishes, the upgrade
of a schema-1 store, on SQLite and PostgreSQL.

The records come from the real chain (`synthval evaluate --predictions` on a small COCO set, then
`synthval publish`): each results file is a model of its own (identified by its content). PostgreSQL is a
real server this module starts with the Debian package's initdb/pg_ctl on loopback (skipped, with the
reason, where the package is not installed).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from pathlib import Path

import pytest
from ports import free_port
from test_publish import write_coco

from synthval.cli import main
from synthval.results.store import SCHEMA_VERSION, StoreError, default_url, open_store, redact_url

RECIPE = "evaluate_new_synthetic_datasets"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


# --- fixtures ------------------------------------------------------------------------------------


def evaluate(tmp_path: Path, name: str, keep_labels: tuple[int, ...] = (1,), split: str = "all",
             data: Path | None = None) -> str:
    """metrics.json of a detector that finds exactly the boxes of `keep_labels` on a 3-image COCO set.

    Each `name` is a model of its own: its detections score a little differently (same ranking, same
    metrics), so its results file, and with it the model's identity, differs.
    """
    data = data or tmp_path / "real"
    if not data.exists():
        write_coco(data)
    doc = json.loads((data / "annotations" / "instances.json").read_text())
    score = 0.5 + (zlib.crc32(name.encode()) % 1000) / 10_000
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": score}
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


def publish(args: list[str], tmp_path: Path) -> dict:
    xcom = tmp_path / f"publish-{uuid.uuid4().hex[:8]}.json"
    assert main([*args, "--xcom-file", str(xcom)]) == 0
    return json.loads(xcom.read_text())


@pytest.fixture
def metrics_uri(tmp_path):
    return evaluate(tmp_path, "soup")


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
    data, port = os.path.join(folder, "data"), free_port()
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


def fresh_postgres_database(server_url: str) -> str:
    """A new, empty database on the session's PostgreSQL server."""
    import sqlalchemy as sa

    name = f"synthval_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    engine.dispose()
    return server_url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store' / 'results.db'}"
    return fresh_postgres_database(request.getfixturevalue("postgres_url"))


# --- one row per model and protocol ----------------------------------------------------------------


def test_a_row_is_one_model_on_one_protocol_whatever_the_run(tmp_path, db_url, monkeypatch):
    monkeypatch.setenv("SYNTHVAL_RESULTS_DB_URL", db_url)
    results = tmp_path / "results"
    model_a, model_b = evaluate(tmp_path, "model-a"), evaluate(tmp_path, "model-b")
    first = publish(publish_args(model_a, results, "/data/synth-a", run_id="scheduled__1"), tmp_path)
    # A cleared DAG run (another run id) and a task retry of the same evaluation: still one row.
    for run_id in ("scheduled__2", "scheduled__2"):
        again = publish(publish_args(model_a, results, "/data/synth-a/", run_id=run_id), tmp_path)
    store = open_store(db_url)
    rows = store.rows()
    assert len(rows) == 1 and again["model_id"] == first["model_id"]
    row = rows[0]
    assert row["dataset"] == "/data/synth-a" and row["real_budget"] == 0 and row["run_id"] == "scheduled__2"
    assert row["model_id"] == first["model_id"] and row["dataset_role"] == "synthetic" and not row["stale"]
    assert row["map"] == pytest.approx(json.loads(Path(model_a).read_text())["mAP"])
    assert len(list(results.iterdir())) == 2  # a record per run; the row is the model's
    # Another model with the very same dataset, budget, recipe and seed (schema 1's whole key): another row.
    other = publish(publish_args(model_b, results, "/data/synth-a", run_id="scheduled__3"), tmp_path)
    assert store.count() == 2
    assert {r["model_id"] for r in store.rows()} == {first["model_id"], other["model_id"]}
    model_c = evaluate(tmp_path, "model-c")
    publish(publish_args(model_c, results, "/data/synth-b"), tmp_path)
    assert store.evaluated_datasets(RECIPE, row["benchmark"], [0]) == {"/data/synth-a", "/data/synth-b"}
    assert store.evaluated_datasets(RECIPE, row["benchmark"], [0, 76]) == set()


def test_two_runs_fetching_the_same_test_set_into_their_own_folders_share_one_protocol(tmp_path, db_url,
                                                                                        monkeypatch):
    """The test set each DAG run fetches into its run folder is the same content: one protocol, every row current."""
    monkeypatch.setenv("SYNTHVAL_RESULTS_DB_URL", db_url)
    write_coco(tmp_path / "source")
    for run in ("manual__1", "manual__2"):
        folder = tmp_path / "runs" / run / "data" / "real"
        assert main(["fetch", str(tmp_path / "source"), "--out", str(folder), "--xcom-file", str(tmp_path / "f")]) == 0
        metrics = evaluate(tmp_path, f"model-{run}", data=folder)
        assert json.loads(Path(metrics).read_text())["test_set"]["data_uri"] == str(folder)
        publish(publish_args(metrics, tmp_path / "results", "/data/synth", run_id=run), tmp_path)
    rows = open_store(db_url).rows()
    assert len(rows) == 2 and len({r["protocol"] for r in rows}) == 1 and len({r["benchmark"] for r in rows}) == 1
    assert not any(r["stale"] for r in rows)


def test_default_store_sits_beside_local_results(metrics_uri, tmp_path, monkeypatch):
    monkeypatch.delenv("SYNTHVAL_RESULTS_DB_URL", raising=False)
    results = tmp_path / "out" / "results"
    publish(publish_args(metrics_uri, results, "/data/synth-a"), tmp_path)
    assert default_url(str(results)) == f"sqlite:///{tmp_path / 'out' / 'results.db'}"
    assert open_store(default_url(str(results))).count() == 1
    assert all(p.suffix == ".json" for p in results.iterdir())  # the record folder keeps only records
    assert default_url("gs://bucket/results") == f"sqlite:///{Path.home() / '.synthval' / 'results.db'}"


def test_a_changed_test_set_makes_old_rows_stale_not_gone(tmp_path, db_url, monkeypatch):
    monkeypatch.setenv("SYNTHVAL_RESULTS_DB_URL", db_url)
    store = open_store(db_url)
    old = evaluate(tmp_path, "old")
    publish(publish_args(old, tmp_path / "results", "/data/synth-a"), tmp_path)
    time.sleep(0.01)
    # The same folder with one box moved by a pixel: another test set.
    annotations = tmp_path / "real" / "annotations" / "instances.json"
    doc = json.loads(annotations.read_text())
    doc["annotations"][0]["bbox"][0] += 1
    annotations.write_text(json.dumps(doc))
    new = evaluate(tmp_path, "new")
    publish(publish_args(new, tmp_path / "results", "/data/synth-b"), tmp_path)
    rows = {r["dataset"]: r for r in store.rows()}
    assert rows["/data/synth-a"]["stale"] and not rows["/data/synth-b"]["stale"]
    assert rows["/data/synth-a"]["benchmark"] != rows["/data/synth-b"]["benchmark"]
    assert [r["dataset"] for r in store.rows(include_stale=False)] == ["/data/synth-b"]
    # A late publish on the old test set lands, and is stale at once.
    late = json.loads(Path(old).read_text())
    late["source_predictions_uri"] = str(tmp_path / "late.json")
    (tmp_path / "late.json").write_text("[]")
    (tmp_path / "late-metrics.json").write_text(json.dumps(late))
    publish(publish_args(str(tmp_path / "late-metrics.json"), tmp_path / "results", "/data/synth-c"), tmp_path)
    assert {r["dataset"]: r["stale"] for r in store.rows()}["/data/synth-c"] is True


def _publish_at_once(barrier, args: list[str]) -> None:
    barrier.wait(timeout=120)
    sys.exit(main(args))


def test_twenty_concurrent_publishes_all_land(metrics_uri, tmp_path, db_url, monkeypatch):
    import multiprocessing

    monkeypatch.setenv("SYNTHVAL_RESULTS_DB_URL", db_url)
    results = tmp_path / "results"
    metrics = json.loads(Path(metrics_uri).read_text())
    models = []
    for i in range(16):  # 16 models: the same evaluation, each of its own results file
        (tmp_path / f"model-{i}.json").write_text(" " * i + "[]")
        (tmp_path / f"metrics-{i}.json").write_text(json.dumps(
            {**metrics, "source_predictions_uri": str(tmp_path / f"model-{i}.json")}))
        models.append(str(tmp_path / f"metrics-{i}.json"))
    # 20 processes, released together: 16 models, and 4 more publishes of model 0 racing on its row.
    ctx = multiprocessing.get_context("fork")  # children start with synthval imported: the race is the writes
    barrier = ctx.Barrier(20)
    procs = []
    for i in range(20):
        args = [*publish_args(models[i % 16], results, f"/data/synth-{i % 16:02d}", run_id=f"run-{i}"),
                "--xcom-file", str(tmp_path / f"x{i}.json")]
        procs.append(ctx.Process(target=_publish_at_once, args=(barrier, args)))
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * 20
    rows = open_store(db_url).rows()
    assert len(rows) == 16
    assert sorted(r["dataset"] for r in rows) == [f"/data/synth-{i:02d}" for i in range(16)]
    assert all(r["map"] is not None for r in rows)


def test_bad_urls_and_records_fail_clearly(tmp_path):
    from synthval.errors import ConfigError
    from synthval.results.store import row_from_record

    with pytest.raises(ConfigError, match="mysql"):
        open_store("mysql://user:secret@db/results")
    with pytest.raises(StoreError, match="'model'"):
        row_from_record({"record_id": "x", "recipe": "r", "protocol_fingerprint": "p", "benchmark_fingerprint": "b",
                         "metrics": {}, "created_at": "t"})
    assert "secret" not in redact_url("postgresql+psycopg://user:secret@db/results")


# --- the upgrade of a schema-1 store -------------------------------------------------------------


def load_v1_store(db_url: str) -> None:
    """Restore the schema-1 store synthval 0.1.0 wrote (tests/fixtures/results-store-v1.*.sql)."""
    import sqlalchemy as sa

    if db_url.startswith("sqlite"):
        path = db_url.removeprefix("sqlite:///")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with sqlite3.connect(path) as conn:
            conn.executescript((FIXTURES / "results-store-v1.sqlite.sql").read_text())
        return
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        conn.exec_driver_sql((FIXTURES / "results-store-v1.postgresql.sql").read_text())
        conn.exec_driver_sql("SELECT pg_catalog.set_config('search_path', 'public', false)")
    engine.dispose()


def test_a_store_written_by_synthval_0_1_0_is_upgraded_in_place(tmp_path, db_url, monkeypatch):
    import sqlalchemy as sa

    load_v1_store(db_url)
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        old = {r.id: r for r in conn.execute(sa.text("SELECT * FROM synthval_results ORDER BY id"))}
    assert len(old) == 5

    store = open_store(db_url)
    with store.engine.connect() as conn:
        assert store.schema_version(conn) == SCHEMA_VERSION
    rows = {r["record_id"]: r for r in store.rows()}
    assert len(rows) == 5
    by_recipe = {}
    for row in rows.values():
        by_recipe.setdefault(row["recipe"], []).append(row)
        before = next(o for o in old.values() if o.record_id == row["record_id"])
        assert (row["map"], row["result_uri"], row["created_at"]) == (before.map, before.result_uri, before.created_at)
        assert row["record"] == json.loads(before.record)
    # Roles derived again: schema 1 put the fine-tune of a given checkpoint and evaluate_the_model's models in
    # the real-only curve ("real").
    roles = {r["recipe"]: (r["dataset_role"], r["dataset"], r["real_budget"]) for r in rows.values()}
    assert roles == {
        "train_on_synthdet_sample": ("synthetic", "/data/synth-a", 0),
        "train_on_real_world_dataset": ("real", "/data/real", 76),
        "train_on_synthetic_and_real_dataset": ("model+real", "/data/real", 76),
        "evaluate_the_model": ("model", "/models/other.pt", None),
        "evaluate_new_synthetic_datasets": ("synthetic", "/data/synth-b", 0),
    }
    assert len({r["model_id"] for r in rows.values()}) == 5
    assert not any(r["stale"] for r in rows.values())  # each recipe's protocol is still its current benchmark

    # The old tables stay as they were, and refuse the writes of a synthval 0.1.0 left running.
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM synthval_results")).scalar_one() == 5
    with pytest.raises(sa.exc.DBAPIError, match="replaced by synthval_model_results"), engine.begin() as conn:
        conn.execute(sa.text("UPDATE synthval_results SET map = 0"))
    engine.dispose()

    # New publishes land beside the upgraded rows; the recipe's new benchmark (content) makes its old row stale.
    monkeypatch.setenv("SYNTHVAL_RESULTS_DB_URL", db_url)
    metrics = evaluate(tmp_path, "after-upgrade")
    publish(publish_args(metrics, tmp_path / "results", "/data/synth-b"), tmp_path)
    after = store.rows()
    assert len(after) == 6
    stale = {r["record_id"]: r["stale"] for r in after if r["recipe"] == RECIPE}
    assert sorted(stale.values()) == [False, True]
    # Opening it again (another process) finds nothing to do.
    from synthval.results.store import ResultsStore

    assert ResultsStore(db_url).count() == 6


def test_a_store_newer_than_this_synthval_is_refused(tmp_path, capsys, monkeypatch):
    url = f"sqlite:///{tmp_path / 'results.db'}"
    store = open_store(url)
    with store.engine.begin() as conn:
        conn.execute(store.meta.update().values(value=str(SCHEMA_VERSION + 1)))
    from synthval.results.store import ResultsStore

    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}"):
        ResultsStore(url)
    monkeypatch.setenv("SYNTHVAL_RESULTS_DB_URL", url)
    metrics = evaluate(tmp_path, "m")
    monkeypatch.setattr("synthval.results.store._STORES", {})
    code = main([*publish_args(metrics, tmp_path / "results", "/data/s"), "--xcom-file", str(tmp_path / "x")])
    assert code == 1 and "upgrade synthval" in capsys.readouterr().err
