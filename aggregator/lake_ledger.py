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

Catalog outages (PostgreSQL restarted or out of reach) are waited out on a new connection
(``LakeLedgerSet.recover``) and the operation is run again from its start. A COMMIT cut off
mid-way may or may not have reached the lake; the fence makes reading it back exact: under
our epoch only we move ``next_offset``, from the offset we last stored to the batch's end, so
the row says which (``LakePartitionLedger._transaction``); a moved epoch means not ours.
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
from typing import TypeVar

import duckdb

from aggregator.files import topic_folder
from aggregator.fold import Folded
from aggregator.lake import LAKE, CatalogWatch, catalog_lost, discard
from aggregator.ledger import (
    CommitResult,
    OwnershipLost,
    PartitionLedger,
    ReplayRequest,
    ledger_ddl,
)
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
from common.errors import CatalogError, LedgerError, StorageError
from schemas.prepare import PreparedBatch, RecordBatch

log = logging.getLogger(__name__)
T = TypeVar("T")

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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


class _Again(Exception):
    """A commit cut off by a catalog outage that did not reach the lake: run it again, from
    its start, on the new connection."""


class LakePartitionLedger(PartitionLedger):
    """One partition's ledger in the lake, claimed for this worker on creation (on
    ``ledgers``' connection, which it outlives catalog outages with)."""

    event_hash = LAKE_EVENT_HASH

    def __init__(
        self,
        con: duckdb.DuckDBPyConnection,
        topic: str,
        partition: int,
        owner: str,
        ledgers: LakeLedgerSet | None = None,
    ):
        self.ledgers = ledgers  # a worker's: outages are waited out (None: they fail)
        self.owner = owner
        self.epoch = 0  # ours, once claimed
        self._claimed: tuple[int | None, int | None] = (None, None)
        self._landed: Callable[[], bool] = self._offset_moved
        self._expected: tuple[int | None, int] = (None, 0)  # (stored before, after the batch)
        super().__init__(con, schema_alias(topic, partition), topic, partition)

    def _outage(self, exc: BaseException) -> bool:
        """Whether ``exc`` is a catalog outage to wait out (then waited out: ``self.con`` is
        the new connection)."""
        if self.ledgers is None or not self.ledgers.outage(exc):
            return False
        self.con = self.ledgers.recover(exc)
        return True

    def _create_tables(self) -> None:
        """Create the schema, its tables and the offsets row once (one transaction: two
        hosts creating it at once conflict, the loser finds it made), then claim it."""
        a = self.alias

        def create() -> None:
            con = self.con
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
        a = self.alias
        found: list[tuple[int, int | None, int | None]] = []

        def claim_once() -> None:
            found.clear()
            row = self._offsets_row()
            updated = self.con.execute(
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
        commit as conflicting, or after a catalog outage (each body here may run twice: a
        claim claims again, a create finds the schema, a prune finds nothing more)."""
        attempt = 0
        while True:
            con = self.con
            try:
                con.execute("BEGIN TRANSACTION")
                body()
                con.execute("COMMIT")
                return
            except duckdb.Error as exc:
                with contextlib.suppress(duckdb.Error):
                    con.execute("ROLLBACK")
                if self._outage(exc):
                    continue
                attempt += 1
                if not is_conflict(exc) or attempt == CONFLICT_ATTEMPTS:
                    raise LedgerError(
                        f"cannot {what} {self.topic}[{self.partition}] in the lake: {exc}"
                    ) from exc
            except BaseException:
                with contextlib.suppress(duckdb.Error):
                    con.execute("ROLLBACK")
                raise
            time.sleep(CONFLICT_PAUSE_SECONDS * attempt)

    def _read(self, body: Callable[[], T]) -> T:
        """``body`` (a read on ``self.con``), again after each catalog outage."""
        while True:
            try:
                return body()
            except duckdb.Error as exc:
                if not self._outage(exc):
                    raise

    def open_dead_letters(self) -> dict[str, int]:
        return self._read(super().open_dead_letters)

    def replayable(self, request: ReplayRequest) -> RecordBatch | None:
        return self._read(lambda: super(LakePartitionLedger, self).replayable(request))

    def commit(self, batch: PreparedBatch) -> CommitResult:
        """As embedded; a commit cut off by a catalog outage waits for the catalog, then
        (if the cut came in its COMMIT, whose outcome the client cannot know) reads the
        offsets row back: at the batch's end, it was stored (counted once, as it is); still
        at the batch's start, it was not (run again); another epoch, not ours any more."""
        self._landed = self._offset_moved
        self._expected = (self.next_offset, batch.next_offset)
        while True:
            try:
                return super().commit(batch)
            except _Again:
                continue

    def replay(self, request: ReplayRequest, batch: PreparedBatch) -> CommitResult:
        """As embedded; after an outage in its COMMIT, the ``replays`` row says whether it
        was stored."""
        self._landed = lambda: self._replay_recorded(request.request_id)
        while True:
            try:
                return super().replay(request, batch)
            except _Again:
                continue

    def _offsets_row(self) -> tuple[int, int | None, int | None]:
        """(epoch, next offset, newest occurred_at) of the partition's offsets row."""
        row = self.con.execute(
            f"SELECT epoch, next_offset, max_occurred_at FROM {self.alias}.offsets "
            "WHERE topic = ? AND partition = ?",
            [self.topic, self.partition],
        ).fetchone()
        if row is None:
            raise LedgerError(f"ledger {self.alias} has no offsets row")
        return int(row[0]), row[1], row[2]

    def _still_ours(self, what: str) -> int | None:
        """The stored next offset (read now: a new snapshot), unless another worker claimed
        the partition since."""
        epoch, stored, _ = self._offsets_row()
        if epoch != self.epoch:
            raise OwnershipLost(
                f"{self.topic}[{self.partition}]: {what} cut off by a catalog outage; the "
                f"partition is no longer ours (epoch {epoch}, ours {self.epoch}): not counted "
                "here, its new owner resumes from the offset stored"
            )
        return stored

    def _offset_moved(self) -> bool:
        before, after = self._expected
        stored = self._still_ours("a commit")
        if stored == after:
            return True
        if stored == before:
            return False
        raise LedgerError(
            f"{self.topic}[{self.partition}]: after a catalog outage the stored offset is "
            f"{stored}, neither {before} (before the batch) nor {after} (after it)"
        )

    def _replay_recorded(self, request_id: str) -> bool:
        self._still_ours("a replay")
        rows = self.con.execute(
            f"SELECT 1 FROM {self.alias}.replays WHERE request_id = ?", [request_id]
        ).fetchall()
        return bool(rows)

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
        the offsets row) while DuckLake refuses its commit as conflicting.

        Cut off by a catalog outage: wait until the catalog answers (``ledgers.recover``),
        then, if everything up to COMMIT had run, ask ``_landed`` (read back, never
        guessed) whether the COMMIT reached the lake: if so, it is done (the fold's result
        as computed); if not, or if the cut came before COMMIT (nothing reaches the lake
        before it), ``_Again``: the caller runs the whole commit again on the new
        connection."""
        done: list[tuple[int, Folded]] = []  # set once ``apply`` ran: only COMMIT was left

        def applied(first_seen: int, folded: Folded) -> None:
            apply(first_seen, folded)
            done.append((first_seen, folded))

        for attempt in range(CONFLICT_ATTEMPTS):
            done.clear()
            try:
                return super()._transaction(batch, applied)
            except OwnershipLost:
                raise
            except LedgerError as exc:
                if self._outage(exc):
                    if done:  # cut off in COMMIT: read back whether it reached the lake
                        landed: bool = self._read(self._landed)
                        log.warning(
                            "p%d: the catalog went away during the COMMIT of [%s, %d); the "
                            "lake says it was %s",
                            self.partition,
                            self.next_offset,
                            batch.next_offset,
                            "stored: counted once" if landed else "not stored: committing again",
                        )
                        if landed:
                            self.bound = done[0][1].bound
                            return done[0]
                    raise _Again() from exc
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
    a new in-memory DuckDB connection with the lake attached as ``lake``).

    Catalog outages (PostgreSQL restarted or out of reach) are waited out, never fatal:
    an operation that lost the catalog calls ``recover``, which waits with ``watch``
    (bounded backoff, its log lines and ``pf_catalog_connected``) until a new connection
    attaches the lake, and the operation runs again on it (a commit first resolves an
    unknown COMMIT outcome: ``LakePartitionLedger._transaction``)."""

    publishes_snapshots = False

    def __init__(
        self,
        connect: Callable[[], duckdb.DuckDBPyConnection],
        topic: str,
        owner: str | None = None,
        memory_limit: str = "512MB",
        watch: CatalogWatch | None = None,
    ) -> None:
        self.topic = topic
        self.owner = owner or default_owner()
        self._connect = connect
        self.memory_limit = memory_limit
        self.watch = watch or CatalogWatch()
        self.con = self._open()
        self.held: dict[int, PartitionLedger] = {}

    def _open(self) -> duckdb.DuckDBPyConnection:
        con = self._connect()
        con.execute(f"SET memory_limit = '{self.memory_limit}'")
        con.execute("SET threads = 1")  # as embedded (docs/performance.md)
        con.execute("SET preserve_insertion_order = false")
        return con

    def outage(self, exc: BaseException) -> bool:
        """Whether ``exc`` (not a conflict) came from losing the catalog: its text says so,
        or the catalog does not answer a probe now."""
        if is_conflict(exc) or isinstance(exc, OwnershipLost):
            return False
        if catalog_lost(exc):
            return True
        try:
            self.con.execute(f"SELECT id FROM {LAKE}.current_snapshot()").fetchall()
        except duckdb.Error as probe:
            return catalog_lost(probe)
        return False

    def recover(self, exc: BaseException) -> duckdb.DuckDBPyConnection:
        """Wait out a catalog outage (``exc``: what showed it): close the connection, then
        try a new one after each ``watch.pause`` until one attaches the lake; every held
        ledger moves to it. Raises ``StopRequested`` if asked to stop meanwhile."""
        self.watch.lost(_first_line(exc))
        discard(self.con)
        con = None
        while con is None:
            self.watch.pause()
            try:
                con = self._open()
                con.execute(f"SELECT id FROM {LAKE}.current_snapshot()").fetchall()
            except (CatalogError, duckdb.Error) as failed:
                if con is not None:
                    discard(con)
                    con = None
                if not catalog_lost(failed):
                    raise
                self.watch.lost(_first_line(failed))
        self.con = con
        for ledger in self.held.values():
            ledger.con = con
        self.watch.reached()
        return con

    def acquire(self, partition: int) -> PartitionLedger:
        """Create (once) and claim the partition's ledger; after an outage in between,
        again from the start (a second claim only raises our epoch once more)."""
        while partition not in self.held:
            try:
                self.held[partition] = LakePartitionLedger(
                    self.con, self.topic, partition, self.owner, self
                )
            except duckdb.Error as exc:
                if not self.outage(exc):
                    raise
                self.recover(exc)
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
