"""The ledger: one set of tables per (topic, partition), owned by whichever worker holds the
partition. A batch's offsets, dedup ids, aggregates, sessions, duplicates and dead letters
commit in one transaction, so a worker killed at any instruction either applied the
batch whole or not at all, and restarts from the offset stored beside the data.

``LedgerStore`` is the seam the worker's commit step and its housekeeping use; it has two
implementations sharing ``PartitionLedger`` (the dedup, fold and dead-letter SQL):
- embedded (``LedgerSet``, the default): one DuckDB file per partition, all ATTACHed to one
  in-memory DuckDB connection so they share one buffer pool (bounded by ``memory_limit``).
  DuckDB's file lock keeps a second worker out of a partition file until the first has
  detached it.
- cluster mode (``aggregator.lake_ledger``): one schema per partition in the DuckLake,
  where an owner epoch fences a worker that lost the partition (``OwnershipLost``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from aggregator.files import retry_while_locked, topic_folder
from aggregator.fold import Folded, fold_fresh, stored_maximum
from aggregator.recovery import set_aside_torn_ledger
from aggregator.snapshot import manifest_path, publish_partition
from common.errors import LedgerError
from common.sqltext import sql_string
from schemas.codec import COUNTERS
from schemas.prepare import DeadLetter, PreparedBatch, RecordBatch

log = logging.getLogger(__name__)

# Counters are 128-bit: an Avro long each, summed without a ceiling they could pass 2**63
# (the ceiling, ``aggregator.fold.COUNTER_CEILING``, keeps them far below 2**127).
COUNTER_TYPE = "HUGEINT"
HASH_TYPE = "UHUGEINT"


def ledger_ddl(counter_type: str = COUNTER_TYPE, hash_type: str = HASH_TYPE) -> list[str]:
    """The ledger's tables (``{a}``: where they live), counters and dedup hashes of these
    types."""
    counter_cols = ", ".join(f"{c} {counter_type} NOT NULL DEFAULT 0" for c in COUNTERS)
    return [d.replace("{counters}", counter_cols).replace("{hash}", hash_type) for d in _DDL]


_DDL = [
    """CREATE TABLE IF NOT EXISTS {a}.offsets (
        topic VARCHAR NOT NULL, partition INTEGER NOT NULL, next_offset BIGINT NOT NULL,
        max_occurred_at BIGINT, updated_at TIMESTAMPTZ NOT NULL, PRIMARY KEY (topic, partition))""",
    """CREATE TABLE IF NOT EXISTS {a}.seen_events (
        h {hash} NOT NULL, partition INTEGER NOT NULL, occurred_at BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS {a}.aggregates (
        tenant_id VARCHAR NOT NULL, period VARCHAR NOT NULL, partition INTEGER NOT NULL,
        events BIGINT NOT NULL, sessions BIGINT NOT NULL, {counters},
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
    # replay state (DEAD_LETTER_STATES); ADD COLUMN keeps ledgers made before it readable
    "ALTER TABLE {a}.dead_letters ADD COLUMN IF NOT EXISTS state VARCHAR DEFAULT 'open'",
    "ALTER TABLE {a}.dead_letters ADD COLUMN IF NOT EXISTS replayed_at TIMESTAMPTZ",
    """CREATE TABLE IF NOT EXISTS {a}.forwarded (
        topic VARCHAR NOT NULL, partition INTEGER NOT NULL, "offset" BIGINT NOT NULL,
        tenant_id VARCHAR NOT NULL, event_id VARCHAR NOT NULL, to_partition INTEGER NOT NULL,
        forwarded_at TIMESTAMPTZ NOT NULL)""",
    # the corrections applied (the refused ones are dead letters): who asked for what, why
    f"""CREATE TABLE IF NOT EXISTS {{a}}.corrections (
        tenant_id VARCHAR NOT NULL, period VARCHAR NOT NULL, event_id VARCHAR NOT NULL,
        "offset" BIGINT NOT NULL, corrects_event_id VARCHAR, reason VARCHAR NOT NULL,
        {", ".join(f"{c} BIGINT NOT NULL" for c in COUNTERS)},
        applied_at TIMESTAMPTZ NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS {a}.replays (
        request_id VARCHAR NOT NULL PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL,
        counted BIGINT NOT NULL, duplicates BIGINT NOT NULL, still_failing BIGINT NOT NULL,
        forwarded BIGINT NOT NULL)""",
]
# What became of a dead letter: never replayed; replayed and counted; replayed and found
# already counted; replayed and sent on to its tenant's partition (counted there); replayed
# and refused again (its reason is then the new one).
DEAD_LETTER_STATES = (
    "open", "replayed_counted", "replayed_duplicate", "replayed_forwarded", "still_failing"
)  # fmt: skip
REPLAYABLE = ("open", "still_failing")
DDL = ledger_ddl()

# 128-bit hash of the idempotency key (collision odds ~1e-25 at 10M ids): 16 bytes a row.
EVENT_HASH = "md5_number(tenant_id || chr(0) || event_id)"


def ledger_path(ledger_dir: Path, topic: str, partition: int) -> Path:
    return ledger_dir / topic_folder(topic) / f"p-{partition:04d}.duckdb"


@dataclass
class CommitResult:
    counted: int
    duplicates: int
    dead: int  # the batch's dead letters plus ``refused``
    refused: list[DeadLetter] = field(default_factory=list)  # valid events the fold could
    # not apply (over the ceiling), among ``dead``
    forwarded: int = 0


@dataclass(frozen=True)
class ReplayRequest:
    """Replay the replayable dead letters (``REPLAYABLE``) stored at or before
    ``requested_at`` (unix seconds), of ``reason`` (a code; None: all), of ``partition``
    (None: all)."""

    request_id: str
    requested_at: float
    reason: str | None = None
    partition: int | None = None


class OwnershipLost(LedgerError):
    """A commit refused because this worker no longer owns the partition (cluster mode:
    another worker claimed it with a newer epoch). Nothing of the batch was stored."""


class PartitionLedger:
    """The ledger of one partition, reached as ``alias`` (an attached file, or a schema of
    the lake) on the worker's shared connection."""

    event_hash = EVENT_HASH  # the dedup id's SQL, of type HASH_TYPE

    def __init__(self, con: duckdb.DuckDBPyConnection, alias: str, topic: str, partition: int):
        self.con = con
        self.alias = alias
        self.topic = topic
        self.partition = partition
        self._create_tables()
        self.bound = stored_maximum(self.con, alias)  # upper bound of every counter total
        self.next_offset, self.max_occurred_at = self._stored_offset()
        self.last_publish = 0.0
        self.last_commit = 0.0
        self.committed_at: float | None = None  # wall clock of this process's last commit
        self.log_end: int | None = None  # the partition's end as its owner last saw it

    def _create_tables(self) -> None:
        for ddl in DDL:
            self.con.execute(ddl.format(a=self.alias))
        widen_counters(self.con, self.alias)

    def _stored_offset(self) -> tuple[int | None, int | None]:
        """(next offset, newest occurred_at) stored for the partition (None: none yet)."""
        row = self.con.execute(
            f"SELECT next_offset, max_occurred_at FROM {self.alias}.offsets "
            "WHERE topic = ? AND partition = ?",
            [self.topic, self.partition],
        ).fetchone()
        return (row[0], row[1]) if row else (None, None)

    def _hold(self) -> None:
        """Inside a transaction: make sure this worker still owns the partition, else raise
        ``OwnershipLost`` (embedded mode: DuckDB's file lock already does)."""

    def commit(self, batch: PreparedBatch) -> CommitResult:
        """Apply one prepared batch atomically; returns what it counted.

        One transaction (``_transaction``: the fresh events counted, folded and their ids
        remembered), then the duplicates, dead letters (the batch's and the fold's
        refusals), forwarded events (each only if any) and the offset. The forwarded
        events must already be acknowledged by the broker: a crash before this commit
        forwards them again, and the destination's dedup makes the second copy a duplicate.
        """
        a, con = self.alias, self.con
        max_at = later_of(self.max_occurred_at, batch.max_occurred_at)

        def apply(first_seen: int, folded: Folded) -> None:
            if first_seen < batch.events.num_rows:
                con.execute(
                    f"""INSERT INTO {a}.duplicates
                        SELECT ?, ?, b."offset", b.tenant_id, b.event_id, now()
                        FROM batch_events b ANTI JOIN fresh_ids f ON f."offset" = b."offset"
                    """,
                    [self.topic, self.partition],
                )
            dead = [*batch.dead, *folded.refused]
            if dead:
                with registered(con, "dead_rows", self._dead_table(dead)):
                    con.execute(
                        f"""INSERT INTO {a}.dead_letters BY NAME SELECT ? AS topic,
                            ? AS partition, *, now() AS dead_lettered_at FROM dead_rows""",
                        [self.topic, self.partition],
                    )
            self._record_forwarded(batch)
            self._store_offset(batch.next_offset, max_at)

        first_seen, folded = self._transaction(batch, apply)
        self.next_offset = batch.next_offset
        self.max_occurred_at = max_at
        self.last_commit = time.monotonic()
        self.committed_at = time.time()
        counted = first_seen - len(folded.refused)
        return CommitResult(
            counted,
            batch.events.num_rows - first_seen,
            len(batch.dead) + len(folded.refused),
            folded.refused,
            len(batch.forward),
        )

    def replayable(self, request: ReplayRequest) -> RecordBatch | None:
        """The dead letters ``request`` replays here, as records (offset order); None when
        this ledger applied it already."""
        a, con = self.alias, self.con
        done = con.execute(
            f"SELECT 1 FROM {a}.replays WHERE request_id = ?", [request.request_id]
        ).fetchall()
        if done:
            return None
        rows = con.execute(
            f"""SELECT "offset", key, value FROM {a}.dead_letters
                WHERE state IN {REPLAYABLE} AND dead_lettered_at <= make_timestamptz(?)
                  AND (?::VARCHAR IS NULL OR reason_code = ?)
                ORDER BY "offset" """,
            [int(request.requested_at * 1_000_000), request.reason, request.reason],
        ).fetchall()
        return RecordBatch([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])

    def replay(self, request: ReplayRequest, batch: PreparedBatch) -> CommitResult:
        """Apply the re-prepared dead letters of ``request`` (``batch``, made from
        ``replayable``) atomically, exactly as ``commit`` applies live events, and mark each
        dead letter's state; the request is recorded as applied in the same transaction,
        so a second run of it here changes nothing. The stored offset does not move."""
        a, con = self.alias, self.con

        def mark(offsets: pa.Array, state: str) -> None:
            with registered(con, "marked", pa.table({"offset": offsets})):
                con.execute(
                    f"""UPDATE {a}.dead_letters d SET state = ?, replayed_at = now()
                        FROM marked m WHERE d."offset" = m."offset" """,
                    [state],
                )

        def apply(first_seen: int, folded: Folded) -> None:
            self._hold()
            fresh = con.execute('SELECT "offset" FROM fresh_ids').to_arrow_table().column(0)
            offsets = batch.events.column("offset")
            refused = pa.array([d.offset for d in folded.refused], pa.int64())
            counted = pc.filter(fresh, pc.invert(pc.is_in(fresh, refused)))
            mark(
                counted.combine_chunks() if counted.num_chunks else pa.array([], pa.int64()),
                "replayed_counted",
            )
            if first_seen < batch.events.num_rows:
                mark(pc.filter(offsets, pc.invert(pc.is_in(offsets, fresh))), "replayed_duplicate")
            if batch.forward:
                mark(pa.array([f.offset for f in batch.forward], pa.int64()), "replayed_forwarded")
                self._record_forwarded(batch)
            dead = [*batch.dead, *folded.refused]
            if dead:
                with registered(con, "dead_rows", self._dead_table(dead)):
                    con.execute(
                        f"""UPDATE {a}.dead_letters d SET reason = r.reason,
                              reason_code = r.reason_code, state = 'still_failing',
                              replayed_at = now()
                            FROM dead_rows r WHERE d."offset" = r."offset"
                              AND (d.state != 'still_failing' OR d.reason != r.reason)"""
                    )
            con.execute(
                f"INSERT INTO {a}.replays VALUES (?, now(), ?, ?, ?, ?)",
                [
                    request.request_id,
                    first_seen - len(folded.refused),
                    batch.events.num_rows - first_seen,
                    len(dead),
                    len(batch.forward),
                ],
            )

        first_seen, folded = self._transaction(batch, apply)
        self.last_commit = time.monotonic()
        self.committed_at = time.time()
        return CommitResult(
            first_seen - len(folded.refused),
            batch.events.num_rows - first_seen,
            len(batch.dead) + len(folded.refused),
            folded.refused,
            len(batch.forward),
        )

    def open_dead_letters(self) -> dict[str, int]:
        """Replayable dead letters by reason code."""
        rows = self.con.execute(
            f"""SELECT reason_code, count(*) FROM {self.alias}.dead_letters
                WHERE state IN {REPLAYABLE} GROUP BY reason_code"""
        ).fetchall()
        return {str(r[0]): int(r[1]) for r in rows}

    def _transaction(
        self, batch: PreparedBatch, apply: Callable[[int, Folded], None]
    ) -> tuple[int, Folded]:
        """One transaction: find ``batch``'s fresh events, fold them, remember their ids,
        then ``apply(first_seen, folded)`` with ``batch_events`` and the ``fresh_ids`` temp
        table (offset, h, occurred_at) still there; returns (first_seen, folded). Any
        DuckDB error rolls it all back.

        Fresh: first sighting of their id (the 128-bit hash, computed once, anti-joined with
        ``seen_events``; only offset, hash and time are materialised); every unseen copy of a
        correction is handed to the fold, which takes at most one (a refused copy leaves the
        next to be judged) and names the others ``repeated``. They are folded into
        sessions and aggregates (``aggregator.fold``, which refuses events that would take a
        counter past its ceiling: those become dead letters and their ids stay unseen). When
        every event is fresh the Arrow batch itself is the fresh set.
        """
        a, con = self.alias, self.con
        events = batch.events
        con.register("batch_events", events)
        try:
            con.execute("BEGIN TRANSACTION")
            # temp tables live in memory and vanish with a rolled-back transaction
            con.execute(
                f"""CREATE OR REPLACE TEMP TABLE fresh_ids AS
                    SELECT b.* FROM (
                      SELECT "offset", {self.event_hash} AS h, occurred_at
                      FROM batch_events WHERE first_in_batch OR correction) b
                    ANTI JOIN {a}.seen_events s ON s.h = b.h"""
            )
            first_seen = _scalar(con, "SELECT count(*) FROM fresh_ids")
            fresh = events
            if first_seen < events.num_rows:
                offsets = con.execute('SELECT "offset" FROM fresh_ids').to_arrow_table()
                fresh = events.filter(pc.is_in(events.column("offset"), offsets.column(0)))
            folded = fold_fresh(con, a, fresh, self.partition, self.bound, batch.corrections)
            if folded.repeated:  # copies of a correction applied in this batch: duplicates
                with registered(con, "repeated", pa.table({"offset": folded.repeated})):
                    con.execute('DELETE FROM fresh_ids WHERE "offset" IN (SELECT * FROM repeated)')
                first_seen -= len(folded.repeated)
            remember = f"INSERT INTO {a}.seen_events SELECT h, ?, occurred_at FROM fresh_ids"
            if folded.refused:  # refused ids stay unseen: a redelivery is refused again
                with registered(con, "refused_rows", self._dead_table(folded.refused)):
                    remember += ' WHERE "offset" NOT IN (SELECT "offset" FROM refused_rows)'
                    con.execute(remember, [self.partition])
            else:
                con.execute(remember, [self.partition])
            apply(first_seen, folded)
            con.execute("DROP TABLE fresh_ids")
            con.execute("COMMIT")
        except duckdb.Error as exc:
            with contextlib.suppress(duckdb.Error):
                con.execute("ROLLBACK")
            raise LedgerError(
                f"ledger commit failed for {self.topic}[{self.partition}]: {exc}"
            ) from exc
        except BaseException:  # OwnershipLost, or an interrupt: nothing of it is stored
            with contextlib.suppress(duckdb.Error):
                con.execute("ROLLBACK")
            raise
        finally:
            with contextlib.suppress(duckdb.Error):
                con.unregister("batch_events")
        self.bound = folded.bound
        return first_seen, folded

    def _record_forwarded(self, batch: PreparedBatch) -> None:
        if not batch.forward:
            return
        fwd = batch.forward
        rows = pa.table(
            {
                "offset": pa.array([f.offset for f in fwd], pa.int64()),
                "tenant_id": pa.array([f.tenant_id for f in fwd], pa.string()),
                "event_id": pa.array([f.event_id for f in fwd], pa.string()),
                "to_partition": pa.array([f.to_partition for f in fwd], pa.int32()),
            }
        )
        with registered(self.con, "forwarded_rows", rows):
            self.con.execute(
                f"""INSERT INTO {self.alias}.forwarded SELECT ?, ?, "offset", tenant_id,
                    event_id, to_partition, now() FROM forwarded_rows""",
                [self.topic, self.partition],
            )

    def _store_offset(self, next_offset: int, max_at: int | None) -> None:
        # UPDATE of the existing row, not INSERT ... ON CONFLICT (docs/performance.md)
        updated = _scalar(
            self.con,
            f"""UPDATE {self.alias}.offsets
                SET next_offset = ?, max_occurred_at = ?, updated_at = now()
                WHERE topic = ? AND partition = ?""",
            [next_offset, max_at, self.topic, self.partition],
        )
        if not updated:
            self.con.execute(
                f"INSERT INTO {self.alias}.offsets VALUES (?, ?, ?, ?, now())",
                [self.topic, self.partition, next_offset, max_at],
            )

    @staticmethod
    def _dead_table(dead: list[DeadLetter]) -> pa.Table:
        return pa.table(
            {
                "offset": pa.array([d.offset for d in dead], pa.int64()),
                "key": pa.array([d.key for d in dead], pa.binary()),
                "value": pa.array([d.value for d in dead], pa.binary()),
                "reason": pa.array([d.reason for d in dead], pa.string()),
                "reason_code": pa.array([d.reason_code for d in dead], pa.string()),
            }
        )

    def prune(self, oldest_billable_micros: int | None) -> int:
        """Forget the dedup ids of periods that can no longer be billed (events of those
        periods are dead-lettered by ``prepare_batch``, so their ids are never needed)."""
        if oldest_billable_micros is None:
            return 0
        row = self.con.execute(
            f"DELETE FROM {self.alias}.seen_events WHERE occurred_at < ? RETURNING 1",
            [oldest_billable_micros],
        ).fetchall()
        return len(row)

    def publish(self, snapshot_dir: Path, con: duckdb.DuckDBPyConnection | None = None) -> None:
        """Write the snapshot readers use (``con``: a cursor of this ledger's connection)."""
        publish_partition(
            con or self.con,
            self.alias,
            snapshot_dir,
            self.topic,
            self.partition,
            committed_at=self.committed_at,
            log_end=self.log_end,
        )
        self.last_publish = time.monotonic()


RELEASE_THREADS = 2  # ledgers published and checkpointed at once when several are released


class LedgerStore(Protocol):
    """Where a worker's partition ledgers live: what the commit step (``held``), the
    rebalance callbacks (``acquire``, ``release``, ``forget``) and the readers rely on."""

    held: dict[int, PartitionLedger]
    publishes_snapshots: bool  # True: readers read the Parquet snapshots ledgers publish

    def acquire(self, partition: int) -> PartitionLedger:
        """The partition's ledger, now owned by this worker (waiting for its last owner)."""
        ...

    def release(self, partitions: Iterable[int], snapshot_dir: Path | None) -> None:
        """Let go of these ledgers (publishing their snapshots unless ``snapshot_dir`` is
        None); partitions not held are skipped."""
        ...

    def forget(self, partition: int) -> None:
        """Drop a ledger whose ownership was lost, storing nothing more of it."""
        ...

    def close(self, snapshot_dir: Path | None) -> None:
        """Release every ledger and the connection."""
        ...


class LedgerSet:
    """The partition ledgers a worker holds, on one shared DuckDB connection."""

    publishes_snapshots = True

    def __init__(
        self,
        ledger_dir: Path,
        topic: str,
        lock_timeout: float,
        memory_limit: str = "512MB",
        snapshot_dir: Path | None = None,
    ) -> None:
        self.ledger_dir = ledger_dir
        self.snapshot_dir = snapshot_dir  # where its partitions' manifests are published
        self.topic = topic
        self.lock_timeout = lock_timeout
        self.con = duckdb.connect(":memory:")
        self.con.execute(f"SET memory_limit = '{memory_limit}'")
        # One DuckDB thread: a batch's statements run faster on one than on several and
        # leave a core to the Kafka client (docs/performance.md).
        self.con.execute("SET threads = 1")
        self.con.execute("SET preserve_insertion_order = false")
        self.held: dict[int, PartitionLedger] = {}

    def acquire(self, partition: int) -> PartitionLedger:
        """Attach a partition's file, waiting while another worker still holds it; a file
        torn at its creation is set aside first (``aggregator.recovery``)."""
        if partition in self.held:
            return self.held[partition]
        path = ledger_path(self.ledger_dir, self.topic, partition)
        manifest = (
            manifest_path(self.snapshot_dir, self.topic, partition) if self.snapshot_dir else None
        )
        set_aside_torn_ledger(path, manifest)
        path.parent.mkdir(parents=True, exist_ok=True)
        alias = f"p{partition}"
        attach = f"ATTACH {sql_string(path)} AS {alias}"
        try:
            retry_while_locked(
                lambda: self.con.execute(attach), self.lock_timeout, f"ledger {path}", LedgerError
            )
        except LedgerError as exc:
            if "not a valid DuckDB database" not in str(exc):
                raise
            raise LedgerError(
                f"cannot open ledger {path}: damaged (not a DuckDB file, nor one cut short at "
                "creation), left as it is: restore it from a backup"
            ) from exc
        ledger = PartitionLedger(self.con, alias, self.topic, partition)
        self.held[partition] = ledger
        return ledger

    def release(self, partitions: Iterable[int], snapshot_dir: Path | None) -> None:
        """Publish (unless ``snapshot_dir`` is None), checkpoint and detach these ledgers.

        Two at a time, each on its own cursor: publishing and checkpointing write files
        with the GIL released, so on two cores a worker's shutdown takes half as long.
        Every ledger is detached even if another one failed; the first error is raised.
        """
        ledgers = [self.held.pop(p) for p in list(partitions) if p in self.held]
        if len(ledgers) <= 1:
            self._release_all(ledgers, self.con, snapshot_dir)
            return
        cursors = [self.con.cursor() for _ in range(RELEASE_THREADS)]
        try:
            with ThreadPoolExecutor(RELEASE_THREADS) as pool:
                futures = [
                    pool.submit(
                        self._release_all, ledgers[i::RELEASE_THREADS], cursor, snapshot_dir
                    )
                    for i, cursor in enumerate(cursors)
                ]
                for future in futures:
                    future.result()
        finally:
            for cursor in cursors:
                cursor.close()

    def _release_all(
        self, ledgers: list[PartitionLedger], con: duckdb.DuckDBPyConnection, snapshot: Path | None
    ) -> None:
        first: BaseException | None = None
        for ledger in ledgers:
            try:
                self._release(ledger, con, snapshot)
            except BaseException as exc:
                first = first or exc
        if first is not None:
            raise first

    @staticmethod
    def _release(
        ledger: PartitionLedger, con: duckdb.DuckDBPyConnection, snapshot_dir: Path | None
    ) -> None:
        try:
            if snapshot_dir is not None:
                ledger.publish(snapshot_dir, con)
            con.execute("CHECKPOINT " + ledger.alias)
        finally:
            con.execute(f"DETACH {ledger.alias}")

    def forget(self, partition: int) -> None:
        ledger = self.held.pop(partition, None)
        if ledger is not None:
            self.con.execute(f"DETACH {ledger.alias}")

    def close(self, snapshot_dir: Path | None) -> None:
        try:
            self.release(list(self.held), snapshot_dir)
        finally:
            self.con.close()


def widen_counters(con: duckdb.DuckDBPyConnection, alias: str) -> None:
    """Ledger files written before the counters were 128-bit hold BIGINT counters: widen
    them in place (values kept) so every later sum is exact."""
    narrow = [
        name
        for (name,) in con.execute(
            "SELECT column_name FROM duckdb_columns() WHERE database_name = ? "
            "AND table_name = 'aggregates' AND data_type <> ? AND list_contains(?, column_name)",
            [alias, COUNTER_TYPE, list(COUNTERS)],
        ).fetchall()
    ]
    if not narrow:
        return
    con.execute("BEGIN TRANSACTION")
    try:
        for name in narrow:
            con.execute(f"ALTER TABLE {alias}.aggregates ALTER {name} TYPE {COUNTER_TYPE}")
        con.execute("COMMIT")
    except duckdb.Error as exc:
        with contextlib.suppress(duckdb.Error):
            con.execute("ROLLBACK")
        raise LedgerError(f"cannot widen the counters of ledger {alias}: {exc}") from exc
    log.info("ledger %s: counters widened to %s", alias, COUNTER_TYPE)


def later_of(a: int | None, b: int | None) -> int | None:
    """The later of two optional timestamps (None: none seen yet)."""
    return b if a is None else a if b is None else max(a, b)


@contextlib.contextmanager
def registered(con: duckdb.DuckDBPyConnection, name: str, table: pa.Table) -> Iterator[None]:
    """``table`` registered on ``con`` as ``name`` for the block."""
    con.register(name, table)
    try:
        yield
    finally:
        with contextlib.suppress(duckdb.Error):
            con.unregister(name)


def _scalar(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> int:
    row = con.execute(sql, params).fetchone()
    return int(row[0]) if row else 0


__all__ = [
    "DDL",
    "DEAD_LETTER_STATES",
    "CommitResult",
    "LedgerSet",
    "LedgerStore",
    "OwnershipLost",
    "PartitionLedger",
    "ReplayRequest",
    "later_of",
    "ledger_path",
]
