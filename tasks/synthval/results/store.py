"""The results store: every published result record as one row of a SQL table (SQLAlchemy).

Why a table beside the record files: the leaderboard, discovery and the Airflow plugin ask questions
across all results ("which datasets have a result on this benchmark?", "the best mAP per budget"),
which a folder of JSON files answers only by reading every file.

One row per (model, protocol) (`synthval_model_results`): the model by content (synthval.results.identity),
the protocol by what was measured (synthval.scoring.protocol). A task retry, a cleared DAG run or a second
publish of the same evaluation updates its row (`INSERT ... ON CONFLICT DO UPDATE`, on SQLite and
PostgreSQL alike); two checkpoints are two rows whatever their run, dataset or budget. A publish that
knows less about a model than its row (a trained checkpoint published again as a given `model` by
evaluate_the_model) does not erase what the row knows of its training. A row keeps the whole record
as JSON, plus the columns queries sort and filter on.

Stale rows: the table `synthval_benchmarks` remembers since when each benchmark (test set content and
metric protocol) of a recipe is current; the one made current last is the recipe's *current*
benchmark, and its rows on older benchmarks are *stale*: kept and shown on request, never deleted or
overwritten, because they were right for the test set of their day.

Schema versions (`synthval_meta`): 2 is this layout. A store written by synthval 0.1.0 (schema 1:
`synthval_results` keyed by (dataset, protocol, recipe, real_budget, seed), protocols by test set
path) is upgraded when first opened, in one transaction under a lock (SQLite `BEGIN IMMEDIATE`, a
PostgreSQL advisory lock): each old row becomes a row of its own (its model is unknown, so its old key
stands in for it), roles are re-derived from its record, and its protocols become benchmarks. The old
tables stay as they were, as a backup, and refuse further writes, so an old publisher left running fails
loudly instead of writing where nobody reads. A store newer than this synthval is refused.

Concurrency: PostgreSQL serialises the upserts itself. SQLite runs in WAL mode with a busy timeout,
writes take the write lock when they begin, and a write that still finds the database locked is
retried with backoff, so 20 publishes at once all land.

URLs: SQLAlchemy URLs (`sqlite:////abs/path/results.db`, `postgresql+psycopg://user@host/db`;
`postgresql://` and `postgres://` use psycopg 3 too, the driver synthval ships). `default_url` picks a
SQLite file beside a local results folder (`results` -> `results.db`) or `~/.synthval/results.db`.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

from synthval.errors import ConfigError, SynthvalError
from synthval.io import storage
from synthval.results.identity import ROLES, model_role, normalize_uri
from synthval.scoring.protocol import sha256_of

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
RESULTS_TABLE = "synthval_model_results"
BENCHMARKS_TABLE = "synthval_benchmarks"
META_TABLE = "synthval_meta"
V1_RESULTS_TABLE, V1_PROTOCOLS_TABLE = "synthval_results", "synthval_protocols"
KEY_COLUMNS = ("model_id", "protocol")
SQLITE_BUSY_TIMEOUT_S = 30
WRITE_ATTEMPTS = 8
DB_FILE = "results.db"
_PG_SCHEMA_LOCK = 7_301_952_041  # pg_advisory_xact_lock key: one schema change at a time

T = TypeVar("T")


class StoreError(SynthvalError):
    """The results database cannot be opened or written, or a record lacks a field the store needs."""

    exit_code = 1


def default_url(results_uri: str | None = None) -> str:
    """SQLite file beside a local results folder (`<folder>.db`, the folder keeps only records), else ~/.synthval."""
    if results_uri and storage.is_local(results_uri):
        return f"sqlite:///{storage.local_path(results_uri).rstrip(os.sep)}.db"
    return f"sqlite:///{os.path.join(os.path.expanduser('~'), '.synthval', DB_FILE)}"


def redact_url(url: str) -> str:
    """The URL with any password hidden, for logs and error messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is reported without its text
        return "<unparsable database URL>"


