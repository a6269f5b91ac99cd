"""The reference fold: an independent count that every ledger total is reconciled against.

Corrections (``kind`` = ``correction``) follow the ledger's rule, written here again from
the rule, not from its code: in log order, a correction adds its signed deltas to the
counters of its tenant and period unless that would take any of them below zero (then it
is refused whole, and its id stays unseen: a later copy is judged again); it is not an
event, opens no session and carries no risk score.
"""

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
    corrections: int = 0  # corrections applied
    risk_scores: list[float] = field(default_factory=list)  # of usage events only

    @property
    def risk_score_max(self) -> float | None:
        return max(self.risk_scores, default=None)

    @property
    def risk_score_avg(self) -> float | None:
        return sum(self.risk_scores) / len(self.risk_scores) if self.risk_scores else None


@dataclass
class Folded:
    """The reference fold of a log: totals, and the corrections refused (in log order)."""

    totals: dict[tuple[str, str], Totals]
    refused: list[dict[str, Any]]


def fold_log(events: Iterable[dict[str, Any]]) -> Folded:
    """Reference fold of events in log order: each (tenant_id, event_id) counted once."""
    out: dict[tuple[str, str], Totals] = {}
    seen: set[tuple[str, str]] = set()
    refused: list[dict[str, Any]] = []
    for e in events:
        ident = (e["tenant_id"], e["event_id"])
        if ident in seen:
            continue
        key = (e["tenant_id"], period_of(e["occurred_at"]))
        if e.get("kind", "usage") == "correction":
            before = out.get(key, Totals()).counters
            if any(before[k] + e.get(k, 0) < 0 for k in COUNTERS):
                refused.append(e)
                continue
            seen.add(ident)
            t = out.setdefault(key, Totals())
            t.corrections += 1
            for k in COUNTERS:
                t.counters[k] += e.get(k, 0)
            continue
        seen.add(ident)
        t = out.setdefault(key, Totals())
        t.events += 1
        t.sessions.add(e["session_id"])
        t.counters.update({k: e[k] for k in COUNTERS})
        if e.get("risk_score") is not None:
            t.risk_scores.append(e["risk_score"])
    return Folded(out, refused)


def fold_totals(events: Iterable[dict[str, Any]]) -> dict[tuple[str, str], Totals]:
    """Reference fold: count each (tenant_id, event_id) once (corrections as above)."""
    return fold_log(events).totals
