"""Native column-wise decoding of flat Avro single-object values (``schemas/_native_decoder.c``).

The C loop behind ``decode_columns`` proves and decodes a batch's values in one pass, with
the GIL released, straight into Arrow buffers (what it saves: docs/performance.md). It is
exact by construction: a value counts only if its body is exactly one
record of the writer schema (the walk ends on its last byte), every varint fits its type,
every union index is 0 or 1, every enum index names a symbol (an enum decodes as that
index, an int64) and every string is valid UTF-8. Everything else is left to
the caller's per-record path, which decides it and names the reason.

The extension is built by ``make install`` (``pyproject.toml``: an optional extension).
Where it could not be built, ``NATIVE`` is False and callers use the per-record path
for every event: slower, never different.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import polars as pl
import pyarrow as pa

from schemas.flat_schema import FlatField, FlatSchema

try:
    from schemas import _native_decoder
except ImportError:  # pragma: no cover - exercised only where no C compiler is present
    _native_decoder = None  # type: ignore[assignment]

NATIVE = _native_decoder is not None
# The kind codes of _native_decoder.c, and the Arrow type each kind decodes to.
_KINDS: dict[str, tuple[int, pa.DataType]] = {
    "null": (0, pa.null()),
    "boolean": (1, pa.bool_()),
    "int": (2, pa.int64()),
    "long": (3, pa.int64()),
    "float": (4, pa.float32()),
    "double": (5, pa.float64()),
    "string": (6, pa.string_view()),
    "bytes": (7, pa.binary_view()),
    "enum": (2, pa.int64()),  # an Avro int on the wire; its range is checked here
}
_NOT_A_UNION = 2
# Body bytes one native call takes at most (string views hold int32 offsets).
MAX_CALL_BYTES = 2**31 - 1
ROW = "_row"


@dataclass(frozen=True)
class DecodePlan:
    """How to decode one writer schema: its header, the C plan, the wanted fields."""

    header: bytes
    plan: bytes
    wanted: tuple[FlatField, ...]

    @classmethod
    def of(cls, schema: FlatSchema, header: bytes, wanted: Collection[str]) -> DecodePlan:
        """The plan decoding the ``wanted`` fields of ``schema`` (others are skipped)."""
        if any(schema.field(name) is None for name in wanted):
            raise ValueError(f"{schema.name} lacks one of {sorted(wanted)}")
        kept = tuple(f for f in schema.fields if f.name in wanted and f.kind != "null")
        plan = bytearray()
        for field in schema.fields:
            branch = _NOT_A_UNION if field.null_branch is None else field.null_branch
            plan += bytes((_KINDS[field.kind][0], branch, field in kept))
        return cls(header, bytes(plan), kept)


def decode_columns(
    values: Sequence[bytes | None], plan: DecodePlan, max_bytes: int
) -> pl.DataFrame | None:
    """The values carrying ``plan.header`` that decode exactly, as a frame of the wanted
    fields plus ``_row`` (their index in ``values``, ascending); None if no value carries
    the header. Values with the header that are not proven are simply absent."""
    if _native_decoder is None:
        return None
    values = values if isinstance(values, list) else list(values)
    frames, start = [], 0
    while start < len(values):
        out = _native_decoder.decode(
            values, start, plan.header, plan.plan, max_bytes, MAX_CALL_BYTES, pa.allocate_buffer
        )
        if out[0] is not None:
            frames.append(_frame(plan, *out[:-1]))
        start = out[-1]
    if not frames:
        return None
    return frames[0] if len(frames) == 1 else pl.concat(frames)


def _frame(
    plan: DecodePlan,
    rows: pa.Buffer,
    ok: pa.Buffer,
    columns: list[tuple[pa.Buffer, pa.Buffer | None]],
    data: pa.Buffer,
    data_len: int,
) -> pl.DataFrame:
    """The proven rows of one ``_native_decoder.decode`` result (Arrow buffers, no copy)."""
    count = ok.size
    used = data.slice(0, data_len)
    arrays = []
    for field, (buffer, validity) in zip(plan.wanted, columns, strict=True):
        arrow_type = _KINDS[field.kind][1]
        if arrow_type in (pa.string_view(), pa.binary_view()):
            arrays.append(pa.Array.from_buffers(arrow_type, count, [validity, buffer, used]))
        elif field.kind == "boolean":  # decoded as one byte a value
            bytes_ = pa.Array.from_buffers(pa.uint8(), count, [validity, buffer])
            arrays.append(bytes_.cast(pa.bool_()))
        else:
            arrays.append(pa.Array.from_buffers(arrow_type, count, [validity, buffer]))
    arrays.append(pa.Array.from_buffers(pa.int64(), count, [None, rows]))
    table = pa.Table.from_arrays(arrays, names=[*(f.name for f in plan.wanted), ROW])
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    proven = pl.Series(pa.Array.from_buffers(pa.uint8(), count, [None, ok])).cast(pl.Boolean)
    for field in plan.wanted:
        if field.symbols is not None:
            proven = proven & frame.get_column(field.name).is_between(0, len(field.symbols) - 1)
    return frame if proven.all() else frame.filter(proven)
