"""Emitter: validated, batched, idempotent publishing of usage events to Kafka.

Services call ``emit(event)`` for each usage delta and ``close()`` (or use ``with``) at the
end. Events are validated before they leave the process, keyed by tenant_id (so one
tenant's events share a partition) and sent by an idempotent, compressing producer.
Delivery failures are never swallowed: ``flush``/``close`` raise ``DeliveryFailed``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from datetime import datetime
from types import TracebackType
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from schemas.codec import COUNTERS, Codec, default_codec
from schemas.validation import validate

PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "compression.type": "lz4",
    "linger.ms": 25,
    "batch.size": 1_000_000,
    "queue.buffering.max.messages": 1_000_000,
    "queue.buffering.max.kbytes": 1_048_576,
    "message.timeout.ms": 120_000,
}


class InvalidEvent(ValueError):
    """The event breaks the usage-event contract; it was not sent."""


class DeliveryFailed(RuntimeError):
    """The broker did not acknowledge some events; ``errors`` holds (event_id, error)."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        first = errors[0]
        super().__init__(f"{len(errors)} event(s) not delivered; first {first[0]}: {first[1]}")
        self.errors = errors


def to_micros(value: int | datetime) -> int:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise InvalidEvent("occurred_at must be timezone-aware (UTC)")
        return int(value.timestamp() * 1_000_000)
    return int(value)


def normalise(event: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults, make occurred_at integer microseconds, give an event_id if missing."""
    out = dict(event)
    out.setdefault("event_id", str(uuid.uuid4()))
    out["occurred_at"] = to_micros(out["occurred_at"])
    for name in COUNTERS:
        out.setdefault(name, 0)
    out.setdefault("risk_score", None)
    return out


class Emitter:
    """Publishes usage events; thread-compatible, one per process is plenty."""

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        *,
        config: dict[str, Any] | None = None,
        codec: Codec | None = None,
        schema_version: int | None = None,
        validate_events: bool = True,
    ) -> None:
        conf = {**PRODUCER_DEFAULTS, "bootstrap.servers": bootstrap_servers, **(config or {})}
        self._producer = Producer(conf)
        self.topic = topic
        self.codec = codec or default_codec()
        self.schema_version = schema_version
        self.validate_events = validate_events
        self.sent = 0
        self.delivered = 0
        self.failures: list[tuple[str, str]] = []

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self.delivered += 1
        else:
            key = msg.key()
            self.failures.append((key.decode("utf-8", "replace") if key else "?", str(err)))

    def emit(self, event: dict[str, Any]) -> str:
        """Validate, encode and queue one event; returns its event_id."""
        record = normalise(event)
        if self.validate_events:
            reason = validate(record, now_micros=int(time.time() * 1_000_000))
            if reason:
                raise InvalidEvent(reason)
        self.produce_raw(
            record["tenant_id"].encode(), self.codec.encode(record, self.schema_version)
        )
        return str(record["event_id"])

    def emit_many(self, events: Iterable[dict[str, Any]]) -> int:
        n = 0
        for event in events:
            self.emit(event)
            n += 1
        return n

    def produce_raw(self, key: bytes | None, value: bytes | None) -> None:
        """Queue pre-encoded bytes (also used by tests to send invalid values on purpose)."""
        while True:
            try:
                self._producer.produce(self.topic, value, key, on_delivery=self._on_delivery)
                break
            except BufferError:
                self._producer.poll(0.05)  # local queue full: let deliveries drain
        self.sent += 1
        if self.sent % 1000 == 0:
            self._producer.poll(0)

    def flush(self, timeout: float = 120.0) -> None:
        """Wait for every queued event; raise DeliveryFailed if any was not acknowledged."""
        remaining = self._producer.flush(timeout)
        if remaining:
            self.failures.append(("?", f"{remaining} event(s) still queued after {timeout}s"))
        if self.failures:
            failures, self.failures = self.failures, []
            raise DeliveryFailed(failures)

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> Emitter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
        else:
            self._producer.flush(10)
