"""The native column decoder (``schemas.native_decoder``) on its own, against fastavro.

Every kind a flat schema can hold, decoded from fastavro's own bytes, must come back as
fastavro reads it; anything that is not exactly one valid record (cut, padded, a varint
too long for its type, a bad union index, invalid UTF-8, the wrong header) must be left
out, and never shift its neighbours.
"""

from __future__ import annotations

import io
import math
from typing import Any

import fastavro
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import _native_decoder, native_decoder
from schemas.flat_schema import FlatSchema
from schemas.native_decoder import ROW, DecodePlan, decode_columns

ALL_KINDS: dict[str, Any] = {
    "type": "record",
    "name": "AllKinds",
    "fields": [
        {"name": "n", "type": "null"},
        {"name": "b", "type": "boolean"},
        {"name": "i", "type": "int"},
        {"name": "l", "type": "long"},
        {"name": "f", "type": "float"},
        {"name": "d", "type": "double"},
        {"name": "s", "type": "string"},
        {"name": "y", "type": "bytes"},
        {"name": "ns", "type": ["null", "string"]},
        {"name": "ln", "type": ["long", "null"]},
        {"name": "nd", "type": ["null", "double"]},
        {"name": "nb", "type": ["boolean", "null"]},
    ],
}
PARSED = fastavro.parse_schema(ALL_KINDS)
HEADER = b"\xc3\x01" + b"allkinds"
_FLAT = FlatSchema.of(ALL_KINDS)
assert _FLAT is not None
FLAT: FlatSchema = _FLAT
NAMES = [f["name"] for f in ALL_KINDS["fields"]]
PLAN = DecodePlan.of(FLAT, HEADER, NAMES)
MAX = 64 * 1024

records = st.fixed_dictionaries(
    {
        "n": st.none(),
        "b": st.booleans(),
        "i": st.integers(-(2**31), 2**31 - 1),
        "l": st.integers(-(2**63), 2**63 - 1),
        "f": st.floats(width=32),
        "d": st.floats(),
        "s": st.text(max_size=40),
        "y": st.binary(max_size=40),
        "ns": st.none() | st.text(max_size=20),
        "ln": st.none() | st.integers(-(2**63), 2**63 - 1),
        "nd": st.none() | st.floats(),
        "nb": st.none() | st.booleans(),
    }
)


def encode(record: dict[str, Any]) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, PARSED, record)
    return HEADER + out.getvalue()


def fastavro_reads(value: bytes) -> dict[str, Any]:
    record = fastavro.schemaless_reader(io.BytesIO(value[len(HEADER) :]), PARSED, None)
    assert isinstance(record, dict)
    return record


def comparable(row: dict[str, Any]) -> dict[str, Any]:
    """NaN equals NaN; everything else as it is."""
    return {k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}


def decoded_rows(values: list[bytes | None]) -> dict[int, dict[str, Any]]:
    """Row index -> decoded record (without ``_row``)."""
    table = decode_columns(values, PLAN, MAX)
    if table is None:
        return {}
    return {row.pop(ROW): row for row in table.to_dicts()}


def test_the_native_decoder_is_built() -> None:
    """``make install`` compiles it; without it everything still works, slowly (the
    fallback is tested in tests/schemas/test_fast_path.py), but the hot path would be untested."""
    assert native_decoder.NATIVE, (
        "schemas/_native_decoder.c was not compiled (is a C compiler there?)"
    )


@settings(max_examples=80, deadline=None)
@given(st.lists(records, min_size=1, max_size=40))
def test_every_kind_decodes_as_fastavro_reads_it(batch: list[dict[str, Any]]) -> None:
    values: list[bytes | None] = [encode(r) for r in batch]
    got = decoded_rows(values)
    assert sorted(got) == list(range(len(batch)))
    for i, value in enumerate(values):
        assert value is not None
        expected = {k: v for k, v in fastavro_reads(value).items() if k != "n"}
        assert comparable(got[i]) == comparable(expected)


@settings(max_examples=60, deadline=None)
@given(st.lists(records, min_size=1, max_size=20), st.randoms(use_true_random=False))
def test_mutated_values_are_left_out_or_read_as_fastavro_reads_them(
    batch: list[dict[str, Any]], rnd: Any
) -> None:
    """Flipped, cut or extended bytes: whatever the decoder keeps, fastavro reads the same
    from exactly the whole body."""
    values: list[bytes | None] = []
    for record in batch:
        value = bytearray(encode(record))
        at = rnd.randrange(len(HEADER), len(value) + 1)
        choice = rnd.randrange(3)
        if choice == 0 and at < len(value):
            value[at] ^= rnd.randrange(1, 256)
        elif choice == 1:
            del value[at:]
        else:
            value[at:at] = bytes([rnd.randrange(256)])
        values.append(bytes(value))
    for i, row in decoded_rows(values).items():
        kept = values[i]
        assert kept is not None
        body = io.BytesIO(kept[len(HEADER) :])
        expected = fastavro.schemaless_reader(body, PARSED, None)
        assert isinstance(expected, dict) and body.tell() == len(kept) - len(HEADER)
        assert comparable(row) == comparable({k: v for k, v in expected.items() if k != "n"})


