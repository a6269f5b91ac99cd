"""A thin, typed shell over confluent-kafka's Consumer for the worker.

It owns the client configuration (offsets never auto-committed or auto-stored: the ledger
is the source of truth) and turns polled messages into per-partition ``Record`` lists.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from aggregator.fold import Record

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
}


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


def split_by_partition(messages: list[Message]) -> dict[int, list[Record]]:
    """Group polled messages by partition; raise on fatal client errors, log the rest."""
    out: dict[int, list[Record]] = defaultdict(list)
    for msg in messages:
        err = msg.error()
        if err is not None:
            if err.fatal():
                raise KafkaException(err)
            if err.code() != KafkaError._PARTITION_EOF:
                log.warning("kafka: %s", err)
            continue
        partition = msg.partition()
        offset = msg.offset()
        if partition is None or offset is None:
            continue
        out[partition].append(Record(offset, msg.key(), msg.value()))
    return out


def end_offsets(consumer: Consumer, topic: str, timeout: float = 10.0) -> dict[int, int]:
    """High watermark of every partition of ``topic``.

    The cached value (from fetch responses) is used when known: a fresh ListOffsets
    request queues behind the connection's long-poll fetch and can take half a second.
    """
    meta = consumer.list_topics(topic, timeout=timeout).topics[topic]
    if meta.error is not None:
        raise KafkaException(meta.error)
    ends = {}
    for p in meta.partitions:
        tp = TopicPartition(topic, p)
        high = consumer.get_watermark_offsets(tp, cached=True)[1]
        if high < 0:
            high = consumer.get_watermark_offsets(tp, timeout=timeout)[1]
        ends[p] = high
    return ends


def committed_offsets(consumer: Consumer, topic: str, partitions: list[int]) -> dict[int, int]:
    if not partitions:
        return {}
    got = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
    return {tp.partition: tp.offset for tp in got}
