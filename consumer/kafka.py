"""A thin, typed shell over confluent-kafka's Consumer for the worker.

It owns the client configuration (offsets never auto-committed or auto-stored: the ledger
is the source of truth), the part of the client the worker uses (``ConsumerClient``: tests
give the worker an in-memory one through its consumer factory), and turns polled
messages into per-partition ``RecordBatch``es.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Literal, Protocol, cast, overload

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._listoffsets import OffsetSpec  # (not re-exported for mypy)

from schemas.record_batch import RecordBatch

log = logging.getLogger(__name__)

CONSUMER_DEFAULTS: dict[str, Any] = {
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "auto.offset.reset": "earliest",
    "isolation.level": "read_committed",
    "session.timeout.ms": 30_000,
    "max.poll.interval.ms": 300_000,
    "fetch.max.bytes": 52_428_800,
    "queued.max.messages.kbytes": 262_144,
    # Throughput (docs/performance.md): the 1 MiB default per partition makes a fetch
    # round trip per MiB; and once a partition's prefetch queue is full the fetcher
    # otherwise waits a whole second before asking again.
    "max.partition.fetch.bytes": 10_485_760,
    "fetch.queue.backoff.ms": 50,
}


RebalanceCallback = Callable[[Any, list[TopicPartition]], None]


class ConsumerClient(Protocol):
    """What the worker uses of confluent-kafka's ``Consumer`` (same signatures)."""

    def subscribe(
        self,
        topics: list[str],
        on_assign: RebalanceCallback | None = ...,
        on_revoke: RebalanceCallback | None = ...,
        on_lost: RebalanceCallback | None = ...,
    ) -> None: ...
    def consume(self, num_messages: int = ..., timeout: float = ...) -> list[Message]: ...
    def assign(self, partitions: list[TopicPartition]) -> None: ...
    def incremental_assign(self, partitions: list[TopicPartition]) -> None: ...
    @overload
    def commit(self, *, offsets: list[TopicPartition], asynchronous: Literal[True]) -> object: ...
    @overload
    def commit(self, *, offsets: list[TopicPartition], asynchronous: Literal[False]) -> object: ...
    def get_watermark_offsets(
        self, partition: TopicPartition, timeout: float = ..., cached: bool = ...
    ) -> tuple[int, int]: ...
    def committed(
        self, partitions: list[TopicPartition], timeout: float = ...
    ) -> list[TopicPartition]: ...
    def list_topics(self, topic: str | None = ..., timeout: float = ...) -> Any: ...
    def close(self) -> None: ...


ConsumerFactory = Callable[[dict[str, Any]], ConsumerClient]


def kafka_consumer(config: dict[str, Any]) -> ConsumerClient:
    """The worker's default consumer factory: confluent-kafka's ``Consumer``."""
    return Consumer(config)


def commit_offsets(
    consumer: ConsumerClient, topic: str, offsets: Mapping[int, int], *, wait: bool
) -> None:
    """Store ``offsets`` (partition -> next offset) as the group's committed offsets."""
    listed = [TopicPartition(topic, p, offset) for p, offset in offsets.items()]
    if wait:
        consumer.commit(offsets=listed, asynchronous=False)
    else:
        consumer.commit(offsets=listed, asynchronous=True)


def consumer_config(
    common: dict[str, Any], group: str, strategy: str, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        **CONSUMER_DEFAULTS,
        **common,
        "group.id": group,
        "partition.assignment.strategy": strategy,
        **(extra or {}),
    }


