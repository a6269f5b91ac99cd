"""The columnar hot path gives exactly what the per-record path gives, and falls back.

``prepare_batch(columnar=True)`` (the worker's path) is held to ``columnar=False`` (every
record through ``Codec.decode`` + ``validate``) on the same batches: same events table,
same dead letters with the same reasons. Malformed bodies amid valid ones, writer schemas
the columnar decoder cannot handle, and the bulk encoder on its own (the native decoder
on its own: tests/schemas/test_native_decoder.py; the emitter's bulk path, through the
real broker: tests/broker/emitter/test_emit_many.py).
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import batch_validation, native_decoder
from schemas.bulk_encoder import encode
from schemas.codec import COUNTERS, HEADER_LEN, Codec, default_codec, discover, load_schema
from schemas.fast_path import decode_fast, plans
from schemas.flat_schema import FlatSchema
from schemas.prepare import DeadLetter, PreparedBatch, Record, RecordBatch, prepare_batch
from schemas.validation import REASONS
from tests.support.events import NOW, make_correction, make_event
from tests.support.worker_harness import random_events, with_duplicates

CODEC = default_codec()
INT64 = (-(2**63), 2**63 - 1)


def records_of(
    values: Sequence[tuple[bytes | None, bytes | None]], first: int = 100
) -> list[Record]:
    return [Record(first + i, key, value) for i, (key, value) in enumerate(values)]


def encoded(events: list[dict[str, Any]], version: int | None = None) -> list[Record]:
    return records_of([(e["tenant_id"].encode(), CODEC.encode(e, version)) for e in events])


def dead_view(dead: list[DeadLetter]) -> list[tuple[int, bytes | None, bytes | None, str]]:
    # fastavro names a BytesIO by its address in some messages: not part of the reason
    return [(d.offset, d.key, d.value, re.sub(r" at 0x[0-9a-f]+", "", d.reason)) for d in dead]


def assert_same(fast: PreparedBatch, slow: PreparedBatch) -> None:
    assert fast.events.schema == slow.events.schema
    assert fast.events.to_pylist() == slow.events.to_pylist()
    assert sorted(dead_view(fast.dead)) == sorted(dead_view(slow.dead))
    assert (fast.next_offset, fast.consumed, fast.max_occurred_at) == (
        slow.next_offset,
        slow.consumed,
        slow.max_occurred_at,
    )


def both(records: list[Record], codec: Codec = CODEC) -> PreparedBatch:
    """The columnar result, after checking it equals the per-record one."""
    fast = prepare_batch(2, records, codec, NOW, None)
    assert_same(fast, prepare_batch(2, records, codec, NOW, None, columnar=False))
    return fast


# --- the columnar path against the per-record path --------------------------------------


def test_clean_batch_is_decoded_columnar_and_equal() -> None:
    events = random_events(2000, tenants=7, seed=21, period=(2025, 3))
    records = encoded(events)
    decoded = decode_fast(records, CODEC, NOW, None)
    assert decoded.slow == [] and decoded.events.height == len(events)
    batch = both(records)
    assert batch.events.column("event_id").to_pylist() == [e["event_id"] for e in events]
    assert batch.events.column("first_in_batch").to_pylist() == [True] * len(events)


def test_versions_interleaved_duplicates_and_keys() -> None:
    events = with_duplicates(random_events(3000, tenants=5, seed=22), ratio=0.1)
    rnd = random.Random(5)
    records = [
        Record(i, rnd.choice([None, e["tenant_id"].encode()]), CODEC.encode(e, rnd.choice([1, 2])))
        for i, e in enumerate({**e, "region": rnd.choice([None, "eu"])} for e in events)
    ]
    batch = both(records)
    flags = batch.events.column("first_in_batch").to_pylist()
    assert flags.count(False) == len(events) - len(
        {(e["tenant_id"], e["event_id"]) for e in events}
    )


def test_v3_usage_stays_columnar_and_corrections_take_the_per_record_path() -> None:
    rnd = random.Random(8)
    events: list[dict[str, Any]] = []
    for i, e in enumerate(random_events(600, tenants=4, seed=23)):
        if i % 50 == 7:
            e = make_correction(e["tenant_id"], occurred_at=e["occurred_at"], cpu_ms=-i)
        events.append(e)
    versions = [3 if e.get("kind") else rnd.choice([1, 2, 3]) for e in events]
    records = records_of(
        [
            (e["tenant_id"].encode(), CODEC.encode(e, v))
            for e, v in zip(events, versions, strict=True)
        ]
    )
    corrections = [i for i, e in enumerate(events) if e.get("kind") == "correction"]
    assert len(plans(CODEC)) == 3 and decode_fast(records, CODEC, NOW, None).slow == corrections
    batch = both(records)
    flags = batch.events.column("correction").to_pylist()
    assert [i for i, f in enumerate(flags) if f] == corrections
    assert sorted(batch.corrections) == [records[i].offset for i in corrections]
    note = batch.corrections[records[corrections[0]].offset]
    assert (note.reason, note.corrects_event_id) == ("test correction", None)
    assert note.value == records[corrections[0]].value


def test_an_enum_index_naming_no_symbol_is_undecodable_on_both_paths() -> None:
    good = CODEC.encode(make_event(tenant="acme"), 3)
    tail = 3  # kind, corrects_event_id and reason: one byte each when usage with nulls
    assert good[-tail:] == b"\x00\x00\x00"
    bad = good[:-tail] + b"\x04\x00\x00"  # index 2 of a two-symbol enum
    batch = both(records_of([(b"acme", good), (b"acme", bad)]))
    assert batch.events.num_rows == 1
    assert [d.reason_code for d in batch.dead] == ["undecodable_body"]


def test_every_invalid_class_gets_the_per_record_reason() -> None:
    good = [make_event(tenant="good", session_id=f"s{i}") for i in range(30)]
    bad = [
        make_event(tenant="bad", event_id=""),
        make_event(tenant="bad", event_id="x" * 129),
        make_event(tenant="bad", session_id=""),
        make_event(tenant="bad", source="é" * 129),
        make_event(tenant="bad", api_calls=-3),
        make_event(tenant="bad", violations=INT64[0]),
        make_event(tenant="bad", risk_score=math.nan),
        make_event(tenant="bad", risk_score=-math.inf),
        make_event(tenant="bad", risk_score=1.0000001),
        make_event(tenant="bad", occurred_at=NOW + 3_600_000_000),
        make_event(tenant="bad", occurred_at=INT64[0]),
        make_event(tenant="no spaces"),
    ]
    values: list[tuple[bytes | None, bytes | None]] = [
        (e["tenant_id"].encode(), CODEC.encode(e)) for e in good + bad
    ]
    values += [
        (b"good", CODEC.encode(make_event(tenant="other"))),  # key mismatch
        (b"good", b"not avro"),
        (b"good", None),
        (b"good", b"\xc3\x01" + b"\x11" * 8 + b"\x00"),
        (b"good", b"\xc3\x01" + bytes(70_000)),
    ]
    random.Random(3).shuffle(values)
    batch = both(records_of(values))  # same reasons as the per-record path, whatever they are
    assert batch.events.num_rows == len(good)
    assert len(batch.dead) == len(values) - len(good)
    assert {d.reason_code for d in batch.dead} <= set(REASONS)
    assert len({d.reason_code for d in batch.dead}) >= 11


def test_malformed_bodies_amid_valid_ones_leave_neighbours_exact() -> None:
    """Truncated, padded and overlong bodies inside one block: each is dead-lettered as
    undecodable, each neighbour decodes to exactly its own event."""
    events = random_events(400, tenants=3, seed=23)
    values = [CODEC.encode(e) for e in events]
    broken = {
        10: values[10][:-1],  # truncated: its last field runs into the next value
        11: values[11] + b"\x00",  # a trailing byte
        200: values[200][: HEADER_LEN + 5],  # cut inside the first string
        201: values[201][:HEADER_LEN],  # header only
        399: values[399] + values[0][HEADER_LEN:],  # two bodies in one value
    }
    records = records_of(
        [(e["tenant_id"].encode(), broken.get(i, values[i])) for i, e in enumerate(events)]
    )
    batch = both(records)
    assert sorted(d.offset - 100 for d in batch.dead) == sorted(broken)
    assert {d.reason_code for d in batch.dead} == {"undecodable_body"}
    counted = {row["offset"] - 100: row for row in batch.events.to_pylist()}
    assert sorted(counted) == [i for i in range(len(events)) if i not in broken]
    for i, row in counted.items():
        assert {k: row[k] for k in ("event_id", "cpu_ms", "risk_score")} == {
            k: events[i][k] for k in ("event_id", "cpu_ms", "risk_score")
        }


def test_invalid_utf8_costs_only_its_own_record_the_fast_path() -> None:
    """A structurally sound body with invalid UTF-8 is not proven by the native decoder:
    it alone takes the per-record path, which dead-letters it."""
    events = random_events(2000, tenants=4, seed=30)
    values = [CODEC.encode(e) for e in events]
    sid = events[1234]["session_id"].encode()
    values[1234] = values[1234].replace(sid, b"\xff" * len(sid), 1)
    records = records_of(
        [(e["tenant_id"].encode(), v) for e, v in zip(events, values, strict=True)]
    )
    decoded = decode_fast(records, CODEC, NOW, None)
    assert decoded.slow == [1234]
    batch = both(records)
    assert [(d.offset - 100, d.reason_code) for d in batch.dead] == [(1234, "undecodable_body")]


def test_an_overlong_varint_cannot_shift_a_neighbour() -> None:
    """A body whose varint is non-canonical (valid Avro) and that is also one byte short
    would fool a check of canonical lengths; the native decoder reads the bytes as any
    decoder does and sends it to the per-record path."""
    first, second = make_event(tenant="t", cpu_ms=5), make_event(tenant="t")
    value = CODEC.encode(first, 1)
    fields = CODEC.versions[1].field_names
    # re-encode cpu_ms (zig-zag 10 = 0x0a) as the 2-byte varint 0x8a 0x00
    cpu_at = _field_offset(value, fields.index("cpu_ms"))
    assert value[cpu_at] == 0x0A
    overlong = value[:cpu_at] + b"\x8a\x00" + value[cpu_at + 1 :]
    assert CODEC.decode(overlong)["cpu_ms"] == 5
    batch = both(records_of([(b"t", overlong), (b"t", CODEC.encode(second, 1))]))
    assert batch.events.num_rows == 2  # a valid non-canonical body is counted...
    short = overlong[:-1]
    batch = both(records_of([(b"t", short), (b"t", CODEC.encode(second, 1))]))
    assert [d.reason_code for d in batch.dead] == ["undecodable_body"]  # ...a short one not
    assert batch.events.column("event_id").to_pylist() == [second["event_id"]]


def _field_offset(value: bytes, index: int) -> int:
    """Byte offset of field ``index`` of a v1 value (strings and longs before it)."""
    pos = HEADER_LEN
    for field in range(index):
        shift = length = 0
        while True:
            byte = value[pos]
            length |= (byte & 0x7F) << shift
            pos += 1
            shift += 7
            if byte < 0x80:
                break
        if field in (0, 1, 2, 4):  # event_id, tenant_id, session_id, source: strings
            pos += length >> 1
    return pos


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_random_mutations_agree_with_the_per_record_path(seed: int) -> None:
    rnd = random.Random(seed)
    events = random_events(rnd.randrange(1, 300), tenants=4, seed=seed)
    values: list[tuple[bytes | None, bytes | None]] = []
    for e in events:
        value = CODEC.encode(e, rnd.choice([1, 2]))
        if rnd.random() < 0.1:
            data = bytearray(value)
            at = rnd.randrange(HEADER_LEN, len(data))
            if rnd.random() < 0.5:
                data[at] ^= rnd.randrange(1, 256)
            else:
                del data[at:]
            value = bytes(data)
        values.append((e["tenant_id"].encode(), value))
    both(records_of(values))


def test_vectorised_rules_drifting_from_validate_are_caught(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """If the vectorised twin of ``validate`` ever lets through what validate refuses
    (here: it forgets the future-timestamp limit), the audit of the extremes catches it
    and the batch goes through validate event by event: nothing wrong is counted."""
    monkeypatch.setattr(batch_validation, "MAX_FUTURE_MICROS", 10**18)
    events = random_events(200, tenants=3, seed=29)
    events[77]["occurred_at"] = NOW + 3_600_000_000
    batch = both(encoded(events))
    assert [(d.offset, d.reason_code) for d in batch.dead] == [(177, "future_timestamp")]
    assert "vectorised validation vouched" in caplog.text


# --- fallback: what the columnar decoder cannot handle -------------------------------------


def _codec_with(tmp_path: Path, name: str, extra_field: dict[str, Any]) -> Codec:
    raw = copy.deepcopy(CODEC.reader.raw)
    raw["fields"].append(extra_field)
    for schema in discover():
        (tmp_path / schema.path.name).write_text(schema.path.read_text())
    (tmp_path / name).write_text(json.dumps(raw))
    return Codec(discover(tmp_path))


@pytest.mark.parametrize(
    "field",
    [
        {"name": "tags", "type": {"type": "array", "items": "string"}, "default": []},
        {"name": "where", "type": ["null", {"type": "record", "name": "Where",
                                            "fields": [{"name": "zone", "type": "string"}]}],
         "default": None},
    ],
)  # fmt: skip
def test_a_writer_schema_it_cannot_handle_takes_the_per_record_path(
    tmp_path: Path, field: dict[str, Any]
) -> None:
    codec = _codec_with(tmp_path, "usage_event.v9.avsc", field)
    v9 = codec.versions[9]
    assert FlatSchema.of(v9.raw) is None
    assert all(p.header != v9.header for p in plans(codec))
    events = random_events(60, tenants=2, seed=24)
    extra: list[str] | None = [] if field["name"] == "tags" else None
    values = [
        (e["tenant_id"].encode(), codec.encode({**e, field["name"]: extra}, 9 if i % 2 else 1))
        for i, e in enumerate(events)
    ]
    records = records_of(values)
    decoded = decode_fast(records, codec, NOW, None)
    assert decoded.slow == list(range(1, len(events), 2))  # the v9 ones, and only them
    batch = both(records, codec)
    assert batch.events.num_rows == len(events) and not batch.dead


def test_without_the_native_decoder_every_record_takes_the_per_record_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where the C extension could not be built, nothing is decoded columnar and the
    results are still exactly the per-record ones."""
    monkeypatch.setattr(native_decoder, "_native_decoder", None)
    events = random_events(50, tenants=2, seed=26)
    records = encoded(events)
    assert decode_fast(records, CODEC, NOW, None).slow == list(range(len(events)))
    assert both(records).events.num_rows == len(events)


