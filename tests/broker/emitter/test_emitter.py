"""Emitter -> real broker -> a plain consumer, byte for byte; simulate-usage end to end."""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import Consumer, Message

from emitter import DeliveryFailed, Emitter, InvalidEvent
from emitter.simulate import SESSION_RANGES, simulate_sessions
from schemas.codec import COUNTERS, default_codec
from schemas.periods import Period
from tests.support.cli_runner import run_cli
from tests.support.events import make_event


def read_all(bootstrap: str, topic: str, expected: int, timeout: float = 60) -> list[Message]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"plain-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    got: list[Message] = []

    deadline = time.time() + timeout
    while len(got) < expected and time.time() < deadline:
        for msg in consumer.consume(1000, 1.0):
            if msg.error() is None:
                got.append(msg)
    consumer.close()
    return got


def test_emitter_round_trip_byte_for_byte(kafka_bootstrap: str, topic: str) -> None:
    codec = default_codec()
    events = [make_event(tenant=f"t{i % 3}") for i in range(300)]
    with Emitter(kafka_bootstrap, topic) as emitter:
        for e in events:
            emitter.emit(e)
    msgs = read_all(kafka_bootstrap, topic, len(events))
    assert len(msgs) == len(events)
    by_id = {codec.decode(m.value())["event_id"]: m for m in msgs}
    for e in events:
        m = by_id[e["event_id"]]
        assert m.key() == e["tenant_id"].encode()
        assert m.value() == codec.encode(e)
    # one tenant, one partition
    parts: dict[bytes | None, set[int | None]] = {}
    for m in msgs:
        parts.setdefault(m.key(), set()).add(m.partition())
    assert all(len(p) == 1 for p in parts.values())


def test_emitter_refuses_invalid_before_sending(kafka_bootstrap: str, topic: str) -> None:
    with Emitter(kafka_bootstrap, topic) as emitter:
        with pytest.raises(InvalidEvent, match="negative_counter"):
            emitter.emit(make_event(cpu_ms=-1))
        assert emitter.sent == 0


def test_delivery_failure_surfaces(topic: str) -> None:
    emitter = Emitter("127.0.0.1:1", topic, config={"message.timeout.ms": 1500})
    emitter.emit(make_event())
    with pytest.raises(DeliveryFailed):
        emitter.flush(timeout=10)


def test_simulation_is_reproducible_and_in_period() -> None:
    period = Period.parse("2025-01")
    a = list(simulate_sessions("acme", 50, period, seed=7))
    b = list(simulate_sessions("acme", 50, period, seed=7))
    assert a == b and len({e["session_id"] for e in a}) == 50
    assert len(a) > 50  # several events per session
    start, end = period.start.timestamp() * 1e6, period.end.timestamp() * 1e6
    assert all(start <= e["occurred_at"] < end for e in a)
    per_session: dict[str, dict[str, int]] = {}
    for e in a:
        acc = per_session.setdefault(e["session_id"], dict.fromkeys(COUNTERS, 0))
        for k in COUNTERS:
            acc[k] += e[k]
    for totals in per_session.values():
        for k, (lo, hi) in SESSION_RANGES.items():
            assert lo <= totals[k] <= hi


def test_simulate_usage_cli(env: dict[str, str]) -> None:
    proc = run_cli(
        "simulate-usage", "sim-tenant", "20", "--period", "2025-03", "--seed", "3", check=True
    )
    assert "sent" in proc.stderr and "20 sessions" in proc.stderr
    expected = list(simulate_sessions("sim-tenant", 20, Period.parse("2025-03"), seed=3))
    msgs = read_all(env["KAFKA_BOOTSTRAP_SERVERS"], env["METERING_TOPIC"], len(expected))
    codec = default_codec()
    assert sorted(codec.decode(m.value())["event_id"] for m in msgs) == sorted(
        e["event_id"] for e in expected
    )
