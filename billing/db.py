"""The billing database (tenants, invoices, Stripe sync): short-lived connections, one unit
of work at a time across every process.

Embedded mode: the billing DuckDB file. DuckDB allows one read-write process per file, and the
webhook server, the nightly job and ad-hoc commands all write it. So nobody holds it open for
long: each unit of work opens it, commits, and closes; a process that finds it locked retries
with backoff up to ``METERING_LOCK_TIMEOUT`` seconds.

Cluster mode (``billing.catalog_db``): the same tables in schema ``pf_billing`` of the
catalog's PostgreSQL database, ATTACHed through DuckDB's postgres extension, so the same SQL
runs (DuckDB plans it; PostgreSQL stores the rows and enforces every PRIMARY KEY and UNIQUE
constraint, ``invoices.live_key`` among them). The file lock's part, one unit of work at a
time, is a PostgreSQL advisory lock (``BILLING_LOCK``) held on its own connection from before
the unit's first statement until it is closed, waited for up to ``METERING_LOCK_TIMEOUT``.

Modules register their DDL with ``register_schema``; it is written in DuckDB's dialect and
``for_backend`` adapts the few types PostgreSQL lacks.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import duckdb

from aggregator.files import retry_while_locked
from billing.model import INVOICES_SHOWN_SQL
from common.settings import Settings

_SCHEMA: list[str] = []
_TABLE_NAME = re.compile(r"CREATE TABLE IF NOT EXISTS (\w+)")
Migration = Callable[[duckdb.DuckDBPyConnection], None]
_MIGRATIONS: list[Migration] = []

Connect = Callable[[], AbstractContextManager[duckdb.DuckDBPyConnection]]
"""Opens the billing file for one unit of work, e.g. ``partial(billing_db, path, timeout)``."""


def register_schema(ddl: str) -> None:
    """Add idempotent DDL (CREATE ... IF NOT EXISTS) run on every open."""
    if ddl not in _SCHEMA:
        _SCHEMA.append(ddl)


def registered_tables() -> list[str]:
    """The tables the registered DDL creates, in registration order."""
    return [m.group(1) for ddl in _SCHEMA if (m := _TABLE_NAME.search(ddl))]


def register_migration(migration: Migration) -> None:
    """Add a step run on every open after the DDL, in one transaction with the others: it
    brings a file written by an older version up to date, and must be a cheap no-op on a
    current one (look at ``duckdb_columns()`` first)."""
    if migration not in _MIGRATIONS:
        _MIGRATIONS.append(migration)


_POSTGRES_TYPES = {"HUGEINT": "DECIMAL(38, 0)"}
"""DuckDB types PostgreSQL has no column type for -> the exact one used there instead (the
postgres extension would store a HUGEINT as a DOUBLE)."""


def on_catalog(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether ``con``'s default database is the catalog's PostgreSQL (cluster mode)."""
    row = con.execute(
        "SELECT type FROM duckdb_databases() WHERE database_name = current_database()"
    ).fetchone()
    return row is not None and row[0] == "postgres"


def for_backend(con: duckdb.DuckDBPyConnection, sql: str, catalog: bool | None = None) -> str:
    """``sql`` (DDL or a type) with PostgreSQL's types when ``con`` is on the catalog
    (``catalog``, if known already)."""
    if on_catalog(con) if catalog is None else catalog:
        for duck, pg in _POSTGRES_TYPES.items():
            sql = sql.replace(duck, pg)
    return sql


def changed(con: duckdb.DuckDBPyConnection, sql: str, params: object = None) -> int:
    """Run an INSERT, UPDATE or DELETE; the number of rows it changed (both backends report
    it; the postgres extension has no RETURNING)."""
    row = con.execute(sql, params).fetchone()
    return int(row[0]) if row else 0