def _tables():
    import sqlalchemy as sa

    metadata = sa.MetaData()
    results = sa.Table(
        RESULTS_TABLE, metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("model_id", sa.String(64), nullable=False),
        sa.Column("protocol", sa.String(64), nullable=False),
        sa.Column("benchmark", sa.String(64), nullable=False, index=True),
        sa.Column("dataset", sa.String(2048), nullable=False),
        sa.Column("dataset_role", sa.String(32), nullable=False),
        sa.Column("recipe", sa.String(256), nullable=False, index=True),
        sa.Column("real_budget", sa.Integer),
        sa.Column("seed", sa.Integer),
        sa.Column("num_gt", sa.Integer),
        sa.Column("record_id", sa.String(128), nullable=False),
        sa.Column("schema_version", sa.Integer, nullable=False),
        sa.Column("run_id", sa.String(512)),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("updated_at", sa.String(40), nullable=False),
        sa.Column("result_uri", sa.Text),
        sa.Column("metrics_uri", sa.Text),
        sa.Column("checkpoint_uri", sa.Text),
        sa.Column("report_uri", sa.Text),
        sa.Column("map", sa.Float),
        sa.Column("map50", sa.Float),
        sa.Column("mar100", sa.Float),
        sa.Column("record", sa.Text, nullable=False),
        sa.UniqueConstraint(*KEY_COLUMNS, name="uq_synthval_model_results_key"),
    )
    benchmarks = sa.Table(
        BENCHMARKS_TABLE, metadata,
        sa.Column("recipe", sa.String(256), primary_key=True),
        sa.Column("benchmark", sa.String(64), primary_key=True),
        sa.Column("current_since", sa.String(40), nullable=False),
        sa.Column("description", sa.Text),
    )
    meta = sa.Table(
        META_TABLE, metadata,
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    return metadata, results, benchmarks, meta


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def row_from_record(record: Mapping[str, Any], result_uri: str | None = None) -> dict[str, Any]:
    """The table row of a result record (synthval.steps.publish, schema 2); StoreError names a missing field."""
    for key in ("record_id", "recipe", "model", "protocol_fingerprint", "benchmark_fingerprint", "metrics",
                "created_at"):
        if key not in record:
            raise StoreError(f"result record {record.get('record_id', '?')}: missing field {key!r}")
    model = record["model"] or {}
    for key in ("id", "role", "dataset"):
        if not model.get(key):
            raise StoreError(f"result record {record['record_id']}: missing field 'model.{key}'")
    if model["role"] not in ROLES:
        raise StoreError(f"result record {record['record_id']}: model.role {model['role']!r} is not one of "
                         f"{', '.join(ROLES)}")
    return {
        "model_id": model["id"],
        "protocol": record["protocol_fingerprint"],
        "benchmark": record["benchmark_fingerprint"],
        "dataset": model["dataset"],
        "dataset_role": model["role"],
        **_common_columns(record, result_uri),
    }


def _common_columns(record: Mapping[str, Any], result_uri: str | None) -> dict[str, Any]:
    train_config = (record.get("checkpoint") or {}).get("config") or {}
    seed = train_config.get("seed") if isinstance(train_config, dict) else None
    metrics = record["metrics"] or {}
    return {
        "recipe": record["recipe"],
        "real_budget": _int_or_none(record.get("real_budget")),
        "seed": _int_or_none(seed),
        "num_gt": _int_or_none(record.get("num_gt")),
        "record_id": record["record_id"],
        "schema_version": int(record.get("schema_version") or 1),
        "run_id": record.get("run_id"),
        "created_at": record["created_at"],
        "result_uri": result_uri or record.get("result_uri"),
        "metrics_uri": (record.get("evaluation") or {}).get("metrics_uri"),
        "checkpoint_uri": record.get("checkpoint_uri"),
        "report_uri": record.get("report_uri"),
        "map": metrics.get("mAP"),
        "map50": metrics.get("mAP50"),
        "mar100": metrics.get("mAR100"),
        "record": json.dumps(record, sort_keys=True),
    }


def row_from_v1(old: Mapping[str, Any]) -> dict[str, Any]:
    """The schema-2 row of a schema-1 row: its old key stands in for the unknown model, its protocol
    (of the test set's path) for the benchmark; the role is derived again from its record."""
    record = json.loads(old["record"])
    datasets = {k: v for k, v in (record.get("datasets") or {}).items() if k in ("synthetic", "real", "model") and v}
    budget = _int_or_none(record.get("real_budget"))
    if budget and not datasets.get("real"):
        budget = None
    role, dataset = model_role(datasets, budget)
    if role == "real" and record.get("recipe") == "train_on_synthetic_and_real_dataset":
        role = "model+real"  # schema 1 stored fine-tunes of a given checkpoint without the checkpoint
    if dataset is None:
        dataset = normalize_uri(record.get("checkpoint_uri") or old["dataset"])
    key = {k: old[k] for k in ("dataset", "protocol", "recipe", "real_budget", "seed")}
    row = {
        "model_id": sha256_of({"schema-1 row": key}),
        "protocol": old["protocol"],
        "benchmark": old["protocol"],
        "dataset": dataset,
        "dataset_role": role,
        **_common_columns(record, old["result_uri"]),
        "created_at": old["created_at"],
        "updated_at": old["updated_at"],
    }
    row["record"] = old["record"]
    return row


def _is_locked(exc: Exception) -> bool:
    text = str(getattr(exc, "orig", exc)).lower()
    return "database is locked" in text or "database is busy" in text or "deadlock detected" in text


def _engine_url(url: str) -> Any:
    import sqlalchemy as sa

    try:
        sa_url = sa.engine.make_url(url)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy raises ArgumentError and ValueError
        raise ConfigError(f"results database URL {redact_url(url)!r} is not a SQLAlchemy URL: {exc}") from None
    if sa_url.drivername in ("postgresql", "postgres"):
        sa_url = sa_url.set(drivername="postgresql+psycopg")  # the driver synthval installs
    return sa_url


class ResultsStore:
    """One database of results; `open_store(url)` returns a shared instance per URL and process."""

    def __init__(self, url: str) -> None:
        import sqlalchemy as sa

        self.url = url
        self._metadata, self.results, self.benchmarks, self.meta = _tables()
        sa_url = _engine_url(url)
        self.dialect = sa_url.get_backend_name()
        if self.dialect == "sqlite":
            database = sa_url.database or ""
            if database and database != ":memory:":
                os.makedirs(os.path.dirname(os.path.abspath(database)), exist_ok=True)
            self.engine = sa.create_engine(sa_url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
            sa.event.listen(self.engine, "connect", _sqlite_connect)
            sa.event.listen(self.engine, "begin", _sqlite_begin)
        elif self.dialect == "postgresql":
            self.engine = sa.create_engine(sa_url, pool_pre_ping=True)
        else:
            raise ConfigError(f"results database {redact_url(url)}: dialect {self.dialect!r} is not supported; "
                              "use sqlite:/// or postgresql+psycopg://")
        self._retry(self._prepare_schema, "create or upgrade the tables")

    # --- schema ---------------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[Any]:
        """A connection in a transaction that holds the write lock from its start (SQLite)."""
        with self.engine.connect().execution_options(synthval_write=True) as conn, conn.begin():
            yield conn

    def schema_version(self, conn: Any) -> int:
        """The store's schema version: 0 for an empty database, 1 for synthval 0.1.0's tables."""
        import sqlalchemy as sa

        inspector = sa.inspect(conn)
        if inspector.has_table(META_TABLE):
            value = conn.execute(sa.select(self.meta.c.value).where(self.meta.c.key == "schema_version")).scalar()
            if value is not None:
                return int(value)
        return 1 if inspector.has_table(V1_RESULTS_TABLE) else 0

    def _prepare_schema(self) -> None:
        with self.engine.connect() as conn:
            version = self.schema_version(conn)
        if version == SCHEMA_VERSION:
            return
        with self._write() as conn:
            if self.dialect == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_SCHEMA_LOCK})")
            version = self.schema_version(conn)  # another process may have done it while we waited
            if version > SCHEMA_VERSION:
                raise StoreError(f"{redact_url(self.url)}: the results store has schema version {version}; this "
                                 f"synthval reads up to {SCHEMA_VERSION}: upgrade synthval")
            if version == SCHEMA_VERSION:
                return
            self._metadata.create_all(conn)
            if version == 1:
                self._upgrade_from_v1(conn)
            conn.execute(self._upsert_stmt(self.meta, {"key": "schema_version", "value": str(SCHEMA_VERSION)},
                                           ["key"]))

    def _upgrade_from_v1(self, conn: Any) -> None:
        import sqlalchemy as sa

        old_results = sa.Table(V1_RESULTS_TABLE, sa.MetaData(), autoload_with=conn)
        rows = [row_from_v1(r._mapping) for r in conn.execute(sa.select(old_results).order_by(old_results.c.id))]
        if rows:
            conn.execute(sa.insert(self.results), rows)
        if sa.inspect(conn).has_table(V1_PROTOCOLS_TABLE):
            old_protocols = sa.Table(V1_PROTOCOLS_TABLE, sa.MetaData(), autoload_with=conn)
            benchmarks = [{"recipe": r.recipe, "benchmark": r.protocol, "current_since": r.current_since,
                           "description": r.description} for r in conn.execute(sa.select(old_protocols))]
            if benchmarks:
                conn.execute(sa.insert(self.benchmarks), benchmarks)
        for table in (V1_RESULTS_TABLE, V1_PROTOCOLS_TABLE):
            if sa.inspect(conn).has_table(table):
                self._retire(conn, table)
        log.info("results store %s: upgraded from schema 1 to %d (%d rows); the schema-1 tables %s and %s are "
                 "kept read-only as a backup", redact_url(self.url), SCHEMA_VERSION, len(rows), V1_RESULTS_TABLE,
                 V1_PROTOCOLS_TABLE)

    def _retire(self, conn: Any, table: str) -> None:
        """Make a schema-1 table refuse writes, naming why, so an old publisher fails instead of writing unseen."""
        message = f"{table} was replaced by {RESULTS_TABLE} (results store schema {SCHEMA_VERSION}): upgrade synthval"
        if self.dialect == "sqlite":
            for event in ("INSERT", "UPDATE"):
                conn.exec_driver_sql(f"CREATE TRIGGER {table}_retired_{event.lower()} BEFORE {event} ON {table} "
                                     f"BEGIN SELECT RAISE(ABORT, '{message}'); END")
            return
        conn.exec_driver_sql(f"CREATE OR REPLACE FUNCTION {table}_retired() RETURNS trigger LANGUAGE plpgsql AS "
                             f"$$ BEGIN RAISE EXCEPTION '{message}'; END $$")
        conn.exec_driver_sql(f"CREATE TRIGGER {table}_retired BEFORE INSERT OR UPDATE ON {table} "
                             f"FOR EACH ROW EXECUTE FUNCTION {table}_retired()")

    def _retry(self, fn: Callable[[], T], what: str) -> T:
        import sqlalchemy as sa

        delay = 0.05
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                return fn()
            except sa.exc.OperationalError as exc:
                if not _is_locked(exc) or attempt == WRITE_ATTEMPTS:
                    raise StoreError(f"{redact_url(self.url)}: cannot {what}: {exc.orig}") from exc
                log.info("%s: database busy, retrying in %.2f s (attempt %d of %d)",
                         what, delay, attempt, WRITE_ATTEMPTS)
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 2.0)
            except sa.exc.DBAPIError as exc:
                raise StoreError(f"{redact_url(self.url)}: cannot {what}: {exc.orig}") from exc
        raise AssertionError("unreachable")

    def _upsert_stmt(self, table: Any, values: Mapping[str, Any], keys: list[str], *, update: bool = True,
                     where: Callable[[Any], Any] | None = None) -> Any:
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        stmt = insert(table).values(**values)
        if not update:
            return stmt.on_conflict_do_nothing(index_elements=keys)
        changes = {k: stmt.excluded[k] for k in values if k not in keys}
        return stmt.on_conflict_do_update(index_elements=keys, set_=changes,
                                          where=where(stmt) if where is not None else None)

    # --- writes ---------------------------------------------------------------------------------

    def register_benchmark(self, recipe: str, benchmark: str, description: Mapping[str, Any] | None = None, *,
                           make_current: bool = False) -> bool:
        """Note that `recipe` evaluates on `benchmark`; True if it became current (older ones turn stale).

        A benchmark met for the first time becomes current. `make_current` (discovery, which knows the
        benchmark a DAG evaluates on now) also makes an earlier one current again; a late publish on an
        old benchmark does not.
        """

        def write() -> bool:
            values = {"recipe": recipe, "benchmark": benchmark, "current_since": _now(),
                      "description": json.dumps(description, sort_keys=True) if description else None}
            renew = make_current and self.current_benchmarks().get(recipe) != benchmark
            stmt = self._upsert_stmt(self.benchmarks, values, ["recipe", "benchmark"], update=renew)
            with self._write() as conn:
                return conn.execute(stmt).rowcount == 1

        changed = self._retry(write, "register a benchmark")
        if changed:
            log.info("recipe %s: benchmark %s is now current; results of this recipe on other benchmarks are "
                     "stale", recipe, benchmark[:12])
        return changed

    def upsert(self, record: Mapping[str, Any], result_uri: str | None = None) -> dict[str, Any]:
        """Insert the record's row, or update the row of the same (model, protocol); returns the row written."""
        row = row_from_record(record, result_uri)
        self.register_benchmark(row["recipe"], row["benchmark"], {"test_set": record.get("test_set"),
                                                                  "protocol": record.get("protocol")})
        row["updated_at"] = _now()

        def keeps_training_facts(stmt: Any) -> Any:
            # An update is skipped only when it would turn a trained model's row into a plain "model" row.
            return (stmt.excluded.dataset_role != "model") | (self.results.c.dataset_role == "model")

        def write() -> None:
            with self._write() as conn:
                conn.execute(self._upsert_stmt(self.results, row, list(KEY_COLUMNS), where=keeps_training_facts))

        self._retry(write, "write a result")
        log.info("results store %s: %s %s %s budget %s -> mAP %s", redact_url(self.url), row["recipe"],
                 row["dataset_role"], row["dataset"], row["real_budget"], row["map"])
        return row

    # --- reads ----------------------------------------------------------------------------------

    def current_benchmarks(self) -> dict[str, str]:
        """{recipe: its current benchmark}."""
        import sqlalchemy as sa

        query = sa.select(self.benchmarks.c.recipe, self.benchmarks.c.benchmark, self.benchmarks.c.current_since)
        current: dict[str, tuple[str, str]] = {}
        with self.engine.connect() as conn:
            for recipe, benchmark, since in conn.execute(query):
                if recipe not in current or (since, benchmark) > current[recipe]:
                    current[recipe] = (since, benchmark)
        return {recipe: benchmark for recipe, (_, benchmark) in current.items()}

    def rows(self, *, recipe: str | None = None, protocol: str | None = None, benchmark: str | None = None,
             dataset_role: str | None = None, include_stale: bool = True, with_records: bool = True
             ) -> list[dict[str, Any]]:
        """Every row matching the filters, as dicts with `stale`, and `record` parsed (`with_records`) or
        left out."""
        import sqlalchemy as sa

        columns = [c for c in self.results.c if with_records or c.name != "record"]
        query = sa.select(*columns).order_by(self.results.c.id)
        for column, value in (("recipe", recipe), ("protocol", protocol), ("benchmark", benchmark),
                              ("dataset_role", dataset_role)):
            if value is not None:
                query = query.where(self.results.c[column] == value)
        current = self.current_benchmarks()
        with self.engine.connect() as conn:
            found = [dict(r._mapping) for r in conn.execute(query)]
        out = []
        for row in found:
            row["stale"] = current.get(row["recipe"], row["benchmark"]) != row["benchmark"]
            if row["stale"] and not include_stale:
                continue
            if with_records:
                row["record"] = json.loads(row["record"])
            out.append(row)
        return out

    def evaluated_datasets(self, recipe: str, benchmark: str, budgets: Iterable[int] = (0,)) -> set[str]:
        """Datasets with a row for every one of `budgets` under `recipe` on `benchmark`."""
        wanted = set(budgets)
        seen: dict[str, set[int]] = {}
        for row in self.rows(recipe=recipe, benchmark=benchmark, with_records=False):
            if row["real_budget"] is not None:
                seen.setdefault(row["dataset"], set()).add(row["real_budget"])
        return {dataset for dataset, have in seen.items() if wanted <= have}

    def count(self) -> int:
        import sqlalchemy as sa

        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(self.results)).scalar_one()

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    # SQLAlchemy, not the sqlite3 module, decides when a transaction begins (see _sqlite_begin).
    dbapi_conn.isolation_level = None
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sqlite_begin(conn: Any) -> None:
    # A write transaction takes the write lock at once (waiting up to the busy timeout), so it never
    # fails half-way when it turns from reading to writing; the schema upgrade needs the same.
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("synthval_write") else "BEGIN")


_STORES: dict[str, ResultsStore] = {}
_STORES_LOCK = threading.Lock()


def _forget_stores_in_child() -> None:
    # A forked child (Airflow's local executor, multiprocessing) must not share its parent's sockets.
    global _STORES_LOCK
    for store in _STORES.values():
        store.engine.dispose(close=False)
    _STORES.clear()
    _STORES_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_stores_in_child)


def open_store(url: str) -> ResultsStore:
    """The store at `url` (created with its tables, or upgraded, if needed), shared per process."""
    with _STORES_LOCK:
        if url not in _STORES:
            _STORES[url] = ResultsStore(url)
        return _STORES[url]
