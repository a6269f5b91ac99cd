"""The invoice as a JSON document (``generate-invoice -f json``, ``invoices -f json``) and
the quota report inside it: money as decimal strings with two places, every line explained.
See docs/spec.md, "Invoices"."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from billing.alerts.model import AlertRecord
from billing.model import Invoice, LinePart, QuotaUsage, money, plain


def quota_json(q: QuotaUsage) -> dict[str, Any]:
    """One quota's use in a period, numbers as decimal strings."""
    return {
        "quota": q.quota,
        "used": plain(q.used),
        "limit": plain(q.limit),
        "utilisation_pct": plain(q.utilisation_pct, 2) if q.utilisation_pct is not None else None,
        "exceeded": q.exceeded,
    }


def part_json(part: LinePart) -> dict[str, Any]:
    """One part of a graduated, volume or package line: its range (``from``, ``up_to``; null:
    no end) or ``package_size``, then quantity x unit_price = amount, all exact."""
    where: dict[str, Any]
    if part.package_size is not None:
        where = {"package_size": part.package_size}
    else:
        up_to = None if part.up_to is None else plain(part.up_to)
        where = {"from": plain(part.start or Decimal(0)), "up_to": up_to}
    return {
        **where,
        "quantity": plain(part.quantity),
        "unit_price": plain(part.unit_price, 2),
        "amount": plain(part.amount, 2),
    }


def invoice_json(
    invoice: Invoice, now: datetime, alerts: Sequence[AlertRecord] = ()
) -> dict[str, Any]:
    """The invoice document with its status at ``now`` (unpaid past due: ``overdue``) and the
    usage alerts of its tenant and period (``alerts``, as ``alerts list -f json`` shows them)."""
    key = (invoice.tenant_id, invoice.period)
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
        if ln.corrects is not None:
            line["corrects"] = ln.corrects
        if ln.parts is not None:
            line["parts"] = [part_json(p) for p in ln.parts]
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
        "credit_balance": money(invoice.credit_balance),
        "due_date": invoice.due_date,
        "issued_late": invoice.issued_late,
        "created_at": invoice.created_at,
        "finalized_at": invoice.finalized_at,
        "stripe_invoice_id": invoice.stripe_invoice_id,
        "quotas": [quota_json(q) for q in invoice.quotas],
        "computed_from": invoice.computed_from,
        "alerts": [a.as_json() for a in alerts if (a.tenant_id, a.period) == key],
        "void_reason": invoice.void_reason,
        "voided_at": invoice.voided_at,
        "voided_by": invoice.voided_by,
        "replaces": invoice.replaces,
        "replaced_by": invoice.replaced_by,
        "lake_snapshot": invoice.lake_snapshot,
    }
