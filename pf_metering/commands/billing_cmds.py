"""Billing commands: tiers, tenants, usage, generate-invoice, invoices, bill, export-metrics.

Usage comes from the published snapshot (a freshness line goes to stderr); billing state from
the billing DuckDB file, opened for one unit of work at a time. ``-o`` writes to a file; where
the original tool's ``-o`` saved JSON (tiers, generate-invoice, invoices), JSON is the default
format when ``-o`` is given.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import typer
from rich.table import Table

from aggregator.views import open_usage
from billing import invoice_store, invoicing, tenants
from billing.db import billing_db, transaction
from billing.invoicing import Rules, UsageData
from billing.model import Invoice, InvoiceStatus, QuotaUsage, money, plain
from billing.rating import quota_report
from billing.tiers import PRICE_FIELDS, Tier, get_tier, load_tiers
from common.errors import UserError
from common.settings import settings
from pf_metering.commands.common import (
    FORMAT_OPTION,
    OUTPUT_OPTION,
    QUIET_OPTION,
    check_tenant,
    output_path,
    parse_period,
)
from pf_metering.commands.stripe_cmds import PushFailed, push_to_stripe, stripe_requested
from pf_metering.output import Format, render, rows_table, write
from pf_metering.progress import status
from schemas.codec import COUNTERS
from schemas.periods import Period

if TYPE_CHECKING:
    from billing.stripe.push import PushResult


class TableOrJson(StrEnum):
    table = "table"
    json = "json"


class InvoiceFormat(StrEnum):
    table = "table"
    json = "json"
    html = "html"


TABLE_JSON_OPTION = typer.Option(
    None, "-f", "--format", help="table or json (default: table; json with -o)"
)
STRIPE_OPTION = typer.Option(
    False, "--stripe", help="push finalized invoices to Stripe (also: STRIPE_ENABLED=true)"
)


def _format(fmt: TableOrJson | InvoiceFormat | None, output: Path | None) -> Format:
    if fmt is None:
        return Format.json if output is not None else Format.table
    return Format(fmt.value)


def _now() -> datetime:
    return datetime.now(UTC)


@contextmanager
def _billing() -> Iterator[duckdb.DuckDBPyConnection]:
    cfg = settings()
    with billing_db(cfg.billing_db, cfg.metering_lock_timeout) as con:
        yield con


def _read_usage(tenant_id: str | None = None, *, quiet: bool = False) -> UsageData:
    """The snapshot's usage (all tenants, or one), saying how fresh it is on stderr."""
    cfg = settings()
    reader = open_usage(cfg.snapshot_dir, cfg.metering_topic)
    try:
        if not quiet:
            print(reader.freshness.describe(), file=sys.stderr)
        return UsageData.read(reader, tenant_id)
    finally:
        reader.close()


def _rules() -> Rules:
    return Rules.from_settings(settings())


def _right(table: Table, *names: str) -> None:
    for name in names:
        table.add_column(name, justify="right")


# --- tiers ----------------------------------------------------------------------------------


def _tier_json(tier: Tier) -> dict[str, Any]:
    prices = {field: plain(tier.price_of(code), 2) for code, field in PRICE_FIELDS.items()}
    return {
        "name": tier.name,
        "display_name": tier.display_name,
        "currency": "usd",
        "base_price_usd": plain(tier.base_price_usd, 2),
        **prices,
        "risk_multiplier": plain(tier.risk_multiplier, 1),
        "quota_mode": tier.quota_mode,
        "quotas": tier.quotas.model_dump(exclude_none=True),
    }


def _tiers_table(data: list[dict[str, Any]]) -> Table:
    table = Table(title="Billing tiers (usd; network per MiB, cpu per ms)")
    table.add_column("field")
    for tier in data:
        table.add_column(tier["name"], justify="right")
    fields = [k for k in data[0] if k not in ("name", "quotas")]
    for field in fields:
        table.add_row(field, *(str(t[field]) for t in data))
    quota_keys = sorted({k for t in data for k in t["quotas"]})
    for key in quota_keys:
        limits = (t["quotas"].get(key) for t in data)
        table.add_row(f"quota {key}", *("-" if v is None else f"{v:,}" for v in limits))
    return table


