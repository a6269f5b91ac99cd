"""Cluster mode's ledgers: each partition's tables in its own schema of the DuckLake (attached
as ``lake``, ``aggregator.lake``), folded by the same ``PartitionLedger`` SQL as embedded mode.

Why a schema per partition: DuckLake settles concurrent commits per table (a commit that
deletes or updates rows of a table conflicts with any other commit that changed that table
since its snapshot), so workers holding different partitions never conflict, while two
writers of one partition always do.

Fencing: each partition's ``offsets`` row carries an owner ``epoch``. ``acquire`` claims the
partition by raising it by one (``claim``); every commit then stores its offset with
``UPDATE offsets ... WHERE epoch = <ours> AND next_offset = <what we last stored>`` inside
the batch's transaction and refuses the whole batch (``OwnershipLost``) unless that updated
the row. A worker woken after another took the partition over is refused either way: if it
begins its transaction after the claim committed, the condition fails on the new epoch; if
its transaction began before, DuckLake refuses its COMMIT (its update deletes a row of
``offsets``, which the claim changed since its snapshot) and the commit is run again from
the start here (``CONFLICT_ATTEMPTS``), re-reading the row and failing the condition. A
conflict is never replayed blindly: only a re-run of the whole transaction.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import duckdb

from aggregator.files import topic_folder
from aggregator.fold import Folded
from aggregator.lake import LAKE
from aggregator.ledger import OwnershipLost, PartitionLedger, ledger_ddl
from aggregator.snapshot import Freshness
from aggregator.views import (
    EMPTY_AGGREGATES,
    EMPTY_CORRECTIONS,
    EMPTY_DEAD_LETTERS,
    UsageReader,
    define_views_over,
    materialize,
    union_of,
)
from common.errors import LedgerError, StorageError
from schemas.prepare import PreparedBatch

log = logging.getLogger(__name__)

CONFLICT_ATTEMPTS = 20
"""Times a commit, claim or set-up is run again from its start after DuckLake refused it as
conflicting (each attempt re-reads what it decides on)."""
CONFLICT_PAUSE_SECONDS = 0.05

# The offsets row of a lake ledger: created with the schema (next_offset NULL: nothing
# stored yet) and claimed by each new owner (epoch + 1).
_OFFSETS = """CREATE TABLE IF NOT EXISTS {a}.offsets (
    topic VARCHAR NOT NULL, partition INTEGER NOT NULL, next_offset BIGINT,
    max_occurred_at BIGINT, updated_at TIMESTAMPTZ NOT NULL, epoch BIGINT NOT NULL,
    owner VARCHAR, claimed_at TIMESTAMPTZ)"""
_KEY = re.compile(r",\s*PRIMARY KEY \([^)]*\)|\s+PRIMARY KEY")


# DuckLake writes a (U)HUGEINT to Parquet as a DOUBLE (exact only to 2**53): counters are
# DECIMAL(38, 0) (every total stays under the fold's ceiling, 10**28) and the dedup hash is
# the same MD5 as a UUID (16 bytes).
LAKE_COUNTER_TYPE = "DECIMAL(38, 0)"
LAKE_HASH_TYPE = "UUID"
LAKE_EVENT_HASH = "md5(tenant_id || chr(0) || event_id)::UUID"


def lake_ddl() -> list[str]:
    """The embedded ledger's tables with the lake's types and without their keys (DuckLake
    has no PRIMARY KEY or UNIQUE constraints: the MERGE and the single offsets row keep the
    same invariants), and an offsets table with the owner's epoch."""
    tables = ledger_ddl(LAKE_COUNTER_TYPE, LAKE_HASH_TYPE)
    return [_OFFSETS, *(_KEY.sub("", ddl) for ddl in tables if "{a}.offsets" not in ddl)]


def schema_name(topic: str, partition: int) -> str:
    return f"{topic_folder(topic)}__p{partition:04d}"


def schema_alias(topic: str, partition: int) -> str:
    """The partition's schema as the SQL ``{a}`` of ``PartitionLedger``: ``lake."t__p0003"``."""
    return f'{LAKE}."{schema_name(topic, partition)}"'


def partition_schemas(con: duckdb.DuckDBPyConnection, topic: str) -> dict[int, str]:
    """Partition -> alias of every ledger schema of ``topic`` in the lake (as of the
    connection's current transaction)."""
    prefix = f"{topic_folder(topic)}__p"
    rows = con.execute(
        "SELECT schema_name FROM duckdb_schemas() WHERE database_name = ? "
        "AND starts_with(schema_name, ?)",
        [LAKE, prefix],
    ).fetchall()
    out = {}
    for (name,) in rows:
        digits = name.removeprefix(prefix)
        if digits.isdigit():
            out[int(digits)] = f'{LAKE}."{name}"'
    return dict(sorted(out.items()))


