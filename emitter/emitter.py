"""Emitter: validated, batched, idempotent publishing of usage events to Kafka.

Services call ``emit(event)`` for each usage delta, or ``emit_many(events)`` for a batch
(dicts, a polars DataFrame or an Arrow table), and ``close()`` (or use ``with``) at the
end. Events are validated before they leave the process, keyed by tenant_id and placed
by the partition contract (``schemas.partitioning``: murmur2 of the tenant_id, as Kafka's
Java client does; librdkafka's own default, CRC32, would put a tenant elsewhere) and sent
by an idempotent, compressing producer.
Delivery failures are never swallowed: ``flush``/``close`` raise ``DeliveryFailed``.

``emit_many`` is the bulk path: it validates a chunk with vectorised rules (the exact
per-event ``validate`` names the reason of any row they do not vouch for), encodes it
with ``schemas.columnar.encode`` (fastavro's exact bytes) and queues it with
``produce_batch``. The producer reports deliveries only when they fail, so a healthy
event costs no Python callback.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime
from itertools import islice
from types import TracebackType
from typing import Any, TypeAlias

import polars as pl
import pyarrow as pa
from confluent_kafka import KafkaError, Message, Producer

from schemas.batch_validation import vouched
from schemas.bulk_encoder import ENCODES, encode
from schemas.codec import COUNTERS, Codec, PublishedSchema, default_codec
from schemas.flat_schema import FlatSchema
from schemas.validation import validate

# librdkafka's own lines and its error callbacks, on the logger whose repeats are dropped
_client_log = logging.getLogger("rdkafka")
# Client errors no retry will cure: flush stops waiting once one is reported.
REFUSALS = frozenset({KafkaError._AUTHENTICATION, KafkaError._SSL})

EventBatch: TypeAlias = "Iterable[dict[str, Any]] | pl.DataFrame | pa.Table"
_Rows: TypeAlias = "pl.DataFrame | list[dict[str, Any]]"
# Rows validated, encoded and queued together by emit_many.
CHUNK_ROWS = 50_000
_POLARS_TYPES = {
    "int": pl.Int64, "long": pl.Int64, "string": pl.String, "bytes": pl.Binary,
    "float": pl.Float64, "double": pl.Float64, "boolean": pl.Boolean, "null": pl.Null,
    "enum": pl.String,
}  # fmt: skip

PRODUCER_DEFAULTS: dict[str, Any] = {
    # The partition contract (schemas.partitioning.partition_for), computed by librdkafka.
    "partitioner": "murmur2_random",
    "enable.idempotence": True,
    "acks": "all",
    "compression.type": "lz4",
    "linger.ms": 25,
    "batch.size": 1_000_000,
    "queue.buffering.max.messages": 1_000_000,
    "queue.buffering.max.kbytes": 1_048_576,
    "message.timeout.ms": 120_000,
    # Only failures call back into Python (docs/performance.md, "Emitter").
    "delivery.report.only.error": True,
}


class InvalidEvent(ValueError):
    """The event breaks the usage-event contract; it was not sent."""


class DeliveryFailed(RuntimeError):
    """The broker did not acknowledge some events; ``errors`` holds (event_id, error)."""

    def __init__(self, errors: list[tuple[str, str]], refused: str | None = None) -> None:
        first = errors[0]
        super().__init__(
            f"the broker refused the client: {refused}"
            if refused
            else f"{len(errors)} event(s) not delivered; first {first[0]}: {first[1]}"
        )
        self.errors = errors
        self.refused = refused  # why the broker refused the client itself (SASL, TLS)


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
        conf.setdefault("logger", _client_log)  # through logging, never raw on stderr
        conf.setdefault("error_cb", self._on_error)
        self._refused: KafkaError | None = None
        self._producer = Producer(conf)
        self.topic = topic
        self.codec = codec or default_codec()
        self.schema_version = schema_version
        self.validate_events = validate_events
        self.sent = 0
        self.failed = 0
        self.failures: list[tuple[str, str]] = []

    @property
    def delivered(self) -> int:
        """Events acknowledged so far (sent, minus failed, minus still queued). A failed
        event can be counted before librdkafka drops it from its queue: never below 0."""
        return max(0, self.sent - self.failed - len(self._producer))

    def _on_error(self, err: KafkaError) -> None:
        """Client errors go to the log; one the broker will keep giving (authentication,
        TLS, a fatal error) makes ``flush`` fail at once instead of at its timeout."""
        if err.fatal() or err.code() in REFUSALS:
            self._refused = err
        _client_log.warning("kafka client: %s", err.str())

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            key = msg.key()
            self.failed += 1
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

    def emit_many(self, events: EventBatch) -> int:
        """Validate, encode and queue many events; returns how many were queued.

        Works in chunks of ``CHUNK_ROWS``: a chunk is validated whole before any of it is
        queued, so an invalid event raises ``InvalidEvent`` with nothing of its chunk sent
        (earlier chunks were). Dicts are normalised as ``emit`` does (event_id generated
        when missing, datetimes to microseconds, counters default 0).
        """
        writer = self.codec.writer(self.schema_version)
        flat = FlatSchema.of(writer.raw) if ENCODES else None
        return sum(self._emit_chunk(chunk, writer, flat) for chunk in _chunks(events))

    def _emit_chunk(self, chunk: _Rows, writer: PublishedSchema, flat: FlatSchema | None) -> int:
        frame = None if flat is None else _typed(chunk, writer, flat)
        if flat is None or frame is None:  # not columnar: the per-event path decides
            rows = chunk.to_dicts() if isinstance(chunk, pl.DataFrame) else chunk
            for event in rows:
                self.emit(event)
            return len(rows)
        if self.validate_events:
            self._check(frame)
        values = encode(frame.to_arrow(), flat, writer.header).to_pylist()
        self._produce_batch(frame.get_column("tenant_id").to_list(), values)
        return frame.height

    def _check(self, frame: pl.DataFrame) -> None:
        """Raise InvalidEvent for the first row ``validate`` refuses."""
        now = int(time.time() * 1_000_000)
        ok = vouched(frame, now)
        if ok.all():
            return
        for row in frame.filter(~ok).iter_rows(named=True):
            reason = validate(row, now_micros=now)
            if reason:
                raise InvalidEvent(reason)

    def _produce_batch(self, keys: list[str | None], values: list[bytes]) -> None:
        messages: list[dict[str, Any]] = [
            {"key": k, "value": v} for k, v in zip(keys, values, strict=True)
        ]
        while messages:
            queued = self._producer.produce_batch(
                self.topic, messages, on_delivery=self._on_delivery
            )
            self.sent += queued
            if queued == len(messages):
                break
            retry = []
            for m in messages:
                err = m.get("_error")
                if err is None:
                    continue
                if err.code() == KafkaError._QUEUE_FULL:
                    retry.append({"key": m["key"], "value": m["value"]})
                else:
                    self.failed += 1
                    self.failures.append((str(m["key"]), str(err)))
            messages = retry
            if messages:
                self._producer.poll(0.05)  # local queue full: let deliveries drain
        self._producer.poll(0)

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
        deadline = time.monotonic() + timeout
        remaining = len(self._producer)
        while remaining and self._refused is None and time.monotonic() < deadline:
            remaining = self._producer.flush(min(0.5, max(0.0, deadline - time.monotonic())))
        if self._refused is not None and remaining:
            self._producer.purge()  # nothing will get through: do not wait at exit either
            failures, self.failures = self.failures, []
            failures.append(("?", f"{remaining} event(s) not sent"))
            raise DeliveryFailed(failures, refused=self._refused.str())
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


def _chunks(events: EventBatch) -> Iterator[_Rows]:
    if isinstance(events, pa.Table):
        events = pl.DataFrame(pl.from_arrow(events))
    if isinstance(events, pl.DataFrame):
        yield from events.iter_slices(CHUNK_ROWS)
        return
    it = iter(events)
    while chunk := list(islice(it, CHUNK_ROWS)):
        yield chunk


def _typed(chunk: _Rows, writer: PublishedSchema, flat: FlatSchema) -> pl.DataFrame | None:
    """The chunk as one typed column per writer field, normalised like ``normalise``;
    None when its values do not fit the columns (the per-event path then decides)."""
    defaults = {f["name"]: f.get("default") for f in writer.raw["fields"]}
    dtypes = {f.name: _POLARS_TYPES[f.kind] for f in flat.fields}
    try:
        if isinstance(chunk, pl.DataFrame):
            frame = pl.DataFrame(
                [_column(chunk, name, dtype, defaults.get(name)) for name, dtype in dtypes.items()]
            )
        else:
            frame = _dict_frame(chunk, dtypes, defaults)
    except (TypeError, ValueError, OverflowError, pl.exceptions.PolarsError):
        return None
    if frame.select(pl.col("occurred_at").is_null().any()).item():
        return None
    return frame


def _column(
    frame: pl.DataFrame, name: str, dtype: pl.DataType | type[pl.DataType], default: Any
) -> pl.Series:
    if name not in frame.columns:
        if name == "event_id":
            return pl.Series(name, [str(uuid.uuid4()) for _ in range(frame.height)], dtype)
        return pl.Series(name, [default] * frame.height, dtype)
    column = frame.get_column(name)
    if name == "occurred_at" and isinstance(column.dtype, pl.Datetime):
        if column.dtype.time_zone is None:
            raise InvalidEvent("occurred_at must be timezone-aware (UTC)")
        return column.dt.epoch("us")
    return column.cast(dtype)


def _dict_frame(
    events: list[dict[str, Any]], dtypes: dict[str, Any], defaults: dict[str, Any]
) -> pl.DataFrame:
    """Typed columns of dict events. Polars reads the dicts natively (2x faster than
    column by column); then the few nulls are told apart: a missing key takes its default
    (a fresh uuid for event_id), an explicit None stays, as in ``normalise``."""
    try:
        frame = pl.from_dicts(events, schema=dtypes)
    except (TypeError, ValueError, OverflowError, pl.exceptions.PolarsError):
        # e.g. datetimes for occurred_at: column by column, as normalise does
        columns = {name: _normalised(events, name, defaults.get(name)) for name in dtypes}
        return pl.DataFrame(columns, schema=dtypes)
    for name, dtype in dtypes.items():
        column = frame.get_column(name)
        if not column.null_count() or (name != "event_id" and defaults.get(name) is None):
            continue  # no nulls, or null is what a missing key means anyway
        values = column.to_list()
        for i in column.is_null().arg_true().to_list():
            if name not in events[i]:
                values[i] = str(uuid.uuid4()) if name == "event_id" else defaults[name]
        frame = frame.with_columns(pl.Series(name, values, dtype))
    return frame


def _normalised(events: list[dict[str, Any]], name: str, default: Any) -> list[Any]:
    if name == "event_id":
        return [e["event_id"] if "event_id" in e else str(uuid.uuid4()) for e in events]
    if name == "occurred_at":
        values = [e["occurred_at"] for e in events]
        return values if all(type(v) is int for v in values) else [to_micros(v) for v in values]
    return [e.get(name, default) for e in events]
