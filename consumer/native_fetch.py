"""The worker's records fetched straight from librdkafka (``consumer/_native_fetch.c``).

confluent-kafka's ``consume()`` builds a ``Message`` object per record with the GIL held,
and reading its fields back costs as much again (what that is and what this saves:
docs/performance.md, "The native fetch"). Here the fetch queues of the partitions held are
forwarded to a queue of the extension's own, served in C with the GIL released, into the
same per-partition ``RecordBatch``es ``split_by_partition`` makes. Rebalances, client and
group errors stay on the consumer's own queue, which the worker still serves with
``consume()``: whatever that queue holds of a partition was fetched before the partition
was forwarded, so the worker takes it first (``Worker.run``) and order is kept.

Used only for confluent-kafka's own ``Consumer`` (not the in-memory one of the tests),
where the extension is built and ``METERING_NATIVE_FETCH`` is on; otherwise
``native_fetch`` returns None and every record takes the ``consume()`` path: slower,
never different.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException

from schemas.record_batch import RecordBatch

try:
    from consumer import _native_fetch
except ImportError:  # pragma: no cover - exercised only where no C compiler is present
    _native_fetch = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

NATIVE = _native_fetch is not None


def loaded_librdkafka() -> str | None:
    """The path of the librdkafka this process has loaded (confluent-kafka's), if any."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
        if "/librdkafka" in path and ".so" in path:
            return path.strip()
    return None


class NativeFetch:
    """Records of the forwarded partitions, polled without ``Message`` objects."""

    def __init__(self, fetch: Any) -> None:
        self._fetch = fetch
        self._forwarded: set[int] = set()

    def forward(self, partitions: Iterable[int]) -> None:
        """From now on, what Kafka fetches of ``partitions`` comes through ``poll``. Call it
        on every assignment: librdkafka leaves a partition forwarded by the application
        unforwarded when it is assigned again."""
        ids = sorted(set(partitions))
        self._fetch.forward(ids)
        self._forwarded.update(ids)

    def poll(self, into: dict[int, RecordBatch], max_records: int, timeout: float) -> int:
        """Add up to ``max_records`` records to ``into`` (after what it holds of each
        partition), waiting up to ``timeout`` s for the first; the number added. Fetch
        errors are logged (the client retries them), a fatal one raised."""
        batches, errors, records = self._fetch.poll(max_records, int(timeout * 1000))
        for partition, code, text in errors:
            if code == KafkaError._FATAL:
                raise KafkaException(KafkaError(code, text, fatal=True))
            if code != KafkaError._PARTITION_EOF:
                log.warning("kafka: partition %d: %s", partition, KafkaError(code, text))
        for partition, (offsets, keys, values) in batches.items():
            held = into.get(partition)
            if held is None:
                into[partition] = RecordBatch(offsets, keys, values)
            else:
                held.extend(offsets, keys, values)
        return int(records)

    def close(self) -> None:
        """Stop forwarding and drop the queue; call it before the consumer is closed."""
        self._fetch.close(sorted(self._forwarded))
        self._forwarded.clear()


def native_fetch(consumer: object, topic: str, config: dict[str, Any]) -> NativeFetch | None:
    """A ``NativeFetch`` for ``consumer`` (configured with ``config``), or None where the
    ``consume()`` path is to be used."""
    if _native_fetch is None or type(consumer) is not Consumer:
        return None
    library = loaded_librdkafka()
    if library is None:
        return None
    prefix = f"{config.get('client.id', 'rdkafka')}#consumer-"
    try:
        return NativeFetch(_native_fetch.bind(consumer, library, topic, prefix))
    except (OSError, TypeError, RuntimeError) as exc:
        log.warning("native fetch unavailable, using consume(): %s", exc)
        return None
