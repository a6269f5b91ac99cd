"""A worker never stops on arithmetic (real broker, real worker processes): sums past 2**63
count exactly, an event past the ceiling is dead-lettered on its own, and every event
behind it, of that tenant or another on the partition, is still counted."""

from __future__ import annotations

import json

import duckdb

from aggregator.fold import COUNTER_CEILING
from aggregator.ledger import ledger_path
from common.settings import load_settings
from schemas.codec import COUNTERS
from tests.support.cli_runner import run_cli
from tests.support.events import make_event
from tests.support.worker_harness import (
    drain,
    expected_totals,
    ledger_state,
    ledger_totals,
    produce,
)

INT64_MAX = 2**63 - 1


def _event(tenant: str, **counters: int) -> dict[str, object]:
    return make_event(tenant, **{**dict.fromkeys(COUNTERS, 0), **counters})


def test_the_overflow_case_then_ordinary_events_are_all_counted(env: dict[str, str]) -> None:
    bootstrap, topic = env["KAFKA_BOOTSTRAP_SERVERS"], env["METERING_TOPIC"]
    first = [_event("edge", network_bytes=INT64_MAX), _event("edge", cpu_ms=2**62)]
    produce(bootstrap, topic, first)
    drain(env)
    rest = [
        _event("edge", network_bytes=1),  # 2**63 bytes: stopped the partition for good before
        _event("edge", cpu_ms=2**62),  # 2**63 ms: made a negative invoice before
        *[make_event(f"t{i}", session_id=f"s{i}") for i in range(200)],  # all partitions
    ]
    produce(bootstrap, topic, rest)
    proc = drain(env)
    assert "202 counted" in proc.stderr, proc.stderr
    totals = ledger_totals(env)
    assert totals == expected_totals(first + rest)
    assert totals[next(k for k in totals if k[0] == "edge")]["network_bytes"] == 2**63
    letters = json.loads(run_cli("dead-letters", "-f", "json", env=env, check=True).stdout)
    assert letters == []


def test_an_event_past_the_ceiling_is_dead_lettered_and_the_partition_goes_on(
    env: dict[str, str],
) -> None:
    bootstrap, topic = env["KAFKA_BOOTSTRAP_SERVERS"], env["METERING_TOPIC"]
    seed = _event("edge", cpu_ms=1)
    produce(bootstrap, topic, [seed])
    drain(env)
    (partition,) = [p for p, (_, rows) in ledger_state(env).items() if rows]
    cfg = load_settings(metering_data_dir=env["METERING_DATA_DIR"], metering_topic=topic)
    con = duckdb.connect(str(ledger_path(cfg.ledger_dir, topic, partition)))
    try:  # a total one step below the ceiling, as if 10**9 huge events had come before
        con.execute("UPDATE aggregates SET cpu_ms = ?::HUGEINT", [str(COUNTER_CEILING - 1)])
    finally:
        con.close()
    refused = _event("edge", cpu_ms=2, api_calls=1)
    behind = [_event("edge", api_calls=3), *[make_event(f"t{i}") for i in range(100)]]
    produce(bootstrap, topic, [refused, *behind])
    proc = drain(env)
    assert "100 counted" not in proc.stderr and "101 counted" in proc.stderr, proc.stderr
    totals = ledger_totals(env)
    edge = totals.pop(next(k for k in totals if k[0] == "edge"))
    assert (edge["events"], edge["cpu_ms"], edge["api_calls"]) == (2, COUNTER_CEILING - 1, 3)
    assert totals == {k: v for k, v in expected_totals(behind).items() if k[0] != "edge"}
    letters = json.loads(run_cli("dead-letters", "-f", "json", env=env, check=True).stdout)
    assert [(d["partition"], d["reason_code"]) for d in letters] == [(partition, "counter_ceiling")]
    assert refused["event_id"] in letters[0]["reason"]
