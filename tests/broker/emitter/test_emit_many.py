"""The emitter's bulk path (``emit_many``) is checked byte for byte against ``emit`` through the
real broker."""

from __future__ import annotations

import time
import uuid

import polars as pl
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from emitter import DeliveryFailed, Emitter, InvalidEvent
from schemas.codec import default_codec
from tests.support.events import make_event
from tests.support.worker_harness import random_events

CODEC = default_codec()


def _read(bootstrap: str, topic: str, expected: int) -> list[tuple[bytes | None, bytes | None]]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"read-{uuid.uuid4()}",
            "enable.auto.commit": False,
        }
    )
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(6)])
    got: list[tuple[bytes | None, bytes | None]] = []
    deadline = time.time() + 60
    while len(got) < expected and time.time() < deadline:
        got += [(m.key(), m.value()) for m in consumer.consume(1000, 1.0) if m.error() is None]
    consumer.close()
    return got


def test_emit_many_sends_what_emit_sends(kafka_bootstrap: str, topic: str) -> None:
    events = random_events(700, tenants=9, seed=26)
    frame_events = pl.DataFrame(random_events(300, tenants=9, seed=27))
    with Emitter(kafka_bootstrap, topic) as emitter:
        assert emitter.emit_many(iter(events)) == len(events)
        assert emitter.emit_many(frame_events) == frame_events.height
        assert emitter.emit_many(frame_events.to_arrow().slice(0, 10)) == 10
    expected = [e["tenant_id"].encode() + b"|" + CODEC.encode(e) for e in events]
    expected += [e["tenant_id"].encode() + b"|" + CODEC.encode(e) for e in frame_events.to_dicts()]
    expected += expected[len(events) : len(events) + 10]
    got = _read(kafka_bootstrap, topic, len(expected))
    assert sorted((k or b"") + b"|" + (v or b"") for k, v in got) == sorted(expected)


def test_emit_many_normalises_like_emit(kafka_bootstrap: str, topic: str) -> None:
    event = make_event(tenant="norm")
    for name in ("event_id", "cpu_ms", "risk_score"):
        event.pop(name)
    with Emitter(kafka_bootstrap, topic) as emitter:
        emitter.emit_many([event])
    ((key, value),) = _read(kafka_bootstrap, topic, 1)
    decoded = CODEC.decode(value)
    assert key == b"norm" and decoded["cpu_ms"] == 0 and decoded["risk_score"] is None
    assert uuid.UUID(decoded["event_id"])


def test_emit_many_validates_the_chunk_before_sending_any(kafka_bootstrap: str, topic: str) -> None:
    events = [make_event(tenant="t") for _ in range(50)] + [make_event(tenant="t", cpu_ms=-1)]
    with Emitter(kafka_bootstrap, topic) as emitter:
        with pytest.raises(InvalidEvent, match="negative_counter: cpu_ms=-1"):
            emitter.emit_many(events)
        assert emitter.sent == 0
        with pytest.raises(InvalidEvent, match="invalid_tenant_id"):
            emitter.emit_many(pl.DataFrame([make_event(tenant="no spaces")]))
        assert emitter.sent == 0


def test_emit_many_surfaces_delivery_failures(topic: str) -> None:
    emitter = Emitter("127.0.0.1:1", topic, config={"message.timeout.ms": 1500})
    emitter.emit_many(random_events(20, seed=28))
    with pytest.raises(DeliveryFailed) as failed:
        emitter.flush(timeout=10)
    assert len(failed.value.errors) == 20 and emitter.delivered == 0
