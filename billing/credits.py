"""The per-tenant credit balance (pure: no I/O, Decimal only).

An invoice total never goes below zero. When an invoice's lines (its own period plus the
corrections it carries) sum to less than zero, a ``credit_carried`` line brings it to zero and
that amount becomes a credit lot of the tenant, named by the invoice that created it. A later
invoice with a positive sum uses the oldest lots first, as one negative ``credit_applied``
line. Every movement names the invoice it is on and the invoice whose lot it creates or
consumes, so the balance (the sum of the movements) can be audited lot by lot, and the sum
of all totals plus the balance equals the sum of all lines before settling.

Voiding an invoice reverses its movements (``reversing``): a reversal names the same
invoice and lot with the opposite amount, so the balance is as if the invoice never existed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from decimal import Decimal

from billing.model import CREDIT_APPLIED, CREDIT_CARRIED, EXACT, InvoiceLine, add_up, money


@dataclass(frozen=True)
class CreditLot:
    """What is left of the credit one invoice (of ``period``) created."""

    source_invoice_id: str
    period: str
    remaining: Decimal


@dataclass(frozen=True)
class CreditMovement:
    """One change of a tenant's balance: + when ``invoice_id`` carries credit (then
    ``source_invoice_id`` is itself), - when it uses ``source_invoice_id``'s lot."""

    tenant_id: str
    invoice_id: str
    source_invoice_id: str
    amount: Decimal
    reversal: bool = False  # undoes the movement of ``invoice_id`` on that lot (a void)


def reversing(movements: Sequence[CreditMovement]) -> tuple[CreditMovement, ...]:
    """What undoes ``movements`` (the ones on an invoice being voided): credit it applied
    goes back to its lot, credit it carried is taken back."""
    return tuple(replace(m, amount=-m.amount, reversal=True) for m in movements if not m.reversal)


def balance(lots: Sequence[CreditLot]) -> Decimal:
    return add_up(lot.remaining for lot in lots)


@dataclass(frozen=True)
class Settlement:
    """How one invoice meets the tenant's balance."""

    line: InvoiceLine | None
    movements: tuple[CreditMovement, ...]
    lots: tuple[CreditLot, ...]  # the balance afterwards, oldest lot first

    @property
    def balance(self) -> Decimal:
        return balance(self.lots)


def settle(
    tenant_id: str, invoice_id: str, period: str, charges: Decimal, lots: Sequence[CreditLot]
) -> Settlement:
    """Settle the invoice ``invoice_id`` of ``period``, whose lines sum to ``charges``,
    against ``lots`` (oldest first)."""
    if charges < 0:
        carried = -charges
        line = InvoiceLine(
            code=CREDIT_CARRIED,
            description=f"credit of {money(carried)} carried to the next invoices",
            quantity=Decimal(1),
            unit_price=carried,
            amount=carried,
        )
        movement = CreditMovement(tenant_id, invoice_id, invoice_id, carried)
        return Settlement(line, (movement,), (*lots, CreditLot(invoice_id, period, carried)))
    due, left, movements, sources = charges, [], [], []
    for lot in lots:
        used = min(due, lot.remaining)
        if used > 0:
            movements.append(CreditMovement(tenant_id, invoice_id, lot.source_invoice_id, -used))
            sources.append(lot.period)
            due = EXACT.subtract(due, used)
        if lot.remaining > used:
            remaining = EXACT.subtract(lot.remaining, used)
            left.append(CreditLot(lot.source_invoice_id, lot.period, remaining))
    if not movements:
        return Settlement(None, (), tuple(lots))
    applied = EXACT.subtract(charges, due)
    line = InvoiceLine(
        code=CREDIT_APPLIED,
        description=f"credit balance applied (credit from {', '.join(sources)})",
        quantity=Decimal(1),
        unit_price=-applied,
        amount=-applied,
    )
    return Settlement(line, tuple(movements), tuple(left))
