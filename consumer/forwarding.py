"""Forwarding: valid events that arrived on a partition other than their tenant's (or with
no key) are re-sent, same bytes, key = tenant_id, to the partition of the contract
(``schemas.partitioning``), and only then recorded as forwarded in the source ledger.

Exactly once by construction: ``send`` returns only once the broker acknowledged every
event; the caller then commits the batch (which records them as forwarded). A crash in
between forwards them again on restart, and the destination's dedup makes the second copy
a duplicate. Each forwarded record carries the header ``pf-forwarded-from`` =
``<partition>:<offset>`` of its source.
"""

from __future__ import annotations

import threading
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from common.errors import OperationError
from common.stopping import StopRequested
from schemas.prepare import Forward

FORWARDED_FROM = "pf-forwarded-from"
FORWARD_PRODUCER: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "compression.type": "lz4",
    "linger.ms": 5,
    # never give up on its own: a broker that is away only delays the batch (which is not
    # committed until every forward is acknowledged); a stop request ends the wait
    "message.timeout.ms": 0,
}
WAIT_STEP_SECONDS = 0.2


class Forwarder:
    """A lazily created idempotent producer for forwarded events (most workers never
    forward anything and never open it)."""

    def __init__(self, common: dict[str, Any], topic: str, stop: threading.Event) -> None:
        self.conf = {**FORWARD_PRODUCER, **common}
        self.topic = topic
        self.stop = stop
        self._producer: Producer | None = None
        self._errors: list[str] = []
        self.ends: dict[int, int] = {}  # per partition: 1 + the last offset forwarded there

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        partition, offset = msg.partition(), msg.offset()
        if err is not None:
            self._errors.append(str(err))
        elif partition is not None and offset is not None:
            self.ends[partition] = max(self.ends.get(partition, 0), offset + 1)

    def send(self, source_partition: int, events: list[Forward]) -> None:
        """Produce ``events`` to their partitions and wait until the broker acknowledged
        every one. Raises StopRequested if the worker is asked to stop first, or
        OperationError if the broker refused one."""
        if not events:
            return
        if self._producer is None:
            self._producer = Producer(self.conf)
        producer = self._producer
        for event in events:
            header = f"{source_partition}:{event.offset}".encode()
            while True:
                try:
                    producer.produce(
                        self.topic,
                        event.value,
                        event.tenant_id.encode(),
                        partition=event.to_partition,
                        headers=[(FORWARDED_FROM, header)],
                        on_delivery=self._on_delivery,
                    )
                    break
                except BufferError:
                    producer.poll(WAIT_STEP_SECONDS)
        while producer.flush(WAIT_STEP_SECONDS) > 0:
            if self.stop.is_set():
                raise StopRequested(f"{len(producer)} forwarded event(s) not acknowledged")
        if self._errors:
            errors, self._errors = self._errors, []
            raise OperationError(f"forwarding {len(errors)} event(s) failed: {errors[0]}")

    def close(self) -> None:
        """Drop what is still queued (it belongs to a batch that was not committed)."""
        if self._producer is not None:
            self._producer.purge()
            self._producer.flush(0)
            self._producer = None


__all__ = ["FORWARDED_FROM", "Forwarder", "StopRequested"]
