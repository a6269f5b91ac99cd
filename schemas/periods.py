"""Billing periods: calendar months in UTC, written ``YYYY-MM`` (pure).

An event belongs to the period of its ``occurred_at`` (``period_of``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

_PERIOD_RE = re.compile(r"([0-9]{4})-(0[1-9]|1[0-2])")  # ASCII digits only, whole string
FORM = "expected YYYY-MM from 1970-01 on, e.g. 2025-01"


@dataclass(frozen=True, order=True)
class Period:
    year: int
    month: int

    @classmethod
    def parse(cls, text: str) -> Period:
        """Strict ``YYYY-MM`` from 1970-01 on, the whole text: 2025-13, 2025-1, 25-01, an
        empty text and one with spaces around it are errors (ValueError naming the form)."""
        m = _PERIOD_RE.fullmatch(text) if isinstance(text, str) else None
        if not m or int(m.group(1)) < 1970:
            raise ValueError(f"invalid period {text!r}: {FORM}")
        return cls(int(m.group(1)), int(m.group(2)))

    @classmethod
    def of(cls, moment: datetime) -> Period:
        moment = moment.astimezone(UTC)
        return cls(moment.year, moment.month)

    @property
    def start(self) -> datetime:
        """The first instant of the month, UTC."""
        return datetime(self.year, self.month, 1, tzinfo=UTC)

    @property
    def end(self) -> datetime:
        """The first instant of the next month, UTC (exclusive)."""
        return self.next().start

    def next(self) -> Period:
        return Period(self.year + self.month // 12, self.month % 12 + 1)

    def previous(self) -> Period:
        return Period(self.year - (self.month == 1), (self.month - 2) % 12 + 1)

    def through(self, last: Period) -> Iterator[Period]:
        """This period and each one after it up to ``last`` (none if ``last`` is earlier)."""
        period = self
        while period <= last:
            yield period
            period = period.next()

    def is_closed(self, now: datetime, grace: timedelta) -> bool:
        return now >= self.end + grace

    def due_date(self, due_days: int) -> datetime:
        return self.end + timedelta(days=due_days)

    def __str__(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"


def oldest_billable_start(now_micros: int, horizon_months: int) -> int | None:
    """The first instant (microseconds) of the oldest period that can still be billed at
    ``now_micros`` (wall clock): a period stays billable for its own month plus
    ``horizon_months`` after it ends, so at any moment of May with a 3-month horizon
    February is the oldest (January ended February 1st; its horizon ended May 1st).
    None: ``horizon_months`` is 0, every period stays billable forever."""
    if horizon_months == 0:
        return None
    p = Period.of(datetime.fromtimestamp(now_micros / 1_000_000, UTC))
    months = p.year * 12 + p.month - 1 - horizon_months
    oldest = Period(months // 12, months % 12 + 1)
    return int(oldest.start.timestamp()) * 1_000_000


def period_of(micros: int) -> str:
    """The ``YYYY-MM`` of a timestamp in microseconds since the epoch, UTC."""
    moment = datetime.fromtimestamp(micros / 1_000_000, UTC)
    return str(Period(moment.year, moment.month))
