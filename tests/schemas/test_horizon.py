"""The late-usage horizon: whether an event is accepted depends on the event and the wall
clock only (never on other events, their order or the partition's newest event)."""

from __future__ import annotations

import random
from datetime import UTC, datetime

from schemas.codec import default_codec
from schemas.periods import oldest_billable_start
from schemas.prepare import Record, prepare_batch
from tests.support.events import make_event

CODEC = default_codec()


def micros(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> int:
    return int(datetime(year, month, day, hour, minute, tzinfo=UTC).timestamp()) * 1_000_000


def test_a_period_is_billable_for_its_month_plus_the_horizon() -> None:
    # January 2026 ends on February 1st; with 3 months it stays billable until May 1st.
    assert oldest_billable_start(micros(2026, 4, 30, 23, 59), 3) == micros(2026, 1, 1)
    assert oldest_billable_start(micros(2026, 5, 1), 3) == micros(2026, 2, 1)
    assert oldest_billable_start(micros(2026, 2, 10), 3) == micros(2025, 11, 1)
    assert oldest_billable_start(micros(2026, 1, 1), 12) == micros(2025, 1, 1)
    assert oldest_billable_start(micros(2026, 1, 1), 1) == micros(2025, 12, 1)
    assert oldest_billable_start(micros(2026, 6, 15), 0) is None  # 0: kept forever


def test_acceptance_does_not_depend_on_order_or_other_events() -> None:
    now = micros(2026, 4, 20)
    oldest = oldest_billable_start(now, 3)
    rng = random.Random(8)
    events = [
        make_event(tenant=f"t{i % 5}", occurred_at=rng.randrange(micros(2025, 12, 1), now))
        for i in range(400)
    ]
    expected_dead = {e["event_id"] for e in events if e["occurred_at"] < micros(2026, 1, 1)}
    assert 0 < len(expected_dead) < len(events)
    for _ in range(3):
        rng.shuffle(events)
        records = [
            Record(i, e["tenant_id"].encode(), CODEC.encode(e)) for i, e in enumerate(events)
        ]
        # split into batches anywhere: the outcome of each event stays the same
        cut = rng.randrange(1, len(records))
        dead: set[str] = set()
        counted: set[str] = set()
        for part in (records[:cut], records[cut:]):
            batch = prepare_batch(0, part, CODEC, now, oldest)
            counted |= set(batch.events.column("event_id").to_pylist())
            for d in batch.dead:
                assert d.reason_code == "past_late_usage_horizon", d.reason
                assert "period 2025-12" in d.reason
                dead.add(CODEC.decode(d.value)["event_id"])
        assert dead == expected_dead
        assert counted == {e["event_id"] for e in events} - expected_dead
