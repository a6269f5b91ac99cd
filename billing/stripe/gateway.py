"""A thin, typed wrapper over stripe-python for the calls the push makes, with our own retries.

stripe-python's built-in retries skip 429 and cannot be observed, so the client runs with
``max_network_retries=0`` and ``call`` retries connection errors, 409, 429 and 5xx with
exponential backoff and jitter (honouring ``Stripe-Should-Retry``). Every create passes the
caller's deterministic idempotency key, so a retry after a lost response is replayed by Stripe,
never executed twice. Errors leave as ``StripeCallError`` with the secret key redacted.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import stripe

from billing.backoff import RetryPolicy
from common.errors import UserError
from common.settings import Settings

# The logger's name is pinned: operators filter on it; it predates the module's move.
log = logging.getLogger("billing.stripe_gateway")

T = TypeVar("T")
S = TypeVar("S", bound=stripe.StripeObject)

RETRYABLE_STATUSES = frozenset({409, 429})


class StripeCallError(Exception):
    """A Stripe call that failed for good (non-retryable, or out of attempts)."""

    def __init__(
        self,
        operation: str,
        message: str,
        *,
        http_status: int | None,
        code: str | None,
        retryable: bool,
        attempts: int,
    ) -> None:
        super().__init__(f"{operation}: {message}")
        self.operation = operation
        self.http_status = http_status
        self.code = code
        self.retryable = retryable
        self.attempts = attempts


def _header(error: stripe.StripeError, name: str) -> str | None:
    for key, value in (error.headers or {}).items():
        if key.lower() == name:
            return value
    return None


def is_retryable(error: stripe.StripeError) -> bool:
    """Connection errors, 409, 429 and 5xx, unless Stripe says otherwise in a header."""
    advice = _header(error, "stripe-should-retry")
    if advice in ("true", "false"):
        return advice == "true"
    status = error.http_status
    return status is None or status in RETRYABLE_STATUSES or status >= 500


@dataclass
class StripeGateway:
    """The Stripe calls of the push, each through ``call`` (retries, redaction, typed results)."""

    client: stripe.StripeClient
    api_base: str
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random = field(default_factory=random.Random)
    redact: tuple[str, ...] = ()

    @classmethod
    def from_settings(
        cls, cfg: Settings, retry: RetryPolicy | None = None, timeout: float = 30.0
    ) -> StripeGateway:
        if cfg.stripe_secret_key is None or not cfg.stripe_secret_key.get_secret_value():
            raise UserError("STRIPE_SECRET_KEY is not set; it is needed to push to Stripe")
        api_base = (cfg.stripe_api_base or stripe.DEFAULT_API_BASE).rstrip("/")
        if not api_base.startswith(("http://", "https://")):
            raise UserError(f"invalid STRIPE_API_BASE {api_base!r}: expected an http(s) URL")
        key = cfg.stripe_secret_key.get_secret_value()
        return cls.connect(key, api_base, retry or RetryPolicy(), timeout=timeout)

    @classmethod
    def connect(
        cls, api_key: str, api_base: str, retry: RetryPolicy, *, timeout: float = 30.0
    ) -> StripeGateway:
        client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base},
            max_network_retries=0,
            http_client=stripe.RequestsClient(timeout=timeout),
        )
        return cls(client=client, api_base=api_base, retry=retry, redact=(api_key,))

    def call(self, operation: str, fn: Callable[[], T]) -> T:
        """Run one Stripe request, retrying what may succeed on a later attempt."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except stripe.StripeError as exc:
                retryable = is_retryable(exc)
                if not retryable or attempt >= self.retry.max_attempts:
                    raise self._failure(operation, exc, retryable, attempt) from exc
                pause = self.retry.delay(attempt, self.rng)
                log.warning(
                    "stripe %s failed (%s), retry %d in %.2fs",
                    operation,
                    self._describe(exc),
                    attempt,
                    pause,
                )
                self.sleep(pause)

    def _describe(self, exc: stripe.StripeError) -> str:
        if exc.http_status is None:
            # stripe-python wraps the cause in a support paragraph: keep only the cause.
            detail = str(exc.user_message or exc)
            detail = detail.rpartition("(Network error: ")[2].rstrip(")") or detail
            text = f"cannot reach Stripe at {self.api_base}: {detail}"
        else:
            kind = exc.error.type if exc.error is not None and exc.error.type else "error"
            text = f"HTTP {exc.http_status} {kind}: {exc.user_message or exc}"
        for secret in self.redact:
            text = text.replace(secret, "[redacted]")
        return " ".join(text.split())

    def _failure(
        self, operation: str, exc: stripe.StripeError, retryable: bool, attempts: int
    ) -> StripeCallError:
        message = self._describe(exc)
        if retryable:
            message += f" (gave up after {attempts} attempts)"
        return StripeCallError(
            operation,
            message,
            http_status=exc.http_status,
            code=exc.code,
            retryable=retryable,
            attempts=attempts,
        )

    # The calls the push makes. Searches are eventually consistent at Stripe: callers use them
    # only to recover state they lost, never as the only guard against duplicates.

    def _find(
        self,
        operation: str,
        search: Callable[..., stripe.SearchResultObject[S]],
        key: str,
        value: str,
    ) -> S | None:
        """The first object whose metadata ``key`` is ``value``, if any."""
        params: dict[str, Any] = {"query": metadata_query(key, value), "limit": 2}
        found = self.call(operation, lambda: search(params=params))
        return found.data[0] if found.data else None

    def _create(
        self, operation: str, create: Callable[..., S], params: dict[str, Any], key: str
    ) -> S:
        """Create an object under an idempotency key (a retry or rerun replays, never repeats)."""
        return self.call(operation, lambda: create(params=params, options={"idempotency_key": key}))

    def _list(self, operation: str, first_page: Callable[[], stripe.ListObject[S]]) -> list[S]:
        """Every object of a listing, all its pages (one call: retried as a whole)."""
        return self.call(operation, lambda: list(first_page().auto_paging_iter()))

    def find_customer(self, tenant_id: str) -> stripe.Customer | None:
        search = self.client.v1.customers.search
        return self._find(f"search customer of {tenant_id}", search, "tenant_id", tenant_id)

    def create_customer(
        self, tenant_id: str, metadata: Mapping[str, str], idempotency_key: str
    ) -> stripe.Customer:
        params = {
            "name": tenant_id,
            "description": f"pf-metering tenant {tenant_id}",
            "metadata": dict(metadata),
        }
        create = self.client.v1.customers.create
        return self._create(f"create customer of {tenant_id}", create, params, idempotency_key)

    def find_invoice(self, invoice_id: str) -> stripe.Invoice | None:
        search = self.client.v1.invoices.search
        return self._find(f"search invoice {invoice_id}", search, "invoice_id", invoice_id)

    def retrieve_invoice(self, stripe_invoice_id: str) -> stripe.Invoice:
        return self.call(
            f"retrieve invoice {stripe_invoice_id}",
            lambda: self.client.v1.invoices.retrieve(stripe_invoice_id),
        )

    def create_invoice(
        self,
        *,
        customer_id: str,
        currency: str,
        days_until_due: int,
        description: str,
        metadata: Mapping[str, str],
        idempotency_key: str,
    ) -> stripe.Invoice:
        params = {
            "customer": customer_id,
            "currency": currency,
            "auto_advance": False,
            "collection_method": "send_invoice",
            "days_until_due": days_until_due,
            "pending_invoice_items_behavior": "exclude",
            "description": description,
            "metadata": dict(metadata),
        }
        operation = f"create invoice {metadata.get('invoice_id', '')}".strip()
        return self._create(operation, self.client.v1.invoices.create, params, idempotency_key)

    def list_lines(self, stripe_invoice_id: str) -> list[stripe.InvoiceLineItem]:
        lines = self.client.v1.invoices.line_items
        return self._list(
            f"list lines of {stripe_invoice_id}",
            lambda: lines.list(stripe_invoice_id, params={"limit": 100}),
        )

    def create_item(
        self,
        *,
        idempotency_key: str,
        customer_id: str,
        stripe_invoice_id: str,
        amount_cents: int,
        currency: str,
        description: str,
        metadata: Mapping[str, str],
    ) -> stripe.InvoiceItem:
        params = {
            "customer": customer_id,
            "invoice": stripe_invoice_id,
            "amount": amount_cents,
            "currency": currency,
            "description": description,
            "metadata": dict(metadata),
        }
        create = self.client.v1.invoice_items.create
        return self._create(
            f"create invoice item {idempotency_key}", create, params, idempotency_key
        )

    def finalize_invoice(self, stripe_invoice_id: str, idempotency_key: str) -> stripe.Invoice:
        return self.call(
            f"finalize invoice {stripe_invoice_id}",
            lambda: self.client.v1.invoices.finalize_invoice(
                stripe_invoice_id,
                params={"auto_advance": True},
                options={"idempotency_key": idempotency_key},
            ),
        )

    def void_invoice(self, stripe_invoice_id: str, idempotency_key: str) -> stripe.Invoice:
        """Void an open (or uncollectible) Stripe invoice."""
        return self.call(
            f"void invoice {stripe_invoice_id}",
            lambda: self.client.v1.invoices.void_invoice(
                stripe_invoice_id, options={"idempotency_key": idempotency_key}
            ),
        )

    def delete_invoice(self, stripe_invoice_id: str) -> None:
        """Delete a Stripe draft (what never was finalized cannot be voided)."""
        self.call(
            f"delete draft invoice {stripe_invoice_id}",
            lambda: self.client.v1.invoices.delete(stripe_invoice_id),
        )

    def list_credit_notes(self, stripe_invoice_id: str) -> list[stripe.CreditNote]:
        notes = self.client.v1.credit_notes
        return self._list(
            f"list credit notes of {stripe_invoice_id}",
            lambda: notes.list(params={"invoice": stripe_invoice_id, "limit": 100}),
        )

    def create_credit_note(
        self,
        *,
        stripe_invoice_id: str,
        amount_cents: int,
        memo: str,
        metadata: Mapping[str, str],
        idempotency_key: str,
    ) -> stripe.CreditNote:
        """A credit note for a paid invoice, credited to the customer's balance (Stripe
        applies it to their next invoice; refunding money stays a decision made in Stripe)."""
        params = {
            "invoice": stripe_invoice_id,
            "amount": amount_cents,
            "credit_amount": amount_cents,
            "memo": memo,
            "metadata": dict(metadata),
        }
        create = self.client.v1.credit_notes.create
        return self._create(
            f"create credit note for {stripe_invoice_id}", create, params, idempotency_key
        )


def metadata_query(key: str, value: str) -> str:
    """A Stripe search clause matching one metadata value exactly (quotes escaped)."""
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"metadata['{key}']:'{escaped}'"
