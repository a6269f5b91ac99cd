"""The emitter's bulk encoder: the single-object values of a whole batch, built from columns.

``encode`` writes, column by column, byte for byte what fastavro writes record by record
(header + body), for a flat writer schema (``schemas.flat_schema``).
"""

from __future__ import annotations

import sys
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from schemas.flat_schema import FlatField, FlatSchema

# ``encode`` builds Arrow views and doubles from native words: Avro is little-endian.
ENCODES = sys.byteorder == "little"


# -- vector helpers (pyarrow.compute with typed scalars) ----------------------------------


def _i64(v: int) -> pa.Scalar:
    return pa.scalar(v, pa.int64())


def _u64(v: int) -> pa.Scalar:
    return pa.scalar(v, pa.uint64())


_I0, _I1 = _i64(0), _i64(1)
_U0, _U1 = _u64(0), _u64(1)
_EMPTY = pa.scalar(b"", pa.binary())


def _as_int(mask: pa.Array, dtype: pa.DataType = pa.int64()) -> pa.Array:
    one, zero = (_I1, _I0) if dtype == pa.int64() else (_U1, _U0)
    return pc.if_else(mask, one, zero)


def as_array(values: Any) -> pa.Array:
    """One contiguous array from an Array or ChunkedArray result."""
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


# -- encoding ------------------------------------------------------------------------------


def zigzag(values: pa.Array) -> pa.Array:
    """Avro zig-zag of int64 values as uint64, without overflow at any int64."""
    negative = pc.less(values, _I0)
    magnitude = pc.if_else(negative, pc.bit_wise_not(values), values)  # ~x == -x - 1
    doubled = pc.shift_left(magnitude.cast(pa.uint64()), _U1)
    return pc.bit_wise_or(doubled, _as_int(negative, pa.uint64()))


_ARANGE: list[pa.Array] = [pa.array(range(1 << 16), pa.int64())]


def arange(n: int) -> pa.Array:
    """0 .. n-1 as int64 (sliced from a cached array, grown by doubling)."""
    while len(_ARANGE[0]) < n:
        size = 2 * len(_ARANGE[0])
        _ARANGE[0] = pa.concat_arrays([_ARANGE[0], pc.add(_ARANGE[0], _i64(len(_ARANGE[0])))])
        assert len(_ARANGE[0]) == size
    return _ARANGE[0].slice(0, n)


def _inline_views(length: pa.Array, low: pa.Array, high: pa.Array) -> pa.Array:
    """A binary array from inline binary views (<= 12 bytes each), cast to plain binary.

    A view is 16 bytes: int32 length then 12 data bytes, so as two little-endian uint64
    words: ``length | low << 32`` (``low`` = data bytes 0-3) and ``high`` (bytes 4-11).
    """
    n = len(length)
    first = pc.bit_wise_or(length, pc.shift_left(low, _u64(32)))
    i = arange(2 * n)  # word i of the output comes from row i // 2, word i % 2
    order = pc.add(pc.shift_right(i, _I1), pc.multiply(pc.bit_wise_and(i, _I1), _i64(n)))
    words = as_array(pc.take(pa.concat_arrays([first, high]), order)).buffers()[1]
    views = pa.Array.from_buffers(pa.binary_view(), n, [None, words])
    return views.cast(pa.binary())


_LUT_SIZE = 1 << 16
_LUT: list[pa.Array] = []


def varint_bytes(zz: pa.Array) -> pa.Array:
    """Each uint64 as its Avro varint bytes (binary).

    Small values (string lengths, most counters) come from a 64Ki-entry lookup table
    with one ``take``; larger ones are computed 7 bits at a time.
    """
    if len(zz) and pc.max(zz).as_py() < _LUT_SIZE:
        if not _LUT:
            _LUT.append(_varint_bytes(arange(_LUT_SIZE).cast(pa.uint64())))
        return pc.take(_LUT[0], zz)
    return _varint_bytes(zz)


