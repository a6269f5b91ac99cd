"""The worker against the real broker: exact totals, duplicates, dead letters, versions."""

from __future__ import annotations

import json
import time

from confluent_kafka import KafkaError, Message

from consumer.kafka import split_by_partition
from schemas.codec import default_codec
from schemas.validation import REASONS
from tests.support import worker_harness as harness
from tests.support.cli_runner import run_cli
from tests.support.events import make_correction, make_event


def test_drain_counts_every_event_once(env: dict[str, str]) -> None:
    events = harness.with_duplicates(harness.random_events(3000), ratio=0.2)
    harness.produce(env["KAFKA_BOOTSTRAP_SERVERS"], env["METERING_TOPIC"], events)
    proc = harness.drain(env)
    assert "duplicates" in proc.stderr
    assert harness.ledger_totals(env) == harness.expected_totals(events)
    # a second drain reads nothing new and changes nothing
    harness.drain(env)
    assert harness.ledger_totals(env) == harness.expected_totals(events)


def test_same_events_produced_again_later_are_duplicates(env: dict[str, str]) -> None:
    events = harness.random_events(500, seed=9)
    harness.produce(env["KAFKA_BOOTSTRAP_SERVERS"], env["METERING_TOPIC"], events)
    harness.drain(env)
    harness.produce(env["KAFKA_BOOTSTRAP_SERVERS"], env["METERING_TOPIC"], events)
    proc = harness.drain(env)
    assert "0 counted, 500 duplicates" in proc.stderr
    assert harness.ledger_totals(env) == harness.expected_totals(events)


def test_every_invalid_class_is_dead_lettered_and_nothing_else(env: dict[str, str]) -> None:
    codec = default_codec()
    now = int(time.time() * 1_000_000)
    good = [make_event(tenant="good", session_id=f"s{i}") for i in range(20)]
    bad_events = {
        "invalid_event_id": make_event(tenant="bad", event_id=""),
        "invalid_session_id": make_event(tenant="bad", session_id=""),
        "invalid_source": make_event(tenant="bad", source=""),
        "negative_counter": make_event(tenant="bad", api_calls=-3),
        "invalid_risk_score": make_event(tenant="bad", risk_score=float("nan")),
        "future_timestamp": make_event(tenant="bad", occurred_at=now + 3_600_000_000),
        "timestamp_before_1970": make_event(tenant="bad", occurred_at=-86_400_000_000),
        "invalid_correction": make_correction(tenant="bad"),  # corrects nothing
    }
    raw: list[tuple[bytes | None, bytes | None, str]] = [
        (b"bad", codec.encode(e), reason) for reason, e in bad_events.items()
    ]
    bad_tenant = make_event(tenant="bad")
    bad_tenant["tenant_id"] = "no spaces allowed"
    raw += [
        (b"no spaces allowed", codec.encode(bad_tenant), "invalid_tenant_id"),
        (b"bad", b"not avro at all", "not_single_object"),
        (b"bad", None, "not_single_object"),
        (b"bad", b"\xc3\x01" + b"\x11" * 8 + b"\x00", "unknown_fingerprint"),
        (b"bad", codec.encode(make_event(tenant="bad"))[:-4], "undecodable_body"),
        (b"someone-else", codec.encode(make_event(tenant="bad")), "key_mismatch"),
        (b"bad", b"\xc3\x01" + b"\x00" * 200_000, "oversized"),
    ]
    harness.produce_raw(env["KAFKA_BOOTSTRAP_SERVERS"], env["METERING_TOPIC"], [r[:2] for r in raw])
    harness.produce(env["KAFKA_BOOTSTRAP_SERVERS"], env["METERING_TOPIC"], good)
    harness.drain(env)
    assert harness.ledger_totals(env) == harness.expected_totals(good)
    proc = run_cli("dead-letters", "-f", "json", env=env, check=True)
    letters = json.loads(proc.stdout)
    assert sorted(d["reason_code"] for d in letters) == sorted(r[2] for r in raw)
    assert {d["reason_code"] for d in letters} | {"past_late_usage_horizon"} == set(REASONS)
    assert all(d["reason"] and d["offset"] is not None for d in letters)


def test_v1_and_v2_mixed_in_one_partition(env: dict[str, str]) -> None:
    v1 = [make_event(tenant="mixed", session_id=f"a{i}") for i in range(50)]
    v2 = [{**make_event(tenant="mixed", session_id=f"b{i}"), "region": "eu"} for i in range(50)]
    harness.produce(env["KAFKA_BOOTSTRAP_SERVERS"], env["METERING_TOPIC"], v1, version=1)
    harness.produce(env["KAFKA_BOOTSTRAP_SERVERS"], env["METERING_TOPIC"], v2, version=2)
    harness.drain(env)
    assert harness.ledger_totals(env) == harness.expected_totals(v1 + v2)


def test_a_poll_is_split_into_partition_runs_in_offset_order() -> None:
    """A poll interleaves runs of partitions (one per fetch response): each partition's
    records come out together, in order, and client errors are left out."""
    polled = [
        Message(topic="t", partition=p, offset=o, key=b"k%d" % o, value=b"v%d" % o)
        for p, o in [(0, 1), (0, 2), (3, 7), (3, 8), (0, 3), (5, 1)]
    ]
    polled.insert(3, Message(topic="t", error=KafkaError(KafkaError._PARTITION_EOF)))
    split = split_by_partition(polled)
    assert sorted(split) == [0, 3, 5]
    assert split[0].offsets == [1, 2, 3] and split[0].values == [b"v1", b"v2", b"v3"]
    assert split[3].offsets == [7, 8] and split[3].keys == [b"k7", b"k8"]
    one = split_by_partition(polled[:2])
    assert list(one) == [0] and one[0].offsets == [1, 2]
    assert split_by_partition([]) == {}
