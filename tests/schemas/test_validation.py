"""Every invalid class (docs/spec.md, "The usage event", "Invalid events") gives its named
reason."""

from __future__ import annotations

import math
from typing import Any

import pytest

from schemas.validation import REASONS, reason_code, validate
from tests.support.events import NOW, make_correction, make_event


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"event_id": ""}, "invalid_event_id"),
        ({"event_id": "x" * 129}, "invalid_event_id"),
        ({"tenant_id": ""}, "invalid_tenant_id"),
        ({"tenant_id": "-leading-dash"}, "invalid_tenant_id"),
        ({"tenant_id": "has space"}, "invalid_tenant_id"),
        ({"tenant_id": "a" * 129}, "invalid_tenant_id"),
        ({"tenant_id": "x'; DROP TABLE t;--"}, "invalid_tenant_id"),
        ({"session_id": ""}, "invalid_session_id"),
        ({"session_id": "s" * 129}, "invalid_session_id"),
        ({"source": ""}, "invalid_source"),
        ({"cpu_ms": -1}, "negative_counter"),
        ({"network_bytes": -5}, "negative_counter"),
        ({"violations": -1}, "negative_counter"),
        ({"risk_score": math.nan}, "invalid_risk_score"),
        ({"risk_score": math.inf}, "invalid_risk_score"),
        ({"risk_score": -0.01}, "invalid_risk_score"),
        ({"risk_score": 1.5}, "invalid_risk_score"),
        ({"occurred_at": NOW + 6 * 60 * 1_000_000}, "future_timestamp"),
        ({"occurred_at": -1}, "timestamp_before_1970"),
    ],
)
def test_invalid_event_reason(overrides: dict[str, Any], reason: str) -> None:
    got = validate(make_event(**overrides), NOW)
    assert got is not None and reason_code(got) == reason
    assert reason in REASONS


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tenant_id": "t_with.under_scores:and-dashes"},
        {"tenant_id": "a" * 128},
        {"risk_score": None},
        {"risk_score": 0.0},
        {"risk_score": 1.0},
        {"occurred_at": NOW + 4 * 60 * 1_000_000},
        {"cpu_ms": 0, "network_bytes": 0},
    ],
)
def test_valid_events_pass(overrides: dict[str, Any]) -> None:
    assert validate(make_event(**overrides), NOW) is None


def test_key_must_be_tenant() -> None:
    event = make_event(tenant="acme")
    assert validate(event, NOW, key=b"acme") is None
    got = validate(event, NOW, key=b"other")
    assert got is not None and reason_code(got) == "key_mismatch"


@pytest.mark.parametrize(
    "overrides",
    [
        {"cpu_ms": -3_600_000},
        {"cpu_ms": -1, "network_bytes": 5, "violations": -2},
        {"api_calls": 7, "corrects_event_id": "e-1"},
        {"cpu_ms": -(2**63), "reason": "r" * 1000},
    ],
)
def test_corrections_carry_signed_deltas(overrides: dict[str, Any]) -> None:
    assert validate(make_correction(**overrides), NOW) is None


@pytest.mark.parametrize(
    ("overrides", "detail"),
    [
        ({}, "corrects no counter"),
        ({"cpu_ms": -1, "reason": None}, "reason must be"),
        ({"cpu_ms": -1, "reason": "  "}, "reason must be"),
        ({"cpu_ms": -1, "reason": "r" * 1001}, "reason must be"),
        ({"cpu_ms": -1, "corrects_event_id": ""}, "corrects_event_id"),
        ({"cpu_ms": -1, "risk_score": 0.5}, "no risk_score"),
        ({"cpu_ms": -1, "kind": "refund"}, "neither usage nor correction"),
    ],
)
def test_malformed_corrections_are_refused(overrides: dict[str, Any], detail: str) -> None:
    got = validate(make_correction(**overrides), NOW)
    assert got is not None and reason_code(got) == "invalid_correction" and detail in got


def test_a_negative_counter_is_refused_on_usage_even_in_v3() -> None:
    got = validate(make_event(kind="usage", cpu_ms=-1, reason="because"), NOW)
    assert got == "negative_counter: cpu_ms=-1"