def tiers_cmd(fmt: TableOrJson | None = TABLE_JSON_OPTION, output: Path = OUTPUT_OPTION) -> None:
    """List billing tiers with every price and quota (built in, plus METERING_TIERS_FILE)."""
    data = [_tier_json(t) for t in load_tiers(settings().metering_tiers_file).values()]
    render(
        _format(fmt, output), output_path(output), json_data=data, table=lambda: _tiers_table(data)
    )


# --- tenants --------------------------------------------------------------------------------

tenants_app = typer.Typer(help="The tenant registry and tier history.", no_args_is_help=True)


def _tenant_json(tenant: tenants.Tenant, now: datetime) -> dict[str, Any]:
    return {
        "tenant_id": tenant.tenant_id,
        "tier": tenant.tier_for(Period.of(now)),
        "first_period": str(tenant.first_period),
        "first_usage_period": str(tenant.first_usage) if tenant.first_usage else None,
        "added_at": tenant.added_at.astimezone(UTC) if tenant.added_at else None,
        "tier_history": [{"from": str(c.effective_from), "tier": c.tier} for c in tenant.history],
    }


@tenants_app.command("add")
def tenants_add(
    tenant_id: str = typer.Argument(..., help="tenant identifier, e.g. acme-corp"),
    tier: str = typer.Option(None, "--tier", help="its tier for every period (default: basic)"),
) -> None:
    """Register a tenant (it also exists once it has sent an event)."""
    check_tenant(tenant_id)
    if tier is not None:
        get_tier(load_tiers(settings().metering_tiers_file), tier)
    usage = _read_usage(tenant_id, quiet=True)
    now = _now()
    with _billing() as con, transaction(con):
        known = tenants.load_tenants(con, usage.first_periods(), tenant_id).get(tenant_id)
        added = tenants.add_tenant(con, known, tenant_id, tier, now)
        current = tenants.load_tenants(con, usage.first_periods(), tenant_id)[tenant_id]
    state = "added" if added else "already registered:"
    print(f"{state} tenant {tenant_id}, tier {current.tier_for(Period.of(now))}", file=sys.stderr)


@tenants_app.command("set-tier")
def tenants_set_tier(
    tenant_id: str = typer.Argument(..., help="tenant identifier"),
    tier: str = typer.Argument(..., help="tier name, e.g. professional"),
    start: str = typer.Option(
        None, "--from", help="first period rated with TIER, YYYY-MM (default: this month)"
    ),
) -> None:
    """Change a tenant's tier from a period on; earlier periods keep their tier."""
    check_tenant(tenant_id)
    get_tier(load_tiers(settings().metering_tiers_file), tier)
    now = _now()
    period = parse_period(start) if start is not None else Period.of(now)
    usage = _read_usage(tenant_id, quiet=True)
    with _billing() as con, transaction(con):
        invoicing.known_tenant(con, usage, tenant_id)
        tenants.set_tier(con, tenant_id, tier, period, now)
    print(f"tenant {tenant_id}: tier {tier} from {period}", file=sys.stderr)


@tenants_app.command("list")
def tenants_list(fmt: Format = FORMAT_OPTION, output: Path = OUTPUT_OPTION) -> None:
    """Every known tenant with its current tier, first period and tier history."""
    usage = _read_usage()
    now = _now()
    with _billing() as con:
        known = tenants.load_tenants(con, usage.first_periods())
    rows = [_tenant_json(known[t], now) for t in sorted(known)]

    def flat() -> list[dict[str, Any]]:
        return [
            {
                **r,
                "tier_history": "; ".join(
                    f"{h['tier']} from {h['from']}" for h in r["tier_history"]
                ),
            }
            for r in rows
        ]

    render(
        fmt,
        output_path(output),
        json_data=rows,
        csv_rows=flat,
        table=lambda: rows_table(flat(), title=f"{len(rows)} tenants"),
    )


# --- usage ----------------------------------------------------------------------------------


