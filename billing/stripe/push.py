"""Pushing finalized invoices to Stripe: idempotent, resumable, one result per invoice.

Order of calls (a deliberate deviation from docs/spec.md, "Stripe", which lists the items
before the invoice):

1. customer: local table, else search by ``metadata['tenant_id']``, else create
   (key ``pf-customer-<tenant_id>``);
2. the draft invoice, created *first* with ``pending_invoice_items_behavior=exclude``
   (key ``pf-invoice-<invoice_id>``), after looking for it locally and by metadata;
3. one invoice item per non-zero line, attached with ``invoice=<id>``
   (key ``pf-item-<invoice_id>-<line index>-<code>``), skipping lines the invoice already has;
4. finalize (key ``pf-finalize-<invoice_id>``), unless Stripe shows it is no longer a draft;
5. Stripe's total must equal ours to the cent, then the local invoice becomes ``sent``.

Before the first call, an invoice with an amount beyond Stripe's limit (eight digits of cents)
is refused, that invoice alone (``check_stripe_limits``).

Items created before their invoice are "pending" on the customer and would be swept into
whichever invoice is created next; creating the invoice first means a crash can never leave
such strays. Every create carries a deterministic key and a deterministic body, so a retry or a
rerun within Stripe's 24 h idempotency window is replayed, and the look-ups before each create
keep a rerun after the window from duplicating anything. Local state is written after each
successful call on a short-lived connection, never held open across HTTP calls.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Any, Protocol

import duckdb
import stripe

from billing.db import transaction
from billing.model import Invoice, InvoiceStatus
from billing.stripe import state as stripe_state
from billing.stripe.gateway import StripeCallError, StripeGateway
from billing.stripe.state import Connect
from common.errors import OperationError

# The logger's name is pinned: operators filter on it; it predates the module's move.
log = logging.getLogger("billing.stripe_push")

PUSHABLE = frozenset({InvoiceStatus.finalized})
STRIPE_MAX_AMOUNT = 99_999_999
"""Stripe takes amounts of at most eight digits in the currency's minor unit (999,999.99 usd
for an invoice item, and for what an invoice charges)."""
ALREADY_PUSHED = frozenset({InvoiceStatus.sent, InvoiceStatus.paid, InvoiceStatus.overdue})


class SentMarker(Protocol):
    """The one thing the push needs from the invoice store (``billing.invoice_store``)."""

    def mark_sent(
        self, con: duckdb.DuckDBPyConnection, invoice_id: str, stripe_invoice_id: str
    ) -> None: ...


class PushOutcome(StrEnum):
    sent = "sent"
    already_sent = "already_sent"
    failed = "failed"


@dataclass(frozen=True)
class PushResult:
    invoice_id: str
    tenant_id: str
    outcome: PushOutcome
    stripe_invoice_id: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome is not PushOutcome.failed


class PushRefused(Exception):
    """The push of one invoice stopped for a reason of ours (state or totals), not Stripe's."""


@dataclass(frozen=True)
class PlannedItem:
    """One invoice item as Stripe gets it; ``ref`` (line index and code) identifies it there."""

    ref: str
    code: str
    amount_cents: int
    description: str
    idempotency_key: str


def customer_key(tenant_id: str) -> str:
    return f"pf-customer-{tenant_id}"


def invoice_key(invoice_id: str) -> str:
    return f"pf-invoice-{invoice_id}"


def finalize_key(invoice_id: str) -> str:
    return f"pf-finalize-{invoice_id}"


def planned_items(invoice: Invoice) -> list[PlannedItem]:
    """One item per non-zero line; the index is the line's position, stable across reruns."""
    items = []
    for index, line in enumerate(invoice.lines):
        cents = invoice.cents(line)
        if cents == 0:
            continue
        ref = f"{index}-{line.code}"
        items.append(
            PlannedItem(
                ref=ref,
                code=line.code,
                amount_cents=cents,
                description=line.description or line.code,
                idempotency_key=f"pf-item-{invoice.invoice_id}-{ref}",
            )
        )
    return items


def check_stripe_limits(invoice: Invoice) -> None:
    """``PushRefused`` naming the invoice and the limit when Stripe would refuse an amount
    of it (checked before any call, so nothing of such an invoice reaches Stripe)."""
    limit = f"Stripe accepts at most {STRIPE_MAX_AMOUNT} cents (8 digits) per amount"
    for item in planned_items(invoice):
        if abs(item.amount_cents) > STRIPE_MAX_AMOUNT:
            raise PushRefused(
                f"invoice {invoice.invoice_id}: line {item.ref} is {item.amount_cents} cents; "
                f"{limit}: split it or bill it outside Stripe"
            )
    if abs(invoice.total_cents) > STRIPE_MAX_AMOUNT:
        raise PushRefused(
            f"invoice {invoice.invoice_id}: its total is {invoice.total_cents} cents; {limit}"
        )


def days_until_due(invoice: Invoice) -> int:
    """Our due date as days after our finalization: fixed per invoice, so the create body (and
    its idempotency key) never changes between reruns. Stripe counts these days from its own
    finalization, so a late push shifts Stripe's due date; ours stays the authority."""
    base = invoice.finalized_at or invoice.period_end
    days = math.ceil((invoice.due_date - base) / timedelta(days=1))
    return max(1, days)