def column_types(con: duckdb.DuckDBPyConnection, table: str) -> dict[str, str]:
    """Column name -> DuckDB type of ``table`` in the main database."""
    rows = con.execute(
        "SELECT column_name, data_type FROM duckdb_columns() "
        "WHERE database_name = current_database() AND table_name = ?",
        [table],
    ).fetchall()
    return {name: kind for name, kind in rows}


def widen(con: duckdb.DuckDBPyConnection, table: str, columns: dict[str, str]) -> None:
    """ALTER each of ``columns`` (name -> type) of ``table`` whose type differs (values kept;
    DuckDB spells ``DECIMAL(38, 2)`` as ``DECIMAL(38,2)``: spaces do not count)."""
    present = {name: kind.replace(" ", "") for name, kind in column_types(con, table).items()}
    mapped = any(duck in kind for kind in columns.values() for duck in _POSTGRES_TYPES)
    catalog = mapped and on_catalog(con)  # (asked only when a type differs there)
    for name, kind in ((n, for_backend(con, k, catalog)) for n, k in columns.items()):
        if present.get(name, kind.replace(" ", "")) != kind.replace(" ", ""):
            con.execute(f"ALTER TABLE {table} ALTER {name} TYPE {kind}")


def open_with_retry(
    path: Path, timeout: float, *, read_only: bool = False, what: str = "database"
) -> duckdb.DuckDBPyConnection:
    """Open a DuckDB file, waiting (with jittered backoff) while another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return retry_while_locked(
        lambda: duckdb.connect(str(path), read_only=read_only), timeout, f"{what} {path}"
    )


@contextmanager
def billing_db(path: Path, timeout: float) -> Iterator[duckdb.DuckDBPyConnection]:
    """A connection to the billing file with every registered table present."""
    con = open_with_retry(path, timeout, what="billing database")
    try:
        prepare(con, catalog=False)
        yield con
    finally:
        con.close()


def prepare(con: duckdb.DuckDBPyConnection, *, catalog: bool) -> None:
    """Every registered table present and brought up to date; ``catalog``: ``con`` is on the
    catalog's PostgreSQL (views only in a DuckDB file: a view's SQL is DuckDB's)."""
    for ddl in _SCHEMA:
        if not (catalog and "CREATE VIEW" in ddl):
            con.execute(for_backend(con, ddl, catalog))
    if _MIGRATIONS:
        with transaction(con):
            for migration in _MIGRATIONS:
                migration(con)


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


# Billing tables the read-only ``sql`` command offers beside the usage views; ``invoices``
# with the status people see (``stored_status``: the one stored).
QUERYABLE_TABLES = (
    "tenants",
    "tenant_tiers",
    "invoices",
    "billed_usage",
    "credit_movements",
    "tenant_alerts",
    "alert_outbox",
)


def copy_queryable_tables(target: duckdb.DuckDBPyConnection, settings: Settings) -> None:
    """Copy the billing tables into ``target`` (an in-memory connection), reading briefly so
    ad-hoc queries never hold the billing database: the file read-only (nothing if there is
    none yet), or in cluster mode the catalog's tables."""
    if settings.cluster_mode:
        from billing.catalog_db import catalog_billing_db  # (cluster mode only)

        with catalog_billing_db(settings) as source:
            _copy_tables(source, target)
        return
    path = settings.billing_db
    if not path.exists():
        return
    source = open_with_retry(
        path, settings.metering_lock_timeout, read_only=True, what="billing database"
    )
    try:
        _copy_tables(source, target)
    finally:
        source.close()


def _copy_tables(source: duckdb.DuckDBPyConnection, target: duckdb.DuckDBPyConnection) -> None:
    present = {
        row[0]
        for row in source.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database()"
        ).fetchall()
    }
    for table in QUERYABLE_TABLES:
        if table not in present:
            continue
        query = INVOICES_SHOWN_SQL if table == "invoices" else f"SELECT * FROM {table}"
        data = source.execute(query).to_arrow_table()
        target.register("_billing_copy", data)
        target.execute(f"CREATE TABLE {table} AS SELECT * FROM _billing_copy")
        target.unregister("_billing_copy")
