"""Validation rules (docs/spec.md, "The usage event" and "Invalid events") as pure functions
returning a named reason.

A ``usage`` event's counters are >= 0. A ``correction`` (schema v3) carries signed deltas,
at least one of them non-zero, a ``reason`` and no ``risk_score``. Whether a correction
keeps its tenant's totals >= 0 needs the stored totals: the fold decides that
(``aggregator.fold``, ``negative_total``)."""

from __future__ import annotations

import math
import re
from typing import Any

from schemas.codec import COUNTERS

# \Z, not $: "$" would also accept a trailing newline.
TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z")
MAX_FUTURE_MICROS = 5 * 60 * 1_000_000
MIN_OCCURRED_MICROS = 0  # 1970-01-01: billing periods start there
MAX_ID_LEN = 128
MAX_REASON_LEN = 1000  # a correction's ``reason``
USAGE, CORRECTION = "usage", "correction"  # the event kinds (v3's ``kind``; before: usage)
# Every reason code a dead letter can carry (metrics label values).
REASONS = (
    "not_single_object",
    "oversized",
    "unknown_fingerprint",
    "undecodable_body",
    "invalid_event_id",
    "invalid_tenant_id",
    "invalid_session_id",
    "invalid_source",
    "negative_counter",
    "invalid_risk_score",
    "future_timestamp",
    "timestamp_before_1970",
    "key_mismatch",
    "past_late_usage_horizon",
    "invalid_correction",
)


def _bad_id(value: Any) -> bool:
    return not isinstance(value, str) or not (1 <= len(value) <= MAX_ID_LEN)


def validate(event: dict[str, Any], now_micros: int, key: bytes | None = None) -> str | None:
    """None when ``event`` may be counted, else ``"<reason>: <detail>"``."""
    if _bad_id(event.get("event_id")):
        return "invalid_event_id: must be 1-128 characters"
    tenant = event.get("tenant_id")
    if not isinstance(tenant, str) or not TENANT_RE.match(tenant):
        return f"invalid_tenant_id: {str(tenant)[:64]!r} does not match {TENANT_RE.pattern}"
    if _bad_id(event.get("session_id")):
        return "invalid_session_id: must be 1-128 characters"
    source = event.get("source")
    if not isinstance(source, str) or not source or len(source) > MAX_ID_LEN:
        return "invalid_source: must be 1-128 characters"
    kind = event.get("kind", USAGE)
    if kind == CORRECTION:
        why = _bad_correction(event)
        if why is not None:
            return f"invalid_correction: {why}"
    elif kind != USAGE:
        return f"invalid_correction: kind {str(kind)[:32]!r} is neither usage nor correction"
    else:
        for name in COUNTERS:
            if event.get(name, 0) < 0:
                return f"negative_counter: {name}={event[name]}"
    risk = event.get("risk_score")
    if risk is not None and not (math.isfinite(risk) and 0.0 <= risk <= 1.0):
        return f"invalid_risk_score: {risk!r} is not within [0, 1]"
    if event["occurred_at"] < MIN_OCCURRED_MICROS:
        return "timestamp_before_1970: occurred_at precedes 1970-01-01T00:00:00Z"
    if event["occurred_at"] > now_micros + MAX_FUTURE_MICROS:
        return "future_timestamp: occurred_at is more than 5 minutes in the future"
    if key is not None and key != tenant.encode():
        return "key_mismatch: Kafka key is not the tenant_id"
    return None


def _bad_correction(event: dict[str, Any]) -> str | None:
    """Why a correction is malformed (its counters are signed deltas), or None."""
    if not any(event.get(name, 0) for name in COUNTERS):
        return "it corrects no counter (every delta is 0)"
    reason = event.get("reason")
    if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON_LEN:
        return f"reason must be 1-{MAX_REASON_LEN} characters, not blank"
    corrects = event.get("corrects_event_id")
    if corrects is not None and _bad_id(corrects):
        return "corrects_event_id must be 1-128 characters"
    if event.get("risk_score") is not None:
        return "a correction carries no risk_score (it adjusts counters only)"
    return None


def reason_code(reason: str) -> str:
    """The code part of a reason (``"negative_counter: cpu_ms=-1"`` -> ``"negative_counter"``)."""
    return reason.split(":", 1)[0]
