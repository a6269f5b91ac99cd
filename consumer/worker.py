"""The worker: poll, decode, validate, commit to the ledger; survive rebalances and kills.

Commit contract (why exactly-once holds), one clause per step (``consumer.steps``):
1. ``Accumulate``: every partition was assigned at the offset its own ledger file stored
   (handed to ``assign``/``incremental_assign``, not ``seek``), so Kafka resumes exactly
   there; records below the partition's head (redelivered) are dropped.
2. ``Decode``: every record is decoded and validated; an invalid one becomes a dead
   letter, never skipped; a valid one of another partition (the partition contract,
   ``schemas.partitioning``) or without a key is set aside to be forwarded.
2b. ``Forward``: those are sent to their tenant's partition and acknowledged by the
   broker before the commit that records them as forwarded (never counted here).
3. ``CommitToLedger``: one DuckDB transaction per batch holds its aggregates, dedup ids,
   duplicates (ids already in the dedup table: recorded, not counted), dead letters and
   the partition's next offset. In cluster mode the offset is stored only if the partition's
   owner epoch is still the one this worker claimed on assignment (``aggregator.lake_ledger``);
   otherwise the transaction stores nothing and the partition is dropped.
4. ``Acknowledge``: after the DuckDB commit, the offsets go to Kafka's commit, for lag
   monitoring only.
A worker killed between 3 and 4 (or anywhere) redoes the batch from the ledger's offset:
nothing is lost or doubled.

Threads: the main thread polls, splits by partition and accumulates; ``Decode`` and
``CommitToLedger`` run each on its own stage (``consumer.pipeline``), item by item in
order, so poll N+2 is fetched while N+1 decodes and N commits. Rebalance callbacks
(which run inside ``consume()``) and every other use of the ledgers' connection first
settle the stages (wait until they are empty), so no batch is in flight when a partition
is revoked.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, TopicPartition

from aggregator.ledger import LedgerSet, LedgerStore, OwnershipLost, PartitionLedger, ReplayRequest
from aggregator.views import write_query_db
from common.documents import Documents
from common.errors import OperationError
from common.logs import Repeats
from common.stopping import on_stop
from consumer import lag
from consumer.config import WorkerConfig
from consumer.connectivity import BrokerWatch
from consumer.forwarding import Forwarder, StopRequested
from consumer.kafka import (
    ConsumerFactory,
    cached_high_watermark,
    commit_offsets,
    committed_offsets,
    consumer_config,
    end_offsets,
    fresh_end_offsets,
    kafka_consumer,
    split_by_partition,
    topic_partitions,
)
from consumer.metrics import WorkerMetrics
from consumer.native_fetch import native_fetch
from consumer.pipeline import Stage
from consumer.replay import folder_board, pending_requests, write_result
from consumer.steps import Accumulate, Acknowledge, CommitToLedger, Decode, Forward
from consumer.types import Head, WorkerStats
from schemas.codec import Codec
from schemas.periods import oldest_billable_start
from schemas.prepare import PreparedBatch, prepare_batch
from schemas.record_batch import RecordBatch
from schemas.registry import Registry

log = logging.getLogger(__name__)
PRUNE_EVERY_SECONDS = 600.0
# --drain's view of the topic's partitions is refreshed this often (partitions are rarely
# added, and the metadata request waits behind a fetch: not on every check).
PARTITIONS_MAX_AGE_SECONDS = 10.0
# Records asked of one poll: consume() holds the GIL while it builds a poll's messages, so
# small polls keep the decoder's and committer's stalls short. Batches still reach
# METERING_BATCH_SIZE: polls accumulate per partition until then (or a poll comes back short).
POLL_RECORDS = 5_000
# How long one poll of the native fetch waits for records: rebalances wait as long.
NATIVE_WAIT_SECONDS = 0.1
GIL_SWITCH_SECONDS = 0.0002
# pf_consumer_lag (and --drain's progress) is refreshed at least this often while busy.
LAG_EVERY_SECONDS = 1.0
# While idle, Kafka's committed offsets of the partitions held are checked this often
# against the ledgers' and committed again where behind (an async commit can be lost).
KAFKA_OFFSETS_CHECK_SECONDS = 2.0


class Worker:
    """One consumer-group member folding the usage topic into its partition ledgers.

    ``consumer_factory`` makes the Kafka client from its librdkafka configuration
    (default: confluent-kafka's ``Consumer``); ``clock`` (monotonic seconds) paces the lag
    refresh and the broker watch; ``ledgers`` is where the partition ledgers live (default:
    embedded files under ``config.ledger_dir``; cluster mode: ``LakeLedgerSet``);
    ``schema_documents`` and ``replay_board`` where the published schema versions and the
    replay requests are (default: folders of ``config.data_dir``; cluster mode: the lake's).
    """

    def __init__(
        self,
        config: WorkerConfig,
        *,
        drain: bool = False,
        metrics: WorkerMetrics | None = None,
        codec: Codec | None = None,
        strategy: str = "cooperative-sticky",
        extra_config: dict[str, Any] | None = None,
        progress: Callable[[int, int], None] | None = None,
        consumer_factory: ConsumerFactory = kafka_consumer,
        clock: Callable[[], float] = time.monotonic,
        ledgers: LedgerStore | None = None,
        schema_documents: Documents | None = None,
        replay_board: Documents | None = None,
    ) -> None:
        self.config = config
        self.topic = config.topic
        self.drain = drain
        self.metrics = metrics or WorkerMetrics()
        # published schema versions: re-read on each assignment and on an unknown fingerprint
        self.registry = Registry(config.data_dir, documents=schema_documents)
        self.replay_board = replay_board or folder_board(config.data_dir)
        self._fixed_codec = codec
        self.cooperative = strategy == "cooperative-sticky"
        self.stats = WorkerStats()
        self.stop_requested = threading.Event()
        self.fatal: BaseException | None = None
        self.assigned_once = False
        self.closing = False
        self.failed = False
        self.ledgers: LedgerStore = ledgers or LedgerSet(
            config.ledger_dir, self.topic, config.lock_timeout, snapshot_dir=config.snapshot_dir
        )
        conf = consumer_config(dict(config.kafka), config.group, strategy, extra_config)
        conf["error_cb"] = self._on_error
        conf["logger"] = logging.getLogger("rdkafka")  # librdkafka's logs obey LOG_FORMAT too
        self._errors_logged = Repeats(30.0)
        bootstrap = str(config.kafka.get("bootstrap.servers", ""))
        self.clock = clock
        self.watch = BrokerWatch(bootstrap, self.metrics.broker_connected, clock)
        self.consumer = consumer_factory(conf)
        self.fetch = native_fetch(self.consumer, self.topic, conf) if config.native_fetch else None
        log.debug("records fetched %s", "natively" if self.fetch else "with consume()")
        forward_conf = {**config.kafka, "error_cb": self._on_error, "logger": conf["logger"]}
        self.forwarder = Forwarder(forward_conf, self.topic, self.stop_requested)
        self.partition_count = 0  # of the topic, for the partition contract (on assignment)
        self._replays_done: set[tuple[str, int]] = set()
        self._last_replay_check = -1e9
        self._open_dead: dict[int, dict[str, int]] = {}  # per partition held, by reason
        self._stop_deadline: float | None = None
        # --drain asks the broker for the ends before it calls the topic drained: the
        # cached ones may predate an outage (or a pause of this process).
        self._fresh_ends = fresh_end_offsets(self.consumer, conf) if drain else None
        self._lag_updated = -1e9
        self._kafka_checked = -1e9
        self._kafka_confirmed: dict[int, int] = {}  # held partition -> offset Kafka has too
        self._last_prune = time.monotonic()
        self.progress = progress  # called with (records consumed, records still to go)
        self.lag: dict[int, int] = {}
        self.heads: dict[int, Head] = {}
        # The steps, built last to first. ``stages`` in chain order: settling and closing
        # them in that order finishes everything handed over.
        self.acknowledge = Acknowledge(self._commit_to_kafka)
        commit = CommitToLedger(self.ledgers, self.stats, self.metrics, self.acknowledge)
        self.lost = commit.lost  # partitions whose commit was refused: no longer ours
        forward = Forward(self.forwarder, commit)
        self.committer = Stage("ledger-commit", forward.submit)
        decode = Decode(self._prepare, self.committer)
        self.decoder = Stage("decode", decode.submit)
        self.accumulate = Accumulate(self.heads, config.batch_size, self.decoder)
        self.stages = (self.decoder, self.committer)
        self._partitions: tuple[float, list[int]] = (-1e9, [])  # (when, ids) for --drain

    @property
    def codec(self) -> Codec:
        return self._fixed_codec or self.registry.codec

    # -- rebalance callbacks (run inside consume()) -------------------------------------
    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        if self.closing:
            return  # leaving the group: take nothing new
        try:
            self._settle()
            self.registry.refresh()
            self.partition_count = len(self._topic_partitions(fresh=True))
            for tp in partitions:
                ledger = self.ledgers.acquire(tp.partition)
                self.lost.discard(tp.partition)
                tp.offset = (
                    ledger.next_offset if ledger.next_offset is not None else OFFSET_BEGINNING
                )
                self.heads[tp.partition] = Head(ledger.next_offset)
                self.metrics.forwarded.labels(partition=str(tp.partition))  # shown from 0
                self._publish(ledger)
            if self.cooperative:
                self.consumer.incremental_assign(partitions)
            else:
                self.consumer.assign(partitions)
            if self.fetch is not None:
                self.fetch.forward(tp.partition for tp in partitions)
            self.assigned_once = True
            if self.ledgers.publishes_snapshots:
                write_query_db(self.config.data_dir, self.config.snapshot_dir, self.topic)
            self.metrics.rebalances.labels(kind="assign").inc()
            self.metrics.partitions_held.set(len(self.ledgers.held))
            log.info("assigned %s", sorted(tp.partition for tp in partitions))
        except BaseException as exc:  # an exception here must stop the worker
            self.fatal = exc
            self.stop_requested.set()
            raise

    def _on_lost(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        """The group gave these partitions away while this worker could not hear of it (its
        session timed out: cut off from Kafka, or frozen): another worker may hold them
        already, so what was polled of them and not handed over yet is dropped, not
        committed late (the new owner redoes it from the lake's offset); what was handed
        over is committed or refused by the fence."""
        self.accumulate.drop(tp.partition for tp in partitions)
        self._on_revoke(consumer, partitions, "lost")

    def _on_revoke(
        self, consumer: Any, partitions: list[TopicPartition], kind: str = "revoked"
    ) -> None:
        try:
            if not self.closing:  # (closing: the stages are stopped already)
                self.accumulate.hand_over()  # what was polled of them is still ours to commit
                self._settle()
            snapshot = None if self.failed else self.config.snapshot_dir
            self.ledgers.release([tp.partition for tp in partitions], snapshot)
            for tp in partitions:
                self.heads.pop(tp.partition, None)
                self._open_dead.pop(tp.partition, None)
                with contextlib.suppress(KeyError):
                    self.metrics.lag.remove(str(tp.partition))
            self._show_open_dead_letters()
            self.metrics.rebalances.labels(kind="revoke").inc()
            self.metrics.partitions_held.set(len(self.ledgers.held))
            log.info("%s %s", kind, sorted(tp.partition for tp in partitions))
        except BaseException as exc:
            self.fatal = exc
            self.stop_requested.set()
            raise

    def _on_error(self, err: Any) -> None:
        """A cluster out of reach goes to the broker watch (one line a minute); other client
        errors are logged once per 30 s (librdkafka repeats them every few ms)."""
        if isinstance(err, KafkaError) and self.watch.on_error(err):
            return
        if self._errors_logged.first(str(err), time.monotonic()):
            log.warning("kafka client: %s", err)

    # -- the loop ------------------------------------------------------------------------
    def run(self) -> WorkerStats:
        """Consume until stopped (or, with drain, until every partition is at its end)."""
        self.consumer.subscribe(
            [self.topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        # Young objects are collected 70x less often (a poll allocates two tracked objects
        # per record; nothing here builds cycles) and threads hand the GIL over sooner
        # between native steps: docs/performance.md, "Why the code is shaped this way".
        gc.set_threshold(50_000, 20, 100)
        sys.setswitchinterval(GIL_SWITCH_SECONDS)
        clean = False
        try:
            while not self.stop_requested.is_set():
                size = min(POLL_RECORDS, self.config.batch_size)
                if self.drain:
                    remaining = self._remaining()
                    if remaining == 0:
                        self.accumulate.hand_over()
                        if self._drained():
                            break
                    # ask for no more than is left: a poll returns early only when full
                    size = min(size, remaining or size)
                # With the native fetch, the consumer's queue holds rebalances and errors, and
                # records only from before a partition was forwarded: while partitions are
                # held it is looked at without waiting, and the wait is the fetch's (short,
                # so that a rebalance is answered soon).
                fetch = self.fetch if self.ledgers.held else None
                messages = self.consumer.consume(size, 0.5 if fetch is None else 0)
                if self.fatal is not None:
                    failed = self.fatal
                    raise OperationError(f"partition assignment failed: {failed}") from failed
                self._watch_broker()
                self.acknowledge.poll()
                if self.lost:
                    self._drop_lost()
                batches = split_by_partition(messages) if messages else {}
                polled = len(messages)
                if fetch is not None and polled < size:
                    # the consumer's queue is empty: what it held came first
                    wait = NATIVE_WAIT_SECONDS if not polled else 0
                    polled += fetch.poll(batches, size - polled, wait)
                if batches:
                    self.accumulate.submit(batches)
                if polled < size:
                    self.accumulate.hand_over()  # caught up: nothing waits for more records
                self._housekeeping(idle=not polled)
                if self.drain and not polled and self._drained():
                    break
            self.accumulate.hand_over()
            self._settle()
            clean = True
        except StopRequested as exc:  # the batch in hand is not committed: redone on restart
            log.info("stopped with a batch uncommitted (%s)", exc)
            clean = True
        finally:
            self._shutdown(clean)
        return self.stats

    def _watch_broker(self) -> None:
        """While the cluster is out of reach: probe it now and then, say so once a minute,
        and (draining) give up after METERING_DRAIN_TIMEOUT."""
        watch = self.watch
        if watch.connected:
            return
        if watch.probe_due():
            try:
                self.consumer.list_topics(self.topic, timeout=2.0)
                watch.reached()
                return
            except KafkaException as exc:
                watch.lost(_first_line(exc))
        watch.tick()
        limit = self.config.drain_timeout
        if self.drain and watch.down_for() > limit:
            raise OperationError(
                f"gave up draining: cannot reach the Kafka broker at {watch.bootstrap} "
                f"(KAFKA_BOOTSTRAP_SERVERS) for {watch.down_for():.0f} s "
                f"(METERING_DRAIN_TIMEOUT={limit:g})"
            )

    def _commit_to_kafka(self, offsets: Mapping[int, int]) -> None:
        commit_offsets(self.consumer, self.topic, offsets, wait=False)

    def _housekeeping(self, idle: bool) -> None:
        now = time.monotonic()
        due = now - self.config.snapshot_seconds
        stale = [
            ledger
            for ledger in self.ledgers.held.values()
            if ledger.last_commit > ledger.last_publish and (idle or ledger.last_publish <= due)
        ]
        prune = now - self._last_prune > PRUNE_EVERY_SECONDS
        if idle or stale or prune:
            self._settle()  # publishing and pruning use the ledgers' connection
        for ledger in stale:
            self._publish(ledger)
        if prune:
            months = self.config.late_usage_months
            oldest = oldest_billable_start(int(time.time() * 1_000_000), months)
            for ledger in list(self.ledgers.held.values()):
                try:
                    ledger.prune(oldest)
                except OwnershipLost as exc:
                    self._lose(ledger.partition, exc)
            self._last_prune = now
        if idle or self.clock() - self._lag_updated >= LAG_EVERY_SECONDS:
            self._lag_updated = self.clock()
            self._update_lag()
        if idle and self.clock() - self._kafka_checked >= KAFKA_OFFSETS_CHECK_SECONDS:
            self._kafka_checked = self.clock()
            self._recommit_to_kafka()
        self._replay_requested()

    def _recommit_to_kafka(self) -> None:
        """Commit again to Kafka each held partition's ledger offset that Kafka's committed
        offset is behind: an asynchronous commit refused in a rebalance is never retried,
        and a partition taken over at its end brings no record to commit. Other members'
        ``--drain`` reads these offsets; without it they would wait for ever."""
        stored = {
            p: ledger.next_offset
            for p, ledger in self.ledgers.held.items()
            if ledger.next_offset is not None
        }
        if stored == self._kafka_confirmed:
            return  # nothing moved since Kafka was seen to agree: no request
        try:
            known = committed_offsets(self.consumer, self.topic, list(stored))
        except KafkaException as exc:  # unreachable now: the next idle check asks again
            log.debug("committed offsets unknown for now: %s", exc)
            return
        behind = {p: offset for p, offset in stored.items() if known.get(p, -1) < offset}
        self._kafka_confirmed = {p: o for p, o in stored.items() if p not in behind}
        if behind:
            log.debug("Kafka's committed offsets behind the ledgers: %s", behind)
            self._commit_to_kafka(behind)

    def _prepare(self, partition: int, records: RecordBatch, now_micros: int) -> PreparedBatch:
        """``prepare_batch`` with the partition contract and the late-usage horizon; a
        batch that met an unknown fingerprint is prepared again if the registry has learnt
        new versions since (published with ``schemas add``)."""
        oldest = oldest_billable_start(now_micros, self.config.late_usage_months)

        def prepare() -> PreparedBatch:
            return prepare_batch(
                partition,
                records,
                self.codec,
                now_micros,
                oldest,
                partitions=self.partition_count or None,
            )

        batch = prepare()
        unknown = any(d.reason_code == "unknown_fingerprint" for d in batch.dead)
        if unknown and self._fixed_codec is None and self.registry.refresh():
            log.info("schema registry: new writer versions published; decoding again")
            batch = prepare()
        return batch

    def _publish(self, ledger: PartitionLedger) -> None:
        ledger.publish(self.config.snapshot_dir)
        self._open_dead[ledger.partition] = ledger.open_dead_letters()
        self._show_open_dead_letters()

    def _show_open_dead_letters(self) -> None:
        totals: dict[str, int] = {}
        for by_reason in self._open_dead.values():
            for reason, n in by_reason.items():
                totals[reason] = totals.get(reason, 0) + n
        for reason in set(totals) | set(self.metrics.known_open_reasons):
            self.metrics.open_dead_letters.labels(reason=reason).set(totals.get(reason, 0))
        self.metrics.known_open_reasons.update(totals)

    # -- dead-letter replay (consumer.replay) -----------------------------------------------
    def _replay_requested(self) -> None:
        """Apply the pending replay requests to the partitions held (between batches)."""
        now = time.monotonic()
        if now - self._last_replay_check < self.config.replay_check_seconds:
            return
        self._last_replay_check = now
        todo = [
            (request, ledger)
            for request in pending_requests(self.replay_board)
            for ledger in self.ledgers.held.values()
            if (request.request_id, ledger.partition) not in self._replays_done
            and request.partition in (None, ledger.partition)
        ]
        if not todo:
            return
        self._settle()
        self.registry.refresh()
        for request, ledger in todo:
            self._replay(request, ledger)
            self._replays_done.add((request.request_id, ledger.partition))

    def _replay(self, request: ReplayRequest, ledger: PartitionLedger) -> None:
        if ledger.partition in self.lost:
            return
        records = ledger.replayable(request)
        if records is None:
            return  # applied before (by this worker or an earlier owner)
        batch = self._prepare(ledger.partition, records, int(time.time() * 1_000_000))
        self.forwarder.send(ledger.partition, batch.forward)
        try:
            result = ledger.replay(request, batch)
        except OwnershipLost as exc:
            self._lose(ledger.partition, exc)
            return
        write_result(self.replay_board, request, ledger.partition, result)
        log.info(
            "replay %s on p%d: %d dead letters, %d counted, %d duplicates, %d forwarded, "
            "%d still failing",
            request.request_id,
            ledger.partition,
            len(records),
            result.counted,
            result.duplicates,
            result.forwarded,
            result.dead,
        )
        self.metrics.counted.inc(result.counted)
        if result.forwarded:
            self.metrics.forwarded.labels(partition=str(ledger.partition)).inc(result.forwarded)
        self._publish(ledger)

    def _lose(self, partition: int, exc: OwnershipLost) -> None:
        """A replay or prune of ``partition`` was refused: it is no longer ours."""
        log.warning("p%d: refused: %s", partition, exc)
        self.metrics.commits_refused.labels(partition=str(partition)).inc()
        self.lost.add(partition)
        self._drop_lost()

    def _drop_lost(self) -> None:
        """Stop working on the partitions whose commit was refused (another worker owns them
        now): their records are no longer accumulated, their ledgers are dropped without
        storing anything. The group's next rebalance takes them away (or gives them back,
        claimed anew)."""
        dropped = [p for p in list(self.lost) if p in self.ledgers.held or p in self.heads]
        if not dropped:
            return
        self._settle()
        for partition in dropped:
            self.heads.pop(partition, None)
            self._open_dead.pop(partition, None)
            self.ledgers.forget(partition)
        self.metrics.partitions_held.set(len(self.ledgers.held))
        log.warning("dropped %s: taken over by another worker", sorted(dropped))

    def _settle(self) -> None:
        """Wait until every record handed over has gone through every step."""
        for stage in self.stages:
            stage.flush()

    # -- lag and drain -------------------------------------------------------------------
    def _lag_of(self, partition: int, head: Head) -> int | None:
        """Records of the partition not yet handed over, per its cached end."""
        high = cached_high_watermark(self.consumer, self.topic, partition)
        return lag.lag(high, head.next_offset)

    def _update_lag(self) -> None:
        for partition, head in self.heads.items():
            behind = self._lag_of(partition, head)
            if behind is not None:
                self.lag[partition] = behind
                self.metrics.lag.labels(partition=str(partition)).set(behind)
                ledger = self.ledgers.held.get(partition)
                if ledger is not None:  # (the snapshot's manifest says how far behind)
                    ledger.log_end = (head.next_offset or 0) + behind
        if self.progress is not None:
            self.progress(self.stats.consumed, lag.held_lag(self.lag, self.heads))

    def _remaining(self) -> int | None:
        """Records left in the partitions held, per the cached ends (None: not known)."""
        return lag.remaining([self._lag_of(p, head) for p, head in self.heads.items()])

    def _drained(self) -> bool:
        """True once every partition of the topic is consumed to its end (by anyone)."""
        if not self.assigned_once or not self.watch.connected:
            return False  # (not knowing the end is not the end: wait, as a service does)
        ours = {p: head.next_offset for p, head in self.heads.items()}
        try:
            partitions = self._topic_partitions()
            cached = end_offsets(self.consumer, self.topic, partitions)
            for partition, end in self.forwarder.ends.items():
                cached[partition] = max(cached.get(partition, 0), end)
            mine = {p: end for p, end in cached.items() if p in ours}
            if not lag.drained(mine, ours, {}):
                return False  # (the usual answer mid-drain: no request made)
            others = [p for p in cached if p not in ours]
            theirs = committed_offsets(self.consumer, self.topic, others)
            if not lag.drained(cached, ours, theirs):
                return False
            assert self._fresh_ends is not None
            ends = self._fresh_ends(self.topic, partitions)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if isinstance(err, KafkaError) and err.fatal():
                raise
            # The broker is unreachable (restarting, say), or busy electing leaders.
            if self._errors_logged.first("drain: end offsets unknown", time.monotonic()):
                log.warning("drain: end offsets unknown for now (%s); waiting for the broker", exc)
            return False
        self.watch.reached()
        for partition, end in self.forwarder.ends.items():  # (fetches may not show them yet)
            ends[partition] = max(ends.get(partition, 0), end)
        return lag.drained(ends, ours, theirs)

    def _topic_partitions(self, fresh: bool = False) -> list[int]:
        when, ids = self._partitions
        if fresh or time.monotonic() - when > PARTITIONS_MAX_AGE_SECONDS:
            ids = topic_partitions(self.consumer, self.topic)
            self._partitions = (time.monotonic(), ids)
        return ids

    # -- stopping ------------------------------------------------------------------------
    def _shutdown(self, clean: bool) -> None:
        """Finish (or drop) the batch in hand, release the ledgers, then leave the group.

        After a failure (``clean`` False) the error in flight is the one to report: errors of
        the clean-up itself (a disk that refused the commit usually refuses the checkpoint
        too) are logged at DEBUG and never replace it. Committed batches are safe either way:
        they are in the ledger's write-ahead log, replayed on the next start.

        Bounded: the ledgers are released before Kafka is told anything, and leaving the
        group (a last offset commit for lag monitoring, then ``close``) is given what is
        left of ``METERING_SHUTDOWN_SECONDS``; a broker that does not answer by then is left
        behind (the group evicts this member after its session timeout).
        """
        self.closing = True
        self.failed = not clean
        deadline = self._stop_deadline or time.monotonic() + self.config.shutdown_seconds
        first: Exception | None = None
        for stage in self.stages:
            try:
                stage.close()  # records already handed over are still committed
            except StopRequested as exc:
                log.info("stopped with a batch uncommitted (%s)", exc)
            except Exception as exc:
                log.debug("while stopping: %s", _first_line(exc))
                self.failed, first = True, first or exc
        held = {
            p: ledger.next_offset
            for p, ledger in self.ledgers.held.items()
            if ledger.next_offset is not None and clean and not self.failed
        }
        snapshot = None if self.failed else self.config.snapshot_dir
        steps: list[Callable[[], None]] = [lambda: self.ledgers.close(snapshot)]
        if self.fetch is not None:
            steps.append(self.fetch.close)  # (before the consumer is closed)
        for step in [*steps, self.forwarder.close]:
            try:
                step()
            except Exception as exc:
                log.debug("while stopping: %s", _first_line(exc))
                first = first or exc
        errors: list[Exception] = []

        def leave() -> None:
            if held:
                try:
                    commit_offsets(self.consumer, self.topic, held, wait=True)
                except Exception as exc:  # lag monitoring only; the ledger has the truth
                    log.warning("final Kafka offset commit skipped: %s", exc)
            try:
                self.consumer.close()
            except Exception as exc:
                errors.append(exc)

        leaving = threading.Thread(target=leave, name="leave-group", daemon=True)
        leaving.start()
        leaving.join(max(0.1, deadline - time.monotonic() - 0.5))
        if leaving.is_alive():
            log.warning(
                "the broker did not answer within METERING_SHUTDOWN_SECONDS: "
                "stopped without leaving the group"
            )
        elif errors:
            log.debug("while stopping: %s", _first_line(errors[0]))
            first = first or errors[0]
        if clean and first is not None:
            raise OperationError(f"stopping the worker failed: {_first_line(first)}") from first

    def request_stop(self) -> None:
        """Stop within ``METERING_SHUTDOWN_SECONDS``: the loop ends after the batch in hand
        (which commits whole, or not at all if it cannot finish in time), and a watchdog
        ends the process if anything still blocks at the deadline (exit 1; every ledger
        transaction is then rolled back or committed, as after a SIGKILL)."""
        if self._stop_deadline is None:
            seconds = self.config.shutdown_seconds
            self._stop_deadline = time.monotonic() + seconds
            watchdog = threading.Timer(seconds, self._force_exit)
            watchdog.daemon = True
            watchdog.start()
        self.stop_requested.set()

    def _force_exit(self) -> None:
        log.error(
            "not stopped within METERING_SHUTDOWN_SECONDS=%s: exiting now",
            self.config.shutdown_seconds,
        )
        logging.shutdown()
        os._exit(1)

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: ``request_stop`` (also for a signal that came while the process
        was still starting, if the CLI caught it: ``common.stopping``)."""

        def stop(signum: int) -> None:
            log.info("signal %s: stopping within %s s", signum, self.config.shutdown_seconds)
            self.request_stop()

        on_stop(stop)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
