"""The invoice as every part of billing sees it (rating, storage, CLI, Stripe, webhooks)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

LINE_CODES = (
    "base",
    "cpu",
    "network",
    "api_calls",
    "tool_executions",
    "data_retrievals",
    "egress_scans",
    "policy_checks",
    "violations",
    "risk_adjustment",
    "late_usage",
)


class InvoiceStatus(StrEnum):
    draft = "draft"
    finalized = "finalized"
    sent = "sent"
    paid = "paid"
    overdue = "overdue"
    void = "void"


class InvoiceLine(BaseModel):
    """One line: amount = quantity x unit_price rounded to the cent (risk/late lines derive)."""

    code: str
    description: str
    quantity: Decimal
    unit_price: Decimal
    amount: Decimal
    period: str | None = None  # for late_usage: the period the usage belongs to


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

    def cents(self, line: InvoiceLine) -> int:
        """Integer cents of a line, as sent to Stripe."""
        return int((line.amount * 100).to_integral_exact())

    @property
    def total_cents(self) -> int:
        return int((self.total * 100).to_integral_exact())
