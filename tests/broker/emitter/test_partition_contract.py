"""The partition contract on a real topic: the Emitter (by default, both its paths) and a
plain librdkafka producer with ``partitioner=murmur2_random`` put every tenant exactly on
``schemas.partitioning.partition_for``'s partition; librdkafka's own default
(consistent_random, CRC32) does not, which is why the worker forwards."""

from __future__ import annotations

from confluent_kafka import Producer

from bench.broker import TopicFactory
from emitter import Emitter
from schemas.codec import default_codec
from schemas.partitioning import partition_for
from tests.support.events import make_event
from tests.support.worker_harness import read_topic

PARTITIONS = 7  # not the default 6: the count is part of the contract


def test_every_murmur2_producer_places_tenants_where_the_contract_says(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    codec = default_codec()
    tenants = [f"tenant-{i}.x:{i * 7}" for i in range(300)]

    def check(topic: str) -> dict[str, set[int]]:
        out: dict[str, set[int]] = {}
        for partition, records in read_topic(kafka_bootstrap, topic).items():
            for rec in records:
                assert rec.key is not None
                out.setdefault(rec.key.decode(), set()).add(partition)
        return out

    emitted = topic_factory(PARTITIONS)
    with Emitter(kafka_bootstrap, emitted) as emitter:
        for tenant in tenants[:150]:
            emitter.emit(make_event(tenant=tenant))
        emitter.emit_many([make_event(tenant=t) for t in tenants[150:]])
    placed = check(emitted)
    raw = topic_factory(PARTITIONS)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "partitioner": "murmur2_random"})
    for tenant in tenants:
        producer.produce(raw, codec.encode(make_event(tenant=tenant)), tenant.encode())
    assert producer.flush(60) == 0
    for found in (placed, check(raw)):
        assert found == {t: {partition_for(t, PARTITIONS)} for t in tenants}
    crc = topic_factory(PARTITIONS)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})  # consistent_random
    for tenant in tenants:
        producer.produce(crc, codec.encode(make_event(tenant=tenant)), tenant.encode())
    assert producer.flush(60) == 0
    elsewhere = [t for t, ps in check(crc).items() if ps != {partition_for(t, PARTITIONS)}]
    assert len(elsewhere) > len(tenants) // 2