def test_column_types() -> None:
    table = decode_columns([encode(_record())], PLAN, MAX)
    assert table is not None
    assert dict(table.schema) == {
        "b": pl.Boolean, "i": pl.Int64, "l": pl.Int64, "f": pl.Float32, "d": pl.Float64,
        "s": pl.String, "y": pl.Binary, "ns": pl.String, "ln": pl.Int64,
        "nd": pl.Float64, "nb": pl.Boolean, ROW: pl.Int64,
    }  # fmt: skip


def _record(**overrides: Any) -> dict[str, Any]:
    base = {
        "n": None,
        "b": True,
        "i": -7,
        "l": 2**40,
        "f": 1.5,
        "d": -2.25,
        "s": "a string longer than twelve bytes",
        "y": b"\x00\xff",
        "ns": "short",
        "ln": None,
        "nd": 0.5,
        "nb": None,
    }
    return {**base, **overrides}


def test_only_whole_records_are_proven_and_neighbours_stay_exact() -> None:
    good = [encode(_record(l=i, s=f"record number {i}")) for i in range(8)]
    values: list[bytes | None] = list(good)
    values[1] = good[1][:-1]  # cut: its last field would run into the next value
    values[2] = good[2] + b"\x00"  # a trailing byte
    values[3] = good[3][: len(HEADER)]  # header only
    values[4] = good[4] + good[0][len(HEADER) :]  # two bodies in one value
    got = decoded_rows(values)
    assert sorted(got) == [0, 5, 6, 7]
    for i in got:
        assert got[i]["l"] == i and got[i]["s"] == f"record number {i}"


def _with_string(text: bytes) -> bytes:
    """A record whose ``s`` holds ``text`` as it is (even when it is not UTF-8)."""
    marker = "M" * 16
    value = encode(_record(s=marker))
    return value.replace(b"\x20" + marker.encode(), _long(len(text)) + text, 1)


def _long(n: int) -> bytes:
    z, out = (n << 1) ^ (n >> 63), bytearray()
    while z > 0x7F:
        out.append(z & 0x7F | 0x80)
        z >>= 7
    return bytes([*out, z])


def _with_field(name: str, raw: bytes) -> bytes:
    """A record whose field ``name`` (``i``, ``l`` or ``b``) is encoded as ``raw``."""
    marker = {
        "i": ("i", 0x3FFF, _long(0x3FFF)),
        "l": ("l", 0x1FFFF, _long(0x1FFFF)),
        "b": ("b", True, b"\x01"),
    }[name]
    value = encode(_record(**{marker[0]: marker[1]}, y=b"", s=""))
    # n takes no bytes, then b (one byte), i (-7 unless replaced), l
    at = len(HEADER) + {"b": 0, "i": 1, "l": 1 + len(_long(-7))}[name]
    assert value[at : at + len(marker[2])] == marker[2]
    value = value[:at] + raw + value[at + len(marker[2]) :]
    assert raw != marker[2]
    return value


@pytest.mark.parametrize(
    "value",
    [
        _with_string(b"\xff"),  # not UTF-8 at all
        _with_string(b"ok\xc0\xaf"),  # overlong "/"
        _with_string(b"\xed\xa0\x80"),  # a UTF-16 surrogate
        _with_string(b"\xf4\x90\x80\x80"),  # past U+10FFFF
        _with_string(b"cut \xe2\x82"),  # a truncated sequence
        _with_string(b"a" * 9 + b"\x80" + b"a" * 9),  # a stray continuation byte mid-word
        _with_field("i", _long(2**31)),  # too big for an int
        _with_field("i", b"\xff\xff\xff\xff\xff\x01"),  # a 6-byte int varint
        _with_field("l", b"\xff" * 10 + b"\x01"),  # an 11-byte long varint
        _with_field("l", b"\xff" * 9 + b"\x02"),  # 10 bytes, past 64 bits
        _with_field("b", b"\x02"),  # a boolean that is neither 0 nor 1
    ],
    ids=[
        "ff",
        "overlong",
        "surrogate",
        "past-max",
        "truncated",
        "continuation",
        "int-range",
        "int-length",
        "long-length",
        "long-bits",
        "boolean",
    ],
)
def test_malformed_values_are_left_out_not_shifted(value: bytes) -> None:
    good = encode(_record(l=1))
    got = decoded_rows([good, value, good])
    assert sorted(got) == [0, 2] and got[2]["l"] == 1


