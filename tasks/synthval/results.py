"""The results store: every published result record as one row of a SQL table (SQLAlchemy).

Why a table beside the record files: the leaderboard, discovery and the Airflow plugin ask questions
across all results ("which datasets have a result for this protocol?", "the best mAP per budget"),
which a folder of JSON files answers only by reading every file.

One row per (dataset, protocol, recipe, real_budget, seed): a task retry or a DAG re-run updates its
row instead of adding one (`INSERT ... ON CONFLICT DO UPDATE`, on SQLite and PostgreSQL alike). A row
keeps the whole record as JSON, plus the columns queries sort and filter on.

Protocols: `protocol` is the record's `protocol_fingerprint` (test set and scoring, see
synthval.publish). The table `synthval_protocols` remembers since when each protocol of a recipe is current;
the one made current last is the recipe's *current* protocol, and rows of older protocols are *stale*: kept and
shown on request, never deleted or overwritten, because they were right for the test set of their day.

Concurrency: PostgreSQL serialises the upserts itself. SQLite runs in WAL mode with a busy timeout,
and a write that still finds the database locked is retried with backoff, so 20 publishes at once
all land.

URLs: SQLAlchemy URLs (`sqlite:////abs/path/results.db`, `postgresql+psycopg://user@host/db`).
`default_url` picks a SQLite file beside a local results folder (`results` -> `results.db`) or
`~/.synthval/results.db`.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from synthval import storage
from synthval.errors import ConfigError, SynthvalError

log = logging.getLogger(__name__)

RESULTS_TABLE = "synthval_results"
PROTOCOLS_TABLE = "synthval_protocols"
KEY_COLUMNS = ("dataset", "protocol", "recipe", "real_budget", "seed")
UNKNOWN_BUDGET = -1  # the record named no real budget; a key column cannot be NULL (NULLs never conflict)
SQLITE_BUSY_TIMEOUT_S = 30
WRITE_ATTEMPTS = 8
DB_FILE = "results.db"

T = TypeVar("T")


class StoreError(SynthvalError):
    """The results database cannot be opened or written, or a record lacks a field the store needs."""

    exit_code = 1


def default_url(results_uri: str | None = None) -> str:
    """SQLite file beside a local results folder (`<folder>.db`, the folder keeps only records), else ~/.synthval."""
    if results_uri and storage.is_local(results_uri):
        return f"sqlite:///{storage.local_path(results_uri).rstrip(os.sep)}.db"
    return f"sqlite:///{os.path.join(os.path.expanduser('~'), '.synthval', DB_FILE)}"


def normalize_uri(uri: str) -> str:
    """One spelling per dataset: local paths absolute, no trailing slash, gcs:// as gs://."""
    uri = uri.strip()
    if storage.is_local(uri):
        return storage.local_path(uri).rstrip(os.sep) or os.sep
    if uri.startswith("gcs://"):
        uri = "gs://" + uri[len("gcs://"):]
    return uri.rstrip("/")


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
        sa.Column("dataset", sa.String(2048), nullable=False),
        sa.Column("dataset_role", sa.String(32), nullable=False),
        sa.Column("protocol", sa.String(64), nullable=False),
        sa.Column("recipe", sa.String(256), nullable=False),
        sa.Column("real_budget", sa.Integer, nullable=False),
        sa.Column("seed", sa.Integer, nullable=False),
        sa.Column("record_id", sa.String(128), nullable=False),
        sa.Column("schema_version", sa.Integer, nullable=False),
        sa.Column("run_id", sa.String(512)),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("updated_at", sa.String(40), nullable=False),
        sa.Column("result_uri", sa.Text),
        sa.Column("metrics_uri", sa.Text),
        sa.Column("checkpoint_uri", sa.Text),
        sa.Column("map", sa.Float),
        sa.Column("map50", sa.Float),
        sa.Column("mar100", sa.Float),
        sa.Column("record", sa.Text, nullable=False),
        sa.UniqueConstraint(*KEY_COLUMNS, name="uq_synthval_results_key"),
    )
    protocols = sa.Table(
        PROTOCOLS_TABLE, metadata,
        sa.Column("recipe", sa.String(256), primary_key=True),
        sa.Column("protocol", sa.String(64), primary_key=True),
        sa.Column("current_since", sa.String(40), nullable=False),
        sa.Column("description", sa.Text),
    )
    return metadata, results, protocols


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


