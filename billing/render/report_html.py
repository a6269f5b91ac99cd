"""A tenant's usage over several periods as one self-contained HTML page (``report``): a bar
chart per counter (inline SVG drawn here, no scripts, no external assets, so it opens offline
and prints), with each period's quota, and the invoices of those periods.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from billing.alerts.model import AlertRecord
from billing.model import CREDIT_LINES, EARLIER_PERIODS, Invoice, InvoiceStatus, add_up
from billing.rating import METERS, Usage
from billing.render.invoice_html import (
    ALERT_HEADERS,
    DASH,
    alert_rows,
    amount_text,
    day,
    esc,
    grouped,
    moment_text,
    page,
    period_span,
    quantity_text,
    status_badge,
    table,
)
from billing.tiers import Tier
from schemas.periods import Period

REPORT_CSS = """
.head { border-bottom: 3px solid var(--accent); padding-bottom: 14px; }
.cards { display: grid; grid-template-columns: repeat(4, 1fr); gap: 12px; margin-top: 18px; }
.card { background: var(--soft); border-radius: 8px; padding: 10px 14px; }
.card span { display: block; font-size: 12px; color: var(--muted); text-transform: uppercase;
  letter-spacing: .05em; }
.card b { font-size: 20px; }
.charts { display: grid; grid-template-columns: 1fr 1fr; gap: 14px 22px; }
figure { margin: 0; break-inside: avoid; }
figcaption { font-weight: bold; margin-bottom: 2px; }
figcaption span { font-weight: normal; color: var(--muted); font-size: 12px; }
svg { display: block; width: 100%; height: auto; }
svg text { font: 11px "DejaVu Sans", Arial, sans-serif; fill: #5f6b7a; }
.invoices td { white-space: nowrap; font-size: 13px; padding: 6px 5px; }
.invoices th { padding: 6px 5px; }
.invoices code { font-size: 11px; }
.invoices .voided { color: #c0392b; font-size: 11px; white-space: normal; max-width: 260px; }
.invoices .sub { font-size: 11px; }
.legend i { display: inline-block; width: 18px; height: 0; border-top: 2px dashed #c0392b;
  vertical-align: middle; margin: 0 4px 0 12px; }
.legend b { display: inline-block; width: 12px; height: 12px; vertical-align: middle;
  margin: 0 4px 0 12px; }
"""

BAR = "#3d7bd9"
BAR_OVER = "#c0392b"
WIDTH, HEIGHT = 440, 210
LEFT, RIGHT, TOP, BOTTOM = 52, 10, 12, 42


@dataclass(frozen=True)
class PeriodUsage:
    """One period of the report: the tier in force and each meter's quantity (billed units:
    MiB for network) with its quota, where the tier sets one."""

    period: Period
    tier: str
    events: int
    sessions: int
    quantities: dict[str, Decimal]
    limits: dict[str, Decimal]

    @classmethod
    def of(cls, period: Period, tier: Tier, row: Mapping[str, Any] | None) -> PeriodUsage:
        usage = Usage.from_mapping(row or {})
        limits = {}
        for meter in METERS:
            limit = tier.quota_of(meter.quota)
            if limit is not None:
                limits[meter.code] = Decimal(limit)
        return cls(
            period=period,
            tier=tier.name,
            events=int((row or {}).get("events") or 0),
            sessions=int((row or {}).get("sessions") or 0),
            quantities={m.code: m.quantity(usage) for m in METERS},
            limits=limits,
        )


@dataclass(frozen=True)
class AppliedCorrection:
    """A correction event the workers applied (a row of the ``corrections`` view): its
    non-zero signed ``deltas`` (counter -> delta, in the counter's unit)."""

    period: str
    event_id: str
    corrects_event_id: str | None
    reason: str
    deltas: Mapping[str, int]
    applied_at: datetime


@dataclass(frozen=True)
class UsageReport:
    tenant_id: str
    periods: Sequence[PeriodUsage]
    invoices: Sequence[Invoice]
    freshness: str
    generated_at: datetime
    alerts: Sequence[AlertRecord] = ()
    corrections: Sequence[AppliedCorrection] = ()


CORRECTION_HEADERS = (("Period", False), ("Applied", False), ("Changes", False), ("Reason", False))


def _correction_rows(corrections: Sequence[AppliedCorrection]) -> list[list[str]]:
    """One row per applied correction: its period, when, each signed delta, why (and the
    event it corrects)."""
    rows = []
    for c in corrections:
        changes = ", ".join(f"{esc(k)} {v:+,}" for k, v in c.deltas.items())
        why = esc(c.reason) + (
            f' <span class="sub">corrects <code>{esc(c.corrects_event_id)}</code></span>'
            if c.corrects_event_id
            else ""
        )
        rows.append([esc(c.period), esc(moment_text(c.applied_at)), changes, why])
    return rows


# --- charts -----------------------------------------------------------------------------


def nice_step(top: float, ticks: int = 4) -> float:
    """A round tick step (1, 2 or 5 x 10^k) so that ``ticks`` steps cover ``top``."""
    if top <= 0:
        return 1.0
    raw = top / ticks
    magnitude = 10.0 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1.0, 2.0, 5.0, 10.0) if m * magnitude >= raw)


