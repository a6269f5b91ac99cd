"""Columnar decoding of one partition batch: the hot path behind ``prepare_batch``.

Why: per-record fastavro plus per-record validation costs ~7 us an event; this path costs
well under one. It is safe by construction:

1. A value is a candidate only if its 10-byte header equals the header of a writer schema
   the path supports (flat, and resolving into the reader schema without conversions)
   and it is not oversized.
2. ``schemas.columnar.frame`` proves, body by body, that the bytes are exactly one record.
3. The proven values of a writer schema are concatenated into ONE object-container block
   (a leading ``fixed(10)`` field swallows each header) and polars decodes it natively.
   Because every body was proven whole, decoding cannot drift into a neighbour; as a
   canary, every decoded header must still equal the expected one.
4. ``schemas.bulk_validation`` vouches for rows that ``validate`` surely accepts.

Anything else (no header match, a failed walk, a decoder error, a row the vectorised
rules do not vouch for) is returned as an index for the per-record path, which decides
it exactly as before and names the dead-letter reason.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from aggregator.records import Record, columns_of
from schemas.bulk_validation import vouched
from schemas.codec import COUNTERS, MAX_VALUE_BYTES, Codec, PublishedSchema
from schemas.columnar import (
    FRAME_PADDING,
    HEADER_FIELD,
    FlatField,
    FlatSchema,
    arange,
    as_array,
    container_block,
    frame,
)

log = logging.getLogger(__name__)

# What the ledger needs of an event, in EVENT_SCHEMA order (offset and period aside).
NEEDED = ("tenant_id", "event_id", "session_id", "occurred_at", *COUNTERS, "risk_score")
# Validation also reads ``source``.
DECODED = (*NEEDED, "source")
STRINGS = frozenset({"tenant_id", "event_id", "session_id", "source"})
try:  # polars raises a pyo3 PanicException (a BaseException) on some malformed input
    from polars.exceptions import PanicException as _Panic
except ImportError:  # pragma: no cover - older polars
    _Panic = Exception  # type: ignore[assignment,misc]


@dataclass(frozen=True)
class FastSchema:
    """A writer schema the columnar path decodes: its header, walk plan, container prefix."""

    header: bytes
    flat: FlatSchema
    prefix: bytes


@dataclass
class FastDecoded:
    """Rows the columnar path accepted as valid, and the indices it leaves to the caller."""

    events: pl.DataFrame  # "offset" + DECODED columns, in offset order
    slow: list[int]  # indices into the records, ascending


def fast_schema(writer: PublishedSchema, reader: PublishedSchema) -> FastSchema | None:
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
        elif theirs is None or (mine.kind, mine.nullable) != (theirs.kind, theirs.nullable):
            return None
    return FastSchema(writer.header, flat, flat.container_prefix())


@cache
def plans(codec: Codec) -> tuple[FastSchema, ...]:
    """The columnar plans of every published writer schema the path supports."""
    found = (fast_schema(s, codec.reader) for s in codec.versions.values())
    return tuple(p for p in found if p is not None)


def decode_fast(
    records: Sequence[Record], codec: Codec, now_micros: int, oldest_allowed_micros: int | None
) -> FastDecoded:
    """Decode and validate what the columnar path can vouch for; see the module doc."""
    n = len(records)
    offsets, keys, values_ = columns_of(records)
    padded = as_array(pa.array([*values_, _PAD], pa.large_binary()))
    values = padded.slice(0, n)
    heads = pc.binary_slice(values, 0, 10)
    small = pc.less_equal(pc.binary_length(values), pa.scalar(MAX_VALUE_BYTES, pa.int64()))
    frames = []
    for plan in plans(codec):
        mine = pc.fill_null(pc.and_(pc.equal(heads, pa.scalar(plan.header)), small), False)
        count = pc.sum(mine).as_py() or 0
        if count == 0:
            continue
        if count == n:
            rows, group = arange(n), padded
        else:
            rows = pc.indices_nonzero(mine)
            group = padded.take(pa.concat_arrays([rows, pa.array([n], pa.uint64())]))
        decoded = _decode_group(plan, group, rows)
        if decoded is not None:
            frames.append(decoded)
    if not frames:
        return FastDecoded(_EMPTY, list(range(n)))
    joined = pl.concat(frames) if len(frames) > 1 else frames[0]
    rows = joined.get_column("_row").to_arrow()
    joined = joined.with_columns(
        pl.Series("offset", pa.array(offsets, pa.int64()).take(rows)),
        pl.Series("_key", pa.array(keys, pa.large_binary()).take(rows)),
    )
    accepted = joined.filter(_accepts(joined, now_micros, oldest_allowed_micros))
    if len(frames) > 1:
        accepted = accepted.sort("offset")
    slow: list[int] = []
    if accepted.height < n:
        taken = pc.is_in(arange(n), accepted.get_column("_row").to_arrow())
        slow = pc.indices_nonzero(pc.invert(taken)).to_pylist()
    return FastDecoded(accepted.select("offset", *DECODED), slow)


def _accepts(events: pl.DataFrame, now_micros: int, oldest_allowed_micros: int | None) -> pl.Expr:
    """Rows counted as they are: valid, key = tenant, and an occurred_at in range.

    Negative timestamps (before 1970) and ones older than the dedup window go to the
    per-record path, which dead-letters or dates them exactly as it always has.
    """
    at = pl.col("occurred_at")
    ok = pl.lit(vouched(events, now_micros)) & (at >= 0)
    if oldest_allowed_micros is not None:
        ok = ok & (at >= oldest_allowed_micros)
    key = pl.col("_key")
    return ok & (key.is_null() | (key == pl.col("tenant_id").cast(pl.Binary))).fill_null(False)


def _decode_group(plan: FastSchema, padded: pa.Array, rows: pa.Array) -> pl.DataFrame | None:
    """Decode the values of one writer schema (``padded``: them + ``_PAD``): the proven
    rows, with their ``_row``."""
    starts, ends, data = _layout(padded)
    proven = frame(data, pc.add(starts, pa.scalar(10, pa.int64())), ends, plan.flat)
    if not pc.all(proven).as_py():
        rows = rows.filter(proven)
        if len(rows) == 0:
            return None
        keep = pa.concat_arrays([proven, pa.array([False])])
        padded = padded.filter(keep)  # the pad is not needed any more
        starts, ends, data = _layout(padded, padding=False)
    buffer = data.buffers()[1]
    frames = _decode_rows(plan, buffer, starts, ends, rows, 0, len(rows))
    if not frames:
        return None
    return pl.concat(frames) if len(frames) > 1 else frames[0]


# A decoder error sends the smallest group containing it per record: halves are retried
# down to this many rows.
_BISECT_MIN_ROWS = 32


def _decode_rows(
    plan: FastSchema, buffer: pa.Buffer, starts: pa.Array, ends: pa.Array, rows: pa.Array,
    lo: int, hi: int,
) -> list[pl.DataFrame]:  # fmt: skip
    """Decode proven rows ``lo:hi`` (contiguous in ``buffer``) as one block. If polars
    refuses the block (invalid UTF-8 in a string, say), each half is retried, so one bad
    value costs a few extra decodes rather than the whole batch."""
    payload = memoryview(buffer)[starts[lo].as_py() : ends[hi - 1].as_py()]
    container = b"".join((plan.prefix, *container_block(hi - lo, payload)))
    try:
        decoded = pl.read_avro(io.BytesIO(container), columns=[HEADER_FIELD, *DECODED])
    except (Exception, _Panic) as exc:
        if hi - lo <= _BISECT_MIN_ROWS:
            log.debug("columnar decode refused %d rows, per-record path: %s", hi - lo, exc)
            return []
        mid = (lo + hi) // 2
        return [
            *_decode_rows(plan, buffer, starts, ends, rows, lo, mid),
            *_decode_rows(plan, buffer, starts, ends, rows, mid, hi),
        ]
    canary = (pl.col(HEADER_FIELD).cast(pl.Binary) == pl.lit(plan.header, pl.Binary)).all()
    if decoded.height != hi - lo or not decoded.select(canary).item():
        log.warning("columnar decode disagreed with the framing walk; per-record path instead")
        return []
    return [decoded.drop(HEADER_FIELD).with_columns(pl.Series("_row", rows.slice(lo, hi - lo)))]


def _layout(values: pa.Array, padding: bool = True) -> tuple[pa.Array, pa.Array, pa.Array]:
    """(starts, ends, bytes) of a large_binary array: positions index the data buffer.
    With ``padding`` the last element is ``_PAD`` and is left out of starts/ends."""
    _, offsets_buf, data_buf = values.buffers()
    n = len(values) - 1 if padding else len(values)
    offsets = pa.Array.from_buffers(pa.int64(), n + 1, [None, offsets_buf], offset=values.offset)
    data = pa.Array.from_buffers(pa.uint8(), data_buf.size, [None, data_buf])
    return offsets.slice(0, n), offsets.slice(1), data


_PAD = bytes(FRAME_PADDING)
_EMPTY = pl.DataFrame(
    schema={
        "offset": pl.Int64,
        **{name: pl.String if name in STRINGS else pl.Float64 if name == "risk_score"
           else pl.Int64 for name in DECODED},
    }
)  # fmt: skip
