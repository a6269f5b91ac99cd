"""``generate-invoice`` (one tenant's invoice for a period: table, JSON or HTML) and
``invoices`` (all of a tenant's invoices; ``invoices void`` and ``invoices reissue``).

``invoices T`` lists T's invoices (``invoices list T`` is the same): the group runs ``list``
when its first word names none of its commands, so the listing keeps its old command line."""

from __future__ import annotations

import getpass
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import click
import typer
from rich.table import Table
from typer.core import TyperGroup

from aggregator.views import usage_reader
from billing import invoice_store, invoicing
from billing.alerts import store as alert_store
from billing.alerts.model import AlertRecord
from billing.explain import explain as explain_lines
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
from common.errors import UserError
from common.settings import Settings
from pf_metering.commands.books import (
    INVOICE_FORMAT_OPTION,
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
    QUIET_OPTION,
    TENANT_ARGUMENT,
    check_tenant,
    output_path,
    settings_of,
)
from pf_metering.commands.stripe_cmds import push_to_stripe, stripe_requested, void_in_stripe
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
    if invoice.status is InvoiceStatus.void:
        parts.append(_void_note(invoice))
    if invoice.replaces:
        parts.append(f"replaces void {invoice.replaces}")
    if invoice.lake_snapshot is not None:  # (last: the caption before it wraps as before)
        parts.append(f"computed at lake snapshot {invoice.lake_snapshot}")
    return ", ".join(parts)


def _void_note(invoice: Invoice) -> str:
    note = f"VOID {invoicing.void_note(invoice)}"
    return note + (f"; replaced by {invoice.replaced_by}" if invoice.replaced_by else "")


def generate_invoice(
    ctx: typer.Context,
    tenant_id: str = TENANT_ARGUMENT,
    period: str = PERIOD_ARGUMENT,
    output: Path = OUTPUT_OPTION,
    stripe: bool = STRIPE_OPTION,
    fmt: InvoiceFormat | None = INVOICE_FORMAT_OPTION,
    explain: bool = typer.Option(
        False,
        "--explain",
        help="cluster mode: each line's quantity recomputed at the invoice's lake snapshot",
    ),
) -> None:
    """The invoice of a tenant for a period: finalized once the period is closed (then never
    changes), else a draft preview recomputed on each call; always the same invoice_id. A
    closed period whose invoice was voided is billed again: a new invoice that replaces it
    (with Stripe, the void one is voided there first if that is still to do). With --explain,
    each line beside its quantity recomputed from the usage at the DuckLake snapshot the
    invoice records (time travel), to prove an amount later."""
    cfg = settings_of(ctx)
    if explain and fmt is InvoiceFormat.html:
        raise UserError("--explain shows a table or JSON, not html")
    if explain and not cfg.cluster_mode:
        raise UserError(
            "--explain needs cluster mode (METERING_CATALOG): invoices of embedded mode "
            "record no lake snapshot"
        )
    asked = tenant_period(cfg, tenant_id, period, output=output)
    target, out = asked.period, output
    with billing(cfg) as con:
        invoice = invoicing.generate(con, asked.usage, asked.rules, tenant_id, target)
        alerts = alert_store.list_alerts(con, tenant_id, [str(target)])
    if stripe_requested(cfg, stripe):
        if invoice.status is InvoiceStatus.finalized and invoice.stripe_invoice_id is None:
            if invoice.replaces is not None:
                with billing(cfg) as con:
                    replaced = invoicing.existing_invoice(con, invoice.replaces)
                void_in_stripe(cfg, replaced, pending=True)
            invoice = _pushed(cfg, invoice)
        elif invoice.status is InvoiceStatus.draft:
            print(f"{target} is still open: draft invoices are not pushed", file=sys.stderr)
    if explain:
        _explain(cfg, invoice, fmt, out)
        return
    _render(invoice, alerts, fmt, out)


def _render(
    invoice: Invoice,
    alerts: list[AlertRecord],
    fmt: TableOrJson | InvoiceFormat | None,
    output: Path | None,
) -> None:
    """``invoice`` with its period's ``alerts`` as a table, JSON or HTML (to ``output``)."""
    now = utc_now()
    if fmt is InvoiceFormat.html:
        from billing.render.invoice_html import render_invoice_html

        write(render_invoice_html(invoice, now=now, alerts=alerts), output)
        return
    render(
        table_or_json(fmt, output),
        output,
        json_data=invoice_json(invoice, now, alerts),
        table=lambda: _invoice_table(invoice, now, alerts),
    )