def compact(value: float) -> str:
    """Axis label: 950, 1.2k, 3.4M, 5G."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.1f}".rstrip("0").rstrip(".") + suffix
    return f"{value:.2f}".rstrip("0").rstrip(".")


def month_label(period: Period) -> str:
    return period.start.strftime("%b %y")


def bar_chart(
    labels: Sequence[str], values: Sequence[Decimal], limits: Sequence[Decimal | None]
) -> str:
    """An SVG bar chart: one bar per period, a dashed quota mark where there is one, bars over
    their quota in red. Hovering a bar shows its exact value (SVG ``<title>``)."""
    top = max([float(v) for v in values] + [float(q) for q in limits if q is not None] + [0.0])
    step = nice_step(top)
    ceiling = step * max(1, math.ceil(top / step)) if top > 0 else step * 4
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def y(value: float) -> float:
        return TOP + plot_h - plot_h * value / ceiling

    parts = [f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" role="img">']
    ticks = round(ceiling / step)
    for i in range(ticks + 1):
        tick = step * i
        parts.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" '
            f'stroke="{"#1d2433" if i == 0 else "#e3e7ed"}" stroke-width="1"/>'
            f'<text x="{LEFT - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">'
            f"{esc(compact(tick))}</text>"
        )
    slot = plot_w / max(len(values), 1)
    bar_w = max(2.0, min(36.0, slot * 0.64))
    rotate = len(labels) > 8
    for i, (label, value, limit) in enumerate(zip(labels, values, limits, strict=True)):
        cx = LEFT + slot * (i + 0.5)
        over = limit is not None and value > limit
        height = TOP + plot_h - y(float(value))
        tip = f"{label}: {quantity_text(value)}" + (
            f" of {quantity_text(limit)} quota" if limit is not None else ""
        )
        parts.append(
            f'<rect x="{cx - bar_w / 2:.1f}" y="{y(float(value)):.1f}" width="{bar_w:.1f}" '
            f'height="{height:.1f}" fill="{BAR_OVER if over else BAR}" rx="2">'
            f"<title>{esc(tip)}</title></rect>"
        )
        if not rotate and value > 0:
            parts.append(
                f'<text x="{cx:.1f}" y="{y(float(value)) - 3:.1f}" text-anchor="middle">'
                f"{esc(compact(float(value)))}</text>"
            )
        if limit is not None:
            half = min(slot * 0.45, bar_w / 2 + 6)
            parts.append(
                f'<line x1="{cx - half:.1f}" x2="{cx + half:.1f}" y1="{y(float(limit)):.1f}" '
                f'y2="{y(float(limit)):.1f}" stroke="{BAR_OVER}" stroke-width="2" '
                'stroke-dasharray="4 2"/>'
            )
        base = HEIGHT - BOTTOM + 14
        turn = f' transform="rotate(-40 {cx:.1f} {base})"' if rotate else ""
        anchor = "end" if rotate else "middle"
        parts.append(
            f'<text x="{cx:.1f}" y="{base}" text-anchor="{anchor}"{turn}>{esc(label)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _figure(title: str, unit: str, body: str) -> str:
    return f"<figure><figcaption>{esc(title)} <span>{esc(unit)}</span></figcaption>{body}</figure>"


def _charts(periods: Sequence[PeriodUsage]) -> str:
    labels = [month_label(p.period) for p in periods]
    figures = [
        _figure(
            "Events",
            "per period",
            bar_chart(labels, [Decimal(p.events) for p in periods], [None] * len(periods)),
        )
    ]
    for meter in METERS:
        values = [p.quantities[meter.code] for p in periods]
        limits = [p.limits.get(meter.code) for p in periods]
        figures.append(_figure(meter.description, "per period", bar_chart(labels, values, limits)))
    return f'<section class="charts">{"".join(figures)}</section>'


# --- the page ---------------------------------------------------------------------------


def _sum_of(invoice: Invoice, codes: frozenset[str]) -> str:
    """The amount of ``invoice``'s lines with one of ``codes``, or a dash if it has none."""
    lines = [ln.amount for ln in invoice.lines if ln.code in codes]
    return esc(amount_text(add_up(lines))) if lines else DASH