def split_by_partition(messages: list[Message]) -> dict[int, RecordBatch]:
    """Group polled messages by partition, column-wise; raise on fatal client errors,
    log the rest. A poll arrives in runs of one partition (one per fetch response), so
    the columns are cut into runs by slicing, not record by record; most polls are one
    run. ``map`` over the unbound methods: this runs with the GIL held for every record,
    while the decoder and committer threads wait for it."""
    errors = list(map(Message.error, messages))
    if any(e is not None for e in errors):  # (KafkaError == None raises: no count)
        for err in errors:
            if err is not None and err.fatal():
                raise KafkaException(err)
            if err is not None and err.code() != KafkaError._PARTITION_EOF:
                log.warning("kafka: %s", err)
        messages = [m for m, e in zip(messages, errors, strict=True) if e is None]
    maybe_partitions = list(map(Message.partition, messages))
    maybe_offsets = list(map(Message.offset, messages))
    if None in maybe_partitions or None in maybe_offsets:
        messages = [m for m in messages if m.partition() is not None and m.offset() is not None]
        return split_by_partition(messages)
    partitions = cast("list[int]", maybe_partitions)
    offsets = cast("list[int]", maybe_offsets)
    keys = list(map(Message.key, messages))
    values = list(map(Message.value, messages))
    if not partitions:
        return {}
    if partitions.count(partitions[0]) == len(partitions):
        return {partitions[0]: RecordBatch(offsets, keys, values)}
    cuts = [i for i in range(1, len(partitions)) if partitions[i] != partitions[i - 1]]
    out: dict[int, RecordBatch] = {}
    for start, end in zip([0, *cuts], [*cuts, len(partitions)], strict=True):
        partition = partitions[start]
        batch = out.get(partition)
        if batch is None:
            out[partition] = RecordBatch(offsets[start:end], keys[start:end], values[start:end])
        else:
            batch.extend(offsets[start:end], keys[start:end], values[start:end])
    return out


def topic_partitions(consumer: ConsumerClient, topic: str, timeout: float = 10.0) -> list[int]:
    """The partition ids of ``topic``, from a metadata request."""
    meta = consumer.list_topics(topic, timeout=timeout).topics[topic]
    if meta.error is not None:
        raise KafkaException(meta.error)
    return sorted(meta.partitions)


def end_offsets(
    consumer: ConsumerClient, topic: str, partitions: list[int], timeout: float = 10.0
) -> dict[int, int]:
    """High watermark of each of ``partitions`` of ``topic``.

    The cached value (from fetch responses) is used when known: a fresh ListOffsets
    request queues behind the connection's long-poll fetch and can take half a second.
    """
    ends = {}
    for p in partitions:
        high = cached_high_watermark(consumer, topic, p)
        if high < 0:
            high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)[1]
        ends[p] = high
    return ends


EndsSource = Callable[[str, list[int]], dict[int, int]]


def fresh_end_offsets(consumer: ConsumerClient, config: Mapping[str, Any]) -> EndsSource:
    """A way to ask the broker for partitions' ends now (never a cached value). For
    confluent-kafka's Consumer: an admin client's ListOffsets on a connection of its own
    (~30 ms; the consumer's own requests queue behind its long-poll fetches); for another
    client, its uncached watermarks."""
    if isinstance(consumer, Consumer):
        connection = ("bootstrap.", "security.", "sasl.", "ssl.", "error_cb", "logger")
        admin = AdminClient({k: v for k, v in config.items() if k.startswith(connection)})
        return lambda topic, partitions: broker_end_offsets(admin, topic, partitions)

    def uncached(topic: str, partitions: list[int]) -> dict[int, int]:
        ends = {}
        for p in partitions:
            tp = TopicPartition(topic, p)
            ends[p] = consumer.get_watermark_offsets(tp, timeout=10.0, cached=False)[1]
        return ends

    return uncached


def broker_end_offsets(
    admin: AdminClient, topic: str, partitions: list[int], timeout: float = 10.0
) -> dict[int, int]:
    """Each partition's end as the broker says now (not a cached value): one ListOffsets
    request per leader on the admin client's own connection (no fetch queued ahead of it).
    Raises KafkaException when the broker does not answer in ``timeout`` seconds."""
    latest = OffsetSpec.latest()  # type: ignore[no-untyped-call]
    request = {TopicPartition(topic, p): latest for p in partitions}
    futures = admin.list_offsets(request, request_timeout=timeout)
    return {tp.partition: int(future.result().offset) for tp, future in futures.items()}


def cached_high_watermark(consumer: ConsumerClient, topic: str, partition: int) -> int:
    """The partition's end as last seen in a fetch response (-1: not known yet)."""
    try:
        tp = TopicPartition(topic, partition)
        return int(consumer.get_watermark_offsets(tp, cached=True)[1])
    except KafkaException:
        return -1


def committed_offsets(
    consumer: ConsumerClient, topic: str, partitions: list[int]
) -> dict[int, int]:
    if not partitions:
        return {}
    got = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
    return {tp.partition: tp.offset for tp in got}
