"""The invoice as a printable, self-contained HTML page (``generate-invoice -f html``).

One file, no external assets (inline CSS, system fonts), so it can be mailed, archived or
printed to PDF as is. Every value from the invoice goes through ``html.escape``. The page
building blocks (``page``, ``esc``, number formats, the status badge) are shared with the
usage report.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from billing.alerts.model import AlertRecord
from billing.model import (
    CREDIT_APPLIED,
    CREDIT_CARRIED,
    CREDIT_LINES,
    EARLIER_PERIODS,
    EXACT,
    LATE_USAGE,
    Invoice,
    InvoiceLine,
    InvoiceStatus,
    LinePart,
    QuotaUsage,
    add_up,
    plain,
)
from billing.rating import METERS

CENT = Decimal("0.01")
QUANTITY_PLACES = 4
DASH = "\u2013"  # en dash
QUOTA_LABELS = {m.quota: m.description for m in METERS}

BASE_CSS = """
:root { --ink: #1d2433; --muted: #5f6b7a; --line: #d9dee5; --soft: #f4f6f9; --accent: #2453a6; }
* { box-sizing: border-box; }
body { margin: 0; background: #fff; color: var(--ink);
  font: 14px/1.45 "DejaVu Sans", "Helvetica Neue", Arial, sans-serif; }
main { max-width: 920px; margin: 0 auto; padding: 40px 48px; }
h1 { font-size: 28px; margin: 0; letter-spacing: .02em; }
h2 { font-size: 15px; margin: 28px 0 8px; text-transform: uppercase; letter-spacing: .06em;
  color: var(--muted); }
.sub { color: var(--muted); }
table { width: 100%; border-collapse: collapse; }
th { text-align: left; font-size: 12px; text-transform: uppercase; letter-spacing: .05em;
  color: var(--muted); border-bottom: 2px solid var(--ink); padding: 6px 8px; }
td { border-bottom: 1px solid var(--line); padding: 7px 8px; vertical-align: top; }
tr { break-inside: avoid; }
.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
code { font: 12px "DejaVu Sans Mono", Menlo, monospace; color: var(--muted); }
.badge { display: inline-block; padding: 3px 10px; border-radius: 999px; font-size: 12px;
  font-weight: bold; text-transform: uppercase; letter-spacing: .06em; color: #fff; }
.st-draft { background: #7a8594; } .st-finalized { background: #2453a6; }
.st-sent { background: #5b3fb0; } .st-paid { background: #23864a; }
.st-overdue { background: #c0392b; }
.st-void { background: #9aa3ad; text-decoration: line-through; }
.al { display: inline-block; padding: 1px 8px; border-radius: 4px; font-size: 12px;
  font-weight: bold; color: #fff; }
.al-sent { background: #1f7a8c; } .al-pending { background: #e0a100; }
.note { background: var(--soft); border-left: 4px solid var(--accent); padding: 10px 14px;
  margin: 18px 0; }
footer { margin-top: 36px; padding-top: 12px; border-top: 1px solid var(--line);
  color: var(--muted); font-size: 12px; }
@page { size: A4; margin: 14mm; }
@media print { main { padding: 0; max-width: none; } }
"""

INVOICE_CSS = """
.head { display: flex; justify-content: space-between; align-items: flex-start; gap: 24px;
  padding-bottom: 18px; border-bottom: 3px solid var(--accent); }
.head .right { text-align: right; }
.facts { display: grid; grid-template-columns: repeat(3, 1fr); gap: 14px 24px; margin-top: 20px; }
.facts div span { display: block; font-size: 12px; color: var(--muted); text-transform: uppercase;
  letter-spacing: .05em; }
.facts div b { font-size: 15px; }
.totals { width: 360px; margin: 14px 0 0 auto; }
.totals td { border: none; padding: 4px 8px; }
.totals tr.grand td { border-top: 2px solid var(--ink); font-size: 18px; font-weight: bold;
  padding-top: 8px; }
.bar { height: 10px; background: var(--soft); border-radius: 5px; overflow: hidden;
  min-width: 120px; }
.bar i { display: block; height: 100%; background: #3d7bd9; }
.bar i.over { background: #c0392b; }
.exceeded { color: #c0392b; font-weight: bold; }
.credit { color: #23864a; }
.totals tr.balance td { color: #23864a; font-weight: bold; }
.part { color: var(--muted); font-size: 12px; }
td:first-child .part { padding-left: 18px; }
main { position: relative; }
.voidmark { position: absolute; top: 210px; left: 0; right: 0; text-align: center;
  font-size: 150px; font-weight: bold; letter-spacing: .12em; color: rgba(192, 57, 43, .16);
  transform: rotate(-16deg); pointer-events: none; user-select: none; }
.note.void { border-left-color: #c0392b; background: #fbeeec; }
"""


def esc(value: object) -> str:
    """Text or attribute value, escaped (quotes too)."""
    return html.escape(str(value), quote=True)


def grouped(value: Decimal, places: int) -> str:
    """``1234.5`` -> ``1,234.50`` (at least ``places`` decimals, never exponent notation)."""
    text = plain(value, places)
    sign = "-" if text.startswith("-") else ""
    whole, _, frac = text.lstrip("-").partition(".")
    return f"{sign}{int(whole):,}" + (f".{frac}" if frac else "")


def amount_text(value: Decimal) -> str:
    return grouped(value.quantize(CENT, context=EXACT), 2)


def quantity_text(value: Decimal) -> str:
    """A quantity with at most four decimals; a rounded one says so (``≈``)."""
    shown = value.quantize(Decimal(1).scaleb(-QUANTITY_PLACES), context=EXACT).normalize(EXACT)
    return grouped(shown, 0) if shown == value else f"≈ {grouped(shown, 0)}"


def day(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%d %b %Y")


def period_span(start: datetime, end: datetime) -> str:
    """The days a period covers (its end is exclusive)."""
    return f"{day(start)} {DASH} {day(end - timedelta(microseconds=1))}"


def status_badge(status: InvoiceStatus) -> str:
    return f'<span class="badge st-{esc(status.value)}">{esc(status.value)}</span>'


def table(
    headers: Sequence[tuple[str, bool]], rows: Iterable[Sequence[str]], css_class: str = ""
) -> str:
    """A table from pre-escaped cells; each header says whether its column is numeric."""
    head = "".join(f"<th{' class=num' if num else ''}>{esc(h)}</th>" for h, num in headers)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td{' class=num' if num else ''}>{cell}</td>"
            for (_, num), cell in zip(headers, row, strict=True)
        )
        + "</tr>"
        for row in rows
    )
    attr = f' class="{esc(css_class)}"' if css_class else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def page(title: str, body: str, css: str = "") -> str:
    """A complete HTML document around ``body`` (already escaped)."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{BASE_CSS}{css}</style></head>"
        f"<body><main>{body}</main></body></html>\n"
    )


def part_label(part: LinePart) -> str:
    """What a line's part covers: ``units 1,000 - 10,000`` (an en dash), ``units 10,000 and
    above`` or ``packages of 100``."""
    if part.package_size is not None:
        return f"packages of {part.package_size:,}"
    start = grouped(part.start or Decimal(0), 0)
    if part.up_to is None:
        return f"units {start} and above"
    return f"units {start} {DASH} {grouped(part.up_to, 0)}"


def _usage_rows(lines: Sequence[InvoiceLine]) -> list[list[str]]:
    """A row per line; a graduated, volume or package line's parts under it, each with its
    quantity, price and exact amount."""
    rows = []
    for ln in lines:
        rows.append(
            [
                f"{esc(ln.description)}<br><code>{esc(ln.code)}</code>",
                esc(quantity_text(ln.quantity)),
                esc(DASH if ln.parts else grouped(ln.unit_price, 2)),
                esc(amount_text(ln.amount)),
            ]
        )
        rows += [
            [
                f'<span class="part">{esc(part_label(p))}</span>',
                f'<span class="part">{esc(quantity_text(p.quantity))}</span>',
                f'<span class="part">{esc(grouped(p.unit_price, 2))}</span>',
                f'<span class="part">{esc(grouped(p.amount, 2))}</span>',
            ]
            for p in ln.parts or []
        ]
    return rows


def _signed(amount: Decimal) -> str:
    """An amount, a credit (negative) marked as one."""
    text = esc(amount_text(amount))
    return f'<span class="credit">{text}</span>' if amount < 0 else text


def _earlier_rows(lines: Sequence[InvoiceLine]) -> list[list[str]]:
    return [
        [
            esc(ln.period or ""),
            f"{esc(ln.description)}<br><code>{esc(ln.code)}</code>",
            _signed(ln.amount),
        ]
        for ln in lines
    ]


def quota_rows(quotas: Sequence[QuotaUsage]) -> list[list[str]]:
    """Quota utilisation with a bar (shared with the report)."""
    rows = []
    for q in quotas:
        pct = q.utilisation_pct
        width = min(pct, Decimal(100)) if pct is not None else Decimal(100 if q.exceeded else 0)
        over = " class=over" if q.exceeded else ""
        state = '<span class="exceeded">exceeded</span>' if q.exceeded else "within quota"
        rows.append(
            [
                esc(QUOTA_LABELS.get(q.quota, q.quota)),
                esc(quantity_text(q.used)),
                esc(quantity_text(q.limit)),
                esc(f"{grouped(pct, 2)} %" if pct is not None else DASH),
                f'<div class="bar"><i{over} style="width:{esc(plain(width))}%"></i></div>',
                state,
            ]
        )
    return rows


def moment_text(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%d %b %Y %H:%M UTC")


def alert_rows(alerts: Sequence[AlertRecord], *, with_period: bool = False) -> list[list[str]]:
    """The usage alerts of a tenant: what was crossed, when, at what, and the delivery
    (shared with the report, which adds the period)."""
    rows = []
    for a in alerts:
        if a.status == "delivered" and a.delivered_at is not None:
            state = f'<span class="al al-sent">sent</span> {esc(moment_text(a.delivered_at))}'
        else:
            error = f": {a.last_error}" if a.last_error else ""
            state = (
                f'<span class="al al-pending">pending</span> {a.attempts} attempt(s){esc(error)}'
            )
        value = Decimal(a.observed)
        is_amount = a.threshold.startswith("amount_usd")
        observed = f"{amount_text(value)} usd" if is_amount else quantity_text(value)
        row = [esc(a.describe()), esc(moment_text(a.crossed_at)), esc(observed), state]
        rows.append(([esc(a.period)] if with_period else []) + row)
    return rows


ALERT_HEADERS = (("Threshold", False), ("Crossed", False), ("Reached", True), ("Delivery", False))

QUOTA_HEADERS = (
    ("Quota", False),
    ("Used", True),
    ("Limit", True),
    ("Utilisation", True),
    ("", False),
    ("", False),
)


_CREDIT_LABELS = {
    CREDIT_CARRIED: "Credit carried to your balance",
    CREDIT_APPLIED: "Credit balance applied",
}


def _totals(
    invoice: Invoice,
    status: InvoiceStatus,
    earlier: Sequence[InvoiceLine],
    risk: Sequence[InvoiceLine],
    true_up: Sequence[InvoiceLine],
) -> str:
    cur = esc(invoice.currency.upper())
    label = {InvoiceStatus.draft: "Total so far", InvoiceStatus.void: "Total (void)"}.get(
        status, "Total due"
    )
    due = (
        "Void: nothing is due"
        if status is InvoiceStatus.void
        else f"Due by {day(invoice.due_date)}"
    )
    rows = [("Subtotal (base and usage)", invoice.subtotal)]
    rows += [("Risk adjustment", add_up(ln.amount for ln in risk))] if risk else []
    rows += [("Minimum commitment true-up", add_up(ln.amount for ln in true_up))] if true_up else []
    if earlier:
        late = all(ln.code == LATE_USAGE for ln in earlier)
        rows.append(
            ("Late usage" if late else "Earlier periods", add_up(ln.amount for ln in earlier))
        )
    rows += [
        (_CREDIT_LABELS[ln.code], ln.amount) for ln in invoice.lines if ln.code in CREDIT_LINES
    ]
    body = "".join(
        f'<tr><td>{esc(label)}</td><td class="num">{esc(amount_text(value))}</td></tr>'
        for label, value in rows
    )
    balance = ""
    if invoice.credit_balance or any(ln.code in CREDIT_LINES for ln in invoice.lines):
        balance = (
            '<tr class="balance"><td>Credit balance remaining</td>'
            f'<td class="num">{esc(amount_text(invoice.credit_balance))}</td></tr>'
        )
    return (
        f'<table class="totals">{body}<tr class="grand"><td>{label} ({cur})</td>'
        f'<td class="num">{esc(amount_text(invoice.total))}</td></tr>{balance}'
        f'<tr><td colspan="2" class="sub">{esc(due)}</td></tr></table>'
    )


def _facts(invoice: Invoice) -> str:
    facts = [
        ("Billed to", invoice.tenant_id),
        ("Tier", invoice.tier),
        ("Period", f"{invoice.period} ({period_span(invoice.period_start, invoice.period_end)})"),
        ("Issued", day(invoice.created_at)),
        ("Finalized", day(invoice.finalized_at) if invoice.finalized_at else "not yet (draft)"),
        ("Due date", day(invoice.due_date)),
    ]
    if invoice.stripe_invoice_id:
        facts.append(("Stripe invoice", invoice.stripe_invoice_id))
    cells = "".join(f"<div><span>{esc(k)}</span><b>{esc(v)}</b></div>" for k, v in facts)
    return f'<section class="facts">{cells}</section>'


def _shown_by(invoice_id: str) -> str:
    """An invoice id and the command that renders that invoice (a void one included)."""
    return (
        f"<code>{esc(invoice_id)}</code> "
        f"(<code>pf-metering invoices show {esc(invoice_id)} -f html</code>)"
    )


def _void_notes(invoice: Invoice) -> list[str]:
    """The VOID mark and note (reason, who, when, its replacement), and on a replacement
    the invoice it replaces."""
    parts = []
    if invoice.status is InvoiceStatus.void:
        when = day(invoice.voided_at) if invoice.voided_at else "?"
        replaced = (
            f" Replaced by invoice {_shown_by(invoice.replaced_by)}."
            if invoice.replaced_by
            else " Not billed again yet: the next bill of its period replaces it."
        )
        parts += [
            '<div class="voidmark" aria-hidden="true">VOID</div>',
            f'<p class="note void"><b>Void</b> since {esc(when)}, by '
            f"{esc(invoice.voided_by or '?')}: {esc(invoice.void_reason or '')}.{replaced} "
            "Nothing on it is due.</p>",
        ]
    if invoice.replaces:
        parts.append(
            f'<p class="note">Replaces void invoice {_shown_by(invoice.replaces)}, '
            "recomputed from the period's usage as it was when billed again.</p>"
        )
    return parts


def render_invoice_html(
    invoice: Invoice,
    quotas: Sequence[QuotaUsage] | None = None,
    *,
    now: datetime | None = None,
    alerts: Sequence[AlertRecord] = (),
) -> str:
    """The invoice as one HTML page; ``quotas`` defaults to the invoice's own quota report,
    and the status shown is the one at ``now`` (an unpaid invoice past due is overdue);
    ``alerts``: the usage alerts of its tenant and period."""
    status = invoice.status_on(now or datetime.now(UTC))
    quotas = invoice.quotas if quotas is None else quotas
    own = EARLIER_PERIODS | CREDIT_LINES
    usage = [ln for ln in invoice.lines if ln.code not in own]
    given_back = [
        ln for ln in invoice.lines if ln.code in EARLIER_PERIODS and ln.period == invoice.period
    ]
    earlier = [ln for ln in invoice.lines if ln.code in EARLIER_PERIODS and ln not in given_back]
    risk = [ln for ln in usage if ln.code == "risk_adjustment"]
    true_up = [ln for ln in usage if ln.code == "minimum_commitment"]
    parts = [
        '<header class="head"><div><h1>Invoice</h1>'
        f'<div class="sub"><code>{esc(invoice.invoice_id)}</code></div></div>'
        f'<div class="right">{status_badge(status)}'
        '<div class="sub">pf-metering · Provability Fabric testbed</div></div></header>',
        _facts(invoice),
    ]
    if status is InvoiceStatus.draft:
        parts.append(
            '<p class="note">Draft: the period is still open, so this preview is recomputed '
            "until the period closes and the invoice is finalized.</p>"
        )
    parts += _void_notes(invoice)
    headers = (("Description", False), ("Quantity", True), ("Unit price", True), ("Amount", True))
    parts += ["<h2>Charges</h2>", table(headers, _usage_rows(usage))]
    if earlier:
        parts += [
            "<h2>Late usage and corrections from earlier periods</h2>",
            '<p class="sub">Usage of an earlier period that changed after its invoice was '
            "final, rated with that period's tier: late usage adds, a correction can credit "
            "(a negative amount).</p>",
            table(
                (("Period", False), ("Details", False), ("Amount", True)), _earlier_rows(earlier)
            ),
        ]
    if given_back:
        parts += [
            "<h2>Corrections given back</h2>",
            '<p class="sub">This invoice charges its period whole, so what another invoice '
            "already charged for it (late usage, corrections) is given back.</p>",
            table(
                (("Period", False), ("Details", False), ("Amount", True)),
                _earlier_rows(given_back),
            ),
        ]
    parts.append(_totals(invoice, status, earlier, risk, true_up))
    if quotas:
        parts += ["<h2>Quota utilisation</h2>", table(QUOTA_HEADERS, quota_rows(quotas))]
    mine = [a for a in alerts if (a.tenant_id, a.period) == (invoice.tenant_id, invoice.period)]
    if mine:
        parts += [
            "<h2>Usage alerts sent</h2>",
            table(ALERT_HEADERS, alert_rows(mine), "alerts"),
        ]
    parts.append(
        f"<footer>Amounts in {esc(invoice.currency.upper())}; each line is quantity &times; "
        "unit price rounded to the cent (half away from zero), a line priced in ranges or "
        "packages the exact sum of its parts rounded once; network is billed per MiB. "
        f"Invoice {esc(invoice.invoice_id)}, created {esc(day(invoice.created_at))}.</footer>"
    )
    title = f"Invoice {invoice.invoice_id} {DASH} {invoice.tenant_id} {invoice.period}"
    return page(title, "".join(parts), INVOICE_CSS)
