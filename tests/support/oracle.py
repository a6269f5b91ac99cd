"""The reference fold: an independent count that every ledger total is reconciled against."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from schemas.codec import COUNTERS
from schemas.periods import period_of


@dataclass
class Totals:
    """Per tenant and period: what the ledger must end up with."""

    events: int = 0
    sessions: set[str] = field(default_factory=set)
    counters: Counter[str] = field(default_factory=Counter)


def fold_totals(events: Iterable[dict[str, Any]]) -> dict[tuple[str, str], Totals]:
    """Reference fold: count each (tenant_id, event_id) once."""
    out: dict[tuple[str, str], Totals] = {}
    seen: set[tuple[str, str]] = set()
    for e in events:
        ident = (e["tenant_id"], e["event_id"])
        if ident in seen:
            continue
        seen.add(ident)
        t = out.setdefault((e["tenant_id"], period_of(e["occurred_at"])), Totals())
        t.events += 1
        t.sessions.add(e["session_id"])
        t.counters.update({k: e[k] for k in COUNTERS})
    return out