def _quota_json(q: QuotaUsage) -> dict[str, Any]:
    return {
        "quota": q.quota,
        "used": plain(q.used),
        "limit": plain(q.limit),
        "utilisation_pct": plain(q.utilisation_pct, 2) if q.utilisation_pct is not None else None,
        "exceeded": q.exceeded,
    }


def _quotas_table(quotas: Sequence[QuotaUsage], title: str) -> Table:
    table = Table(title=title)
    table.add_column("quota")
    _right(table, "used", "limit", "utilisation %")
    table.add_column("exceeded")
    for q in quotas:
        j = _quota_json(q)
        table.add_row(q.quota, j["used"], j["limit"], j["utilisation_pct"] or "-",
                      "YES" if q.exceeded else "no")  # fmt: skip
    return table


def usage_cmd(
    tenant_id: str = typer.Argument(..., help="tenant identifier"),
    period: str = typer.Argument(..., help="billing period, YYYY-MM"),
    fmt: Format = FORMAT_OPTION,
    output: Path = OUTPUT_OPTION,
) -> None:
    """Usage totals of a tenant in a period, with quota utilisation for its tier."""
    check_tenant(tenant_id)
    target = parse_period(period)
    usage = _read_usage(tenant_id)
    rules = _rules()
    with _billing() as con:
        tenant = invoicing.known_tenant(con, usage, tenant_id)
    tier = get_tier(rules.tiers, tenant.tier_for(target))
    row = usage.row(tenant_id, target) or {}
    quotas = quota_report(tier, usage.usage(tenant_id, target))
    data: dict[str, Any] = {"tenant_id": tenant_id, "period": str(target), "tier": tier.name}
    for key in ("events", "sessions", *COUNTERS):
        data[key] = int(row.get(key) or 0)
    data["risk_score_avg"] = row.get("risk_score_avg")
    data["risk_score_max"] = row.get("risk_score_max")
    data["quotas"] = [_quota_json(q) for q in quotas]

    def csv_rows() -> list[dict[str, Any]]:
        flat = {k: v for k, v in data.items() if k != "quotas"}
        for q in data["quotas"]:
            flat[f"quota_{q['quota']}_pct"] = q["utilisation_pct"]
            flat[f"quota_{q['quota']}_exceeded"] = q["exceeded"]
        return [flat]

    def table() -> Table:
        grid = Table.grid(padding=(1, 0))
        facts = Table(title="Usage")
        facts.add_column("metric")
        _right(facts, "value")
        for key, value in data.items():
            if key in ("tenant_id", "period", "tier"):
                facts.add_row(key, value)
            elif key != "quotas":
                facts.add_row(key, "-" if value is None else f"{value:,}")
        grid.add_row(facts)
        grid.add_row(_quotas_table(quotas, "Quotas"))
        return grid

    render(fmt, output_path(output), json_data=data, csv_rows=csv_rows, table=table)


# --- invoices -------------------------------------------------------------------------------


def invoice_json(invoice: Invoice, now: datetime) -> dict[str, Any]:
    """SPEC 8's invoice document: money as decimal strings, every line explained."""
    lines = []
    for ln in invoice.lines:
        line: dict[str, Any] = {
            "code": ln.code,
            "description": ln.description,
            "quantity": plain(ln.quantity),
            "unit_price": plain(ln.unit_price, 2),
            "amount": money(ln.amount),
        }
        if ln.period is not None:
            line["period"] = ln.period
        lines.append(line)
    return {
        "invoice_id": invoice.invoice_id,
        "tenant_id": invoice.tenant_id,
        "period": invoice.period,
        "period_start": invoice.period_start,
        "period_end": invoice.period_end,
        "tier": invoice.tier,
        "currency": invoice.currency,
        "status": invoice.status_on(now).value,
        "lines": lines,
        "subtotal": money(invoice.subtotal),
        "total": money(invoice.total),
        "due_date": invoice.due_date,
        "created_at": invoice.created_at,
        "finalized_at": invoice.finalized_at,
        "stripe_invoice_id": invoice.stripe_invoice_id,
        "quotas": [_quota_json(q) for q in invoice.quotas],
        "computed_from": invoice.computed_from,
    }


