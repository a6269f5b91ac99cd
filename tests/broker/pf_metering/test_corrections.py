"""``usage correct`` through the real broker and worker: a correction produced from the CLI
lowers the totals ``usage`` and the open period's draft show; one that would take a total
below zero is a ``negative_total`` dead letter and changes nothing; bad input produces
nothing. Totals are reconciled against the reference fold of what the topic holds."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from schemas.codec import COUNTERS, default_codec
from schemas.periods import Period
from tests.support.cli_runner import assert_user_error, run_cli
from tests.support.events import make_event
from tests.support.oracle import fold_log
from tests.support.worker_harness import drain, ledger_totals, produce, read_topic

MIB = 1_048_576


def topic_events(env: dict[str, str]) -> list[dict[str, Any]]:
    """Every event the topic holds, decoded, in log order (one tenant: one partition)."""
    codec = default_codec()
    records = read_topic(env["KAFKA_BOOTSTRAP_SERVERS"], env["METERING_TOPIC"])
    return [codec.decode(r.value) for part in records.values() for r in part]


def usage_of(env: dict[str, str], tenant: str, period: str) -> dict[str, Any]:
    proc = run_cli("usage", tenant, period, "-f", "json", env=env, check=True)
    return dict(json.loads(proc.stdout))


def test_a_correction_from_the_cli_lowers_usage_and_the_draft(env: dict[str, str]) -> None:
    period = str(Period.of(datetime.now(UTC)))
    start = int(Period.of(datetime.now(UTC)).start.timestamp()) * 1_000_000
    zero = dict.fromkeys(COUNTERS, 0)
    first = make_event("acme", occurred_at=start + 1, **{**zero, "cpu_ms": 3_600_000})
    first["network_bytes"] = 3 * MIB
    second = make_event("acme", occurred_at=start + 2, session_id="s-2", **zero)
    second["api_calls"] = 40
    produce(env["KAFKA_BOOTSTRAP_SERVERS"], env["METERING_TOPIC"], [first, second])

    bad = {
        "unknown tenant": (["nobody", period, "--cpu-ms", "-1", "--reason", "r"], "nobody"),
        "empty reason": (["acme", period, "--cpu-ms", "-1", "--reason", " "], "--reason"),
        "no reason": (["acme", period, "--cpu-ms", "-1"], "--reason"),
        "no counter": (["acme", period, "--reason", "r"], "--cpu-ms"),
        "only zero deltas": (["acme", period, "--api-calls", "0", "--reason", "r"], "--cpu-ms"),
        "a bad period": (["acme", "2025-13", "--cpu-ms", "-1", "--reason", "r"], "2025-13"),
        "a future period": (["acme", "2999-01", "--cpu-ms", "-1", "--reason", "r"], "2999-01"),
        "part of a byte": (["acme", period, "--network-mb", "0.3", "--reason", "r"],
                           "--network-mb"),
        "too large": (["acme", period, "--cpu-ms", str(2**63), "--reason", "r"], "--cpu-ms"),
        "a bad target": (["acme", period, "--cpu-ms", "-1", "--corrects", "", "--reason", "r"],
                         "--corrects"),
    }  # fmt: skip
    drain(env)  # the usage is published: "acme" is known, "nobody" is not
    for case, (args, named) in bad.items():
        proc = run_cli("usage", "correct", *args, env=env)
        assert_user_error(proc, named)
        assert "Traceback" not in proc.stderr, case
    assert len(topic_events(env)) == 2  # nothing produced

    down = run_cli(
        "usage", "correct", "acme", period, "--cpu-ms", "-1800000", "--network-mb", "-1.5",
        "--corrects", first["event_id"], "--reason", "billed twice: gateway retry",
        env=env, check=True,
    )  # fmt: skip
    assert "cpu_ms -1800000, network_bytes -1572864" in down.stdout
    too_far = run_cli(
        "usage", "correct", "acme", period, "--cpu-ms", "-1", "--api-calls", "-41",
        "--reason", "too far", env=env, check=True,
    )  # fmt: skip
    assert too_far.returncode == 0  # produced: the worker refuses it
    drain(env)

    shown = usage_of(env, "acme", period)
    assert (shown["events"], shown["sessions"]) == (2, 2)  # corrections are not events
    assert (shown["cpu_ms"], shown["network_bytes"], shown["api_calls"]) == (
        1_800_000, 3 * MIB - 1_572_864, 40,
    )  # fmt: skip
    log = topic_events(env)
    assert [e["kind"] for e in log] == ["usage", "usage", "correction", "correction"]
    assert log[2]["reason"] == "billed twice: gateway retry"
    assert log[2]["corrects_event_id"] == first["event_id"]
    expected = fold_log(log)
    key = ("acme", period)
    assert [e["reason"] for e in expected.refused] == ["too far"]
    assert ledger_totals(env)[key] == {
        "events": 2, "sessions": 2, **{c: expected.totals[key].counters[c] for c in COUNTERS},
    }  # fmt: skip

    letters = json.loads(run_cli("dead-letters", "-f", "json", env=env, check=True).stdout)
    (letter,) = letters
    assert letter["reason_code"] == "negative_total" and letter["state"] == "open"
    assert "api_calls of acme in" in letter["reason"] and "below zero (40 -41)" in letter["reason"]
    assert letter["value"]  # kept: replayable

    draft = json.loads(
        run_cli("generate-invoice", "acme", period, "-f", "json", env=env, check=True).stdout
    )
    assert draft["status"] == "draft"
    lines = {line["code"]: line for line in draft["lines"]}
    assert lines["cpu"]["quantity"] == "1800000"
    assert lines["api_calls"]["quantity"] == "40"
