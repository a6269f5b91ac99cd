"""Cluster mode's billing database: schema ``pf_billing`` of the catalog's PostgreSQL
database through DuckDB's postgres extension, one unit of work at a time under a PostgreSQL
advisory lock (``billing.db`` says why; the README's cluster section why this is safe for
money). Imported only in cluster mode: psycopg and the extensions stay out of embedded runs.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import duckdb
import psycopg

from aggregator.lake import (
    BILLING_SCHEMA,
    attach_catalog_schema,
    catalog_conninfo,
    catalog_error,
    new_connection,
)
from billing.db import billing_db, prepare, registered_tables, transaction
from common.errors import StorageError, UserError
from common.settings import Settings

CATALOG_ALIAS = "billing"
BILLING_LOCK = 0x7066_6269_6C6C
"""The advisory lock key (``pfbill``) one unit of billing work holds."""


_BASES: dict[tuple[str, str], duckdb.DuckDBPyConnection] = {}
_BASES_LOCK = threading.Lock()


@contextmanager
def catalog_billing_db(settings: Settings) -> Iterator[duckdb.DuckDBPyConnection]:
    """Cluster mode's ``billing_db``: a connection whose default schema is the catalog's
    ``pf_billing``, every registered table present, while this process holds
    ``BILLING_LOCK`` (so its transactions begin after the previous holder's committed)."""
    with billing_lock(settings):
        con = _base(settings).cursor()
        try:
            con.execute("SET enable_progress_bar = false")
            con.execute(f"USE {CATALOG_ALIAS}.{BILLING_SCHEMA}")
            yield con
        finally:
            con.close()


def _base(settings: Settings) -> duckdb.DuckDBPyConnection:
    """This process's DuckDB instance with the billing schema ATTACHed and prepared (once:
    loading the postgres extension and reading the schema cost ~0.5 s; each unit of work then
    takes a cursor of it, whose every transaction is a new PostgreSQL one). Call it holding
    ``BILLING_LOCK``: preparing may create or migrate the tables."""
    assert settings.metering_catalog is not None
    key = (settings.metering_catalog.get_secret_value(), str(settings.metering_data_dir))
    with _BASES_LOCK:
        base = _BASES.get(key)
        if base is None:
            base = new_connection(settings)
            try:
                attach_catalog_schema(base, settings, CATALOG_ALIAS, BILLING_SCHEMA)
                prepare(base, catalog=True)
            except BaseException:
                base.close()
                raise
            _BASES[key] = base
        return base


@contextmanager
def billing_lock(settings: Settings) -> Iterator[None]:
    """Hold ``BILLING_LOCK`` on a connection of its own; wait up to ``METERING_LOCK_TIMEOUT``
    for it (then a StorageError). Closing the connection, or the process dying, frees it."""
    assert settings.metering_catalog is not None
    wait_ms = max(1, int(settings.metering_lock_timeout * 1000))
    conninfo, password = catalog_conninfo(settings.metering_catalog.get_secret_value())
    try:
        lock = psycopg.connect(conninfo, password=password, autocommit=True)
    except psycopg.Error as exc:
        raise catalog_error(exc, settings) from exc
    with lock:
        try:
            lock.execute(f"SET lock_timeout = {wait_ms}")
            lock.execute("SELECT pg_advisory_lock(%s)", [BILLING_LOCK])
        except psycopg.errors.LockNotAvailable as exc:
            raise StorageError(
                "cannot open the billing database: another process held its lock in "
                f"METERING_CATALOG for over {settings.metering_lock_timeout:g} s "
                "(METERING_LOCK_TIMEOUT)"
            ) from exc
        except psycopg.Error as exc:
            raise catalog_error(exc, settings) from exc
        yield


@dataclass(frozen=True)
class BillingMove:
    """What ``migrate_billing`` did: ``outcome`` (migrated, already migrated, no billing
    file) and the rows it copied per table."""

    outcome: str
    rows: dict[str, int]

    def summary(self) -> str:
        moved = f": {sum(self.rows.values())} rows in {len(self.rows)} tables" if self.rows else ""
        return f"lake migrate: billing {self.outcome}{moved}"


def migrate_billing(settings: Settings, source: Path) -> BillingMove:
    """Copy the embedded billing file ``source`` (every registered table, brought up to date
    first) into the catalog's ``pf_billing`` in one transaction under ``BILLING_LOCK``. Run
    again after it succeeded: ``already migrated``. A catalog that holds other billing state
    already is refused (a UserError, nothing written): merging two books could bill twice."""
    if not source.exists():
        return BillingMove("no billing file", {})
    _register_every_table()
    tables = registered_tables()
    with billing_db(source, settings.metering_lock_timeout) as old:
        counts = {t: _count(old, t) for t in tables}
        with catalog_billing_db(settings) as new:
            there = {t: _count(new, t) for t in tables}
            if any(there.values()):
                if there == counts and _ids(new) == _ids(old):
                    return BillingMove("already migrated", {})
                raise UserError(
                    f"the billing schema {BILLING_SCHEMA} of METERING_CATALOG holds billing "
                    f"state already ({there['invoices']} invoices) that is not {source}'s: "
                    "refusing to merge two sets of books (nothing written)"
                )
            with transaction(new):
                for table in tables:
                    new.register("_moved", old.execute(f"SELECT * FROM {table}").to_arrow_table())
                    new.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _moved").fetchall()
                    new.unregister("_moved")
    return BillingMove("migrated", {t: n for t, n in counts.items() if n})


def _count(con: duckdb.DuckDBPyConnection, table: str) -> int:
    row = con.execute(f"SELECT count(*) FROM {table}").fetchone()
    return int(row[0]) if row else 0


def _ids(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {str(r[0]) for r in con.execute("SELECT invoice_id FROM invoices").fetchall()}


def _register_every_table() -> None:
    """Import every module that registers billing tables (each registers on import)."""
    import billing.alerts.store
    import billing.credit_store
    import billing.invoice_store
    import billing.stripe.state
    import billing.tenants  # noqa: F401
