"""Voiding a void local invoice in Stripe: idempotent, resumable, one result per invoice.

What Stripe allows decides the call, read from Stripe's invoice each time:

- open (or uncollectible): void it (key ``pf-void-<invoice_id>``);
- paid: Stripe cannot void it, so a credit note for its total, credited to the customer's
  balance (key ``pf-credit-note-<invoice_id>``), after looking for ours by metadata;
- draft (a push that stopped before finalizing): delete it;
- void already: nothing to do.

It goes step by step as the push does (``billing.stripe.push``), on the same state: the push
row of the invoice (``stripe_pushes``) says which Stripe invoice it is, and gains
``void_action`` once done; without a row the invoice is looked up by metadata. A rerun after a
crash or a lost response anywhere reads Stripe's invoice again and takes the step still
missing, never a second credit note.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum

import stripe

from billing.model import Invoice, InvoiceStatus
from billing.stripe import state as stripe_state
from billing.stripe.gateway import StripeCallError, StripeGateway
from billing.stripe.push import PushRefused, metadata_value
from billing.stripe.state import Connect
from common.errors import OperationError

log = logging.getLogger("billing.stripe_void")

MEMO_LIMIT = 500  # characters of a credit note's memo we send


class VoidAction(StrEnum):
    voided = "voided"
    credited = "credited"
    deleted = "deleted"
    absent = "absent"  # never reached Stripe: nothing to do there


@dataclass(frozen=True)
class VoidResult:
    invoice_id: str
    tenant_id: str
    action: VoidAction | None  # None: failed
    stripe_invoice_id: str | None = None
    credit_note_id: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.action is not None


def void_key(invoice_id: str) -> str:
    return f"pf-void-{invoice_id}"


def credit_note_key(invoice_id: str) -> str:
    return f"pf-credit-note-{invoice_id}"


def credit_note_memo(invoice: Invoice) -> str:
    """The same text on every rerun (the reason is stored with the void invoice)."""
    memo = f"pf-metering {invoice.invoice_id} ({invoice.period}) void: {invoice.void_reason}"
    return memo[:MEMO_LIMIT]


@dataclass
class StripeVoider:
    gateway: StripeGateway
    connect: Connect

    def pending(self, invoice: Invoice) -> bool:
        """The invoice is known in Stripe (a push row) and voiding it there is not done."""
        with self.connect() as con:
            state = stripe_state.get_push(con, invoice.invoice_id)
        return state is not None and state.void_action is None

    def void(self, invoice: Invoice) -> VoidResult:
        """Void ``invoice`` (void locally) in Stripe; a failure is a result, not raised."""
        try:
            if invoice.status is not InvoiceStatus.void:
                raise PushRefused(
                    f"invoice is {invoice.status.value}; only a void invoice is voided in Stripe"
                )
            result = self._void(invoice)
        except (StripeCallError, PushRefused, OperationError) as exc:
            log.error("stripe void of %s failed: %s", invoice.invoice_id, exc)
            return VoidResult(invoice.invoice_id, invoice.tenant_id, None, error=str(exc))
        log.info("stripe void of %s done: %s", invoice.invoice_id, result.action)
        return result

    def _void(self, invoice: Invoice) -> VoidResult:
        with self.connect() as con:
            state = stripe_state.get_push(con, invoice.invoice_id)
        if state is not None and state.void_action is not None:
            return self._result(invoice, VoidAction(state.void_action), state)
        remote = self._remote(invoice, state)
        if remote is None:  # a draft an earlier run deleted, or never in Stripe
            gone = VoidAction.deleted if state is not None else VoidAction.absent
            return VoidResult(invoice.invoice_id, invoice.tenant_id, gone)
        credit_note: str | None = None
        if remote.status == "draft":
            self.gateway.delete_invoice(remote.id)
            action = VoidAction.deleted
        elif remote.status in ("open", "uncollectible"):
            self.gateway.void_invoice(remote.id, void_key(invoice.invoice_id))
            action = VoidAction.voided
        elif remote.status == "void":
            action = VoidAction.voided
        elif remote.status == "paid":
            credit_note = self._credit_note(invoice, remote)
            action = VoidAction.credited
        else:
            raise PushRefused(f"Stripe invoice {remote.id} is {remote.status}: not voided")
        with self.connect() as con:
            stripe_state.mark_void_done(con, invoice.invoice_id, action.value, credit_note)
        return VoidResult(
            invoice.invoice_id, invoice.tenant_id, action, remote.id, credit_note_id=credit_note
        )

    def _result(
        self, invoice: Invoice, action: VoidAction, state: stripe_state.PushState
    ) -> VoidResult:
        return VoidResult(
            invoice.invoice_id,
            invoice.tenant_id,
            action,
            state.stripe_invoice_id,
            credit_note_id=state.credit_note_id,
        )

    def _remote(
        self, invoice: Invoice, state: stripe_state.PushState | None
    ) -> stripe.Invoice | None:
        """Stripe's invoice for ours (recorded, else found by metadata; a deleted draft is
        gone), recording a found one as the push would."""
        if state is not None:
            try:
                return self.gateway.retrieve_invoice(state.stripe_invoice_id)
            except StripeCallError as exc:
                if exc.http_status != 404:
                    raise
                with self.connect() as con:  # deleted by an earlier run whose answer was lost
                    stripe_state.mark_void_done(
                        con, invoice.invoice_id, VoidAction.deleted.value, None
                    )
                return None
        remote = self.gateway.find_invoice(invoice.invoice_id)
        if remote is not None:
            with self.connect() as con:
                stripe_state.put_push(con, invoice.invoice_id, remote.id, str(remote.customer))
        return remote

    def _credit_note(self, invoice: Invoice, remote: stripe.Invoice) -> str | None:
        """Our credit note for paid ``remote``: found by metadata, else created (none for a
        zero total)."""
        if remote.total != invoice.total_cents:
            raise PushRefused(
                f"Stripe invoice {remote.id} totals {remote.total} cents, ours is "
                f"{invoice.total_cents}: no credit note; check it in Stripe"
            )
        if invoice.total_cents <= 0:
            return None
        for note in self.gateway.list_credit_notes(remote.id):
            if metadata_value(note, "invoice_id") == invoice.invoice_id:
                return str(note.id)
        created = self.gateway.create_credit_note(
            stripe_invoice_id=remote.id,
            amount_cents=invoice.total_cents,
            memo=credit_note_memo(invoice),
            metadata={
                "invoice_id": invoice.invoice_id,
                "tenant_id": invoice.tenant_id,
                "period": invoice.period,
            },
            idempotency_key=credit_note_key(invoice.invoice_id),
        )
        return str(created.id)
