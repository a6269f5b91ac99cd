"""The ledger: one DuckDB file per (topic, partition), owned by whichever worker holds the
partition. A batch's offsets, dedup ids, aggregates, sessions, duplicates and dead letters
commit in one transaction, so a worker killed at any instruction either applied the
batch whole or not at all, and restarts from the offset stored beside the data.

All partition files of a worker are ATTACHed to one in-memory DuckDB connection so they
share one buffer pool (bounded by ``memory_limit``). DuckDB's file lock keeps a second
worker out of a partition file until the first has detached it.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb

from aggregator.fold import PreparedBatch
from aggregator.snapshot import publish_partition
from billing.db import open_with_retry
from pf_metering.errors import OperationError
from schemas.codec import COUNTERS

log = logging.getLogger(__name__)

_COUNTER_COLS = ", ".join(f"{c} BIGINT NOT NULL DEFAULT 0" for c in COUNTERS)
DDL = [
    """CREATE TABLE IF NOT EXISTS {a}.offsets (
        topic VARCHAR NOT NULL, partition INTEGER NOT NULL, next_offset BIGINT NOT NULL,
        max_occurred_at BIGINT, updated_at TIMESTAMPTZ NOT NULL, PRIMARY KEY (topic, partition))""",
    """CREATE TABLE IF NOT EXISTS {a}.seen_events (
        h UHUGEINT NOT NULL, partition INTEGER NOT NULL, occurred_at BIGINT NOT NULL)""",
    f"""CREATE TABLE IF NOT EXISTS {{a}}.aggregates (
        tenant_id VARCHAR NOT NULL, period VARCHAR NOT NULL, partition INTEGER NOT NULL,
        events BIGINT NOT NULL, sessions BIGINT NOT NULL, {_COUNTER_COLS},
        risk_score_sum DOUBLE NOT NULL DEFAULT 0, risk_score_count BIGINT NOT NULL DEFAULT 0,
        risk_score_max DOUBLE, first_occurred_at BIGINT, last_occurred_at BIGINT,
        PRIMARY KEY (tenant_id, period))""",
    """CREATE TABLE IF NOT EXISTS {a}.sessions (
        tenant_id VARCHAR NOT NULL, period VARCHAR NOT NULL, session_id VARCHAR NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS {a}.duplicates (
        topic VARCHAR NOT NULL, partition INTEGER NOT NULL, "offset" BIGINT NOT NULL,
        tenant_id VARCHAR NOT NULL, event_id VARCHAR NOT NULL, recorded_at TIMESTAMPTZ NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS {a}.dead_letters (
        topic VARCHAR NOT NULL, partition INTEGER NOT NULL, "offset" BIGINT NOT NULL,
        key BLOB, value BLOB, reason VARCHAR NOT NULL, reason_code VARCHAR NOT NULL,
        dead_lettered_at TIMESTAMPTZ NOT NULL)""",
]

# 128-bit hash of the idempotency key (collision odds ~1e-25 at 10M ids): 16 bytes a row.
EVENT_HASH = "md5_number(tenant_id || chr(0) || event_id)"
_SUMS = ", ".join(f"sum({c})::BIGINT AS {c}" for c in COUNTERS)
_ADD = ", ".join(f"{c} = aggregates.{c} + excluded.{c}" for c in COUNTERS)


def ledger_path(ledger_dir: Path, topic: str, partition: int) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", topic)
    return ledger_dir / safe / f"p-{partition:04d}.duckdb"


@dataclass
class CommitResult:
    counted: int
    duplicates: int
    dead: int


class PartitionLedger:
    """The ledger of one partition, attached to the worker's shared connection."""

    def __init__(self, con: duckdb.DuckDBPyConnection, alias: str, topic: str, partition: int):
        self.con = con
        self.alias = alias
        self.topic = topic
        self.partition = partition
        for ddl in DDL:
            con.execute(ddl.format(a=alias))
        row = con.execute(
            f"SELECT next_offset, max_occurred_at FROM {alias}.offsets "
            "WHERE topic = ? AND partition = ?",
            [topic, partition],
        ).fetchone()
        self.next_offset: int | None = row[0] if row else None
        self.max_occurred_at: int | None = row[1] if row else None
        self.last_publish = 0.0
        self.last_commit = 0.0

    def commit(self, batch: PreparedBatch) -> CommitResult:
        """Apply one prepared batch atomically; returns what it counted."""
        a, con = self.alias, self.con
        con.register("batch_events", batch.events)
        dead_rows = [
            (self.topic, self.partition, d.offset, d.key, d.value, d.reason, d.reason_code)
            for d in batch.dead
        ]
        max_at = self.max_occurred_at
        if batch.max_occurred_at is not None:
            max_at = max(max_at or batch.max_occurred_at, batch.max_occurred_at)
        try:
            con.execute("BEGIN TRANSACTION")
            fresh = con.execute(
                f"""WITH b AS (
                      SELECT *, {EVENT_HASH} AS h
                      FROM batch_events WHERE first_in_batch)
                    SELECT b.* EXCLUDE (h) FROM b ANTI JOIN {a}.seen_events s ON s.h = b.h"""
            ).to_arrow_table()
            con.register("fresh_events", fresh)
            con.execute(
                f"""INSERT INTO {a}.aggregates
                    SELECT f.tenant_id, f.period, ?, count(*),
                           count(DISTINCT f.session_id) FILTER (WHERE s.session_id IS NULL),
                           {_SUMS}, coalesce(sum(f.risk_score), 0), count(f.risk_score),
                           max(f.risk_score), min(f.occurred_at), max(f.occurred_at)
                    FROM fresh_events f LEFT JOIN {a}.sessions s
                      ON s.tenant_id = f.tenant_id AND s.period = f.period
                     AND s.session_id = f.session_id
                    GROUP BY f.tenant_id, f.period
                    ON CONFLICT (tenant_id, period) DO UPDATE SET
                      events = aggregates.events + excluded.events,
                      sessions = aggregates.sessions + excluded.sessions, {_ADD},
                      risk_score_sum = aggregates.risk_score_sum + excluded.risk_score_sum,
                      risk_score_count = aggregates.risk_score_count + excluded.risk_score_count,
                      risk_score_max = greatest(aggregates.risk_score_max, excluded.risk_score_max),
                      first_occurred_at = least(aggregates.first_occurred_at,
                                                excluded.first_occurred_at),
                      last_occurred_at = greatest(aggregates.last_occurred_at,
                                                  excluded.last_occurred_at)""",
                [self.partition],
            )
            con.execute(
                f"""INSERT INTO {a}.sessions
                    SELECT DISTINCT f.tenant_id, f.period, f.session_id FROM fresh_events f
                    ANTI JOIN {a}.sessions s ON s.tenant_id = f.tenant_id
                      AND s.period = f.period AND s.session_id = f.session_id"""
            )
            con.execute(
                f"INSERT INTO {a}.seen_events "
                f"SELECT {EVENT_HASH}, ?, occurred_at FROM fresh_events",
                [self.partition],
            )
            con.execute(
                f"""INSERT INTO {a}.duplicates
                    SELECT ?, ?, b."offset", b.tenant_id, b.event_id, now() FROM batch_events b
                    ANTI JOIN fresh_events f ON f."offset" = b."offset"
                """,
                [self.topic, self.partition],
            )
            if dead_rows:
                con.executemany(
                    f"INSERT INTO {a}.dead_letters VALUES (?, ?, ?, ?, ?, ?, ?, now())", dead_rows
                )
            con.execute(
                f"""INSERT INTO {a}.offsets VALUES (?, ?, ?, ?, now())
                    ON CONFLICT (topic, partition) DO UPDATE SET
                      next_offset = excluded.next_offset,
                      max_occurred_at = excluded.max_occurred_at, updated_at = now()""",
                [self.topic, self.partition, batch.next_offset, max_at],
            )
            con.execute("COMMIT")
        except duckdb.Error as exc:
            with contextlib.suppress(duckdb.Error):
                con.execute("ROLLBACK")
            raise OperationError(
                f"ledger commit failed for {self.topic}[{self.partition}]: {exc}"
            ) from None
        finally:
            con.unregister("batch_events")
            with contextlib.suppress(duckdb.Error):
                con.unregister("fresh_events")
        self.next_offset = batch.next_offset
        self.max_occurred_at = max_at
        self.last_commit = time.monotonic()
        counted = fresh.num_rows
        return CommitResult(counted, batch.events.num_rows - counted, len(batch.dead))

    def prune(self, window_micros: int) -> int:
        """Forget dedup ids older than the window (events that old are dead-lettered)."""
        if self.max_occurred_at is None:
            return 0
        horizon = self.max_occurred_at - window_micros
        row = self.con.execute(
            f"DELETE FROM {self.alias}.seen_events WHERE occurred_at < ? RETURNING 1", [horizon]
        ).fetchall()
        return len(row)

    def publish(self, snapshot_dir: Path) -> None:
        publish_partition(self.con, self.alias, snapshot_dir, self.topic, self.partition)
        self.last_publish = time.monotonic()


class LedgerSet:
    """The partition ledgers a worker holds, on one shared DuckDB connection."""

    def __init__(
        self, ledger_dir: Path, topic: str, lock_timeout: float, memory_limit: str = "512MB"
    ) -> None:
        self.ledger_dir = ledger_dir
        self.topic = topic
        self.lock_timeout = lock_timeout
        self.con = duckdb.connect(":memory:")
        self.con.execute(f"SET memory_limit = '{memory_limit}'")
        self.con.execute("SET preserve_insertion_order = false")
        self.held: dict[int, PartitionLedger] = {}

    def acquire(self, partition: int) -> PartitionLedger:
        """Attach a partition's file, waiting while another worker still holds it."""
        if partition in self.held:
            return self.held[partition]
        path = ledger_path(self.ledger_dir, self.topic, partition)
        path.parent.mkdir(parents=True, exist_ok=True)
        alias = f"p{partition}"
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.05
        while True:
            try:
                self.con.execute(f"ATTACH '{_sql_str(path)}' AS {alias}")
                break
            except duckdb.Error as exc:
                if "lock" not in str(exc).lower() or time.monotonic() >= deadline:
                    raise OperationError(f"cannot open ledger {path}: {exc}") from None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        ledger = PartitionLedger(self.con, alias, self.topic, partition)
        self.held[partition] = ledger
        return ledger

    def release(self, partition: int, snapshot_dir: Path | None) -> None:
        ledger = self.held.pop(partition, None)
        if ledger is None:
            return
        try:
            if snapshot_dir is not None:
                ledger.publish(snapshot_dir)
            self.con.execute("CHECKPOINT " + ledger.alias)
        finally:
            self.con.execute(f"DETACH {ledger.alias}")

    def close(self, snapshot_dir: Path | None) -> None:
        for partition in list(self.held):
            self.release(partition, snapshot_dir)
        self.con.close()


def _sql_str(path: Path) -> str:
    return str(path).replace("'", "''")


__all__ = ["CommitResult", "LedgerSet", "PartitionLedger", "ledger_path", "open_with_retry"]