def _explain(cfg: Settings, invoice: Invoice, fmt: InvoiceFormat | None, out: Path | None) -> None:
    """``generate-invoice --explain``: the invoice's lines beside their quantities at its
    lake snapshot."""
    if invoice.lake_snapshot is None:
        raise UserError(f"invoice {invoice.invoice_id} records no lake snapshot to explain it by")
    reader = usage_reader(cfg, invoice.lake_snapshot)
    try:
        usage = invoicing.UsageData.read(reader, invoice.tenant_id)
    finally:
        reader.close()
    checks = explain_lines(invoice, usage)
    data = {
        "invoice_id": invoice.invoice_id,
        "tenant_id": invoice.tenant_id,
        "period": invoice.period,
        "lake_snapshot": invoice.lake_snapshot,
        "total": money(invoice.total),
        "lines": [c.as_json() for c in checks],
    }

    def table() -> Table:
        shown = Table(
            title=f"Invoice {invoice.invoice_id} ({invoice.tenant_id}, {invoice.period}) at "
            f"lake snapshot {invoice.lake_snapshot}",
            caption="at snapshot: recomputed from the usage of that DuckLake snapshot with "
            "the prices the invoice recorded (- : not from usage)",
        )
        for name in ("code", "period"):
            shown.add_column(name)
        currency = invoice.currency
        right(shown, "quantity", "at snapshot", f"amount ({currency})", "at snapshot")
        shown.add_column("same")
        for c in checks:
            line, again = c.line, c.again
            shown.add_row(
                line.code,
                line.period or "",
                plain(line.quantity),
                "-" if again is None else plain(again.quantity),
                money(line.amount),
                "-" if again is None else money(again.amount),
                {None: "-", True: "yes", False: "NO"}[c.same],
            )
        return shown

    render(table_or_json(fmt, out), out, json_data=data, table=table)


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


def _links(invoice: Invoice) -> str:
    if invoice.replaced_by:
        return f"replaced by {invoice.replaced_by}"
    if invoice.status is InvoiceStatus.void:
        return "not billed again yet"
    return f"replaces {invoice.replaces}" if invoice.replaces else ""


class _ListByDefault(TyperGroup):
    """``invoices T ...`` runs ``invoices list T ...``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["list", *args]
        return super().parse_args(ctx, args)


invoices_app = typer.Typer(
    cls=_ListByDefault,
    help="A tenant's invoices (`invoices T`; one by its id: `show`); voiding or reissuing one.",
    no_args_is_help=True,
)


@invoices_app.command("list")
def invoices_cmd(
    ctx: typer.Context,
    tenant_id: str = TENANT_ARGUMENT,
    output: Path = OUTPUT_OPTION,
    fmt: TableOrJson | None = TABLE_JSON_OPTION,
) -> None:
    """All invoices of a tenant, oldest first, with what each carries for earlier periods
    (late usage, corrections), its credit line and the credit balance left after it; void
    invoices too, with their replacement (``invoices T`` is the same)."""
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
        for name in ("due", "stripe_invoice_id", "void / reissue"):
            table.add_column(name)
        for inv in found:
            table.add_row(inv.invoice_id, inv.period, inv.tier, inv.status_on(now).value,
                          money(inv.subtotal), _earlier_summary(inv), _credit(inv),
                          money(inv.total), money(inv.credit_balance), _due(inv),
                          inv.stripe_invoice_id or "", _links(inv))  # fmt: skip
        return table

    render(
        table_or_json(fmt, output),
        out,
        json_data=[invoice_json(inv, now, alerts) for inv in found],
        table=table,
    )


INVOICE_ID_ARGUMENT = typer.Argument(..., help="the invoice's id (`invoices T` lists them)")


def _show(
    cfg: Settings, invoice: Invoice, fmt: TableOrJson | InvoiceFormat | None, output: Path | None
) -> None:
    """The invoice as ``generate-invoice`` shows it, with its period's alerts."""
    with billing(cfg) as con:
        alerts = alert_store.list_alerts(con, invoice.tenant_id, [invoice.period])
    _render(invoice, alerts, fmt, output)


@invoices_app.command("show")
def show_cmd(
    ctx: typer.Context,
    invoice_id: str = INVOICE_ID_ARGUMENT,
    output: Path = OUTPUT_OPTION,
    fmt: InvoiceFormat | None = INVOICE_FORMAT_OPTION,
) -> None:
    """One invoice by its id, as stored: a void one too (with its reason and replacement),
    which ``generate-invoice`` no longer shows once its period is billed again. Reads only."""
    cfg = settings_of(ctx)
    out = output_path(output)
    with billing(cfg) as con:
        invoice = invoicing.existing_invoice(con, invoice_id)
    if invoice.status is InvoiceStatus.draft:
        raise UserError(
            f"invoice {invoice_id} is a draft ({invoice.period} is still open): "
            f"`generate-invoice {invoice.tenant_id} {invoice.period}` shows it recomputed"
        )
    _show(cfg, invoice, fmt, out)


def who(by: str | None) -> str:
    """``--by``, else the OS user running the command (``getpass.getuser``)."""
    if by is None:
        try:
            return getpass.getuser()
        except (KeyError, OSError):  # no user name in the environment or the password file
            return "unknown"
    text = by.strip()
    if not text or len(text) > 128 or not text.isprintable():
        raise UserError(f"invalid --by {by[:40]!r}: a name, 1 to 128 printable characters")
    return text