def _invoice_cell(inv: Invoice) -> str:
    """The invoice's id, with what a void one says and the invoice each one links to."""
    cell = f"<code>{esc(inv.invoice_id)}</code>"
    if inv.status is InvoiceStatus.void:
        cell += f'<div class="voided">void: {esc(inv.void_reason or "")}'
        if inv.replaced_by:
            cell += f"; replaced by <code>{esc(inv.replaced_by)}</code>"
        cell += "</div>"
    elif inv.replaces:
        cell += f'<div class="sub">replaces void <code>{esc(inv.replaces)}</code></div>'
    return cell


def _invoice_rows(report: UsageReport) -> list[list[str]]:
    by_period: dict[str, list[Invoice]] = {}
    for inv in report.invoices:  # a period's void invoices first, then what replaced them
        by_period.setdefault(inv.period, []).append(inv)
    rows = []
    for p in report.periods:
        found = by_period.get(str(p.period), [])
        if not found:
            rows.append([esc(p.period), esc(p.tier), "not invoiced yet", *[""] * 7])
        rows.extend(_invoice_row(report, inv) for inv in found)
    return rows


def _invoice_row(report: UsageReport, inv: Invoice) -> list[str]:
    status = inv.status_on(report.generated_at)
    return [
        esc(inv.period),
        esc(inv.tier),
        _invoice_cell(inv),
        status_badge(status),
        esc(amount_text(inv.subtotal)),
        _sum_of(inv, EARLIER_PERIODS),
        _sum_of(inv, CREDIT_LINES),
        f"<b>{esc(amount_text(inv.total))}</b>",
        esc(amount_text(inv.credit_balance)),
        esc(day(inv.due_date)) if status is not InvoiceStatus.void else DASH,
    ]


INVOICE_HEADERS = (
    ("Period", False),
    ("Tier", False),
    ("Invoice", False),
    ("Status", False),
    ("Subtotal", True),
    ("Earlier periods", True),
    ("Credit", True),
    ("Total", True),
    ("Credit balance", True),
    ("Due", False),
)


def _cards(report: UsageReport) -> str:
    standing = [inv for inv in report.invoices if inv.status is not InvoiceStatus.void]
    invoiced = add_up(inv.total for inv in standing)
    voids = len(report.invoices) - len(standing)
    cards = [
        ("Events", grouped(Decimal(sum(p.events for p in report.periods)), 0)),
        ("Sessions", grouped(Decimal(sum(p.sessions for p in report.periods)), 0)),
        ("Invoices", f"{len(standing)}" + (f" (+{voids} void)" if voids else "")),
        ("Invoiced (USD)", amount_text(invoiced)),
    ]
    if report.invoices:
        latest = max(report.invoices, key=lambda inv: inv.period)
        cards.append(("Credit balance (USD)", amount_text(latest.credit_balance)))
    cells = "".join(
        f'<div class="card"><span>{esc(k)}</span><b>{esc(v)}</b></div>' for k, v in cards
    )
    return f'<section class="cards">{cells}</section>'


def render_report_html(report: UsageReport) -> str:
    """The report page (periods oldest first)."""
    first, last = report.periods[0].period, report.periods[-1].period
    span = period_span(first.start, last.end)
    stamp = report.generated_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = [
        f'<header class="head"><h1>Usage report: {esc(report.tenant_id)}</h1>'
        f'<div class="sub">{esc(first)} to {esc(last)} ({esc(span)}) · generated {esc(stamp)} '
        f"· {esc(report.freshness)}</div></header>",
        _cards(report),
        "<h2>Usage per period</h2>",
        '<p class="sub legend">Bars: usage<i></i>quota of the tier in force'
        f'<b style="background:{BAR_OVER}"></b>over quota</p>',
        _charts(report.periods),
        "<h2>Invoices</h2>",
        table(INVOICE_HEADERS, _invoice_rows(report), "invoices"),
        "<h2>Usage corrections</h2>",
        table(CORRECTION_HEADERS, _correction_rows(report.corrections))
        if report.corrections
        else '<p class="sub">No usage correction was applied in these periods.</p>',
        "<h2>Usage alerts</h2>",
        table((("Period", False), *ALERT_HEADERS), alert_rows(report.alerts, with_period=True))
        if report.alerts
        else '<p class="sub">No usage alert was crossed in these periods.</p>',
        "<footer>Usage from the published snapshot of the usage view; invoices from the billing "
        "database. Network in MiB; quotas as set by each period's tier.</footer>",
    ]
    title = f"Usage report {report.tenant_id} {first}{DASH}{last}"
    return page(title, "".join(body), REPORT_CSS)
