"""Backfill (issue 17, point 9): one old month billed today. First period and tier history
agree with what is billed, invoices issued after their due date say so and are due counted
from their issue (not overdue on arrival), and ``bill`` says what it is about to create."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from schemas.periods import Period
from tests.fixtures.cli import Cli
from tests.fixtures.seeds import SEED, event


def test_a_backfilled_month_billed_today(pfm: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    now = datetime.now(UTC)
    last_closed = Period.of(now - timedelta(hours=2)).previous()
    months = 0
    period = Period(2025, 1)
    while period <= last_closed:
        months, period = months + 1, period.next()
    assert pfm("tenants", "add", "acme", "--tier", "professional").code == 0
    pfm.publish(event("acme", "2025-01", **SEED))

    run = pfm("bill")  # (no --as-of: issued now)
    assert run.code == 0, run.err
    assert f"acme: finalizing {months} invoices, 2025-01 to {last_closed}" in run.err, run.err

    invoices = pfm("invoices", "acme", "-f", "json").json()
    assert [i["period"] for i in invoices][:2] == ["2025-01", "2025-02"]
    first = invoices[0]
    assert first["issued_late"] is True and first["status"] == "finalized", first
    due = datetime.fromisoformat(first["due_date"])
    assert due > now + timedelta(days=29), first["due_date"]  # counted from the issue
    assert "issued after its period's due date" in pfm("generate-invoice", "acme", "2025-01").out
    assert "(issued late)" in pfm("invoices", "acme").out

    def listed() -> dict[str, object]:
        (tenant,) = pfm("tenants", "list", "-f", "json").json()
        return dict(tenant)

    tenant = listed()
    assert tenant["first_period"] == "2025-01"
    assert tenant["tier_history"] == [{"from": "2025-01", "tier": "professional"}]
    monkeypatch.setenv("METERING_TOPIC", "another.topic")  # usage out of sight: still billed
    assert listed()["first_period"] == "2025-01"


def test_bill_on_time_keeps_the_regular_due_date(pfm: Cli) -> None:
    pfm.publish(event("acme", "2025-01", **SEED))
    assert pfm("bill", "--as-of", "2025-02-01T02:00:00Z").code == 0
    (invoice,) = pfm("invoices", "acme", "-f", "json").json()
    assert invoice["issued_late"] is False
    assert invoice["due_date"].startswith("2025-03-03")
