"""The documented read views over the published snapshot (for ``usage``, ``sql``, billing),
or, in cluster mode, over the lake's partition ledgers at one DuckLake snapshot
(``aggregator.lake_ledger.open_lake_usage``); ``usage_reader`` picks by the settings.

Views (all read-only):
- ``usage``: one row per tenant and period: events, sessions, the eight counters (all
  HUGEINT, 128-bit, exact), risk_score_avg, risk_score_max, first_occurred_at,
  last_occurred_at.
- ``dead_letters``: every invalid event with topic, partition, offset, key, value, reason,
  and its replay state (``aggregator.ledger.DEAD_LETTER_STATES``) and when it was replayed.
- ``corrections``: every correction applied: tenant_id, period, event_id, offset,
  corrects_event_id, reason, the eight signed deltas, applied_at (refused ones are dead
  letters).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb

from aggregator.snapshot import TABLES, Freshness, freshness, snapshot_files, topic_dir
from common.errors import StorageError
from common.settings import Settings
from common.sqltext import sql_string
from schemas.codec import COUNTERS

EMPTY_AGGREGATES = (
    "SELECT NULL::VARCHAR AS tenant_id, NULL::VARCHAR AS period, NULL::INTEGER AS partition, "
    "NULL::BIGINT AS events, NULL::BIGINT AS sessions, "
    + ", ".join(f"NULL::DECIMAL(38, 0) AS {c}" for c in COUNTERS)
    + ", NULL::DOUBLE AS risk_score_sum, NULL::BIGINT AS risk_score_count, "
    "NULL::DOUBLE AS risk_score_max, NULL::BIGINT AS first_occurred_at, "
    "NULL::BIGINT AS last_occurred_at WHERE false"
)
EMPTY_DEAD_LETTERS = (
    'SELECT NULL::VARCHAR AS topic, NULL::INTEGER AS partition, NULL::BIGINT AS "offset", '
    "NULL::BLOB AS key, NULL::BLOB AS value, NULL::VARCHAR AS reason, "
    "NULL::VARCHAR AS reason_code, NULL::TIMESTAMPTZ AS dead_lettered_at, "
    "NULL::VARCHAR AS state, NULL::TIMESTAMPTZ AS replayed_at WHERE false"
)
EMPTY_CORRECTIONS = (
    "SELECT NULL::VARCHAR AS tenant_id, NULL::VARCHAR AS period, NULL::VARCHAR AS event_id, "
    'NULL::BIGINT AS "offset", NULL::VARCHAR AS corrects_event_id, NULL::VARCHAR AS reason, '
    + ", ".join(f"NULL::BIGINT AS {c}" for c in COUNTERS)
    + ", NULL::TIMESTAMPTZ AS applied_at WHERE false"
)
VIEWS = ("usage", "dead_letters", "corrections")
# 128-bit sums of 128-bit values: DuckDB's sum never checks for overflow (a HUGEINT sum
# wraps, a DECIMAL one runs past its digits), so exactness rests on each snapshot row
# staying under aggregator.fold.COUNTER_CEILING; then no sum over partitions nears 2**127.
_COUNTER_SUMS = ", ".join(f"sum({c}::HUGEINT) AS {c}" for c in COUNTERS)
USAGE_SQL = f"""
    SELECT tenant_id, period, sum(events)::HUGEINT AS events,
           sum(sessions)::HUGEINT AS sessions,
           {_COUNTER_SUMS},
           CASE WHEN sum(risk_score_count) > 0
                THEN sum(risk_score_sum) / sum(risk_score_count) END AS risk_score_avg,
           max(risk_score_max) AS risk_score_max,
           make_timestamptz(min(first_occurred_at)) AS first_occurred_at,
           make_timestamptz(max(last_occurred_at)) AS last_occurred_at
    FROM raw_aggregates GROUP BY tenant_id, period"""


def _source(files: list[Path] | str, empty: str) -> str:
    """Read the snapshot files by column name: a partition not yet republished since the
    counters became 128-bit still has BIGINT columns beside the new DECIMAL(38, 0) ones."""
    if isinstance(files, str):
        return f"SELECT * FROM read_parquet({sql_string(files)}, union_by_name = true)"
    if not files:
        return empty
    listed = ", ".join(sql_string(f) for f in files)
    return f"SELECT * FROM read_parquet([{listed}], union_by_name = true)"


def define_views(
    con: duckdb.DuckDBPyConnection,
    aggregates: list[Path] | str,
    dead_letters: list[Path] | str,
    corrections: list[Path] | str,
) -> None:
    # a partition not republished since corrections exist has no file: the others are read
    define_views_over(
        con,
        _source(aggregates, EMPTY_AGGREGATES),
        _source(dead_letters, EMPTY_DEAD_LETTERS),
        _source(corrections, EMPTY_CORRECTIONS),
    )


def define_views_over(
    con: duckdb.DuckDBPyConnection, aggregates: str, dead_letters: str, corrections: str
) -> None:
    """The views over three queries: every partition's aggregates rows, dead letters and
    corrections."""
    con.execute(f"CREATE OR REPLACE VIEW raw_aggregates AS {aggregates}")
    con.execute(f"CREATE OR REPLACE VIEW usage AS {USAGE_SQL}")
    con.execute(f"CREATE OR REPLACE VIEW dead_letters AS {dead_letters}")
    con.execute(f"CREATE OR REPLACE VIEW corrections AS {corrections}")


def union_of(tables: list[str], empty: str) -> str:
    """One query over these tables (by column name), or ``empty`` if there are none."""
    if not tables:
        return empty
    return " UNION ALL BY NAME ".join(f"SELECT * FROM {t}" for t in tables)


def materialize(con: duckdb.DuckDBPyConnection) -> None:
    """Copy the views into memory: readers then see one consistent snapshot, never a file
    being replaced under them, and ad-hoc SQL can run with file access switched off."""
    for name in VIEWS:
        con.execute(f"CREATE TABLE _m_{name} AS SELECT * FROM {name}")
    for name in (*VIEWS, "raw_aggregates"):
        con.execute(f"DROP VIEW {name}")
    for name in VIEWS:
        con.execute(f"ALTER TABLE _m_{name} RENAME TO {name}")


@dataclass
class UsageReader:
    """An in-memory DuckDB connection holding a copy of the current snapshot; closed by
    ``close`` or at the end of a ``with`` block. ``lake_snapshot``: in cluster mode, the
    DuckLake snapshot id the copy was read at (None in embedded mode)."""

    con: duckdb.DuckDBPyConnection
    freshness: Freshness
    lake_snapshot: int | None = None

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> UsageReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


READ_ATTEMPTS = 5


def open_usage(snapshot_dir: Path, topic: str) -> UsageReader:
    """Copy the snapshot into memory. A worker may replace a Parquet file while DuckDB reads
    it (DuckDB opens it more than once: 'Invalid data' or a vanished file), so a failed
    copy is retried from a fresh listing; a persistent failure is reported."""
    for attempt in range(READ_ATTEMPTS):
        con = duckdb.connect(":memory:")
        try:
            define_views(
                con,
                *(snapshot_files(snapshot_dir, topic, table) for table in TABLES),
            )
            materialize(con)
            return UsageReader(con, freshness(snapshot_dir, topic))
        except duckdb.Error as exc:
            con.close()
            if attempt == READ_ATTEMPTS - 1:
                raise StorageError(f"cannot read the usage snapshot: {exc}") from exc
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def usage_reader(settings: Settings, lake_snapshot: int | None = None) -> UsageReader:
    """The current usage: the published snapshot (embedded mode) or the lake (cluster mode,
    ``METERING_CATALOG`` set; as of DuckLake snapshot ``lake_snapshot`` if given), copied
    into memory."""
    if settings.cluster_mode:
        from aggregator.lake import open_lake  # (cluster mode only: the extensions load)
        from aggregator.lake_ledger import open_lake_usage

        con = open_lake(settings, snapshot=lake_snapshot)
        return open_lake_usage(con, settings.metering_topic)
    return open_usage(settings.snapshot_dir, settings.metering_topic)


def write_query_db(data_dir: Path, snapshot_dir: Path, topic: str) -> Path:
    """(Re)write ``data/query.duckdb``: views over the snapshot for the plain duckdb CLI."""
    data_dir.mkdir(parents=True, exist_ok=True)
    target = data_dir / "query.duckdb"
    folder = topic_dir(snapshot_dir, topic).resolve()
    tmp = target.with_name(f".query.{os.getpid()}.duckdb")
    tmp.unlink(missing_ok=True)
    con = duckdb.connect(str(tmp))

    def pattern(table: str) -> list[Path] | str:
        # DuckDB checks a glob when the view is created: use it only once files exist.
        found = snapshot_files(snapshot_dir, topic, table)
        return str(folder / f"p-*.{table}.parquet") if found else []

    try:
        define_views(con, *(pattern(table) for table in TABLES))
    finally:
        con.close()
    os.replace(tmp, target)
    return target
