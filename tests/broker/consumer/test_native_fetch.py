"""The native fetch (consumer/native_fetch.py) against the real broker: the same records as
confluent-kafka's consume(), in the same order, and a clean refusal once closed."""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from consumer.kafka import consumer_config
from consumer.native_fetch import NATIVE, NativeFetch, native_fetch
from schemas.record_batch import RecordBatch
from tests.support import worker_harness as harness
from tests.support.memory_consumer import MemoryBroker, MemoryConsumer


def test_the_extension_is_built() -> None:
    assert NATIVE, "make install builds consumer/_native_fetch.c (a C compiler is needed)"


def _consumer(bootstrap: str) -> tuple[Consumer, dict[str, object]]:
    conf = consumer_config(
        {"bootstrap.servers": bootstrap}, f"native-{uuid.uuid4().hex[:8]}", "cooperative-sticky"
    )
    return Consumer(conf), conf


def _fetch_all(fetch: NativeFetch, expected: int) -> dict[int, RecordBatch]:
    out: dict[int, RecordBatch] = {}
    got = 0
    deadline = time.monotonic() + 120
    while got < expected:
        assert time.monotonic() < deadline, f"{got} of {expected} records fetched"
        got += fetch.poll(out, 7, 0.5)  # small polls: records of a partition across polls
    assert got == expected
    return out


def test_native_fetch_reads_what_consume_reads(env: dict[str, str]) -> None:
    bootstrap, topic = env["KAFKA_BOOTSTRAP_SERVERS"], env["METERING_TOPIC"]
    items: list[tuple[bytes | None, bytes | None]] = [
        (f"k{i % 11}".encode(), bytes([i % 256]) * (i % 40)) for i in range(300)
    ]
    items += [(None, b"no key"), (b"tombstone", None), (b"", b""), (b"\x00\xff", b"\x00" * 3)]
    harness.produce_raw(bootstrap, topic, items)
    expected = harness.read_topic(bootstrap, topic)

    consumer, conf = _consumer(bootstrap)
    try:
        fetch = native_fetch(consumer, topic, conf)
        assert fetch is not None
        partitions = sorted(expected)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        fetch.forward(partitions)
        # records the consumer's own queue got before the forward come first (Worker.run)
        early: dict[int, RecordBatch] = {}
        for m in consumer.consume(1000, 0):
            partition, offset = m.partition(), m.offset()
            if m.error() is None and partition is not None and offset is not None:
                early.setdefault(partition, RecordBatch([], [], [])).extend(
                    [offset], [m.key()], [m.value()]
                )
        total = sum(len(records) for records in expected.values())
        fetched = _fetch_all(fetch, total - sum(len(b) for b in early.values()))
        for partition, batch in fetched.items():
            early.setdefault(partition, RecordBatch([], [], [])).extend(
                batch.offsets, batch.keys, batch.values
            )
        got = {p: list(b) for p, b in early.items() if len(b)}
        assert got == {p: records for p, records in expected.items() if records}
        assert any(r.key is None for records in got.values() for r in records)
        assert any(r.value is None for records in got.values() for r in records)
        fetch.close()
        fetch.close()  # idempotent
        with pytest.raises(RuntimeError, match="closed"):
            fetch.poll({}, 10, 0)
    finally:
        consumer.close()


def test_a_fetch_outliving_its_consumer_refuses_cleanly(env: dict[str, str]) -> None:
    consumer, conf = _consumer(env["KAFKA_BOOTSTRAP_SERVERS"])
    fetch = native_fetch(consumer, env["METERING_TOPIC"], conf)
    assert fetch is not None
    consumer.close()  # confluent-kafka destroys the client: the fetch must not touch it
    with pytest.raises(RuntimeError, match="closed"):
        fetch.poll({}, 10, 0)
    with pytest.raises(RuntimeError, match="closed"):
        fetch.forward([0])
    fetch.close()


def test_only_confluent_kafkas_consumer_is_fetched_natively(env: dict[str, str]) -> None:
    memory = MemoryConsumer(MemoryBroker(), {})
    assert native_fetch(memory, env["METERING_TOPIC"], {}) is None


@pytest.mark.parametrize("native", ["true", "false"])
def test_a_drain_counts_every_event_on_either_path(env: dict[str, str], native: str) -> None:
    events = harness.with_duplicates(harness.random_events(2000, seed=5), ratio=0.1)
    harness.produce(env["KAFKA_BOOTSTRAP_SERVERS"], env["METERING_TOPIC"], events)
    proc = harness.drain({**env, "METERING_NATIVE_FETCH": native, "LOG_LEVEL": "DEBUG"})
    path = "natively" if native == "true" else "with consume()"
    assert f"records fetched {path}" in proc.stderr
    assert harness.ledger_totals(env) == harness.expected_totals(events)