def test_a_reader_field_the_writer_lacks_without_default_is_not_columnar(tmp_path: Path) -> None:
    """Resolution would fail per record (undecodable_body): the columnar plan must not
    pretend otherwise."""
    raw = copy.deepcopy(CODEC.reader.raw)
    raw["fields"].append({"name": "mandatory", "type": "string"})
    path = tmp_path / "usage_event.v9.avsc"
    path.write_text(json.dumps(raw))
    reader = load_schema(path, 9)
    codec = Codec([*discover(), reader])
    assert [p.header for p in plans(codec)] == [reader.header]
    events = random_events(20, tenants=2, seed=25)
    batch = both(encoded(events, version=1), codec)
    assert batch.events.num_rows == 0
    assert {d.reason_code for d in batch.dead} == {"undecodable_body"}


# --- the bulk encoder on its own --------------------------------------------------------


_strings = st.text(max_size=150)
_longs = st.integers(*INT64)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.fixed_dictionaries(
            {
                "event_id": _strings, "tenant_id": _strings, "session_id": _strings,
                "occurred_at": _longs, "source": _strings,
                **{c: _longs for c in COUNTERS},
                "risk_score": st.none() | st.floats(allow_nan=True, allow_infinity=True),
                "region": st.none() | _strings,
                "kind": st.sampled_from(["usage", "correction"]),
                "corrects_event_id": st.none() | _strings,
                "reason": st.none() | _strings,
            }
        ),
        min_size=1, max_size=40,
    ),
    version=st.sampled_from([1, 2, 3]),
)  # fmt: skip
def test_bulk_encode_is_fastavro_byte_for_byte(rows: list[dict[str, Any]], version: int) -> None:
    writer = CODEC.versions[version]
    flat = FlatSchema.of(writer.raw)
    assert flat is not None
    table = pl.DataFrame(
        rows,
        schema={
            **{n: pl.String for n in ("event_id", "tenant_id", "session_id", "source")},
            "occurred_at": pl.Int64, **dict.fromkeys(COUNTERS, pl.Int64),
            "risk_score": pl.Float64, "region": pl.String, "kind": pl.String,
            "corrects_event_id": pl.String, "reason": pl.String,
        },
    ).to_arrow()  # fmt: skip
    got = encode(table, flat, writer.header).to_pylist()
    assert got == [CODEC.encode(row, version) for row in rows]


def test_record_batch_since_drops_redelivered() -> None:
    batch = RecordBatch([5, 6, 7, 8], [b"a", b"b", None, b"d"], [b"1", b"2", b"3", None])
    assert batch.since(5) is batch
    later = batch.since(7)
    assert list(later) == [Record(7, None, b"3"), Record(8, b"d", None)]
    assert len(batch.since(9)) == 0 and batch[1] == Record(6, b"b", b"2")