BY_OPTION = typer.Option(
    None, "--by", help="who voids it (default: the OS user running the command)"
)


@invoices_app.command("void")
def void_cmd(
    ctx: typer.Context,
    invoice_id: str = INVOICE_ID_ARGUMENT,
    reason: str = typer.Option(..., "--reason", help="why it is void (kept with the invoice)"),
    by: str = BY_OPTION,
    stripe: bool = typer.Option(
        False, "--stripe", help="void it in Stripe too (also: STRIPE_ENABLED=true)"
    ),
    output: Path = OUTPUT_OPTION,
    fmt: TableOrJson | None = TABLE_JSON_OPTION,
) -> None:
    """Void a finalized invoice: it stays readable (status void, reason, who, when), the
    credit it moved is given back, and billing its period again (`generate-invoice T P`,
    or `bill`) makes a new invoice that replaces it. With Stripe, an open Stripe invoice is
    voided, a paid one gets a credit note for its total; a rerun resumes that."""
    cfg = settings_of(ctx)
    out = output_path(output)
    voider = who(by)
    try:
        with billing(cfg) as con:
            invoice = invoicing.void(con, invoice_id, reason, voider, utc_now())
    except invoicing.AlreadyVoid as exc:
        if not (stripe_requested(cfg, stripe) and void_in_stripe(cfg, exc.invoice, pending=True)):
            raise
        invoice = exc.invoice
    else:
        print(
            f"voided {invoice.invoice_id} ({invoice.tenant_id}, {invoice.period})", file=sys.stderr
        )
        if stripe_requested(cfg, stripe):
            void_in_stripe(cfg, invoice)
    _show(cfg, invoice, fmt, out)


def _resume_reissue(cfg: Settings, void: Invoice) -> Invoice | None:
    """Finish in Stripe what an interrupted ``reissue --stripe`` of ``void`` left undone
    (voiding it there, pushing its replacement); its replacement, or None if nothing was."""
    with billing(cfg) as con:
        new = invoice_store.get_invoice(con, void.replaced_by) if void.replaced_by else None
    voided = void_in_stripe(cfg, void, pending=True)
    if new is None or new.status is not InvoiceStatus.finalized or new.stripe_invoice_id:
        return new if voided else None
    return _pushed(cfg, new)


def _pushed(cfg: Settings, invoice: Invoice) -> Invoice:
    push_to_stripe(cfg, [invoice])
    with billing(cfg) as con:
        return invoice_store.get_invoice(con, invoice.invoice_id) or invoice


@invoices_app.command("reissue")
def reissue_cmd(
    ctx: typer.Context,
    invoice_id: str = INVOICE_ID_ARGUMENT,
    reason: str = typer.Option(
        invoicing.REISSUE_REASON, "--reason", help="why it is reissued (kept with the void one)"
    ),
    by: str = BY_OPTION,
    stripe: bool = typer.Option(
        False,
        "--stripe",
        help="void the old one in Stripe, then push the new one (also: STRIPE_ENABLED=true)",
    ),
    output: Path = OUTPUT_OPTION,
    fmt: TableOrJson | None = TABLE_JSON_OPTION,
    quiet: bool = QUIET_OPTION,
) -> None:
    """Void a finalized invoice and bill its period again from the usage as it is now, in
    one step: a new finalized invoice that names the one it replaces (see the README for
    what it charges). A void invoice is not reissued: billing its period again
    (`generate-invoice T P`, or `bill`) replaces it. With Stripe, the old one is voided
    there as `invoices void` does, then the new one is pushed; a rerun resumes that."""
    cfg = settings_of(ctx)
    out = output_path(output)
    voider = who(by)
    with billing(cfg) as con:
        old = invoicing.existing_invoice(con, invoice_id)
    usage = read_usage(cfg, old.tenant_id, quiet=quiet)
    try:
        with billing(cfg) as con:
            done = invoicing.reissue(
                con,
                usage,
                invoicing.Rules.from_settings(cfg),
                invoice_id,
                by=voider,
                reason=reason,
            )
    except invoicing.AlreadyVoid as exc:
        resumed = _resume_reissue(cfg, exc.invoice) if stripe_requested(cfg, stripe) else None
        if resumed is None:
            raise
        _show(cfg, resumed, fmt, out)
        return
    if not quiet:
        print(f"reissued {invoice_id} as {done.invoice.invoice_id}", file=sys.stderr)
    invoice = done.invoice
    if stripe_requested(cfg, stripe):
        void_in_stripe(cfg, done.void)
        invoice = _pushed(cfg, invoice)
    _show(cfg, invoice, fmt, out)


def register(app: typer.Typer) -> None:
    app.command("generate-invoice")(generate_invoice)
    app.add_typer(invoices_app, name="invoices")
