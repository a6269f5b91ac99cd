"""``report``: a tenant's usage over a range of periods, with its invoices, as an HTML page.

Reads like the other commands: usage from the published snapshot (says how fresh on stderr),
invoices from the billing file; it never creates or changes an invoice.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

import typer

from aggregator.views import UsageReader, usage_reader
from billing import invoice_store, invoicing
from billing.alerts import store as alert_store
from billing.invoicing import Rules, UsageData
from billing.render.report_html import (
    AppliedCorrection,
    PeriodUsage,
    UsageReport,
    render_report_html,
)
from billing.tiers import get_tier
from common.errors import UserError
from pf_metering.commands.common import (
    OUTPUT_OPTION,
    QUIET_OPTION,
    TENANT_ARGUMENT,
    billing_connect,
    check_tenant,
    output_path,
    parse_period,
    settings_of,
)
from pf_metering.output import write
from schemas.codec import COUNTERS
from schemas.periods import Period

DEFAULT_MONTHS = 12
MAX_PERIODS = 120


def _range(start: str | None, end: str | None, now: datetime) -> list[Period]:
    last = parse_period(end, "--to", now=now) if end is not None else Period.of(now)
    first = parse_period(start, "--from", now=now) if start is not None else last
    if start is None:
        for _ in range(DEFAULT_MONTHS - 1):
            first = first.previous()
    if first > last:
        raise UserError(f"--from {first} is after --to {last}")
    periods = list(first.through(last))
    if len(periods) > MAX_PERIODS:
        raise UserError(f"{len(periods)} periods asked; a report covers at most {MAX_PERIODS}")
    return periods


def _corrections(
    reader: UsageReader, tenant_id: str, periods: list[str]
) -> list[AppliedCorrection]:
    """The corrections applied to ``tenant_id`` in ``periods``, oldest first."""
    rows = reader.con.execute(
        "SELECT period, event_id, corrects_event_id, reason, applied_at, "
        f"{', '.join(COUNTERS)} FROM corrections WHERE tenant_id = ? AND period IN "
        f"({', '.join('?' for _ in periods)}) ORDER BY applied_at, period, event_id",
        [tenant_id, *periods],
    ).fetchall()
    return [
        AppliedCorrection(
            period=r[0],
            event_id=r[1],
            corrects_event_id=r[2],
            reason=r[3],
            applied_at=r[4],
            deltas={c: int(v) for c, v in zip(COUNTERS, r[5:], strict=True) if v},
        )
        for r in rows
    ]


def report(
    ctx: typer.Context,
    tenant_id: str = TENANT_ARGUMENT,
    start: str = typer.Option(
        None, "--from", help=f"first period, YYYY-MM (default: {DEFAULT_MONTHS} months to --to)"
    ),
    end: str = typer.Option(None, "--to", help="last period, YYYY-MM (default: this month)"),
    output: Path = OUTPUT_OPTION,
    quiet: bool = QUIET_OPTION,
) -> None:
    """A tenant's usage per counter over periods (charts, quotas) with their invoices, the
    corrections applied and the alerts sent, as one self-contained HTML page (write it with
    -o FILE.html)."""
    check_tenant(tenant_id)
    now = datetime.now(UTC)
    periods = _range(start, end, now)
    out = output_path(output)
    cfg = settings_of(ctx)
    reader = usage_reader(cfg)
    try:
        freshness = reader.freshness.describe()
        usage = UsageData.read(reader, tenant_id)
        corrections = _corrections(reader, tenant_id, [str(p) for p in periods])
    finally:
        reader.close()
    if not quiet:
        print(freshness, file=sys.stderr)
    rules = Rules.from_settings(cfg)
    wanted = {str(p) for p in periods}
    with billing_connect(cfg)() as con:
        tenant = invoicing.known_tenant(con, usage, tenant_id)
        invoices = [i for i in invoice_store.list_invoices(con, tenant_id) if i.period in wanted]
        alerts = alert_store.list_alerts(con, tenant_id, sorted(wanted))
    rows = [
        PeriodUsage.of(p, get_tier(rules.tiers, tenant.tier_for(p)), usage.row(tenant_id, p))
        for p in periods
    ]
    page = render_report_html(
        UsageReport(tenant_id, rows, invoices, freshness, now, alerts, corrections)
    )
    write(page, out)


def register(app: typer.Typer) -> None:
    app.command("report")(report)
