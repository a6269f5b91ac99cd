"""An invoice's quantities recomputed from the usage at the DuckLake snapshot it records, so an
amount can be proven later: ``generate-invoice T P --explain`` (cluster mode).

Each line is recomputed the way it was made, from the snapshot's usage and the prices the
invoice recorded (``computed_from``), never today's tiers file: the period's own lines by
rating its usage, late-usage and correction lines by ``correction_lines`` from what was billed
before (recorded on the invoice) to the snapshot's usage of their period. Credit lines and
the give-backs of a reissue come from other invoices, not usage: nothing to recompute.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from billing.corrections import correction_lines
from billing.invoice_store import to_json_text
from billing.invoicing import UsageData
from billing.model import Invoice, InvoiceLine, money, plain
from billing.rating import Usage, rate
from billing.tiers import tier_from_facts
from schemas.periods import Period

LineKey = tuple[str, str | None, str | None]


@dataclass(frozen=True)
class LineCheck:
    """One stored line beside the line recomputed at the snapshot (None: not from usage)."""

    line: InvoiceLine
    again: InvoiceLine | None

    @property
    def recomputed(self) -> Decimal | None:
        return None if self.again is None else self.again.quantity

    @property
    def same(self) -> bool | None:
        """Whether quantity and amount are both the stored ones (None: not from usage)."""
        if self.again is None:
            return None
        return (self.again.quantity, self.again.amount) == (self.line.quantity, self.line.amount)

    def as_json(self) -> dict[str, Any]:
        again = self.again
        return {
            "code": self.line.code,
            "period": self.line.period,
            "corrects": self.line.corrects,
            "quantity": plain(self.line.quantity),
            "amount": money(self.line.amount),
            "quantity_at_snapshot": None if again is None else plain(again.quantity),
            "amount_at_snapshot": None if again is None else money(again.amount),
            "same": self.same,
        }


def _key(line: InvoiceLine) -> LineKey:
    return line.code, line.period, line.corrects


def recomputed_lines(invoice: Invoice, usage: UsageData) -> dict[LineKey, list[InvoiceLine]]:
    """The lines ``invoice``'s usage-based lines come to from ``usage`` (the snapshot's)."""
    tenant, facts = invoice.tenant_id, invoice.computed_from
    lines = list(
        rate(
            tier_from_facts(to_json_text(facts["tier"])),
            usage.usage(tenant, Period.parse(invoice.period)),
        ).lines
    )
    for entry in facts.get("late_usage", []):
        period = entry["period"]
        now = usage.usage(tenant, Period.parse(period))
        tier = tier_from_facts(to_json_text(entry["prices"]))
        lines += correction_lines(period, tier, Usage.from_mapping(entry["billed"]), now)
    out: dict[LineKey, list[InvoiceLine]] = {}
    for line in lines:
        out.setdefault(_key(line), []).append(line)
    return out


def explain(invoice: Invoice, usage: UsageData) -> list[LineCheck]:
    """Every line of ``invoice`` with its quantity recomputed from ``usage``, in order (two
    lines with one key, e.g. a correction's, are matched in order)."""
    again = recomputed_lines(invoice, usage)
    checks = []
    for line in invoice.lines:
        found = again.get(_key(line))
        checks.append(LineCheck(line, found.pop(0) if found else None))
    return checks