def is_conflict(exc: BaseException) -> bool:
    """Whether DuckLake refused a commit because another one changed what it touched."""
    return "conflict" in str(exc).lower()


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class LakePartitionLedger(PartitionLedger):
    """One partition's ledger in the lake, claimed for this worker on creation."""

    event_hash = LAKE_EVENT_HASH

    def __init__(self, con: duckdb.DuckDBPyConnection, topic: str, partition: int, owner: str):
        self.owner = owner
        self.epoch = 0  # ours, once claimed
        self._claimed: tuple[int | None, int | None] = (None, None)
        super().__init__(con, schema_alias(topic, partition), topic, partition)

    def _create_tables(self) -> None:
        """Create the schema, its tables and the offsets row once (one transaction: two
        hosts creating it at once conflict, the loser finds it made), then claim it."""
        a, con = self.alias, self.con

        def create() -> None:
            exists = con.execute(
                "SELECT count(*) FROM duckdb_schemas() WHERE database_name = ? AND schema_name = ?",
                [LAKE, schema_name(self.topic, self.partition)],
            ).fetchone()
            if exists and exists[0]:
                return
            con.execute(f"CREATE SCHEMA IF NOT EXISTS {a}")
            for ddl in lake_ddl():
                con.execute(ddl.format(a=a))
            con.execute(
                f"INSERT INTO {a}.offsets VALUES (?, ?, NULL, NULL, now(), 0, NULL, NULL)",
                [self.topic, self.partition],
            )

        self._run(create, "create the ledger of")
        self._claimed = self.claim()

    def claim(self) -> tuple[int | None, int | None]:
        """Make this worker the owner with the next epoch; returns the stored (next offset,
        newest occurred_at) as of the claim."""
        a, con = self.alias, self.con
        found: list[tuple[int, int | None, int | None]] = []

        def claim_once() -> None:
            found.clear()
            row = con.execute(
                f"SELECT epoch, next_offset, max_occurred_at FROM {a}.offsets "
                "WHERE topic = ? AND partition = ?",
                [self.topic, self.partition],
            ).fetchone()
            if row is None:
                raise LedgerError(f"ledger {a} has no offsets row")
            updated = con.execute(
                f"""UPDATE {a}.offsets SET epoch = ?, owner = ?, claimed_at = now()
                    WHERE topic = ? AND partition = ? AND epoch = ?""",
                [row[0] + 1, self.owner, self.topic, self.partition, row[0]],
            ).fetchone()
            if not updated or updated[0] != 1:
                raise duckdb.TransactionException("claim conflict: the epoch moved")
            found.append((row[0] + 1, row[1], row[2]))

        self._run(claim_once, "claim")
        self.epoch, next_offset, max_at = found[0]
        log.info("p%d: claimed with epoch %d (by %s)", self.partition, self.epoch, self.owner)
        return next_offset, max_at

    def _stored_offset(self) -> tuple[int | None, int | None]:
        return self._claimed

    def _run(self, body: Callable[[], None], what: str) -> None:
        """``body`` in one transaction, run again from its start while DuckLake refuses the
        commit as conflicting."""
        con = self.con
        for attempt in range(CONFLICT_ATTEMPTS):
            try:
                con.execute("BEGIN TRANSACTION")
                body()
                con.execute("COMMIT")
                return
            except duckdb.Error as exc:
                with contextlib.suppress(duckdb.Error):
                    con.execute("ROLLBACK")
                if not is_conflict(exc) or attempt == CONFLICT_ATTEMPTS - 1:
                    raise LedgerError(
                        f"cannot {what} {self.topic}[{self.partition}] in the lake: {exc}"
                    ) from exc
            except BaseException:
                with contextlib.suppress(duckdb.Error):
                    con.execute("ROLLBACK")
                raise
            time.sleep(CONFLICT_PAUSE_SECONDS * (attempt + 1))

    def _hold(self) -> None:
        """Fail the transaction unless the offsets row still has our epoch."""
        self._fenced_update("updated_at = now()", [], None, check_offset=False)

    def _store_offset(self, next_offset: int, max_at: int | None) -> None:
        self._fenced_update(
            "next_offset = ?, max_occurred_at = ?, updated_at = now()",
            [next_offset, max_at],
            self.next_offset,
            check_offset=True,
        )

    def _fenced_update(
        self, assignments: str, values: list[object], expected: int | None, *, check_offset: bool
    ) -> None:
        where = "topic = ? AND partition = ? AND epoch = ?"
        params: list[object] = [*values, self.topic, self.partition, self.epoch]
        if check_offset:
            where += " AND next_offset IS NOT DISTINCT FROM ?"
            params.append(expected)
        row = self.con.execute(
            f"UPDATE {self.alias}.offsets SET {assignments} WHERE {where}", params
        ).fetchone()
        if not row or row[0] != 1:
            raise OwnershipLost(
                f"{self.topic}[{self.partition}]: commit refused, the partition is no longer "
                f"ours (epoch {self.epoch} at offset {expected}; another worker claimed it)"
            )

    def _transaction(
        self, batch: PreparedBatch, apply: Callable[[int, Folded], None]
    ) -> tuple[int, Folded]:
        """The embedded transaction, run again from its start (re-reading the dedup ids and
        the offsets row) while DuckLake refuses its commit as conflicting."""
        for attempt in range(CONFLICT_ATTEMPTS):
            try:
                return super()._transaction(batch, apply)
            except OwnershipLost:
                raise
            except LedgerError as exc:
                if not is_conflict(exc) or attempt == CONFLICT_ATTEMPTS - 1:
                    raise
                log.debug("p%d: commit conflicted, running it again: %s", self.partition, exc)
            time.sleep(CONFLICT_PAUSE_SECONDS * (attempt + 1))
        raise AssertionError("unreachable")

    def import_rows(self, write: Callable[[], None], next_offset: int, max_at: int | None) -> None:
        """``write`` (rows put straight into this ledger's tables) and the stored offset
        ``next_offset`` in one transaction fenced like a commit (``lake migrate``)."""

        def once() -> None:
            self._hold()
            write()
            self._store_offset(next_offset, max_at)

        self._run(once, "import rows into")
        self.next_offset, self.max_occurred_at = next_offset, max_at

    def prune(self, oldest_billable_micros: int | None) -> int:
        """As embedded, in a transaction fenced by the epoch."""
        if oldest_billable_micros is None:
            return 0
        gone: list[int] = []

        def prune_once() -> None:
            self._hold()
            gone[:] = [super(LakePartitionLedger, self).prune(oldest_billable_micros)]

        self._run(prune_once, "prune the dedup ids of")
        return gone[0]

    def publish(self, snapshot_dir: Path, con: duckdb.DuckDBPyConnection | None = None) -> None:
        """Nothing to publish: readers read the lake itself."""
        self.last_publish = time.monotonic()


