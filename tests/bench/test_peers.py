"""The peers' shared fold (bench/peers/fold.py) and the arroyo peer's DuckDB state agree
with reference totals on a tiny input; peers that cannot run are reported, not skipped.
Runs without the peer venvs (make test never installs them; make bench checks the peers
themselves against the worker)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import bench.peers
from bench.events import synthetic_events
from bench.peers import PEERS, Peer
from bench.peers.duck_sink import DuckSink
from bench.peers.fold import (
    Decoder,
    DictState,
    Totals,
    differences,
    fold_event,
    totals_of,
)
from schemas.codec import COUNTERS, default_codec
from schemas.periods import period_of
from tests.support.oracle import fold_totals

JAN_2025 = 1_736_000_000_000_000  # 2025-01-04


def tiny_input() -> list[dict[str, Any]]:
    """400 events, then 40 of them again (same ids), and 30 in January 2025."""
    events: list[dict[str, Any]] = synthetic_events(400, 7).to_dicts()
    old = [
        {**e, "event_id": f"old-{i}", "occurred_at": JAN_2025 + i}
        for i, e in enumerate(events[:30])
    ]
    return [*events, *events[::10], *old]


def reference(events: list[dict[str, Any]]) -> Totals:
    """The project's reference fold (tests/support/oracle.py), with risk max and mean."""
    risks: dict[str, list[float]] = {}
    seen: set[tuple[str, str]] = set()
    for e in events:
        key = f"{e['tenant_id']}/{period_of(e['occurred_at'])}"
        fresh = (e["tenant_id"], e["event_id"]) not in seen
        seen.add((e["tenant_id"], e["event_id"]))
        if fresh and e["risk_score"] is not None:
            risks.setdefault(key, []).append(e["risk_score"])
    totals: Totals = {}
    for (tenant, period), t in fold_totals(events).items():
        key, scores = f"{tenant}/{period}", risks.get(f"{tenant}/{period}", [])
        totals[key] = {
            "events": t.events,
            "sessions": len(t.sessions),
            **{c: t.counters[c] for c in COUNTERS},
            "risk_score_max": max(scores, default=None),
            "risk_score_avg": sum(scores) / len(scores) if scores else None,
        }
    return totals


def decoded(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each event through the wire format and the peers' ``Decoder``."""
    codec, decode = default_codec(), Decoder()
    out = [decode(codec.encode(e), e["tenant_id"].encode()) for e in events]
    assert all(e is not None for e in out)
    return [e for e in out if e is not None]


def test_the_fold_agrees_with_the_reference_totals() -> None:
    events = tiny_input()
    states: dict[str, DictState] = {}
    folded = [
        fold_event(states.setdefault(e["tenant_id"], DictState()), e) for e in decoded(events)
    ]
    assert sum(agg is None for agg in folded) == 40  # the repeated ids change nothing
    got = totals_of(agg for state in states.values() for agg in state.aggregates())
    expected = reference(events)
    assert any(key.endswith("/2025-01") for key in got)
    assert differences(expected, got) == []


def test_the_duckdb_state_survives_a_restart_and_a_redelivery(tmp_path: Path) -> None:
    events = decoded(tiny_input())
    path = tmp_path / "arroyo.duckdb"
    sink = DuckSink(path)
    fresh = sum(sink.write(events[i : i + 100]) for i in range(0, 300, 100))
    sink.close()
    sink = DuckSink(path)  # a restart: the state comes back from the file
    # at-least-once: the last batch is delivered again, then the rest
    fresh += sum(sink.write(events[i : i + 100]) for i in range(200, len(events), 100))
    got = totals_of(sink.aggregates())
    sink.close()
    assert fresh == len(events) - 40
    assert differences(reference(tiny_input()), got) == []
    assert differences(got, totals_of(DuckSink(path).aggregates())) == []


def test_differences_name_what_differs() -> None:
    expected = reference(tiny_input())
    key = next(k for k, v in expected.items() if v["risk_score_avg"] is not None)
    changed = {k: dict(v) for k, v in expected.items()}
    changed[key]["api_calls"] += 1
    changed[key]["risk_score_avg"] *= 1 + 1e-12  # float sums in another order: equal
    del changed[next(k for k in expected if k != key)]
    found = differences(expected, changed)
    assert len(found) == 2 and any(f"{key} api_calls" in line for line in found)
    assert any(line.endswith("missing") for line in found)


def test_a_peer_without_its_venv_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench.peers, "VENVS", tmp_path)
    peer: Peer = PEERS[0]
    assert peer.unavailable() == "not installed (run `make bench-peers`)"
    peer.venv.mkdir()
    peer.installed_stamp.write_text("an older requirements file")
    assert peer.unavailable() == "not installed (run `make bench-peers`)"
    peer.failed_stamp.write_text("no wheel for this platform\n")
    assert peer.unavailable() == "not installable: no wheel for this platform"
