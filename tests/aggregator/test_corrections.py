"""Corrections through the ledger: signed deltas applied whole or refused whole
(``negative_total``) at the commit, in offset order, whatever the batches; never an event,
a session or a risk score; totals reconciled against the reference fold."""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.ledger import LedgerSet, PartitionLedger, ReplayRequest
from aggregator.views import open_usage
from common.settings import Settings
from schemas.codec import COUNTERS, default_codec
from schemas.prepare import Record, RecordBatch, prepare_batch
from tests.support.events import make_correction, make_event
from tests.support.oracle import fold_log

CODEC = default_codec()
JAN = 1_735_689_600_000_000 + 86_400_000_000  # 2025-01-02T00:00:00Z
FEB = JAN + 31 * 86_400_000_000
ZERO = dict.fromkeys(COUNTERS, 0)


def usage(tenant: str = "acme", at: int = JAN, **counters: Any) -> dict[str, Any]:
    return make_event(tenant, occurred_at=at, **{**ZERO, **counters})


def correction(tenant: str = "acme", at: int = JAN, **deltas: Any) -> dict[str, Any]:
    return make_correction(tenant, occurred_at=at, **deltas)


class Ledger:
    """Partition 0's ledger in ``folder``: commit batches of events, read what it holds."""

    def __init__(self, folder: Path) -> None:
        self.cfg = Settings(metering_data_dir=folder)
        self.set = LedgerSet(
            self.cfg.ledger_dir, self.cfg.metering_topic, 10, snapshot_dir=self.cfg.snapshot_dir
        )
        self.ledger: PartitionLedger = self.set.acquire(0)
        self.now = int(time.time() * 1_000_000)

    def commit(self, events: list[dict[str, Any]]) -> None:
        start = self.ledger.next_offset or 0
        records = [
            Record(start + i, e["tenant_id"].encode(), CODEC.encode(e))
            for i, e in enumerate(events)
        ]
        self.ledger.commit(prepare_batch(0, records, CODEC, self.now, None))

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        return self.ledger.con.execute(sql.format(a=self.ledger.alias)).fetchall()

    def totals(self) -> dict[tuple[str, str], dict[str, Any]]:
        cols = ["events", "sessions", *COUNTERS, "risk_score_sum", "risk_score_count"]
        found = self.rows(f"SELECT tenant_id, period, {', '.join(cols)} FROM {{a}}.aggregates")
        return {(r[0], r[1]): dict(zip(cols, r[2:], strict=True)) for r in found}

    def dead(self) -> list[tuple[str, str, bytes | None]]:
        return [
            (str(r[0]), str(r[1]), r[2])
            for r in self.rows(
                'SELECT reason_code, reason, value FROM {a}.dead_letters ORDER BY "offset"'
            )
        ]

    def close(self) -> None:
        self.set.close(self.cfg.snapshot_dir)


def reconcile(ledger: Ledger, log: list[dict[str, Any]]) -> None:
    """The ledger holds exactly what the reference fold of ``log`` says."""
    expected = fold_log(log)
    got = ledger.totals()
    assert set(got) == set(expected.totals)
    for key, t in expected.totals.items():
        row = got[key]
        assert (row["events"], row["sessions"]) == (t.events, len(t.sessions)), key
        assert {c: int(row[c]) for c in COUNTERS} == {c: t.counters[c] for c in COUNTERS}, key
        assert row["risk_score_count"] == len(t.risk_scores), key
        assert abs(row["risk_score_sum"] - sum(t.risk_scores)) < 1e-9, key
    refused = [e["event_id"] for e in expected.refused]
    dead = [d for d in ledger.dead() if d[0] == "negative_total"]
    assert [next(i for i in refused if i in reason) for _, reason, _ in dead] == refused


def test_a_correction_adjusts_counters_only_and_one_below_zero_is_refused_whole(
    tmp_path: Path,
) -> None:
    ledger = Ledger(tmp_path)
    first = usage(cpu_ms=100, api_calls=10, risk_score=0.5)
    down = correction(cpu_ms=-30, corrects_event_id=first["event_id"], reason="over-reported")
    # cpu_ms would fit (70 - 10), api_calls would not (10 - 11): nothing of it applies
    too_far = correction(cpu_ms=-10, api_calls=-11, reason="too far")
    after = usage(cpu_ms=5, api_calls=1, session_id="s-2", risk_score=0.9)
    log = [first, down, too_far, after]
    ledger.commit(log)
    (row,) = ledger.totals().values()
    assert (row["events"], row["sessions"]) == (2, 2)  # the corrections are not events
    assert (row["cpu_ms"], row["api_calls"]) == (75, 11)
    assert (row["risk_score_count"], row["risk_score_sum"]) == (2, 1.4)
    ((code, reason, value),) = ledger.dead()
    assert code == "negative_total"
    assert "api_calls of acme in 2025-01 below zero (10 -11)" in reason
    assert too_far["event_id"] in reason
    assert value is not None and CODEC.decode(value)["reason"] == "too far"  # replayable
    applied = ledger.rows("SELECT event_id, corrects_event_id, reason, cpu_ms FROM {a}.corrections")
    assert applied == [(down["event_id"], first["event_id"], "over-reported", -30)]
    reconcile(ledger, log)
    ledger.close()


