"""Realistic, reproducible usage for one tenant (pure: no I/O).

Per session, totals are drawn uniformly from the ranges of the original tool's simulator, then
split into several events from different components, each dated uniformly inside the period
(never in the future).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from schemas.periods import Period

SESSION_RANGES: dict[str, tuple[int, int]] = {
    "cpu_ms": (100, 10_099),
    "network_bytes": (1_024, 1_049_599),
    "api_calls": (1, 50),
    "tool_executions": (1, 20),
    "data_retrievals": (1, 10),
    "egress_scans": (1, 5),
    "policy_checks": (10, 109),
    "violations": (0, 2),
}
RISK_RANGE = (0.1, 0.4)
SOURCES = ("gateway", "policy-kernel", "egress-firewall", "retrieval-gateway")


def _split(rng: random.Random, total: int, parts: int) -> list[int]:
    cuts = sorted(rng.randint(0, total) for _ in range(parts - 1))
    bounds = [0, *cuts, total]
    return [bounds[i + 1] - bounds[i] for i in range(parts)]


def simulate_sessions(
    tenant_id: str,
    sessions: int,
    period: Period,
    seed: int | None = None,
    now: datetime | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield the events of ``sessions`` sessions of ``tenant_id`` inside ``period``."""
    rng = random.Random(seed)
    start = int(period.start.timestamp() * 1_000_000)
    end = int(period.end.timestamp() * 1_000_000) - 1
    limit = int((now or datetime.now(UTC)).timestamp() * 1_000_000)
    end = min(end, limit)
    if end < start:
        raise ValueError(f"period {period} lies entirely in the future")
    for _ in range(sessions):
        session_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        totals = {k: rng.randint(lo, hi) for k, (lo, hi) in SESSION_RANGES.items()}
        risk = round(rng.uniform(*RISK_RANGE), 4)
        parts = rng.randint(2, len(SOURCES))
        shares = {k: _split(rng, v, parts) for k, v in totals.items()}
        for i in range(parts):
            event: dict[str, Any] = {
                "event_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                "tenant_id": tenant_id,
                "session_id": session_id,
                "occurred_at": rng.randint(start, end),
                "source": SOURCES[i],
                "risk_score": risk,
            }
            event.update({k: v[i] for k, v in shares.items()})
            yield event
