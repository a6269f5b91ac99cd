"""Batch preparation: one partition's Kafka records -> validated Arrow columns (pure: no I/O).

``prepare_batch`` decodes and validates every record: valid events become one Arrow table
(with the in-batch duplicate flag already set), invalid ones become dead letters with
their reason, and valid ones that belong to another partition (or came without a key)
are set aside to be forwarded there (``schemas.partitioning``). Corrections are events
too (``correction`` True; their reason and target in ``PreparedBatch.corrections``). The
columnar fast path (``schemas.fast_path``) takes what it can vouch for; ``decode_record``,
the per-record path, takes the rest and names every reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import polars as pl
import pyarrow as pa

from schemas.codec import COUNTERS, Codec, DecodeError
from schemas.fast_path import FRAME_SCHEMA, decode_fast
from schemas.partitioning import partition_for
from schemas.periods import Period, period_of
from schemas.record_batch import Record, RecordBatch, columns_of
from schemas.validation import CORRECTION, reason_code, validate

__all__ = [
    "EVENT_SCHEMA",
    "Correction",
    "DeadLetter",
    "Forward",
    "PreparedBatch",
    "Record",
    "RecordBatch",
    "prepare_batch",
]


@dataclass(frozen=True)
class DeadLetter:
    offset: int
    key: bytes | None
    value: bytes | None
    reason: str

    @property
    def reason_code(self) -> str:
        return reason_code(self.reason)


@dataclass(frozen=True)
class Correction:
    """What a correction event says beyond its deltas (the events table has those): why,
    which event it corrects, and its raw value (kept if the fold refuses it)."""

    reason: str
    corrects_event_id: str | None
    value: bytes | None


@dataclass(frozen=True)
class Forward:
    """A valid event to re-send to its tenant's partition, key = tenant_id, same bytes."""

    offset: int
    tenant_id: str
    event_id: str
    to_partition: int
    value: bytes


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
        ("correction", pa.bool_()),  # a correction (signed deltas) rather than usage
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
    forward: list[Forward] = field(default_factory=list)
    corrections: dict[int, Correction] = field(default_factory=dict)  # by offset


# 0001-01-01T00:00:00Z: the first instant a period can be named for (datetime's range).
FIRST_PERIOD_MICROS = -62_135_596_800 * 1_000_000
PAST_HORIZON = "past_late_usage_horizon"


def decode_record(
    rec: Record, codec: Codec, now_micros: int, oldest_allowed_micros: int | None
) -> dict[str, Any] | DeadLetter:
    """The per-record path: decode, validate and date one record, or say why not.

    This is the reference for every dead-letter reason; the columnar path hands it
    every record it cannot vouch for. ``oldest_allowed_micros`` is the start of the
    oldest period still billable (``periods.oldest_billable_start``; None: all are):
    acceptance depends on the event and the wall clock only.
    """
    try:
        event = codec.decode(rec.value)
    except DecodeError as exc:
        return DeadLetter(rec.offset, rec.key, rec.value, f"{exc.reason}: {exc.detail}")
    reason = validate(event, now_micros, rec.key)
    occurred = event["occurred_at"]
    too_old = occurred < FIRST_PERIOD_MICROS or (
        oldest_allowed_micros is not None and occurred < oldest_allowed_micros
    )
    if reason is None and too_old:
        reason = (
            f"{PAST_HORIZON}: period {period_of(max(occurred, FIRST_PERIOD_MICROS))} "
            "can no longer be billed (METERING_LATE_USAGE_MONTHS)"
        )
    if reason is not None:
        return DeadLetter(rec.offset, rec.key, rec.value, reason)
    correction = event.get("kind") == CORRECTION
    return {**event, "offset": rec.offset, "period": period_of(occurred), "correction": correction}


