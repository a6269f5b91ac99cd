"""``generate-invoice`` (one tenant's invoice for a period: table, JSON or HTML) and
``invoices`` (all of a tenant's invoices)."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import typer
from rich.table import Table

from billing import invoice_store, invoicing
from billing.alerts import store as alert_store
from billing.alerts.model import AlertRecord
from billing.model import (
    CREDIT_LINES,
    EARLIER_PERIODS,
    Invoice,
    InvoiceStatus,
    add_up,
    money,
    plain,
)
from billing.render.invoice_json import invoice_json
from pf_metering.commands.books import (
    STRIPE_OPTION,
    TABLE_JSON_OPTION,
    InvoiceFormat,
    TableOrJson,
    billing,
    quotas_table,
    read_usage,
    right,
    table_or_json,
    tenant_period,
    utc_now,
)
from pf_metering.commands.common import (
    OUTPUT_OPTION,
    PERIOD_ARGUMENT,
    TENANT_ARGUMENT,
    check_tenant,
    output_path,
    settings_of,
)
from pf_metering.commands.stripe_cmds import push_to_stripe, stripe_requested
from pf_metering.output import readable, render, write


def _alerts_table(alerts: list[AlertRecord]) -> Table:
    table = Table(title="Usage alerts")
    for name in ("threshold", "crossed at", "at", "status", "attempts"):
        table.add_column(name)
    for a in alerts:
        crossed = f"{a.crossed_at.astimezone(UTC):%Y-%m-%d %H:%M}Z"
        table.add_row(a.describe(), crossed, a.observed, a.status, str(a.attempts))
    return table


def _invoice_table(invoice: Invoice, now: datetime, alerts: list[AlertRecord]) -> Table:
    from billing.render.invoice_html import part_label

    status = invoice.status_on(now).value
    head = (
        f"Invoice {invoice.invoice_id}: {invoice.tenant_id}, {invoice.period}, tier "
        f"{invoice.tier}, {status}"
    )
    lines = Table(title=head, caption=_invoice_caption(invoice))
    lines.add_column("code")
    lines.add_column("description", overflow="fold")
    right(lines, "quantity", "unit price", f"amount ({invoice.currency})")
    for ln in invoice.lines:
        amount = money(ln.amount)
        price = "-" if ln.parts else plain(ln.unit_price, 2)
        lines.add_row(ln.code, ln.description, readable(ln.quantity), price, amount)
        for part in ln.parts or []:
            lines.add_row(
                "",
                f"  {part_label(part)}",
                readable(part.quantity),
                plain(part.unit_price, 2),
                plain(part.amount, 2),
            )
    lines.add_section()
    lines.add_row("subtotal", "base + usage", "", "", money(invoice.subtotal))
    lines.add_row("total", "", "", "", money(invoice.total))
    if invoice.credit_balance or any(ln.code in CREDIT_LINES for ln in invoice.lines):
        balance = money(invoice.credit_balance)
        lines.add_row("credit balance", "remaining after this invoice", "", "", balance)
    grid = Table.grid(padding=(1, 0))
    grid.add_row(lines)
    if invoice.quotas:
        grid.add_row(quotas_table(invoice.quotas, "Quotas"))
    if alerts:
        grid.add_row(_alerts_table(alerts))
    return grid


def _invoice_caption(invoice: Invoice) -> str:
    parts = [f"due {invoice.due_date.date()}", f"created {invoice.created_at:%Y-%m-%d %H:%M}Z"]
    if invoice.issued_late:
        parts.append("issued after its period's due date: due counted from the issue")
    if invoice.stripe_invoice_id:
        parts.append(f"stripe {invoice.stripe_invoice_id}")
    if invoice.status is InvoiceStatus.draft:
        parts.append("draft: recomputed until the period closes")
    return ", ".join(parts)


def generate_invoice(
    ctx: typer.Context,
    tenant_id: str = TENANT_ARGUMENT,
    period: str = PERIOD_ARGUMENT,
    output: Path = OUTPUT_OPTION,
    stripe: bool = STRIPE_OPTION,
    fmt: InvoiceFormat | None = typer.Option(
        None, "-f", "--format", help="table, json or html (default: table; json with -o)"
    ),
) -> None:
    """The invoice of a tenant for a period: finalized once the period is closed (then never
    changes), else a draft preview recomputed on each call; always the same invoice_id."""
    cfg = settings_of(ctx)
    asked = tenant_period(cfg, tenant_id, period, output=output)
    target, out = asked.period, output
    with billing(cfg) as con:
        invoice = invoicing.generate(con, asked.usage, asked.rules, tenant_id, target)
        alerts = alert_store.list_alerts(con, tenant_id, [str(target)])
    if stripe_requested(cfg, stripe):
        if invoice.status is InvoiceStatus.finalized and invoice.stripe_invoice_id is None:
            push_to_stripe(cfg, [invoice])
            with billing(cfg) as con:
                invoice = invoice_store.get_invoice(con, invoice.invoice_id) or invoice
        elif invoice.status is InvoiceStatus.draft:
            print(f"{target} is still open: draft invoices are not pushed", file=sys.stderr)
    now = utc_now()
    if fmt is InvoiceFormat.html:
        from billing.render.invoice_html import render_invoice_html

        write(render_invoice_html(invoice, now=now, alerts=alerts), out)
        return
    render(
        table_or_json(fmt, output),
        out,
        json_data=invoice_json(invoice, now, alerts),
        table=lambda: _invoice_table(invoice, now, alerts),
    )


def _due(invoice: Invoice) -> str:
    return f"{invoice.due_date.date()}" + (" (issued late)" if invoice.issued_late else "")


def _earlier_summary(invoice: Invoice) -> str:
    """Per earlier period, what this invoice carries for it (late usage and corrections)."""
    per: dict[str, list[Decimal]] = {}
    for ln in invoice.lines:
        if ln.code in EARLIER_PERIODS:
            per.setdefault(ln.period or "", []).append(ln.amount)
    return ", ".join(f"{period}: {money(add_up(amounts))}" for period, amounts in per.items())


def _credit(invoice: Invoice) -> str:
    amounts = [ln.amount for ln in invoice.lines if ln.code in CREDIT_LINES]
    return money(add_up(amounts)) if amounts else ""


def invoices_cmd(
    ctx: typer.Context,
    tenant_id: str = TENANT_ARGUMENT,
    output: Path = OUTPUT_OPTION,
    fmt: TableOrJson | None = TABLE_JSON_OPTION,
) -> None:
    """All invoices of a tenant, oldest first, with what each carries for earlier periods
    (late usage, corrections), its credit line and the credit balance left after it."""
    cfg = settings_of(ctx)
    check_tenant(tenant_id)
    out = output_path(output)
    usage = read_usage(cfg, tenant_id)
    with billing(cfg) as con:
        invoicing.known_tenant(con, usage, tenant_id)
        found = invoice_store.list_invoices(con, tenant_id)
        alerts = alert_store.list_alerts(con, tenant_id)
    now = utc_now()

    def table() -> Table:
        table = Table(title=f"{len(found)} invoices of {tenant_id}")
        for name in ("invoice_id", "period", "tier", "status"):
            table.add_column(name)
        right(table, "subtotal")
        table.add_column("earlier periods (period: amount)")
        right(table, "credit", "total", "credit balance")
        for name in ("due", "stripe_invoice_id"):
            table.add_column(name)
        for inv in found:
            table.add_row(inv.invoice_id, inv.period, inv.tier, inv.status_on(now).value,
                          money(inv.subtotal), _earlier_summary(inv), _credit(inv),
                          money(inv.total), money(inv.credit_balance), _due(inv),
                          inv.stripe_invoice_id or "")  # fmt: skip
        return table

    render(
        table_or_json(fmt, output),
        out,
        json_data=[invoice_json(inv, now, alerts) for inv in found],
        table=table,
    )


def register(app: typer.Typer) -> None:
    app.command("generate-invoice")(generate_invoice)
    app.command("invoices")(invoices_cmd)
