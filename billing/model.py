"""The invoice as every part of billing sees it (rating, storage, CLI, Stripe, webhooks)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from decimal import ROUND_HALF_UP, Context, Decimal
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

from schemas.codec import COUNTERS

EXACT = Context(prec=100, rounding=ROUND_HALF_UP)
"""Every sum, product and rounding of money and quantities: Python's default context keeps 28
digits and would round (or refuse to quantize) amounts from 128-bit usage; 100 never does, and
rounding is half away from zero."""


def add_up(amounts: Iterable[Decimal]) -> Decimal:
    """The exact sum of ``amounts`` (Decimal 0 when there are none)."""
    total = Decimal(0)
    for amount in amounts:
        total = EXACT.add(total, amount)
    return total


QUOTA_KEYS: tuple[str, ...] = tuple(
    "network_mb" if counter == "network_bytes" else counter for counter in COUNTERS
)
"""The quota key of each counter, in ``COUNTERS`` order: a tier's ``quotas``, a meter's
``quota``, an alert's ``counter`` (network's quota is in MiB, the others in the counter's
unit)."""

MONEY_SQL = "DECIMAL(38, 2)"
MAX_MONEY = Decimal("9" * 36 + ".99")
"""The largest amount (in usd, either sign) a stored invoice total or subtotal can hold."""


class InvoiceStatus(StrEnum):
    draft = "draft"
    finalized = "finalized"
    sent = "sent"
    paid = "paid"
    overdue = "overdue"
    void = "void"


LATE_USAGE = "late_usage"
"""An earlier period's usage grew after it was finalized: the net difference, one line."""
USAGE_CORRECTION = "usage_correction"
"""An earlier period was corrected down: one signed line per line code it changes."""
CREDIT_CARRIED = "credit_carried"
"""What this invoice's negative lines leave beyond its charges, moved to the credit balance."""
CREDIT_APPLIED = "credit_applied"
"""Credit balance used on this invoice (negative)."""
EARLIER_PERIODS = frozenset({LATE_USAGE, USAGE_CORRECTION})
CREDIT_LINES = frozenset({CREDIT_CARRIED, CREDIT_APPLIED})


class LinePart(BaseModel):
    """One range of a graduated or volume line, or the packages of a package line:
    ``quantity`` x ``unit_price`` = ``amount``, exact (the line rounds once, their sum)."""

    quantity: Decimal  # units in the range, or packages
    unit_price: Decimal
    amount: Decimal
    start: Decimal | None = None  # the range, in the counter's units (up_to None: no end)
    up_to: Decimal | None = None
    package_size: int | None = None


class InvoiceLine(BaseModel):
    """One line: amount = quantity x unit_price rounded to the cent (risk, late, correction
    and credit lines derive: quantity 1, unit price = amount).
    A line with ``parts`` (graduated, volume, package prices) is the sum of its parts' amounts
    rounded to the cent; its quantity is the billable usage and its unit_price the price of
    its last part."""

    code: str
    description: str
    quantity: Decimal
    unit_price: Decimal
    amount: Decimal
    period: str | None = None  # late_usage, usage_correction: the period it is for
    corrects: str | None = None  # usage_correction: the code of the line it corrects
    parts: list[LinePart] | None = None


class QuotaUsage(BaseModel):
    """How much of one tier quota a period used (reported on invoices and ``usage``)."""

    quota: str  # the tier's quota key: cpu_ms, network_mb, api_calls, ...
    used: Decimal
    limit: Decimal
    utilisation_pct: Decimal | None  # used / limit x 100, 2 places; None when the limit is 0
    exceeded: bool


UNPAID = frozenset({InvoiceStatus.finalized, InvoiceStatus.sent})
SHOWN_STATUS_SQL = (
    f"CASE WHEN status IN ({', '.join(sorted(repr(s.value) for s in UNPAID))}) "
    "AND now() > due_date THEN 'overdue' ELSE status END"
)
"""``Invoice.status_on(now)`` in SQL, for the views that show invoices as the CLI does."""
INVOICES_SHOWN_SQL = (
    f"SELECT * REPLACE ({SHOWN_STATUS_SQL} AS status), status AS stored_status FROM invoices"
)


class Invoice(BaseModel):
    invoice_id: str
    tenant_id: str
    period: str
    period_start: datetime
    period_end: datetime
    tier: str
    currency: str = "usd"
    status: InvoiceStatus
    lines: list[InvoiceLine]
    subtotal: Decimal
    total: Decimal
    due_date: datetime
    created_at: datetime
    finalized_at: datetime | None = None
    stripe_invoice_id: str | None = None
    computed_from: dict[str, Any] = Field(default_factory=dict)
    quotas: list[QuotaUsage] = Field(default_factory=list)
    credit_balance: Decimal = Decimal(0)
    """The tenant's credit balance once this invoice is settled (never negative)."""
    # A void invoice stays readable: why, who and when; reissue links the two both ways.
    void_reason: str | None = None
    voided_at: datetime | None = None
    voided_by: str | None = None
    replaces: str | None = None  # the void invoice this one was reissued for
    replaced_by: str | None = None  # the invoice reissued for this void one
    lake_snapshot: int | None = None
    """Cluster mode: the DuckLake snapshot whose usage this invoice was computed from (time
    travel recomputes it there: ``generate-invoice --explain``); None in embedded mode."""

    def status_on(self, now: datetime) -> InvoiceStatus:
        """The status to show at ``now``: an unpaid invoice past its due date is overdue."""
        if self.status in UNPAID and now > self.due_date:
            return InvoiceStatus.overdue
        return self.status

    @property
    def issued_late(self) -> bool:
        """Issued after its period's regular due date, so due counted from the issue."""
        return "issued_late" in self.computed_from

    def cents(self, line: InvoiceLine) -> int:
        """Integer cents of a line, as sent to Stripe."""
        return int(EXACT.multiply(line.amount, Decimal(100)).to_integral_exact(context=EXACT))

    @property
    def total_cents(self) -> int:
        return int(EXACT.multiply(self.total, Decimal(100)).to_integral_exact(context=EXACT))


def plain(value: Decimal, min_places: int = 0) -> str:
    """A Decimal as fixed-point text with at least ``min_places`` decimals, never exponent
    notation: ``plain(Decimal("1E-7"))`` is ``0.0000001``, ``plain(Decimal(50), 2)`` ``50.00``."""
    text = format(abs(value) if value == 0 else value, "f")  # never "-0"
    whole, _, frac = text.partition(".")
    frac = frac.rstrip("0").ljust(min_places, "0")
    return f"{whole}.{frac}" if frac else whole


def money(value: Decimal) -> str:
    """An amount as a decimal string with two places, e.g. ``"53.66"``."""
    return plain(value.quantize(Decimal("0.01"), context=EXACT), 2)