def test_bad_union_index_and_string_lengths_are_left_out() -> None:
    null, empty = (encode(_record(y=b"QQQQQ", ns=ns)) for ns in (None, ""))
    at = null.index(b"QQQQQ") + 5  # ns: its union branch, then (if a string) its length
    assert null[at] == 0 and empty[at : at + 2] == b"\x02\x00"
    cases = [
        null[:at] + b"\x04" + null[at + 1 :],  # union branch 2
        null[:at] + b"\x01" + null[at + 1 :],  # union branch -1
        empty[: at + 1] + b"\x01" + empty[at + 2 :],  # string length -1
        empty[: at + 1] + b"\x7e" + empty[at + 2 :],  # string length past the end
    ]
    got = decoded_rows([null, empty, *cases])
    assert sorted(got) == [0, 1] and got[0]["ns"] is None and got[1]["ns"] == ""


def test_valid_utf8_at_the_edges_is_accepted() -> None:
    text = "\x7f\x80\u07ff\u0800\ud7ff\ue000\uffff\U00010000\U0010ffff é中𝄞"
    got = decoded_rows([encode(_record(s=text, ns=text))])
    assert got[0]["s"] == text and got[0]["ns"] == text


def test_other_headers_none_and_oversized_values_are_left_out() -> None:
    good = encode(_record())
    other = b"\xc3\x01" + b"otherfp!" + good[len(HEADER) :]
    values: list[bytes | None] = [None, other, good, b"", good[:5], good + b"x" * MAX, good]
    assert sorted(decoded_rows(values)) == [2, 6]
    assert decode_columns([None, other, good[:5]], PLAN, MAX) is None


def test_a_batch_larger_than_one_call_takes_is_decoded_in_several(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    values: list[bytes | None] = [encode(_record(l=i, s=f"{i:040d}")) for i in range(50)]
    whole = decoded_rows(values)
    calls: list[int] = []

    class Counting:
        @staticmethod
        def decode(*args: Any) -> tuple[Any, ...]:
            calls.append(args[1])
            result: tuple[Any, ...] = _native_decoder.decode(*args)
            return result

    monkeypatch.setattr(native_decoder, "_native_decoder", Counting)
    monkeypatch.setattr(native_decoder, "MAX_CALL_BYTES", 500)
    assert decoded_rows(values) == whole
    assert len(calls) > 5 and calls == sorted(calls)


def test_only_wanted_fields_are_returned() -> None:
    plan = DecodePlan.of(FLAT, HEADER, ["l", "ns"])
    table = decode_columns([encode(_record(l=3, ns="x"))], plan, MAX)
    assert table is not None and table.to_dicts() == [{"l": 3, "ns": "x", ROW: 0}]
    with pytest.raises(ValueError, match="lacks"):
        DecodePlan.of(FLAT, HEADER, ["nope"])


def test_arrow_buffers_are_valid() -> None:
    values: list[bytes | None] = [
        encode(_record(s="x" * i, ns=None if i % 2 else "y" * i)) for i in range(30)
    ]
    table = decode_columns(values, PLAN, MAX)
    assert table is not None
    arrow = table.to_arrow()
    arrow.validate(full=True)
    assert arrow.column("s").cast(pa.string()).to_pylist() == ["x" * i for i in range(30)]


def test_an_enum_decodes_as_its_index_and_one_naming_no_symbol_is_left_out() -> None:
    raw = {
        "type": "record", "name": "WithEnum",
        "fields": [
            {"name": "k", "type": {"type": "enum", "name": "K", "symbols": ["a", "b", "c"]}},
            {"name": "l", "type": "long"},
        ],
    }  # fmt: skip
    flat = FlatSchema.of(raw)
    assert flat is not None and flat.fields[0].symbols == ("a", "b", "c")
    parsed = fastavro.parse_schema(raw)

    def value(symbol: str, number: int) -> bytes:
        out = io.BytesIO()
        fastavro.schemaless_writer(out, parsed, {"k": symbol, "l": number})
        return HEADER + out.getvalue()

    good = [value(s, i) for i, s in enumerate("abcab")]
    beyond = HEADER + b"\x06\x02"  # index 3 of three symbols, then l = 1
    negative = HEADER + b"\x01\x02"  # index -1
    table = decode_columns([*good, beyond, negative], DecodePlan.of(flat, HEADER, ["k", "l"]), MAX)
    assert table is not None
    assert table.to_dicts() == [
        {"k": "abc".index(s), "l": i, ROW: i} for i, s in enumerate("abcab")
    ]
