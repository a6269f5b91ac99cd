"""The two reference consumers the worker is measured against, in this process.

(a) ``raw_consume``: a plain confluent-kafka loop that touches every value: the ceiling
    any Python consumer on this client and broker can reach.
(b) ``naive_consume``: the consumer a typical team would write first: per message a
    fastavro decode and the project's own ``validate``, a dict fold per (tenant, period),
    and per batch one DuckDB transaction upserting the aggregates and the offsets.
    It is a generous baseline: dedup is an in-memory set (not durable), and it keeps no
    sessions, duplicates or dead-letter tables.

Both use the worker's consumer settings (``consumer.kafka.consumer_config``) and read the
topic from the beginning with ``assign`` (no group join).
"""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import fastavro
import pyarrow as pa
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition

from consumer.kafka import consumer_config
from schemas.codec import COUNTERS, HEADER_LEN, SINGLE_OBJECT_MAGIC, default_codec
from schemas.periods import period_of
from schemas.validation import validate


@dataclass
class Measured:
    """Events read and the wall time it took, from consumer creation to the last one."""

    events: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


def _consume_all(
    bootstrap: str,
    topic: str,
    partitions: int,
    expected: int,
    batch_size: int,
    on_batch: Callable[[list[Message]], None],
) -> Measured:
    """Read ``expected`` records of ``topic`` from the start, handing each poll over."""
    started = time.perf_counter()
    conf = consumer_config(
        {"bootstrap.servers": bootstrap}, f"bench-{uuid.uuid4().hex[:8]}", "cooperative-sticky"
    )
    consumer = Consumer(conf)
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    seen = 0
    idle_since = time.monotonic()
    try:
        while seen < expected:
            messages = consumer.consume(batch_size, 1.0)
            good = [m for m in messages if m.error() is None]
            if not good:
                if time.monotonic() - idle_since > 60:
                    raise RuntimeError(f"stalled after {seen} of {expected} records")
                continue
            idle_since = time.monotonic()
            on_batch(good)
            seen += len(good)
        return Measured(seen, time.perf_counter() - started)
    finally:
        consumer.close()


def raw_consume(
    bootstrap: str, topic: str, partitions: int, expected: int, batch_size: int
) -> Measured:
    """(a): consume and touch every value (its length is summed)."""
    total = [0]

    def touch(messages: list[Message]) -> None:
        n = 0
        for m in messages:
            value = m.value()
            n += len(value) if value is not None else 0
        total[0] += n

    return _consume_all(bootstrap, topic, partitions, expected, batch_size, touch)


_AGG_DDL = f"""CREATE TABLE IF NOT EXISTS aggregates (
    tenant_id VARCHAR, period VARCHAR, events BIGINT, sessions BIGINT,
    {", ".join(f"{c} BIGINT" for c in COUNTERS)}, PRIMARY KEY (tenant_id, period))"""
_OFFSETS_DDL = """CREATE TABLE IF NOT EXISTS offsets (
    partition INTEGER PRIMARY KEY, next_offset BIGINT)"""
_UPSERT = f"""INSERT INTO aggregates SELECT * FROM batch_aggregates
    ON CONFLICT (tenant_id, period) DO UPDATE SET events = aggregates.events + excluded.events,
    sessions = excluded.sessions,
    {", ".join(f"{c} = aggregates.{c} + excluded.{c}" for c in COUNTERS)}"""


class NaiveFolder:
    """(b)'s per-message decode and per-batch fold into DuckDB."""

    def __init__(self, db_path: Path) -> None:
        codec = default_codec()
        self.writers = {s.fingerprint: s.parsed for s in codec.versions.values()}
        self.reader = codec.reader
        self.con = duckdb.connect(str(db_path))
        self.con.execute(_AGG_DDL)
        self.con.execute(_OFFSETS_DDL)
        self.seen: set[tuple[str, str]] = set()
        self.sessions: dict[tuple[str, str], set[str]] = {}
        self.counted = self.duplicates = self.invalid = 0

    def decode(self, value: bytes | None) -> dict[str, Any] | None:
        if value is None or value[:2] != SINGLE_OBJECT_MAGIC or len(value) < HEADER_LEN:
            return None
        writer = self.writers.get(value[2:HEADER_LEN])
        if writer is None:
            return None
        reader = None if writer is self.reader.parsed else self.reader.parsed
        try:
            event = fastavro.schemaless_reader(io.BytesIO(value[HEADER_LEN:]), writer, reader)
        except Exception:
            return None
        return event if isinstance(event, dict) else None

    def fold(self, messages: list[Message]) -> None:
        now = int(time.time() * 1_000_000)
        batch: dict[tuple[str, str], list[int]] = {}
        next_offsets: dict[int, int] = {}
        for m in messages:
            partition, offset = m.partition(), m.offset()
            if partition is not None and offset is not None:
                next_offsets[partition] = offset + 1
            event = self.decode(m.value())
            if event is None or validate(event, now, m.key()) is not None:
                self.invalid += 1
                continue
            ident = (event["tenant_id"], event["event_id"])
            if ident in self.seen:
                self.duplicates += 1
                continue
            self.seen.add(ident)
            key = (event["tenant_id"], period_of(event["occurred_at"]))
            row = batch.get(key)
            if row is None:
                row = batch[key] = [0] * (1 + len(COUNTERS))
            row[0] += 1
            for i, name in enumerate(COUNTERS, 1):
                row[i] += event[name]
            self.sessions.setdefault(key, set()).add(event["session_id"])
            self.counted += 1
        self._write(batch, next_offsets)

    def _write(self, batch: dict[tuple[str, str], list[int]], offsets: dict[int, int]) -> None:
        keys = list(batch)
        columns: dict[str, list[Any]] = {
            "tenant_id": [k[0] for k in keys],
            "period": [k[1] for k in keys],
            "events": [batch[k][0] for k in keys],
            "sessions": [len(self.sessions[k]) for k in keys],
        }
        for i, name in enumerate(COUNTERS, 1):
            columns[name] = [batch[k][i] for k in keys]
        table = pa.table(columns)
        con = self.con
        con.register("batch_aggregates", table)
        con.execute("BEGIN TRANSACTION")
        con.execute(_UPSERT)
        for partition, next_offset in offsets.items():
            con.execute("INSERT OR REPLACE INTO offsets VALUES (?, ?)", [partition, next_offset])
        con.execute("COMMIT")
        con.unregister("batch_aggregates")

    def close(self) -> None:
        self.con.close()


def naive_consume(
    bootstrap: str, topic: str, partitions: int, expected: int, batch_size: int, db_path: Path
) -> tuple[Measured, NaiveFolder]:
    """(b): the typical first consumer; returns its timing and its counts."""
    folder = NaiveFolder(db_path)
    try:
        measured = _consume_all(bootstrap, topic, partitions, expected, batch_size, folder.fold)
    finally:
        folder.close()
    return measured, folder
