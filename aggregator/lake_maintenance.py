"""Lake maintenance (cluster mode): merge small data files, expire old snapshots, delete the
files nothing needs any more. Totals never change: merging rewrites rows into fewer files in
a snapshot of its own, and expiring drops only history.

What it leaves alone, so running workers are not disturbed: a commit that deletes or updates
rows of a file that another transaction compacted meanwhile is refused by DuckLake (measured:
merging a table whose fresh rows a writer updates batch after batch refused 25 of its 99
commits). So it merges only tables that writers append to, never those in
``UPDATED_IN_PLACE`` (a batch commit updates their rows: the offsets row, the aggregates'
MERGE, dead-letter replay states), never flushes inlined rows (``ducklake_flush_inlined_data``
deletes them: the same conflict) and never rewrites files with deletions
(``ducklake_rewrite_data_files``). Compacting an updated-in-place table is for the only
writer of it, between its own commits (``merge_tables``).

Snapshots listed in ``lake.kept_snapshots`` (``keep_snapshot``) and those an invoice was
computed from (``lake_snapshot`` of the catalog's billing schema, read in the same run) are
never expired, so time travel to them keeps working past the retention
(``generate-invoice --explain`` months later). One maintainer runs at a
time across hosts (a PostgreSQL advisory lock on the catalog); another finds it taken and
skips.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

import duckdb
import psycopg

from aggregator.lake import BILLING_SCHEMA, LAKE, open_lake
from common.errors import CatalogError
from common.settings import Settings

log = logging.getLogger(__name__)

KEPT = "kept_snapshots"
UPDATED_IN_PLACE = frozenset({"offsets", "aggregates", "dead_letters"})
"""Tables (in any schema of the lake) whose rows a writer's commits update or delete."""
ORPHAN_AGE = timedelta(days=1)
"""A file no snapshot names is deleted only this old at least: a writer's transaction writes
its files before it commits them, so a younger one may be about to be committed (measured:
with a 1 s age, a file of a commit in flight was deleted)."""
LOCK_KEY = 0x7066_6D61_696E  # "pfmain": the advisory lock of lake maintenance