def row_from_record(record: Mapping[str, Any], result_uri: str | None = None) -> dict[str, Any]:
    """The table row of a result record (synthval.publish, schema 1); StoreError names a missing field."""
    for key in ("record_id", "recipe", "protocol_fingerprint", "datasets", "metrics", "created_at"):
        if key not in record:
            raise StoreError(f"result record {record.get('record_id', '?')}: missing field {key!r}")
    datasets = record["datasets"] or {}
    role = "synthetic" if datasets.get("synthetic") else "real" if datasets.get("real") else "model"
    dataset = datasets.get(role) or record.get("checkpoint_uri") or record["record_id"]
    budget = record.get("real_budget")
    train_config = ((record.get("checkpoint") or {}).get("config") or {})
    seed = train_config.get("seed") if isinstance(train_config, dict) else None
    metrics = record["metrics"] or {}
    evaluation = record.get("evaluation") or {}
    return {
        "dataset": normalize_uri(str(dataset)),
        "dataset_role": role,
        "protocol": record["protocol_fingerprint"],
        "recipe": record["recipe"],
        "real_budget": UNKNOWN_BUDGET if budget is None else int(budget),
        "seed": int(seed) if isinstance(seed, int) and not isinstance(seed, bool) else 0,
        "record_id": record["record_id"],
        "schema_version": int(record.get("schema_version") or 1),
        "run_id": record.get("run_id"),
        "created_at": record["created_at"],
        "result_uri": result_uri or record.get("result_uri"),
        "metrics_uri": evaluation.get("metrics_uri"),
        "checkpoint_uri": record.get("checkpoint_uri"),
        "map": metrics.get("mAP"),
        "map50": metrics.get("mAP50"),
        "mar100": metrics.get("mAR100"),
        "record": json.dumps(record, sort_keys=True),
    }


def _is_locked(exc: Exception) -> bool:
    text = str(getattr(exc, "orig", exc)).lower()
    return "database is locked" in text or "database is busy" in text or "deadlock detected" in text