def metadata_value(obj: stripe.StripeObject, key: str) -> str | None:
    """One metadata value; item access works the same on every stripe-python release."""
    data = getattr(obj, "metadata", None)
    return str(data[key]) if data is not None and key in data else None


def invoice_create_args(invoice: Invoice) -> dict[str, Any]:
    """What creating our invoice's Stripe draft sends (besides the customer): the same
    body on every rerun, so its idempotency key never meets a different request."""
    return {
        "currency": invoice.currency,
        "days_until_due": days_until_due(invoice),
        "description": f"pf-metering {invoice.tenant_id} {invoice.period}",
        "metadata": {
            "invoice_id": invoice.invoice_id,
            "tenant_id": invoice.tenant_id,
            "period": invoice.period,
        },
        "idempotency_key": invoice_key(invoice.invoice_id),
    }


@dataclass
class StripePusher:
    gateway: StripeGateway
    store: SentMarker
    connect: Connect

    def push_all(self, invoices: Iterable[Invoice]) -> list[PushResult]:
        """Push each invoice; one failure never stops the others."""
        return [self.push(invoice) for invoice in invoices]

    def push(self, invoice: Invoice) -> PushResult:
        if invoice.status in ALREADY_PUSHED and invoice.stripe_invoice_id:
            return PushResult(
                invoice.invoice_id,
                invoice.tenant_id,
                PushOutcome.already_sent,
                invoice.stripe_invoice_id,
            )
        try:
            if invoice.status not in PUSHABLE:
                raise PushRefused(
                    f"invoice is {invoice.status.value}; only finalized invoices go to Stripe"
                )
            check_stripe_limits(invoice)
            stripe_id = self._push(invoice)
        except (StripeCallError, PushRefused, OperationError) as exc:
            log.error("stripe push of %s failed: %s", invoice.invoice_id, exc)
            return PushResult(
                invoice.invoice_id, invoice.tenant_id, PushOutcome.failed, error=str(exc)
            )
        log.info("stripe push of %s done: %s", invoice.invoice_id, stripe_id)
        return PushResult(invoice.invoice_id, invoice.tenant_id, PushOutcome.sent, stripe_id)

    def _push(self, invoice: Invoice) -> str:
        with self.connect() as con:
            customer_id = stripe_state.get_customer(con, invoice.tenant_id)
            state = stripe_state.get_push(con, invoice.invoice_id)
        if customer_id is None:
            customer_id = self._customer(invoice.tenant_id)
        remote = self._draft(invoice, customer_id, state)
        if remote.status == "draft":
            expected = self._add_items(invoice, customer_id, remote.id)
            if expected != invoice.total_cents:
                raise PushRefused(
                    f"draft {remote.id} would total {expected} cents, ours is "
                    f"{invoice.total_cents}; not finalizing"
                )
            remote = self.gateway.finalize_invoice(remote.id, finalize_key(invoice.invoice_id))
        if remote.total != invoice.total_cents:
            raise PushRefused(
                f"Stripe invoice {remote.id} totals {remote.total} cents, ours is "
                f"{invoice.total_cents}: check it in Stripe before it is collected"
            )
        with self.connect() as con, transaction(con):
            stripe_state.mark_finalized(con, invoice.invoice_id, remote.total)
            self.store.mark_sent(con, invoice.invoice_id, remote.id)
        return remote.id

    def _customer(self, tenant_id: str) -> str:
        found = self.gateway.find_customer(tenant_id)
        customer = found or self.gateway.create_customer(
            tenant_id, {"tenant_id": tenant_id}, customer_key(tenant_id)
        )
        with self.connect() as con:
            stripe_state.put_customer(con, tenant_id, customer.id)
        return customer.id

    def _draft(
        self, invoice: Invoice, customer_id: str, state: stripe_state.PushState | None
    ) -> stripe.Invoice:
        """The Stripe invoice for ours: known locally, found by metadata, or created."""
        if state is not None:
            return self.gateway.retrieve_invoice(state.stripe_invoice_id)
        remote = self.gateway.find_invoice(invoice.invoice_id)
        if remote is None:
            remote = self.gateway.create_invoice(
                customer_id=customer_id, **invoice_create_args(invoice)
            )
        elif remote.customer != customer_id:
            raise PushRefused(
                f"Stripe invoice {remote.id} for {invoice.invoice_id} belongs to customer "
                f"{remote.customer}, not {customer_id}"
            )
        with self.connect() as con:
            stripe_state.put_push(con, invoice.invoice_id, remote.id, customer_id)
        return remote

    def _add_items(self, invoice: Invoice, customer_id: str, stripe_invoice_id: str) -> int:
        """Create the missing items; return the draft's total as Stripe will compute it."""
        present: dict[str, int] = {}
        foreign = 0
        for line in self.gateway.list_lines(stripe_invoice_id):
            ref = metadata_value(line, "pf_line")
            if ref is None:
                foreign += line.amount
            else:
                present[ref] = present.get(ref, 0) + line.amount
        total = foreign + sum(present.values())
        for item in planned_items(invoice):
            if item.ref in present:
                continue
            created = self.gateway.create_item(
                customer_id=customer_id,
                stripe_invoice_id=stripe_invoice_id,
                amount_cents=item.amount_cents,
                currency=invoice.currency,
                description=item.description,
                metadata={
                    "invoice_id": invoice.invoice_id,
                    "pf_line": item.ref,
                    "code": item.code,
                },
                idempotency_key=item.idempotency_key,
            )
            total += created.amount
        return total
