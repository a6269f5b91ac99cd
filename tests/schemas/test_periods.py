"""Billing periods: strict parsing, UTC bounds, closing with grace."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from schemas.periods import Period, period_of


@pytest.mark.parametrize(
    "text", ["2025-13", "2025-1", "25-01", "2025-00", "2025/01", "", "2025-01-01"]
)
def test_strict_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        Period.parse(text)


def test_bounds_are_utc_months() -> None:
    p = Period.parse("2025-12")
    assert p.start == datetime(2025, 12, 1, tzinfo=UTC)
    assert p.end == datetime(2026, 1, 1, tzinfo=UTC)
    assert str(p.next()) == "2026-01" and str(Period.parse("2026-01").previous()) == "2025-12"


def test_period_of_event_time() -> None:
    micros = int(datetime(2025, 1, 31, 23, 59, 59, tzinfo=UTC).timestamp() * 1_000_000)
    assert period_of(micros) == "2025-01"
    assert period_of(micros + 1_000_000) == "2025-02"


def test_closed_after_grace() -> None:
    p = Period.parse("2025-01")
    grace = timedelta(hours=1)
    assert not p.is_closed(datetime(2025, 2, 1, 0, 59, tzinfo=UTC), grace)
    assert p.is_closed(datetime(2025, 2, 1, 1, 0, tzinfo=UTC), grace)
    assert p.due_date(30) == datetime(2025, 3, 3, tzinfo=UTC)
