"""Turning a batch of Kafka records into columns ready to commit (pure: no I/O).

``prepare_batch`` decodes and validates every record: valid events become one Arrow table
(with the in-batch duplicate flag already set), invalid ones become dead letters with
their reason. ``fold_totals`` is the reference fold used to reconcile totals in tests.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import pyarrow as pa

from schemas.codec import COUNTERS, Codec, DecodeError
from schemas.validation import validate


class Record(NamedTuple):
    """What the ledger needs of one Kafka message."""

    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True)
class DeadLetter:
    offset: int
    key: bytes | None
    value: bytes | None
    reason: str

    @property
    def reason_code(self) -> str:
        return self.reason.split(":", 1)[0]


EVENT_SCHEMA = pa.schema(
    [
        ("offset", pa.int64()),
        ("tenant_id", pa.string()),
        ("event_id", pa.string()),
        ("session_id", pa.string()),
        ("occurred_at", pa.int64()),
        ("period", pa.string()),
        *[(name, pa.int64()) for name in COUNTERS],
        ("risk_score", pa.float64()),
        ("first_in_batch", pa.bool_()),
    ]
)


@dataclass
class PreparedBatch:
    """One partition's slice of a poll, decoded: valid events as columns, the rest dead."""

    partition: int
    next_offset: int
    events: pa.Table
    dead: list[DeadLetter] = field(default_factory=list)
    consumed: int = 0
    max_occurred_at: int | None = None


def period_of(micros: int) -> str:
    moment = datetime.fromtimestamp(micros / 1_000_000, UTC)
    return f"{moment.year:04d}-{moment.month:02d}"


def prepare_batch(
    partition: int,
    records: Sequence[Record],
    codec: Codec,
    now_micros: int,
    oldest_allowed_micros: int | None,
) -> PreparedBatch:
    """Decode, validate and columnise ``records`` (offset order) of one partition."""
    columns: dict[str, list[Any]] = {name: [] for name in EVENT_SCHEMA.names}
    dead: list[DeadLetter] = []
    seen: set[tuple[str, str]] = set()
    max_at: int | None = None
    for rec in records:
        try:
            event = codec.decode(rec.value)
        except DecodeError as exc:
            dead.append(DeadLetter(rec.offset, rec.key, rec.value, f"{exc.reason}: {exc.detail}"))
            continue
        reason = validate(event, now_micros, rec.key)
        too_old = oldest_allowed_micros is not None and event["occurred_at"] < oldest_allowed_micros
        if reason is None and too_old:
            reason = "outside_dedup_window: older than the dedup window allows counting"
        if reason is not None:
            dead.append(DeadLetter(rec.offset, rec.key, rec.value, reason))
            continue
        ident = (event["tenant_id"], event["event_id"])
        columns["offset"].append(rec.offset)
        columns["period"].append(period_of(event["occurred_at"]))
        columns["first_in_batch"].append(ident not in seen)
        seen.add(ident)
        for name in EVENT_SCHEMA.names[1:-1]:
            if name != "period":
                columns[name].append(event[name])
        occurred = event["occurred_at"]
        max_at = occurred if max_at is None or occurred > max_at else max_at
    table = pa.Table.from_pydict(columns, schema=EVENT_SCHEMA)
    next_offset = records[-1].offset + 1 if records else 0
    return PreparedBatch(partition, next_offset, table, dead, len(records), max_at)


@dataclass
class Totals:
    """Per tenant and period: what the ledger must end up with."""

    events: int = 0
    sessions: set[str] = field(default_factory=set)
    counters: Counter[str] = field(default_factory=Counter)


def fold_totals(events: Iterable[dict[str, Any]]) -> dict[tuple[str, str], Totals]:
    """Reference fold: count each (tenant_id, event_id) once."""
    out: dict[tuple[str, str], Totals] = {}
    seen: set[tuple[str, str]] = set()
    for e in events:
        ident = (e["tenant_id"], e["event_id"])
        if ident in seen:
            continue
        seen.add(ident)
        t = out.setdefault((e["tenant_id"], period_of(e["occurred_at"])), Totals())
        t.events += 1
        t.sessions.add(e["session_id"])
        t.counters.update({k: e[k] for k in COUNTERS})
    return out
