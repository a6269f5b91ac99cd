"""The worker: poll, decode, validate, commit to the ledger; survive rebalances and kills.

Commit contract (why exactly-once holds):
1. Every partition has its own ledger file; its ``offsets`` row commits in the same DuckDB
   transaction as the aggregates, dedup ids, duplicates and dead letters of a batch.
2. On assignment the worker attaches the partition's ledger and hands the stored offset
   to ``assign``/``incremental_assign`` (not ``seek``), so Kafka resumes exactly there.
3. Records below the ledger's offset (redelivery) are skipped; ids already in the dedup
   table (the same event produced twice) are recorded as duplicates, not counted.
4. The Kafka-side commit happens after the DuckDB commit and is only for lag monitoring.
A worker killed between 1 and 4 redoes the batch from the ledger's offset: nothing is lost
or doubled.

Pipelining: three threads, each item in order (``consumer.pipeline``): the main thread
polls and splits by partition, the decoder stage decodes and validates, the committer
stage commits to the ledgers; so poll N+2 is fetched while N+1 decodes and N commits.
Each partition's ``Head`` says where it stands once everything handed over is applied
(the main thread advances its offset, the decoder its newest event time). Rebalance
callbacks (which run inside ``consume()``) and every other use of the ledgers' connection
first wait for both stages to be empty, so no batch is in flight when a partition is
revoked.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)

from aggregator.ledger import LedgerSet, later_of, ledger_path
from aggregator.views import write_query_db
from common.errors import OperationError
from common.logs import Repeats
from common.settings import Settings
from consumer.kafka import (
    cached_high_watermark,
    committed_offsets,
    consumer_config,
    end_offsets,
    split_by_partition,
    topic_partitions,
)
from consumer.metrics import WorkerMetrics
from consumer.pipeline import Stage
from schemas.codec import Codec, default_codec
from schemas.prepare import PreparedBatch, RecordBatch, prepare_batch

log = logging.getLogger(__name__)
DAY_MICROS = 86_400 * 1_000_000
PRUNE_EVERY_SECONDS = 600.0
# --drain's view of the topic's partitions is refreshed this often (partitions are rarely
# added; the metadata request waits behind a fetch, ~0.3 s, so not on every check).
PARTITIONS_MAX_AGE_SECONDS = 10.0
# Records asked of one poll. consume() holds the GIL while it builds a poll's messages
# (~0.7 us each), stalling the decoder's and committer's Python in between their native
# steps; small polls keep those stalls short. Batches still reach METERING_BATCH_SIZE:
# polls accumulate per partition until then (or until a poll comes back short).
POLL_RECORDS = 5_000
GIL_SWITCH_SECONDS = 0.0002
# DuckDB writes its main header and two database headers (3 x 4 KiB) when it creates a file.
DUCKDB_HEADER_BYTES = 12_288


@dataclass
class WorkerStats:
    consumed: int = 0
    counted: int = 0
    duplicates: int = 0
    dead: int = 0
    batches: int = 0
    started: float = field(default_factory=time.monotonic)  # (before the Kafka client)


@dataclass
class Head:
    """Where a partition stands once every batch handed over is applied: ``next_offset``
    is advanced by the main thread, ``max_occurred_at`` (the dedup window's anchor) by
    the decoder."""

    next_offset: int | None
    max_occurred_at: int | None


@dataclass
class DecodeJob:
    """One partition's records of a poll, on their way to the decoder."""

    records: RecordBatch
    partition: int
    head: Head
    now_micros: int


@dataclass
class CommitJob:
    """One partition's prepared slice of a poll, on its way to the ledger."""

    batch: PreparedBatch
    first_offset: int
    prepare_seconds: float


POLL_END = None  # queued after a poll's jobs, through both stages: "batch done"


class Worker:
    """One consumer-group member folding the usage topic into its partition ledgers."""

    def __init__(
        self,
        settings: Settings,
        *,
        drain: bool = False,
        metrics: WorkerMetrics | None = None,
        codec: Codec | None = None,
        strategy: str = "cooperative-sticky",
        extra_config: dict[str, Any] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self.settings = settings
        self.topic = settings.metering_topic
        self.drain = drain
        self.metrics = metrics or WorkerMetrics()
        self.codec = codec or default_codec()
        self.cooperative = strategy == "cooperative-sticky"
        self.stats = WorkerStats()
        self.stop_requested = threading.Event()
        self.fatal: BaseException | None = None
        self.assigned_once = False
        self.closing = False
        self.failed = False
        self.ledgers = LedgerSet(settings.ledger_dir, self.topic, settings.metering_lock_timeout)
        conf = consumer_config(
            settings.kafka_common(), settings.metering_group, strategy, extra_config
        )
        conf["error_cb"] = self._on_error
        conf["logger"] = logging.getLogger("rdkafka")  # librdkafka's logs obey LOG_FORMAT too
        self._errors_logged = Repeats(30.0)
        self.consumer = Consumer(conf)
        self._last_prune = time.monotonic()
        self.progress = progress  # called with (records consumed, records still to go)
        self.lag: dict[int, int] = {}
        self.heads: dict[int, Head] = {}
        self.committer: Stage[CommitJob | None] = Stage("ledger-commit", self._commit)
        self.decoder: Stage[DecodeJob | None] = Stage("decode", self._decode)
        self._waiting: dict[int, list[RecordBatch]] = {}  # polled, not yet handed over
        self._acknowledged: deque[TopicPartition] = deque()  # committed, for Kafka's books
        self._partitions: tuple[float, list[int]] = (-1e9, [])  # (when, ids) for --drain

    # -- rebalance callbacks (run inside consume()) -------------------------------------
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self.closing:
            return  # leaving the group: take nothing new
        try:
            self._settle()
            for tp in partitions:
                if tp.partition not in self.ledgers.held:
                    set_aside_torn_ledger(
                        ledger_path(self.settings.ledger_dir, self.topic, tp.partition)
                    )
                ledger = self.ledgers.acquire(tp.partition)
                tp.offset = (
                    ledger.next_offset if ledger.next_offset is not None else OFFSET_BEGINNING
                )
                self.heads[tp.partition] = Head(ledger.next_offset, ledger.max_occurred_at)
                ledger.publish(self.settings.snapshot_dir)
            if self.cooperative:
                consumer.incremental_assign(partitions)
            else:
                consumer.assign(partitions)
            self.assigned_once = True
            if self.drain:
                self._topic_partitions()  # now, before fetches keep the connection busy
            write_query_db(self.settings.metering_data_dir, self.settings.snapshot_dir, self.topic)
            self.metrics.rebalances.labels(kind="assign").inc()
            self.metrics.partitions_held.set(len(self.ledgers.held))
            log.info("assigned %s", sorted(tp.partition for tp in partitions))
        except BaseException as exc:  # an exception here must stop the worker
            self.fatal = exc
            self.stop_requested.set()
            raise

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        try:
            if not self.closing:  # (closing: the stages are stopped already)
                self._hand_over()  # what was polled of them is still ours to commit
                self._settle()
            snapshot = None if self.failed else self.settings.snapshot_dir
            self.ledgers.release([tp.partition for tp in partitions], snapshot)
            for tp in partitions:
                self.heads.pop(tp.partition, None)
                with contextlib.suppress(KeyError):
                    self.metrics.lag.remove(str(tp.partition))
            self.metrics.rebalances.labels(kind="revoke").inc()
            self.metrics.partitions_held.set(len(self.ledgers.held))
            log.info("revoked %s", sorted(tp.partition for tp in partitions))
        except BaseException as exc:
            self.fatal = exc
            self.stop_requested.set()
            raise

    def _on_error(self, err: Any) -> None:
        """Log a client error once per 30 s (librdkafka repeats them every few ms while a
        broker is down)."""
        if self._errors_logged.first(str(err), time.monotonic()):
            log.warning("kafka client: %s", err)

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> WorkerStats:
        """Consume until stopped (or, with drain, until every partition is at its end)."""
        self.consumer.subscribe(
            [self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )  # fmt: skip
        # A poll allocates two tracked objects per record; at the default thresholds the
        # cyclic GC then runs full collections over every batch in flight (~15% of CPU,
        # measured). Collect young objects 70x less often; nothing here builds cycles.
        gc.set_threshold(50_000, 20, 100)
        # The three threads hand the GIL to each other between native steps (a poll, a
        # polars decode, a DuckDB statement). A thread that wants it waits up to the switch
        # interval; 0.2 ms instead of 5 ms measured ~10% faster on 1M events.
        sys.setswitchinterval(GIL_SWITCH_SECONDS)
        clean = False
        try:
            while not self.stop_requested.is_set():
                size = min(POLL_RECORDS, self.settings.metering_batch_size)
                if self.drain:
                    remaining = self._remaining()
                    if remaining == 0:
                        self._hand_over()
                        if self._drained():
                            break
                    # ask for no more than is left: a poll returns early only when full
                    size = min(size, remaining or size)
                messages = self.consumer.consume(size, 0.5)
                if self.fatal is not None:
                    raise OperationError(f"partition assignment failed: {self.fatal}")
                self._acknowledge()
                if messages:
                    self._collect(split_by_partition(messages))
                if len(messages) < size:
                    self._hand_over()  # caught up: nothing waits for more records
                self._housekeeping(idle=not messages)
                if self.drain and not messages and self._drained():
                    break
            self._hand_over()
            self._settle()
            clean = True
        finally:
            self._shutdown(clean)
        return self.stats

    def _collect(self, by_partition: dict[int, RecordBatch]) -> None:
        """Add each partition's new records to those waiting for the decoder; a partition
        holding a whole batch (``METERING_BATCH_SIZE``) is handed over at once."""
        for partition, records in by_partition.items():
            head = self.heads.get(partition)
            if head is None:
                continue  # revoked while the messages were in flight: the new owner redoes them
            fresh = records.since(head.next_offset or 0)
            if not fresh:
                continue
            head.next_offset = fresh.offsets[-1] + 1
            waiting = self._waiting.setdefault(partition, [])
            waiting.append(fresh)
            if sum(map(len, waiting)) >= self.settings.metering_batch_size:
                self._hand_over([partition])

    def _hand_over(self, partitions: list[int] | None = None) -> None:
        """Send the waiting records (of ``partitions``; default: all) to the decoder.

        The DEBUG lines trace each batch's phases (the fault tests use them to tell where a
        kill landed): "batch" -> "committing" -> "committed" (per partition) -> "done"; the
        last three come from the committer's thread.
        """
        jobs = []
        now = int(time.time() * 1_000_000)
        for partition in list(self._waiting) if partitions is None else partitions:
            parts = self._waiting.pop(partition, [])
            head = self.heads.get(partition)
            if parts and head is not None:
                jobs.append(DecodeJob(RecordBatch.concat(parts), partition, head, now))
        if not jobs:
            return
        log.debug("batch: %d records of %d partition(s)",
                  sum(len(j.records) for j in jobs), len(jobs))  # fmt: skip
        for job in jobs:
            self.decoder.submit(job)
        self.decoder.submit(POLL_END)

    def _decode(self, job: DecodeJob | None) -> None:
        """The decoder's work (its own thread): decode and validate one partition batch."""
        if job is None:
            self.committer.submit(POLL_END)
            return
        began = time.perf_counter()
        head, window = job.head, self.settings.metering_dedup_days * DAY_MICROS
        oldest = None if head.max_occurred_at is None else head.max_occurred_at - window
        batch = prepare_batch(job.partition, job.records, self.codec, job.now_micros, oldest)
        head.max_occurred_at = later_of(head.max_occurred_at, batch.max_occurred_at)
        first = job.records.offsets[0]
        self.committer.submit(CommitJob(batch, first, time.perf_counter() - began))

    def _commit(self, job: CommitJob | None) -> None:
        """The committer's work (its own thread): one partition batch into its ledger."""
        if job is None:
            log.debug("batch done")
            return
        batch, partition = job.batch, job.batch.partition
        began = time.perf_counter()
        log.debug("committing p%d [%d, %d)", partition, job.first_offset, batch.next_offset)
        result = self.ledgers.held[partition].commit(batch)
        log.debug("committed p%d [%d, %d): %d counted, %d duplicates, %d dead", partition,
                  job.first_offset, batch.next_offset, result.counted, result.duplicates,
                  result.dead)  # fmt: skip
        self.metrics.batch_seconds.observe(job.prepare_seconds + time.perf_counter() - began)
        self._count(partition, batch.consumed, result.counted, result.duplicates, batch)
        self.metrics.last_commit.set(time.time())
        self._acknowledged.append(TopicPartition(self.topic, partition, batch.next_offset))

    def _acknowledge(self) -> None:
        """Tell Kafka the offsets the ledgers committed (for lag monitoring only)."""
        done: dict[int, TopicPartition] = {}
        while self._acknowledged:
            tp = self._acknowledged.popleft()
            done[tp.partition] = tp
        if done:
            self.consumer.commit(offsets=list(done.values()), asynchronous=True)

    def _count(self, partition: int, consumed: int, counted: int, dups: int, batch: Any) -> None:
        self.stats.consumed += consumed
        self.stats.counted += counted
        self.stats.duplicates += dups
        self.stats.dead += len(batch.dead)
        self.stats.batches += 1
        self.metrics.consumed.labels(partition=str(partition)).inc(consumed)
        self.metrics.counted.inc(counted)
        self.metrics.duplicates.inc(dups)
        for d in batch.dead:
            self.metrics.dead.labels(reason=d.reason_code).inc()

    def _housekeeping(self, idle: bool) -> None:
        now = time.monotonic()
        due = now - self.settings.metering_snapshot_seconds
        stale = [
            ledger
            for ledger in self.ledgers.held.values()
            if ledger.last_commit > ledger.last_publish and (idle or ledger.last_publish <= due)
        ]
        prune = now - self._last_prune > PRUNE_EVERY_SECONDS
        if idle or stale or prune:
            self._settle()  # publishing and pruning use the ledgers' connection
        for ledger in stale:
            ledger.publish(self.settings.snapshot_dir)
        if prune:
            window = self.settings.metering_dedup_days * DAY_MICROS
            for ledger in self.ledgers.held.values():
                ledger.prune(window)
            self._last_prune = now
        if idle or self.stats.batches % 20 == 0:
            self._update_lag()

    def _settle(self) -> None:
        """Wait until every record handed over is decoded and committed."""
        self.decoder.flush()
        self.committer.flush()

    def _lag_of(self, partition: int, head: Head) -> int | None:
        """Records of the partition not yet handed over, per its cached end (None: not
        known yet)."""
        high = cached_high_watermark(self.consumer, self.topic, partition)
        return None if high < 0 else max(0, high - (head.next_offset or 0))

    def _update_lag(self) -> None:
        for partition, head in self.heads.items():
            lag = self._lag_of(partition, head)
            if lag is not None:
                self.lag[partition] = lag
                self.metrics.lag.labels(partition=str(partition)).set(lag)
        if self.progress is not None:
            held = sum(v for p, v in self.lag.items() if p in self.heads)
            self.progress(self.stats.consumed, held)

    def _remaining(self) -> int | None:
        """Records left in the partitions held, per the cached ends (None: not known)."""
        lags = [self._lag_of(p, head) for p, head in self.heads.items()]
        if not lags or None in lags:
            return None
        return sum(lag for lag in lags if lag is not None)

    def _drained(self) -> bool:
        """True once every partition of the topic is consumed to its end (by anyone)."""
        if not self.assigned_once:
            return False
        try:
            ends = end_offsets(self.consumer, self.topic, self._topic_partitions())
            others = [p for p in ends if p not in self.heads]
            theirs = committed_offsets(self.consumer, self.topic, others)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if isinstance(err, KafkaError) and err.fatal():
                raise
            # The broker is unreachable (restarting, say): not knowing the end is not the
            # end. Keep waiting, as a worker without --drain does.
            log.warning("drain: end offsets unknown for now (%s); waiting for the broker", exc)
            return False
        for partition, end in ends.items():
            head = self.heads.get(partition)
            done = (head.next_offset or 0) if head else max(theirs.get(partition, 0), 0)
            if done < end:
                return False
        return True

    def _topic_partitions(self) -> list[int]:
        when, ids = self._partitions
        if time.monotonic() - when > PARTITIONS_MAX_AGE_SECONDS:
            ids = topic_partitions(self.consumer, self.topic)
            self._partitions = (time.monotonic(), ids)
        return ids

    def _shutdown(self, clean: bool) -> None:
        """Leave the group: its final revoke releases (and, if clean, publishes) ledgers.

        After a failure (``clean`` False) the error in flight is the one to report: errors of
        the clean-up itself (a disk that refused the commit usually refuses the checkpoint
        too) are logged at DEBUG and never replace it. Committed batches are safe either way:
        they are in the ledger's write-ahead log, replayed on the next start.
        """
        self.closing = True
        self.failed = not clean
        first: Exception | None = None
        for stage in (self.decoder, self.committer):
            try:
                stage.close()  # records already handed over are still committed
            except Exception as exc:
                log.debug("while stopping: %s", _first_line(exc))
                self.failed, first = True, first or exc
        if clean and not self.failed:
            held = [
                TopicPartition(self.topic, p, ledger.next_offset)
                for p, ledger in self.ledgers.held.items()
                if ledger.next_offset is not None
            ]
            if held:
                try:
                    self.consumer.commit(offsets=held, asynchronous=False)
                except Exception as exc:  # lag monitoring only; the ledger has the truth
                    log.warning("final Kafka offset commit skipped: %s", exc)
        snapshot = None if self.failed else self.settings.snapshot_dir
        for step in (self.consumer.close, lambda: self.ledgers.close(snapshot)):
            try:
                step()
            except Exception as exc:
                log.debug("while stopping: %s", _first_line(exc))
                first = first or exc
        if clean and first is not None:
            raise OperationError(f"stopping the worker failed: {_first_line(first)}") from None

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: finish the batch in hand, publish, release partitions, exit."""

        def handler(signum: int, frame: FrameType | None) -> None:
            log.info("signal %s: stopping after the current batch", signum)
            self.stop_requested.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def set_aside_torn_ledger(path: Path) -> bool:
    """Move aside a ledger file whose creation the storage cut short; True if it did.

    DuckDB writes a new file's headers before anything else, so a file shorter than them,
    with no write-ahead log beside it, holds no data, yet DuckDB refuses to open it ever
    again ("not a valid DuckDB database file"): a disk that filled up while a partition's
    ledger was created would stop the worker for good. The file is renamed, never deleted,
    and only while no one holds DuckDB's lock on it.
    """
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False  # missing, or unwritable: opening the ledger will say what is wrong
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the lock DuckDB takes
        except OSError:
            return False  # open in another process: not torn, or not ours to judge
        size = os.fstat(fd).st_size
        if size >= DUCKDB_HEADER_BYTES or path.with_name(path.name + ".wal").exists():
            return False
        aside = path.with_name(f"{path.name}.torn-{time.time_ns()}")
        os.replace(path, aside)
    finally:
        os.close(fd)
    log.warning("ledger %s was cut short at creation (%d bytes, no data): moved to %s",
                path, size, aside.name)  # fmt: skip
    return True