def prepare_batch(
    partition: int,
    records: Sequence[Record],
    codec: Codec,
    now_micros: int,
    oldest_allowed_micros: int | None,
    *,
    columnar: bool = True,
    partitions: int | None = None,
) -> PreparedBatch:
    """Decode, validate and columnise ``records`` (offset order) of one partition.

    With ``columnar`` (the default) the batch goes through ``schemas.fast_path``
    and only the records it leaves over take the per-record path; without, every record
    does. Both give the same PreparedBatch. With ``partitions`` (the topic's partition
    count) a valid event with a null key, or whose tenant belongs to another partition,
    goes to ``forward`` instead of ``events``: it is never counted where it landed.
    """
    if columnar:
        fast = decode_fast(records, codec, now_micros, oldest_allowed_micros)
        frame = _with_periods(fast.events).with_columns(pl.lit(False).alias("correction"))
        slow = fast.slow
    else:
        frame, slow = _EMPTY_FRAME, list(range(len(records)))
    rows: list[dict[str, Any]] = []
    dead: list[DeadLetter] = []
    notes: dict[int, Correction] = {}
    for i in slow:
        out = decode_record(records[i], codec, now_micros, oldest_allowed_micros)
        if isinstance(out, DeadLetter):
            dead.append(out)
            continue
        rows.append(out)
        if out["correction"]:
            value = records[i].value
            notes[out["offset"]] = Correction(out["reason"], out["corrects_event_id"], value)
    if rows:
        extra = pl.DataFrame(rows, schema=_FRAME_SCHEMA)
        frame = pl.concat([frame, extra]).sort("offset") if frame.height else extra
    forward: list[Forward] = []
    if partitions is not None and frame.height:
        frame, forward = _set_aside_foreign(frame, records, partition, partitions)
    if frame.get_column("event_id").n_unique() == frame.height:  # the usual case: cheap
        first: pl.Expr = pl.lit(True)
    else:
        first = pl.struct("tenant_id", "event_id").is_first_distinct()
    table = frame.select(
        *[c for c in EVENT_SCHEMA.names if c != "first_in_batch"], first.alias("first_in_batch")
    )
    events = table.to_arrow().cast(EVENT_SCHEMA)
    max_at = frame.get_column("occurred_at").max() if frame.height else None
    next_offset = records[-1].offset + 1 if records else 0
    assert max_at is None or isinstance(max_at, int)
    return PreparedBatch(partition, next_offset, events, dead, len(records), max_at, forward, notes)


@lru_cache(maxsize=1 << 16)
def _home(tenant_id: str, partitions: int) -> int:
    return partition_for(tenant_id, partitions)  # (pure Python: ~2 us; tenants repeat)


def _set_aside_foreign(
    frame: pl.DataFrame, records: Sequence[Record], partition: int, partitions: int
) -> tuple[pl.DataFrame, list[Forward]]:
    """Split the valid events into this partition's and those to forward (null key, or a
    tenant whose contract partition is another): one murmur2 per distinct tenant."""
    offsets, keys, values = columns_of(records)
    tenants = frame.get_column("tenant_id").unique().to_list()
    home = {t: _home(t, partitions) for t in tenants}
    keyless = [o for o, k in zip(offsets, keys, strict=True) if k is None] if None in keys else []
    foreign = [t for t, p in home.items() if p != partition]
    if not keyless and not foreign:
        return frame, []
    away = pl.col("tenant_id").is_in(foreign) | pl.col("offset").is_in(keyless)
    moved = frame.filter(away).select("offset", "tenant_id", "event_id")
    at = {o: i for i, o in enumerate(offsets)}
    forward = []
    for offset, tenant, event_id in moved.iter_rows():
        value = values[at[offset]]
        assert value is not None  # it decoded
        forward.append(Forward(offset, tenant, event_id, home[tenant], value))
    return frame.filter(~away), forward


_FRAME_SCHEMA = {**FRAME_SCHEMA, "period": pl.String, "correction": pl.Boolean}
_EMPTY_FRAME = pl.DataFrame(schema=_FRAME_SCHEMA)


def _with_periods(events: pl.DataFrame) -> pl.DataFrame:
    """Add ``period`` (``period_of``) to events with occurred_at >= 0: the month key is
    computed per row, its name once per distinct month (strftime per row costs 2x)."""
    at = pl.from_epoch("occurred_at", "us")
    keys = events.select((at.dt.year() * 100 + at.dt.month()).alias("k")).to_series()
    months = keys.unique()
    names = [str(Period(k // 100, k % 100)) for k in months.to_list()]
    return events.with_columns(
        keys.replace_strict(months, names, return_dtype=pl.String).alias("period")
    )
