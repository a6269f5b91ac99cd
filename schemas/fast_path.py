"""Columnar decoding of one partition batch: the hot path behind ``prepare_batch``.

It decides exactly what the per-record path would (its cost: docs/performance.md). It is safe
by construction:

1. A value is a candidate only if its 10-byte header equals the header of a writer schema
   the path supports (flat, and resolving into the reader schema without conversions)
   and it is not oversized.
2. ``schemas.native_decoder`` decodes the candidates natively and keeps only bodies that
   are exactly one valid record of that writer schema.
3. ``schemas.batch_validation`` vouches for rows that ``validate`` surely accepts.
4. Only usage events: a writer with ``kind`` (v3 on) has it decoded, and corrections
   (rare, with their own rules) take the per-record path.

Anything else (no header match, a body the decoder does not prove, a row the vectorised
rules do not vouch for) is returned as an index for the per-record path, which decides
it exactly as before and names the dead-letter reason. Without the native decoder
(``native_decoder.NATIVE`` False) every record takes that path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from schemas.batch_validation import vouched
from schemas.bulk_encoder import arange
from schemas.codec import COUNTERS, MAX_VALUE_BYTES, Codec, PublishedSchema
from schemas.flat_schema import FlatField, FlatSchema
from schemas.native_decoder import ROW, DecodePlan, decode_columns
from schemas.record_batch import Record, columns_of
from schemas.validation import USAGE

# What the ledger needs of an event, in EVENT_SCHEMA order (offset and period aside).
NEEDED = ("tenant_id", "event_id", "session_id", "occurred_at", *COUNTERS, "risk_score")
# Validation also reads ``source``.
DECODED = (*NEEDED, "source")
KIND = "kind"  # decoded too where the writer has it: only usage events stay columnar
STRINGS = frozenset({"tenant_id", "event_id", "session_id", "source"})
# The polars schema of the decoded events (``FastDecoded.events``).
FRAME_SCHEMA: dict[str, pl.DataType | type[pl.DataType]] = {
    "offset": pl.Int64,
    **{
        n: pl.String if n in STRINGS else pl.Float64 if n == "risk_score" else pl.Int64
        for n in DECODED
    },
}


@dataclass
class FastDecoded:
    """Rows the columnar path accepted as valid, and the indices it leaves to the caller."""

    events: pl.DataFrame  # "offset" + DECODED columns, in offset order
    slow: list[int]  # indices into the records, ascending


def fast_schema(writer: PublishedSchema, reader: PublishedSchema) -> DecodePlan | None:
    """The columnar plan for ``writer``, or None when it needs per-record resolution.

    Supported: a flat writer in which every field of the reader either exists with the
    same primitive type and nullability, or is absent, has a default and is not needed
    here (resolution would fill it in; the ledger ignores it).
    """
    flat = FlatSchema.of(writer.raw)
    if flat is None:
        return None
    for spec in reader.raw["fields"]:
        mine, theirs = flat.field(spec["name"]), FlatField.of(spec)
        if mine is None:
            if spec["name"] in DECODED or "default" not in spec:
                return None
        elif theirs is None or (mine.kind, mine.nullable, mine.symbols) != (
            theirs.kind,
            theirs.nullable,
            theirs.symbols,
        ):
            return None
    kind = flat.field(KIND)
    if kind is not None and (kind.symbols is None or USAGE not in kind.symbols):
        return None
    return DecodePlan.of(flat, writer.header, (*DECODED, KIND) if kind else DECODED)


def _usage_only(frame: pl.DataFrame, plan: DecodePlan) -> pl.DataFrame:
    """The decoded rows that are usage events, without the ``kind`` column."""
    kind = next((f for f in plan.wanted if f.name == KIND), None)
    if kind is None or kind.symbols is None:
        return frame
    usage = pl.col(KIND) == kind.symbols.index(USAGE)
    if not frame.select(usage.all()).item():
        frame = frame.filter(usage)
    return frame.drop(KIND)


@cache
def plans(codec: Codec) -> tuple[DecodePlan, ...]:
    """The columnar plans of every published writer schema the path supports."""
    found = (fast_schema(s, codec.reader) for s in codec.versions.values())
    return tuple(p for p in found if p is not None)


def decode_fast(
    records: Sequence[Record], codec: Codec, now_micros: int, oldest_allowed_micros: int | None
) -> FastDecoded:
    """Decode and validate what the columnar path can vouch for; see the module doc."""
    n = len(records)
    offsets, keys, values = columns_of(records)
    decoded = ((decode_columns(values, p, MAX_VALUE_BYTES), p) for p in plans(codec))
    frames = [_usage_only(f, p) for f, p in decoded if f is not None and f.height]
    frames = [f for f in frames if f.height]
    if not frames:
        return FastDecoded(_EMPTY, list(range(n)))
    joined = pl.concat(frames) if len(frames) > 1 else frames[0]
    rows = joined.get_column(ROW).to_arrow()
    joined = joined.with_columns(
        pl.Series("offset", pa.array(offsets, pa.int64()).take(rows)),
        pl.Series("_key", pa.array(keys, pa.large_binary()).take(rows)),
    )
    accepted = joined.filter(_accepts(joined, now_micros, oldest_allowed_micros))
    if len(frames) > 1:
        accepted = accepted.sort("offset")
    slow: list[int] = []
    if accepted.height < n:
        taken = pc.is_in(arange(n), accepted.get_column(ROW).to_arrow())
        slow = pc.indices_nonzero(pc.invert(taken)).to_pylist()
    return FastDecoded(accepted.select("offset", *DECODED), slow)


def _accepts(events: pl.DataFrame, now_micros: int, oldest_allowed_micros: int | None) -> pl.Expr:
    """Rows counted as they are: valid, key = tenant, and an occurred_at in range.

    Negative timestamps (before 1970) and ones of a period past the late-usage horizon go
    to the per-record path, which dead-letters or dates them exactly as it always has.
    """
    at = pl.col("occurred_at")
    ok = pl.lit(vouched(events, now_micros)) & (at >= 0)
    if oldest_allowed_micros is not None:
        ok = ok & (at >= oldest_allowed_micros)
    key = pl.col("_key")
    return ok & (key.is_null() | (key == pl.col("tenant_id").cast(pl.Binary))).fill_null(False)


_EMPTY = pl.DataFrame(schema=FRAME_SCHEMA)
