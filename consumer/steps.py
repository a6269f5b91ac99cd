"""The worker's steps, in chain order: ``Accumulate`` -> ``Decode`` -> ``Forward`` ->
``CommitToLedger`` -> ``Acknowledge``. Each holds its ``next_step`` and submits to it what
it made of an item; ``END_OF_POLL`` passes through all of them. The worker runs ``Decode``
and ``Forward`` (then ``CommitToLedger``, on the same thread) each on its own
``consumer.pipeline.Stage`` (a stage is a step too: ``submit`` queues the item for the step
behind it), the others on the threads that call them. A new step goes where its input is
made: it takes the next step of the one before it, and that one takes it.

The DEBUG lines trace each hand-over's phases (the fault tests use them to tell where a
kill landed): "batch" -> "committing" -> "committed" (per partition) -> "batch done".
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping

from aggregator.ledger import CommitResult, LedgerStore, OwnershipLost
from consumer.forwarding import Forwarder
from consumer.metrics import WorkerMetrics
from consumer.types import END_OF_POLL, Batch, Decoded, EndOfPoll, Head, Polled, Step, WorkerStats
from schemas.prepare import DeadLetter, PreparedBatch
from schemas.record_batch import RecordBatch

log = logging.getLogger("consumer.worker")  # the name operators and the fault tests know

DecodeInput = Batch[Polled] | EndOfPoll
CommitInput = Batch[Decoded] | EndOfPoll
AcknowledgeInput = Batch[CommitResult] | EndOfPoll


class Accumulate:
    """Main thread: collect each partition's polled records from its head on (records
    below it, redelivered, are dropped) and hand them over as one batch per partition,
    then ``END_OF_POLL``: at once for a partition holding ``batch_size`` records, on
    ``hand_over`` for the rest. A partition without a head (revoked) is not ours: its
    records are dropped, the new owner redoes them."""

    def __init__(
        self, heads: Mapping[int, Head], batch_size: int, next_step: Step[DecodeInput]
    ) -> None:
        self.heads = heads
        self.batch_size = batch_size
        self.next_step = next_step
        self._waiting: dict[int, list[RecordBatch]] = {}  # polled, not yet handed over

    def submit(self, by_partition: Mapping[int, RecordBatch]) -> None:
        """Add one poll's records (split by partition, offset order)."""
        for partition, records in by_partition.items():
            head = self.heads.get(partition)
            if head is None:
                continue
            fresh = records.since(head.next_offset or 0)
            if not fresh:
                continue
            head.next_offset = fresh.offsets[-1] + 1
            waiting = self._waiting.setdefault(partition, [])
            waiting.append(fresh)
            if sum(map(len, waiting)) >= self.batch_size:
                self.hand_over([partition])

    def drop(self, partitions: Iterable[int]) -> None:
        """Forget what was polled of ``partitions`` and not handed over yet."""
        for partition in partitions:
            self._waiting.pop(partition, None)

    def hand_over(self, partitions: Iterable[int] | None = None) -> None:
        """Submit the waiting records (of ``partitions``; default: all), then END_OF_POLL."""
        batches = []
        now = int(time.time() * 1_000_000)
        for partition in list(self._waiting) if partitions is None else partitions:
            parts = self._waiting.pop(partition, [])
            head = self.heads.get(partition)
            if parts and head is not None:
                records = RecordBatch.concat(parts)
                first, end = records.offsets[0], records.offsets[-1] + 1
                batches.append(Batch(partition, first, end, Polled(records, head, now)))
        if not batches:
            return
        log.debug(
            "batch: %d records of %d partition(s)",
            sum(len(b.payload.records) for b in batches),
            len(batches),
        )
        for batch in batches:
            self.next_step.submit(batch)
        self.next_step.submit(END_OF_POLL)


Prepare = Callable[[int, RecordBatch, int], PreparedBatch]  # (partition, records, now)


class Decode:
    """Decode and validate a batch's records with ``prepare`` (``prepare_batch`` with the
    worker's codec, late-usage horizon and partition contract): valid events become
    columns, invalid ones dead letters, those of other partitions events to forward."""

    def __init__(self, prepare: Prepare, next_step: Step[CommitInput]):
        self.prepare = prepare
        self.next_step = next_step

    def submit(self, item: DecodeInput) -> None:
        if isinstance(item, EndOfPoll):
            self.next_step.submit(item)
            return
        began = time.perf_counter()
        polled = item.payload
        prepared = self.prepare(item.partition, polled.records, polled.now_micros)
        self.next_step.submit(item.carrying(Decoded(prepared, time.perf_counter() - began)))