@dataclass(frozen=True)
class Maintenance:
    """What one run did; file counts and bytes are the lake's live data files."""

    skipped: bool
    files_before: int
    files_after: int
    bytes_before: int
    bytes_after: int
    files_merged: int
    tables_skipped: int
    snapshots_expired: int
    snapshots_kept: int
    files_deleted: int

    def as_row(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        if self.skipped:
            return "lake maintenance: skipped, another host is maintaining the lake"
        return (
            f"lake maintenance: {self.files_before} -> {self.files_after} data files "
            f"({self.bytes_before:,} -> {self.bytes_after:,} bytes; {self.tables_skipped} "
            "table(s) updated in place left to their writers), "
            f"{self.snapshots_expired} snapshot(s) expired ({self.snapshots_kept} kept), "
            f"{self.files_deleted} unneeded file(s) deleted"
        )


SKIPPED = Maintenance(True, 0, 0, 0, 0, 0, 0, 0, 0, 0)


def ensure_kept_table(con: duckdb.DuckDBPyConnection, alias: str = LAKE) -> None:
    con.execute(
        f"CREATE TABLE IF NOT EXISTS {alias}.{KEPT} ("
        "snapshot_id BIGINT NOT NULL, reason VARCHAR NOT NULL, kept_at TIMESTAMPTZ NOT NULL)"
    )


def keep_snapshot(
    con: duckdb.DuckDBPyConnection, snapshot_id: int, reason: str, alias: str = LAKE
) -> None:
    """Never expire snapshot ``snapshot_id`` (``reason`` says who needs it)."""
    ensure_kept_table(con, alias)
    con.execute(
        f"INSERT INTO {alias}.{KEPT} VALUES (?, ?, now())", [snapshot_id, reason]
    ).fetchall()


@contextmanager
def _maintainer(settings: Settings) -> Iterator[psycopg.Connection[Any] | None]:
    """A catalog connection while this process holds the lake's maintenance lock, None if
    another does."""
    assert settings.metering_catalog is not None
    try:
        conn = psycopg.connect(
            settings.metering_catalog.get_secret_value(), autocommit=True, connect_timeout=10
        )
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        password = settings.catalog_password()
        reason = reason.replace(password, "[redacted]") if password else reason
        raise CatalogError(
            f"cannot reach METERING_CATALOG ({settings.catalog_shown()}): {reason}"
        ) from exc
    with conn:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", [LOCK_KEY]).fetchone()
        yield conn if row and row[0] else None


def invoice_snapshots(conn: psycopg.Connection[Any]) -> set[int]:
    """The lake snapshots the invoices in the catalog's billing schema were computed from."""
    table = f"{BILLING_SCHEMA}.invoices"
    found = conn.execute("SELECT to_regclass(%s) IS NOT NULL", [table]).fetchone()
    if not found or not found[0]:
        return set()
    rows = conn.execute(
        f"SELECT DISTINCT lake_snapshot FROM {table} WHERE lake_snapshot IS NOT NULL"
    ).fetchall()
    return {int(r[0]) for r in rows}


def _live_files(con: duckdb.DuckDBPyConnection, alias: str) -> tuple[int, int]:
    row = con.execute(
        f"SELECT count(*), coalesce(sum(file_size_bytes), 0) FROM "
        f"__ducklake_metadata_{alias}.ducklake_data_file WHERE end_snapshot IS NULL"
    ).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def lake_tables(con: duckdb.DuckDBPyConnection, alias: str = LAKE) -> list[tuple[str, str]]:
    """Every (schema, table) of the lake."""
    rows = con.execute(
        "SELECT schema_name, table_name FROM duckdb_tables() WHERE database_name = ? ORDER BY 1, 2",
        [alias],
    ).fetchall()
    return [(str(schema), str(table)) for schema, table in rows]


def merge_tables(
    con: duckdb.DuckDBPyConnection, tables: list[tuple[str, str]], alias: str = LAKE
) -> int:
    """Merge the small files of ``tables`` ((schema, table) pairs); returns how many files
    were merged. Safe while others write only if no one else updates those tables."""
    merged = 0
    for schema, table in tables:
        try:
            rows = con.execute(
                f"CALL ducklake_merge_adjacent_files('{alias}', ?, schema => ?)", [table, schema]
            ).fetchall()
        except duckdb.TransactionException as exc:  # a writer deleted from those files first
            log.warning("merging %s.%s lost to a writer's commit, left for the next run: %s",
                        schema, table, str(exc).splitlines()[-1])  # fmt: skip
            continue
        merged += sum(int(r[2]) for r in rows)
    return merged


def _kept(con: duckdb.DuckDBPyConnection, alias: str) -> set[int]:
    tables = con.execute(
        "SELECT 1 FROM duckdb_tables() WHERE database_name = ? AND table_name = ?", [alias, KEPT]
    ).fetchall()
    if not tables:
        return set()
    return {int(r[0]) for r in con.execute(f"SELECT snapshot_id FROM {alias}.{KEPT}").fetchall()}


def maintain(
    con: duckdb.DuckDBPyConnection,
    settings: Settings,
    *,
    now: datetime,
    alias: str = LAKE,
) -> Maintenance:
    """Merge, expire (older than ``METERING_LAKE_RETENTION``, except kept snapshots and the
    newest) and delete files unneeded for ``METERING_LAKE_FILE_GRACE``, on ``con``'s lake."""
    with _maintainer(settings) as catalog:
        if catalog is None:
            return SKIPPED
        try:
            return _maintain(
                con,
                alias,
                pinned=invoice_snapshots(catalog),
                now=now,
                expire_before=now - settings.metering_lake_retention,
                delete_before=now - settings.metering_lake_file_grace,
            )
        except duckdb.Error as exc:
            raise CatalogError(f"lake maintenance failed: {str(exc).splitlines()[0]}") from exc


def _maintain(
    con: duckdb.DuckDBPyConnection,
    alias: str,
    *,
    pinned: set[int],
    now: datetime,
    expire_before: datetime,
    delete_before: datetime,
) -> Maintenance:
    files_before, bytes_before = _live_files(con, alias)
    tables = lake_tables(con, alias)
    appended = [t for t in tables if t[1] not in UPDATED_IN_PLACE]
    merged = merge_tables(con, appended, alias)
    kept = _kept(con, alias) | pinned
    old = [
        int(r[0])
        for r in con.execute(
            f"SELECT snapshot_id FROM ducklake_snapshots('{alias}') WHERE snapshot_time < ? "
            f"AND snapshot_id < (SELECT max(snapshot_id) FROM ducklake_snapshots('{alias}'))",
            [expire_before],
        ).fetchall()
    ]
    expire = sorted(set(old) - kept)
    if expire:
        con.execute(
            f"CALL ducklake_expire_snapshots('{alias}', versions => ?)", [expire]
        ).fetchall()
    deleted = con.execute(
        f"CALL ducklake_cleanup_old_files('{alias}', older_than => ?)", [delete_before]
    ).fetchall()
    if delete_before >= now:  # no grace: what this run unscheduled goes at once too
        deleted += con.execute(
            f"CALL ducklake_cleanup_old_files('{alias}', cleanup_all => true)"
        ).fetchall()
    orphans = con.execute(
        f"CALL ducklake_delete_orphaned_files('{alias}', older_than => ?)",
        [min(delete_before, now - ORPHAN_AGE)],
    ).fetchall()
    files_after, bytes_after = _live_files(con, alias)
    return Maintenance(
        skipped=False,
        files_before=files_before,
        files_after=files_after,
        bytes_before=bytes_before,
        bytes_after=bytes_after,
        files_merged=merged,
        tables_skipped=len(tables) - len(appended),
        snapshots_expired=len(expire),
        snapshots_kept=len(kept & set(old)),
        files_deleted=len(deleted) + len(orphans),
    )


def maintain_lake(settings: Settings, now: datetime) -> Maintenance:
    """Open the lake of ``settings`` and maintain it."""
    con = open_lake(settings)
    try:
        return maintain(con, settings, now=now)
    finally:
        con.close()