def test_the_readers_see_corrected_totals_and_the_refusal(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    ledger.commit([usage(cpu_ms=3_600_000, risk_score=0.25)])
    down = correction(cpu_ms=-3_600_000, reason="free hour")
    ledger.commit([down, correction(cpu_ms=-1, reason="again")])
    ledger.close()
    with open_usage(ledger.cfg.snapshot_dir, ledger.cfg.metering_topic) as reader:
        row = reader.con.execute(
            "SELECT events, sessions, cpu_ms, risk_score_avg, risk_score_max, "
            "first_occurred_at IS NOT NULL FROM usage"
        ).fetchall()
        dead = reader.con.execute("SELECT reason_code FROM dead_letters").fetchall()
        applied = reader.con.execute(
            "SELECT tenant_id, period, event_id, reason, cpu_ms, api_calls FROM corrections"
        ).fetchall()
    assert row == [(1, 1, 0, 0.25, 0.25, True)]
    assert dead == [("negative_total",)]
    assert applied == [("acme", "2025-01", down["event_id"], "free hour", -3_600_000, 0)]


def test_a_correction_without_usage_may_only_add(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    log = [correction("new", cpu_ms=-1), correction("new", at=FEB, network_bytes=2048)]
    ledger.commit(log)
    assert ledger.totals() == {
        ("new", "2025-02"): {
            "events": 0, "sessions": 0, **ZERO, "network_bytes": 2048,
            "risk_score_sum": 0.0, "risk_score_count": 0,
        }
    }  # fmt: skip
    reconcile(ledger, log)
    ledger.close()


def test_a_correction_is_counted_once_and_a_refused_one_stays_unseen(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    down = correction(cpu_ms=-50)
    log = [down, usage(cpu_ms=40), down, usage(cpu_ms=40), down, down]
    for event in log:  # one batch each: the first copy refused, the second applied, then dup
        ledger.commit([event])
    assert [d[0] for d in ledger.dead()] == ["negative_total", "negative_total"]
    assert ledger.totals()[("acme", "2025-01")]["cpu_ms"] == 30
    assert ledger.rows("SELECT count(*) FROM {a}.duplicates") == [(1,)]
    reconcile(ledger, log)
    ledger.close()


def test_a_refused_correction_replays_once_the_usage_it_corrects_has_come(
    tmp_path: Path,
) -> None:
    ledger = Ledger(tmp_path)
    ledger.commit([correction(cpu_ms=-50, reason="credited")])  # ahead of its usage
    ledger.commit([usage(cpu_ms=80)])
    request = ReplayRequest("r-1", time.time() + 1, reason="negative_total")
    records = ledger.ledger.replayable(request)
    assert isinstance(records, RecordBatch) and len(records) == 1
    batch = prepare_batch(0, records, CODEC, ledger.now, None)
    result = ledger.ledger.replay(request, batch)
    assert (result.counted, result.dead) == (1, 0)
    assert ledger.totals()[("acme", "2025-01")]["cpu_ms"] == 30
    assert ledger.rows("SELECT state FROM {a}.dead_letters") == [("replayed_counted",)]
    ledger.close()


_tenants = st.sampled_from(["a", "b"])
_periods = st.sampled_from([JAN, FEB])
_counter = st.sampled_from(COUNTERS[:3])
_step = st.one_of(
    st.tuples(st.just("usage"), _tenants, _periods, _counter, st.integers(0, 50)),
    st.tuples(st.just("correction"), _tenants, _periods, _counter, st.integers(-60, 30)),
)


@settings(max_examples=30, deadline=None)
@given(steps=st.lists(_step, min_size=1, max_size=30), cuts=st.integers(0, 2**32))
def test_any_log_cut_into_any_batches_reconciles_with_the_reference_fold(
    steps: list[tuple[str, str, int, str, int]], cuts: int
) -> None:
    """The outcome depends on the log alone, not on where batches begin and end."""
    rng = random.Random(cuts)
    log: list[dict[str, Any]] = []
    for kind, tenant, at, counter, value in steps:
        if kind == "correction" and value == 0:
            value = -1
        make = usage if kind == "usage" else correction
        log.append(make(tenant, at, **{counter: value}))
        if rng.random() < 0.15:  # a re-send of an earlier event
            log.append(rng.choice(log))
    with tempfile.TemporaryDirectory() as folder:
        ledger = Ledger(Path(folder))
        i = 0
        while i < len(log):
            size = rng.randint(1, 8)
            ledger.commit(log[i : i + size])
            i += size
        reconcile(ledger, log)
        ledger.close()
