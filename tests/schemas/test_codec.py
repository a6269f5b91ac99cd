"""The single-object codec: round trips, evolution both ways, the fingerprint."""

from __future__ import annotations

import copy
import io
import json

import fastavro
import pytest
from fastavro.schema import fingerprint

from schemas.codec import HEADER_LEN, Codec, DecodeError, PublishedSchema, default_codec, discover
from tests.support.events import make_event


def test_int_fingerprint_matches_avro_spec() -> None:
    fp = fingerprint('"int"', "CRC-64-AVRO")
    assert fp == "8f5c393f1ad57572"
    assert int.from_bytes(bytes.fromhex(fp), "little") == 0x7275D51A3F395C8F


def test_published_versions_and_contract_fields() -> None:
    versions = discover()
    assert [s.version for s in versions][:2] == [1, 2]
    v1 = versions[0]
    assert v1.raw["name"] == "UsageEvent" and v1.raw["namespace"] == "pf.metering"
    assert v1.field_names == (
        "event_id", "tenant_id", "session_id", "occurred_at", "source", "cpu_ms",
        "network_bytes", "api_calls", "tool_executions", "data_retrievals", "egress_scans",
        "policy_checks", "violations", "risk_score",
    )  # fmt: skip
    assert len({s.fingerprint for s in versions}) == len(versions)


# What the reader (v3) fills in for an event written with an older version.
V3_DEFAULTS = {"region": None, "kind": "usage", "corrects_event_id": None, "reason": None}


@pytest.mark.parametrize("version", [1, 2, 3])
def test_round_trip_each_version(version: int) -> None:
    codec = default_codec()
    event = make_event()
    if version >= 2:
        event["region"] = "eu-west-1"
    if version == 3:
        event.update(kind="correction", corrects_event_id="e-1", reason="double-counted")
    value = codec.encode(event, version)
    assert value[:2] == b"\xc3\x01"
    assert value[2:HEADER_LEN] == codec.versions[version].fingerprint
    decoded = codec.decode(value)
    assert decoded == {**V3_DEFAULTS, **event}


def test_v3_adds_the_event_kind_with_defaults() -> None:
    """v3 only adds fields, each with a default: usage, no target, no reason."""
    v2, v3 = (default_codec().versions[v] for v in (2, 3))
    assert v3.field_names[: len(v2.field_names)] == v2.field_names
    added = {f["name"]: f for f in v3.raw["fields"][len(v2.field_names) :]}
    assert list(added) == ["kind", "corrects_event_id", "reason"]
    assert added["kind"]["type"]["symbols"] == ["usage", "correction"]
    assert {name: f["default"] for name, f in added.items()} == {
        "kind": "usage", "corrects_event_id": None, "reason": None
    }  # fmt: skip


def test_body_is_plain_avro_binary() -> None:
    codec = default_codec()
    event = make_event()
    value = codec.encode(event, 1)
    body = io.BytesIO(value[HEADER_LEN:])
    assert fastavro.schemaless_reader(body, codec.versions[1].parsed, None) == event


def test_old_writer_new_reader_fills_default() -> None:
    codec = default_codec()
    decoded = codec.decode(codec.encode(make_event(), 1))
    assert {k: decoded[k] for k in V3_DEFAULTS} == V3_DEFAULTS


def test_new_writer_old_reader_drops_added_field() -> None:
    v1_only = Codec([s for s in discover() if s.version == 1])
    both = default_codec()
    event = make_event()
    value_v2 = both.encode({**event, "region": "us-east-2"}, 2)
    with pytest.raises(DecodeError) as err:
        v1_only.decode(value_v2)
    assert err.value.reason == "unknown_fingerprint"
    # An old reader that has learnt the new writer schema resolves it into its own shape.
    old_reader = Codec([s for s in discover() if s.version == 1])
    old_reader.by_fingerprint[both.versions[2].fingerprint] = both.versions[2]
    decoded = old_reader.decode(value_v2)
    assert decoded == event


def test_timestamp_keeps_logical_type_on_disk() -> None:
    raw = default_codec().versions[1].raw
    occurred = next(f for f in raw["fields"] if f["name"] == "occurred_at")
    assert occurred["type"] == {"type": "long", "logicalType": "timestamp-micros"}


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "not_single_object"),
        (b"", "not_single_object"),
        (b"\x00\x00\x00\x00\x01hello", "not_single_object"),
        (b"\xc3\x01" + b"\x00" * 8 + b"\x02", "unknown_fingerprint"),
    ],
)
def test_bad_headers(value: bytes | None, reason: str) -> None:
    with pytest.raises(DecodeError) as err:
        default_codec().decode(value)
    assert err.value.reason == reason


def test_truncated_and_trailing_bodies() -> None:
    codec = default_codec()
    value = codec.encode(make_event(), 1)
    for broken in (value[:-3], value + b"\x00\x01"):
        with pytest.raises(DecodeError) as err:
            codec.decode(broken)
        assert err.value.reason == "undecodable_body"


def test_new_schema_file_is_discovered(tmp_path) -> None:  # type: ignore[no-untyped-def]
    base = discover()[0]
    v9 = copy.deepcopy(base.raw)
    v9["fields"].append({"name": "gpu_ms", "type": "long", "default": 0})
    (tmp_path / "usage_event.avsc").write_text(json.dumps(base.raw))
    (tmp_path / "usage_event.v9.avsc").write_text(json.dumps(v9))
    codec = Codec(discover(tmp_path))
    assert isinstance(codec.reader, PublishedSchema) and codec.reader.version == 9
    assert codec.decode(codec.encode(make_event(), 1))["gpu_ms"] == 0