def _varint_bytes(zz: pa.Array) -> pa.Array:
    n = len(zz)
    length = pa.repeat(_U1, n)
    low = high = pa.repeat(_U0, n)
    rest = zz
    for k in range(10):
        group = pc.bit_wise_and(rest, _u64(0x7F))
        rest = pc.shift_right(rest, _u64(7))
        more = pc.greater(rest, _U0)
        any_more = pc.any(more).as_py()
        if any_more:
            group = pc.bit_wise_or(group, pc.if_else(more, _u64(0x80), _U0))
            length = pc.add(length, _as_int(more, pa.uint64()))
        if k < 4:
            low = pc.bit_wise_or(low, pc.shift_left(group, _u64(8 * k)))
        else:
            high = pc.bit_wise_or(high, pc.shift_left(group, _u64(8 * (k - 4))))
        if not any_more:
            break
    return _inline_views(length, low, high)


def _fixed_bytes(bits: pa.Array, size: int) -> pa.Array:
    """The little-endian low ``size`` (<= 8) bytes of each uint64."""
    low = pc.bit_wise_and(bits, _u64(0xFFFFFFFF))
    high = pc.shift_right(bits, _u64(32))
    return _inline_views(pa.repeat(_u64(size), len(bits)), low, high)


def _masked(encoded: pa.Array, present: pa.Array | None) -> pa.Array:
    return encoded if present is None else pc.if_else(present, encoded, _EMPTY)


def _field_pieces(field: FlatField, column: pa.Array) -> list[pa.Array]:
    pieces: list[pa.Array] = []
    present: pa.Array | None = None
    if field.null_branch is not None:
        present = pc.is_valid(column)
        null_first = field.null_branch == 0
        branch = pc.if_else(present, _u64(2 if null_first else 0), _u64(0 if null_first else 2))
        pieces.append(varint_bytes(branch))
    if field.kind == "null":
        return pieces
    if field.kind in ("int", "long"):
        zz = zigzag(pc.fill_null(column.cast(pa.int64()), _I0))
        pieces.append(_masked(varint_bytes(zz), present))
    elif field.symbols is not None:  # enum: the symbol's index
        index = pc.index_in(column.cast(pa.string()), pa.array(field.symbols, pa.string()))
        if index.null_count:
            raise ValueError(f"{field.name} holds a value that is none of {field.symbols}")
        pieces.append(varint_bytes(zigzag(index.cast(pa.int64()))))
    elif field.kind in ("string", "bytes"):
        raw = pc.fill_null(column.cast(pa.binary()), _EMPTY)
        size = pc.binary_length(raw).cast(pa.uint64())
        pieces.append(_masked(varint_bytes(pc.shift_left(size, _U1)), present))
        pieces.append(raw)
    elif field.kind == "boolean":
        bits = _as_int(pc.fill_null(column, False), pa.uint64())
        pieces.append(_masked(_fixed_bytes(bits, 1), present))
    else:  # float, double
        width, uint, size = (
            (pa.float64(), pa.uint64(), 8)
            if field.kind == "double"
            else (pa.float32(), pa.uint32(), 4)
        )
        floats = as_array(pc.fill_null(column.cast(width), pa.scalar(0.0, width)))
        bits = floats.view(uint).cast(pa.uint64())
        pieces.append(_masked(_fixed_bytes(bits, size), present))
    return pieces


def encode(columns: pa.Table, schema: FlatSchema, header: bytes) -> pa.Array:
    """``header`` + the Avro body of each row, as a binary array (fastavro's exact bytes).

    ``columns`` holds one column per schema field, already valid for it: int64 for
    int/long, string for string and for an enum (one of its symbols), binary for bytes,
    float64 for float/double, bool for boolean; nulls only in union fields. Only where
    ``ENCODES`` (little-endian hosts).
    """
    if not ENCODES:
        raise NotImplementedError("bulk Avro encoding needs a little-endian host")
    if columns.num_rows == 0:
        return pa.array([], pa.binary())
    pieces: list[Any] = [pa.scalar(header, pa.binary())]
    for field in schema.fields:
        pieces.extend(_field_pieces(field, as_array(columns.column(field.name))))
    return as_array(pc.binary_join_element_wise(*pieces, b""))