class ResultsStore:
    """One database of results; `open_store(url)` returns a shared instance per URL and process."""

    def __init__(self, url: str) -> None:
        import sqlalchemy as sa

        self.url = url
        self._metadata, self.results, self.protocols = _tables()
        try:
            sa_url = sa.engine.make_url(url)
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy raises ArgumentError and ValueError
            raise ConfigError(f"results database URL {redact_url(url)!r} is not a SQLAlchemy URL: {exc}") from None
        self.dialect = sa_url.get_backend_name()
        if self.dialect == "sqlite":
            database = sa_url.database or ""
            if database and database != ":memory:":
                os.makedirs(os.path.dirname(os.path.abspath(database)), exist_ok=True)
            self.engine = sa.create_engine(sa_url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        elif self.dialect == "postgresql":
            self.engine = sa.create_engine(sa_url, pool_pre_ping=True)
        else:
            raise ConfigError(f"results database {redact_url(url)}: dialect {self.dialect!r} is not supported; "
                              "use sqlite:/// or postgresql+psycopg://")
        self._retry(self._create_tables, "create the tables")

    def _create_tables(self) -> None:
        import sqlalchemy as sa

        for _ in range(5):
            try:
                self._metadata.create_all(self.engine, checkfirst=True)
                return
            except (sa.exc.IntegrityError, sa.exc.ProgrammingError, sa.exc.OperationalError) as exc:
                # Another process created a table between our check and our CREATE: look again.
                if isinstance(exc, sa.exc.OperationalError) and "already exists" not in str(exc.orig):
                    raise
        raise StoreError(f"{redact_url(self.url)}: cannot create the tables {RESULTS_TABLE}, {PROTOCOLS_TABLE}")

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
        raise AssertionError("unreachable")

    def _insert(self, table):
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        return insert(table)

    # --- writes ---------------------------------------------------------------------------------

    def register_protocol(self, recipe: str, protocol: str, description: Mapping[str, Any] | None = None, *,
                          make_current: bool = False) -> bool:
        """Note that `recipe` evaluates under `protocol`; True if it became current (older ones turn stale).

        A protocol met for the first time becomes current. `make_current` (discovery, which knows the
        protocol a DAG evaluates under now) also makes an earlier one current again; a late publish of
        an old protocol does not.
        """

        def write() -> bool:
            stmt = self._insert(self.protocols).values(
                recipe=recipe, protocol=protocol, current_since=_now(),
                description=json.dumps(description, sort_keys=True) if description else None,
            )
            if make_current and self.current_protocols().get(recipe) != protocol:
                stmt = stmt.on_conflict_do_update(index_elements=["recipe", "protocol"],
                                                  set_={"current_since": stmt.excluded.current_since})
            else:
                stmt = stmt.on_conflict_do_nothing(index_elements=["recipe", "protocol"])
            with self.engine.begin() as conn:
                return conn.execute(stmt).rowcount == 1

        changed = self._retry(write, "register a protocol")
        if changed:
            log.info("recipe %s: protocol %s is now current; results of other protocols of this recipe are stale",
                     recipe, protocol[:12])
        return changed

    def upsert(self, record: Mapping[str, Any], result_uri: str | None = None) -> dict[str, Any]:
        """Insert the record's row, or update the row of the same key; returns the row as stored."""
        row = row_from_record(record, result_uri)
        self.register_protocol(row["recipe"], row["protocol"], {"test_set": record.get("test_set"),
                                                                "protocol": record.get("protocol")})
        row["updated_at"] = _now()

        def write() -> None:
            stmt = self._insert(self.results).values(**row)
            update = {k: stmt.excluded[k] for k in row if k not in KEY_COLUMNS}
            stmt = stmt.on_conflict_do_update(index_elements=list(KEY_COLUMNS), set_=update)
            with self.engine.begin() as conn:
                conn.execute(stmt)

        self._retry(write, "write a result")
        log.info("results store %s: %s %s budget %s seed %s -> mAP %s", redact_url(self.url), row["recipe"],
                 row["dataset"], row["real_budget"], row["seed"], row["map"])
        return row

    # --- reads ----------------------------------------------------------------------------------

    def current_protocols(self) -> dict[str, str]:
        """{recipe: its current protocol}."""
        import sqlalchemy as sa

        query = sa.select(self.protocols.c.recipe, self.protocols.c.protocol, self.protocols.c.current_since)
        current: dict[str, tuple[str, str]] = {}
        with self.engine.connect() as conn:
            for recipe, protocol, since in conn.execute(query):
                if recipe not in current or (since, protocol) > current[recipe]:
                    current[recipe] = (since, protocol)
        return {recipe: protocol for recipe, (_, protocol) in current.items()}

    def rows(self, *, recipe: str | None = None, protocol: str | None = None, dataset_role: str | None = None,
             include_stale: bool = True) -> list[dict[str, Any]]:
        """Every row matching the filters, as dicts with `record` parsed, `stale` and `real_budget` None if unknown."""
        import sqlalchemy as sa

        query = sa.select(self.results).order_by(self.results.c.id)
        for column, value in (("recipe", recipe), ("protocol", protocol), ("dataset_role", dataset_role)):
            if value is not None:
                query = query.where(self.results.c[column] == value)
        current = self.current_protocols()
        with self.engine.connect() as conn:
            found = [dict(r._mapping) for r in conn.execute(query)]
        out = []
        for row in found:
            row["stale"] = current.get(row["recipe"], row["protocol"]) != row["protocol"]
            if row["stale"] and not include_stale:
                continue
            row["record"] = json.loads(row["record"])
            if row["real_budget"] == UNKNOWN_BUDGET:
                row["real_budget"] = None
            out.append(row)
        return out

    def evaluated_datasets(self, recipe: str, protocol: str, budgets: Iterable[int] = (0,)) -> set[str]:
        """Datasets with a row for every one of `budgets` under `recipe` and `protocol`."""
        wanted = set(budgets)
        seen: dict[str, set[int]] = {}
        for row in self.rows(recipe=recipe, protocol=protocol):
            if row["real_budget"] is not None:
                seen.setdefault(row["dataset"], set()).add(row["real_budget"])
        return {dataset for dataset, have in seen.items() if wanted <= have}

    def count(self) -> int:
        import sqlalchemy as sa

        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(self.results)).scalar_one()

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


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
    """The store at `url` (created with its tables if missing), shared per process."""
    with _STORES_LOCK:
        if url not in _STORES:
            _STORES[url] = ResultsStore(url)
        return _STORES[url]
