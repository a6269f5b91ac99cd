"""Building usage events for tests."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from schemas.codec import COUNTERS, discover

NOW = int(time.time() * 1_000_000)
"""The suite's one "now" (microseconds), taken once: events built here occur an hour before it,
and in-process checks validate against it, so a suite that runs for hours never drifts."""


def make_event(tenant: str = "acme-corp", **overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "tenant_id": tenant,
        "session_id": "s-1",
        "occurred_at": NOW - 3_600_000_000,
        "source": "gateway",
        "cpu_ms": 10,
        "network_bytes": 2048,
        "api_calls": 3,
        "tool_executions": 1,
        "data_retrievals": 1,
        "egress_scans": 1,
        "policy_checks": 5,
        "violations": 0,
        "risk_score": 0.25,
    }
    event.update(overrides)
    return event


def make_correction(tenant: str = "acme-corp", **overrides: Any) -> dict[str, Any]:
    """A correction event (schema v3): every delta 0 unless given, a reason, no risk score."""
    event = make_event(tenant, session_id="correction", source="pf-metering", risk_score=None)
    event.update(dict.fromkeys(COUNTERS, 0), kind="correction", reason="test correction")
    event.update(corrects_event_id=None)
    event.update(overrides)
    return event


# Rich markup and emoji codes, as data would carry them (keys, cells, names)
MARKUP = [
    "evil[/red]",
    "x[foo]hidden[/foo]y",
    "[/]",
    "[bold]b[/bold]",
    "[link=http://x]y[/link]",
    ":thumbs_up:",
    "[red]",
]


def v4_schema() -> dict[str, Any]:
    """The newest built-in schema plus a field with a default (a compatible new version)."""
    schema: dict[str, Any] = json.loads(Path(discover()[-1].path).read_text())
    schema["fields"].append({"name": "zone", "type": "string", "default": ""})
    return schema
