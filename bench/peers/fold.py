"""The fold every peer runs, written once, and the totals they are checked by.

A record is decoded and validated with the project's own codec and rules (what a team
switching libraries keeps), then folded into its tenant's keyed state, which has the
shape of Quix Streams' ``State`` (get / set / exists): an event id seen before changes
nothing, sessions are counted once per (tenant, period). Runs in the peer venvs: stdlib,
fastavro and ``schemas`` only.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from schemas.codec import COUNTERS, DecodeError, default_codec
from schemas.periods import period_of
from schemas.validation import validate

Aggregate = dict[str, Any]
Totals = dict[str, dict[str, Any]]  # "tenant/period" -> TOTAL_FIELDS
TOTAL_FIELDS = ("events", "sessions", *COUNTERS, "risk_score_max", "risk_score_avg")
AGG = "agg:"


def seen_key(event_id: str) -> str:
    return "seen:" + event_id


def session_key(period: str, session_id: str) -> str:
    return f"session:{period}:{session_id}"


class KeyedState(Protocol):
    """One tenant's state."""

    def get(self, key: str, default: Any = None) -> Any: ...

    def set(self, key: str, value: Any) -> None: ...

    def exists(self, key: str) -> bool: ...


class DictState:
    """A ``KeyedState`` in a dict (the peers whose state is a Python object)."""

    __slots__ = ("values",)

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def set(self, key: str, value: Any) -> None:
        self.values[key] = value

    def exists(self, key: str) -> bool:
        return key in self.values

    def aggregates(self) -> list[Aggregate]:
        return [v for k, v in self.values.items() if k.startswith(AGG)]


class Decoder:
    """``decoder(value, key)``: the event, or None if the worker would dead-letter it."""

    def __init__(self) -> None:
        self.codec = default_codec()

    def __call__(self, value: bytes | None, key: bytes | None) -> dict[str, Any] | None:
        try:
            event = self.codec.decode(value)
        except DecodeError:
            return None
        return event if validate(event, int(time.time() * 1_000_000), key) is None else None


def new_aggregate(tenant: str, period: str) -> Aggregate:
    return {
        "tenant_id": tenant,
        "period": period,
        "events": 0,
        "sessions": 0,
        **dict.fromkeys(COUNTERS, 0),
        "risk_score_sum": 0.0,
        "risk_score_count": 0,
        "risk_score_max": None,
    }


def fold_event(state: KeyedState, event: dict[str, Any]) -> Aggregate | None:
    """Fold one valid event into its tenant's ``state``: the updated aggregate of its
    period, or None when its event id was seen before (nothing changes)."""
    seen = seen_key(event["event_id"])
    if state.exists(seen):
        return None
    state.set(seen, 1)
    period = period_of(event["occurred_at"])
    agg = state.get(AGG + period) or new_aggregate(event["tenant_id"], period)
    session = session_key(period, event["session_id"])
    if not state.exists(session):
        state.set(session, 1)
        agg["sessions"] += 1
    agg["events"] += 1
    for name in COUNTERS:
        agg[name] += event[name]
    risk = event["risk_score"]
    if risk is not None:
        agg["risk_score_sum"] += risk
        agg["risk_score_count"] += 1
        top = agg["risk_score_max"]
        agg["risk_score_max"] = risk if top is None or risk > top else top
    state.set(AGG + period, agg)
    return agg


def totals_of(aggregates: Iterable[Aggregate]) -> Totals:
    """Aggregates (one per tenant and period) as comparable totals."""
    totals: Totals = {}
    for agg in aggregates:
        count = agg["risk_score_count"]
        row = {f: agg[f] for f in TOTAL_FIELDS[:-1]}
        row["risk_score_avg"] = agg["risk_score_sum"] / count if count else None
        totals[f"{agg['tenant_id']}/{agg['period']}"] = row
    return totals


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9)
    return bool(a == b)


def differences(expected: Totals, got: Totals, limit: int = 5) -> list[str]:
    """Where ``got`` differs from ``expected`` (at most ``limit`` lines); empty if equal."""
    found = [f"{key}: missing" for key in expected.keys() - got.keys()]
    found += [f"{key}: unexpected" for key in got.keys() - expected.keys()]
    for key in expected.keys() & got.keys():
        for name in TOTAL_FIELDS:
            want, have = expected[key][name], got[key][name]
            if not _same(want, have):
                found.append(f"{key} {name}: expected {want}, got {have}")
    return sorted(found)[:limit]


@dataclass
class AppArgs:
    """What the bench tells a peer app."""

    bootstrap: str
    topic: str
    events: int
    workdir: Path
    result: Path
    group: str


def app_args(argv: list[str] | None = None) -> AppArgs:
    parser = argparse.ArgumentParser()
    for name in ("bootstrap", "topic", "group"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    return AppArgs(**vars(parser.parse_args(argv)))


def write_result(path: Path, seconds: float, aggregates: Iterable[Aggregate]) -> None:
    """A peer's output: its own time (client created -> done) and its totals."""
    totals = totals_of(aggregates)
    path.write_text(json.dumps({"seconds": seconds, "totals": totals}))


def read_result(path: Path) -> tuple[float, Totals]:
    data = json.loads(path.read_text())
    return float(data["seconds"]), data["totals"]