def open_lake_usage(con: duckdb.DuckDBPyConnection, topic: str) -> UsageReader:
    """Copy every partition's aggregates, dead letters and corrections of ``topic`` out of
    the lake, in one read transaction (so at one DuckLake snapshot: no partition newer than
    another), into ``con``'s memory, then detach the lake: the reader holds only the copy."""
    try:
        con.execute("BEGIN TRANSACTION")
        schemas = list(partition_schemas(con, topic).values())
        define_views_over(
            con,
            union_of([f"{s}.aggregates" for s in schemas], EMPTY_AGGREGATES),
            union_of([f"{s}.dead_letters" for s in schemas], EMPTY_DEAD_LETTERS),
            union_of([f"{s}.corrections" for s in schemas], EMPTY_CORRECTIONS),
        )
        materialize(con)
        snapshot = con.execute(f"SELECT id FROM {LAKE}.current_snapshot()").fetchone()
        newest = None
        if schemas:
            stamps = union_of([f"{s}.offsets" for s in schemas], "")
            row = con.execute(f"SELECT epoch(max(updated_at)) FROM ({stamps})").fetchone()
            newest = float(row[0]) if row and row[0] is not None else None
        con.execute("COMMIT")
        con.execute(f"DETACH {LAKE}")
    except duckdb.Error as exc:
        con.close()
        raise StorageError(f"cannot read usage from the lake: {exc}") from exc
    now = time.time()
    snapshot_id = int(snapshot[0]) if snapshot else None
    if schemas:
        freshness = Freshness(len(schemas), now, now, newest, None, snapshot_id)
    else:
        freshness = Freshness(0, None, None, lake_snapshot=snapshot_id)
    return UsageReader(con, freshness, snapshot_id)


class LakeLedgerSet:
    """The partition ledgers a worker holds in the lake, on one connection (``connect``:
    a new in-memory DuckDB connection with the lake attached as ``lake``)."""

    publishes_snapshots = False

    def __init__(
        self,
        connect: Callable[[], duckdb.DuckDBPyConnection],
        topic: str,
        owner: str | None = None,
        memory_limit: str = "512MB",
    ) -> None:
        self.topic = topic
        self.owner = owner or default_owner()
        self.con = connect()
        self.con.execute(f"SET memory_limit = '{memory_limit}'")
        self.con.execute("SET threads = 1")  # as embedded (docs/performance.md)
        self.con.execute("SET preserve_insertion_order = false")
        self.held: dict[int, PartitionLedger] = {}

    def acquire(self, partition: int) -> PartitionLedger:
        if partition not in self.held:
            self.held[partition] = LakePartitionLedger(self.con, self.topic, partition, self.owner)
        return self.held[partition]

    def release(self, partitions: Iterable[int], snapshot_dir: Path | None) -> None:
        """Forget these ledgers: everything they hold is committed in the lake, and the next
        owner claims them with a newer epoch."""
        for partition in list(partitions):
            self.held.pop(partition, None)

    def forget(self, partition: int) -> None:
        self.held.pop(partition, None)

    def close(self, snapshot_dir: Path | None) -> None:
        self.held.clear()
        self.con.close()


__all__ = [
    "LakeLedgerSet",
    "LakePartitionLedger",
    "lake_ddl",
    "open_lake_usage",
    "partition_schemas",
    "schema_alias",
]