def _invoice_table(invoice: Invoice, now: datetime) -> Table:
    status = invoice.status_on(now).value
    head = (
        f"Invoice {invoice.invoice_id}: {invoice.tenant_id}, {invoice.period}, tier "
        f"{invoice.tier}, {status}"
    )
    lines = Table(title=head, caption=_invoice_caption(invoice))
    lines.add_column("code")
    lines.add_column("description", overflow="fold")
    _right(lines, "quantity", "unit price", f"amount ({invoice.currency})")
    for ln in invoice.lines:
        lines.add_row(ln.code, ln.description, plain(ln.quantity), plain(ln.unit_price, 2),
                      money(ln.amount))  # fmt: skip
    lines.add_section()
    lines.add_row("subtotal", "base + usage", "", "", money(invoice.subtotal))
    lines.add_row("total", "", "", "", money(invoice.total))
    grid = Table.grid(padding=(1, 0))
    grid.add_row(lines)
    if invoice.quotas:
        grid.add_row(_quotas_table(invoice.quotas, "Quotas"))
    return grid


def _invoice_caption(invoice: Invoice) -> str:
    parts = [f"due {invoice.due_date.date()}", f"created {invoice.created_at:%Y-%m-%d %H:%M}Z"]
    if invoice.stripe_invoice_id:
        parts.append(f"stripe {invoice.stripe_invoice_id}")
    if invoice.status is InvoiceStatus.draft:
        parts.append("draft: recomputed until the period closes")
    return ", ".join(parts)


def generate_invoice(
    tenant_id: str = typer.Argument(..., help="tenant identifier"),
    period: str = typer.Argument(..., help="billing period, YYYY-MM"),
    output: Path = OUTPUT_OPTION,
    stripe: bool = STRIPE_OPTION,
    fmt: InvoiceFormat | None = typer.Option(
        None, "-f", "--format", help="table, json or html (default: table; json with -o)"
    ),
) -> None:
    """The invoice of a tenant for a period: finalized once the period is closed (then never
    changes), else a draft preview recomputed on each call; always the same invoice_id."""
    check_tenant(tenant_id)
    target = parse_period(period)
    out = output_path(output)
    usage = _read_usage(tenant_id)
    rules = _rules()
    with _billing() as con:
        invoice = invoicing.generate(con, usage, rules, tenant_id, target)
    if stripe_requested(stripe):
        if invoice.status is InvoiceStatus.finalized and invoice.stripe_invoice_id is None:
            push_to_stripe([invoice])
            with _billing() as con:
                invoice = invoice_store.get_invoice(con, invoice.invoice_id) or invoice
        elif invoice.status is InvoiceStatus.draft:
            print(f"{target} is still open: draft invoices are not pushed", file=sys.stderr)
    now = _now()
    if fmt is InvoiceFormat.html:
        from billing.render.invoice_html import render_invoice_html

        write(render_invoice_html(invoice, now=now), out)
        return
    render(
        _format(fmt, output),
        out,
        json_data=invoice_json(invoice, now),
        table=lambda: _invoice_table(invoice, now),
    )


def _late_summary(invoice: Invoice) -> str:
    return ", ".join(
        f"{ln.period}: {money(ln.amount)}" for ln in invoice.lines if ln.code == "late_usage"
    )


def invoices_cmd(
    tenant_id: str = typer.Argument(..., help="tenant identifier"),
    output: Path = OUTPUT_OPTION,
    fmt: TableOrJson | None = TABLE_JSON_OPTION,
) -> None:
    """All invoices of a tenant, oldest first (late-usage corrections included)."""
    check_tenant(tenant_id)
    out = output_path(output)
    usage = _read_usage(tenant_id)
    with _billing() as con:
        invoicing.known_tenant(con, usage, tenant_id)
        found = invoice_store.list_invoices(con, tenant_id)
    now = _now()

    def table() -> Table:
        table = Table(title=f"{len(found)} invoices of {tenant_id}")
        for name in ("invoice_id", "period", "tier", "status"):
            table.add_column(name)
        _right(table, "subtotal", "total")
        table.add_column("late usage (period: amount)")
        table.add_column("due")
        table.add_column("stripe_invoice_id")
        for inv in found:
            table.add_row(inv.invoice_id, inv.period, inv.tier, inv.status_on(now).value,
                          money(inv.subtotal), money(inv.total), _late_summary(inv),
                          str(inv.due_date.date()), inv.stripe_invoice_id or "")  # fmt: skip
        return table

    render(
        _format(fmt, output),
        out,
        json_data=[invoice_json(inv, now) for inv in found],
        table=table,
    )