class Forward:
    """Send the batch's events that belong to another partition (or came without a key)
    to their tenant's partition and wait for the broker's acknowledgement, then hand the
    batch on to the ledger commit that records them as forwarded: a crash in between
    forwards them again, and the destination's dedup makes the copy a duplicate
    (``consumer.forwarding``)."""

    def __init__(self, forwarder: Forwarder, next_step: Step[CommitInput]) -> None:
        self.forwarder = forwarder
        self.next_step = next_step

    def submit(self, item: CommitInput) -> None:
        if isinstance(item, Batch):
            self.forwarder.send(item.partition, item.payload.prepared.forward)
        self.next_step.submit(item)


class CommitToLedger:
    """Commit a batch to its partition's ledger in one transaction (aggregates, dedup ids,
    duplicates, dead letters and the batch's next offset), then count it in the worker's
    stats and metrics.

    A commit refused because the partition is no longer ours (``OwnershipLost``, cluster
    mode) stores nothing: the batch is dropped, not counted nor acknowledged, the partition
    goes into ``lost`` (the worker then drops it; its later batches are dropped here), and
    it says so in one line and ``pf_commits_refused_total``."""

    def __init__(
        self,
        ledgers: LedgerStore,
        stats: WorkerStats,
        metrics: WorkerMetrics,
        next_step: Step[AcknowledgeInput],
    ) -> None:
        self.ledgers = ledgers
        self.stats = stats
        self.metrics = metrics
        self.next_step = next_step
        self.lost: set[int] = set()  # partitions whose commit was refused (until reassigned)

    def submit(self, item: CommitInput) -> None:
        if isinstance(item, EndOfPoll):
            log.debug("batch done")
            self.next_step.submit(item)
            return
        partition, prepared = item.partition, item.payload.prepared
        if partition in self.lost:
            first, end = item.first_offset, item.next_offset
            log.debug("dropped p%d [%d, %d): not ours", partition, first, end)
            return
        began = time.perf_counter()
        log.debug("committing p%d [%d, %d)", partition, item.first_offset, item.next_offset)
        try:
            result = self.ledgers.held[partition].commit(prepared)
            self.stats.commit_seconds.append(time.perf_counter() - began)
        except OwnershipLost as exc:
            self.lost.add(partition)
            self.metrics.commits_refused.labels(partition=str(partition)).inc()
            log.warning(
                "p%d: batch [%d, %d) dropped, not counted: %s",
                partition,
                item.first_offset,
                item.next_offset,
                exc,
            )
            return
        log.debug(
            "committed p%d [%d, %d): %d counted, %d duplicates, %d dead",
            partition,
            item.first_offset,
            item.next_offset,
            result.counted,
            result.duplicates,
            result.dead,
        )
        seconds = item.payload.decode_seconds + time.perf_counter() - began
        self.metrics.batch_seconds.observe(seconds)
        self._count(partition, prepared.consumed, result, [*prepared.dead, *result.refused])
        self.metrics.last_commit.set(time.time())
        self.next_step.submit(item.carrying(result))

    def _count(
        self, partition: int, consumed: int, result: CommitResult, dead: list[DeadLetter]
    ) -> None:
        stats, metrics = self.stats, self.metrics
        stats.consumed += consumed
        stats.counted += result.counted
        stats.duplicates += result.duplicates
        stats.dead += result.dead
        stats.forwarded += result.forwarded
        stats.batches += 1
        metrics.consumed.labels(partition=str(partition)).inc(consumed)
        metrics.counted.inc(result.counted)
        metrics.duplicates.inc(result.duplicates)
        for d in dead:
            metrics.dead.labels(reason=d.reason_code).inc()
        if result.forwarded:
            metrics.forwarded.labels(partition=str(partition)).inc(result.forwarded)


class Acknowledge:
    """The last step: keep what the ledgers committed until ``poll`` (the main thread,
    which owns the Kafka client) hands it to ``commit``: Kafka's committed offsets, for
    lag monitoring only; the ledger has the truth."""

    def __init__(self, commit: Callable[[Mapping[int, int]], None]) -> None:
        self.commit = commit
        self._done: deque[Mapping[int, int]] = deque()  # appended by the committer's thread

    def submit(self, item: AcknowledgeInput) -> None:
        if isinstance(item, Batch):
            self._done.append(item.committable)

    def poll(self) -> None:
        """Commit the newest offset of every partition acknowledged since the last poll."""
        offsets: dict[int, int] = {}
        while self._done:
            offsets.update(self._done.popleft())
        if offsets:
            self.commit(offsets)
