"""Cluster mode's billing database: schema ``pf_billing`` of the catalog's PostgreSQL
database through DuckDB's postgres extension, one unit of work at a time under a PostgreSQL
advisory lock (``billing.db`` says why; the README's cluster section why this is safe for
money). Imported only in cluster mode: psycopg and the extensions stay out of embedded runs.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import duckdb
import psycopg

from aggregator.lake import (
    BILLING_SCHEMA,
    attach_catalog_schema,
    catalog_conninfo,
    catalog_error,
    new_connection,
)
from billing.db import prepare
from common.errors import StorageError
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