# --- bill -----------------------------------------------------------------------------------


def _parse_as_of(text: str | None, now: datetime) -> datetime:
    if text is None:
        return now
    try:
        moment = datetime.fromisoformat(text.strip())
        moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except (ValueError, OverflowError):
        raise UserError(
            f"invalid --as-of {text[:40]!r}: expected ISO-8601, e.g. 2025-02-01T02:00:00Z"
        ) from None
    if moment > now:
        raise UserError(f"--as-of {text} lies in the future")
    if moment.year < 1970:  # no period before 1970 exists; earlier instants overflow
        raise UserError(f"--as-of {text[:40]} lies before 1970")
    return moment


def bill(
    as_of: str = typer.Option(
        None, "--as-of", help="close periods as of this ISO-8601 time (default: now)"
    ),
    stripe: bool = STRIPE_OPTION,
    quiet: bool = QUIET_OPTION,
    metrics_file: Path = typer.Option(
        None, "--metrics-file", help="write job metrics here (node-exporter textfile)"
    ),
) -> None:
    """The nightly job: finalize every closed, not yet invoiced period of every tenant (from its
    first period, base fee even without usage), with late-usage corrections; then push."""
    now = _now()
    moment = _parse_as_of(as_of, now)
    finalized, ok = 0, False
    pushes: list[PushResult] = []
    try:
        finalized, pushes = _run_bill(moment, now, stripe, quiet)
        ok = True
    except PushFailed as exc:
        pushes = exc.results
        raise
    finally:
        if metrics_file is not None:
            from billing.job_metrics import BillRun, write_job_metrics

            write_job_metrics(metrics_file, BillRun.of(finalized, pushes, succeeded=ok))


def _run_bill(
    moment: datetime, now: datetime, stripe: bool, quiet: bool
) -> tuple[int, list[PushResult]]:
    """Finalize, report, push; returns (invoices finalized, push results)."""
    usage = _read_usage(quiet=quiet)
    rules = _rules()
    with (
        status(f"billing {len(usage.rows)} tenant-periods of usage", quiet),
        _billing() as con,
    ):
        result = invoicing.bill(con, usage, rules, as_of=moment, now=now)
    if not quiet:
        total = sum((inv.total for inv in result.invoices), Decimal(0))
        print(
            f"billed through {result.last_closed}: {len(result.invoices)} invoice(s) finalized "
            f"for {result.tenants} tenant(s), {result.late_lines} late-usage line(s), "
            f"total {money(total)} usd",
            file=sys.stderr,
        )
    pushes: list[PushResult] = []
    if stripe_requested(stripe):
        with _billing() as con:
            pending = invoice_store.finalized_unsent(con)
        pushes = push_to_stripe(pending)
    return len(result.invoices), pushes


# --- export-metrics -------------------------------------------------------------------------


def export_metrics(output: Path = OUTPUT_OPTION) -> None:
    """Per-tenant, per-period usage in Prometheus text exposition format."""
    from billing.render.prometheus_export import exposition  # only this command needs the library

    out = output_path(output)
    usage = _read_usage()
    write(exposition(usage.rows.values()), out)


def register(app: typer.Typer) -> None:
    app.command("tiers")(tiers_cmd)
    app.add_typer(tenants_app, name="tenants")
    app.command("usage")(usage_cmd)
    app.command("generate-invoice")(generate_invoice)
    app.command("invoices")(invoices_cmd)
    app.command("bill")(bill)
    app.command("export-metrics")(export_metrics)
