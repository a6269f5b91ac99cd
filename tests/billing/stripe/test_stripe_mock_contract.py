"""Contract tests: every Stripe call the push and the void make, as they make them, against the
official stripe-mock (which validates requests against Stripe's OpenAPI spec).

Two angles: each gateway call with the parameters the push builds, read back through the
fields the push relies on; and every request a real push (with a fault and a resume) sent to
our fake Stripe, replayed byte for byte to stripe-mock, which proves the fake serves real
Stripe paths and that nothing we send is invalid."""

from __future__ import annotations

import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import stripe

from billing.model import CREDIT_APPLIED, CREDIT_CARRIED, USAGE_CORRECTION, Invoice, InvoiceStatus
from billing.stripe.gateway import StripeGateway
from billing.stripe.push import finalize_key, invoice_create_args, planned_items
from billing.stripe.voiding import StripeVoider, credit_note_key, credit_note_memo, void_key
from tests.fixtures.cli import Cli
from tests.fixtures.seeds import SEED, correction, event
from tests.fixtures.stripe import (
    API_KEY,
    LocalBilling,
    make_gateway,
    priced_invoices,
    sample_invoices,
)
from tests.support.books import Books
from tests.support.stripe_server import Call, FakeStripe, running

OPERATIONS = {
    ("GET", "/v1/customers/search"),
    ("POST", "/v1/customers"),
    ("GET", "/v1/invoices/search"),
    ("POST", "/v1/invoices"),
    ("GET", "/v1/invoices/{id}"),
    ("GET", "/v1/invoices/{id}/lines"),
    ("POST", "/v1/invoiceitems"),
    ("POST", "/v1/invoices/{id}/finalize"),
}


@pytest.fixture
def mock_gateway(stripe_mock_url: str) -> StripeGateway:
    return make_gateway(stripe_mock_url, attempts=1)


def test_customer_search_and_create(mock_gateway: StripeGateway) -> None:
    found = mock_gateway.find_customer("acme.eu:prod-1")
    assert found is None or isinstance(found.id, str)
    created = mock_gateway.create_customer("acme", {"tenant_id": "acme"}, "pf-customer-acme")
    assert isinstance(created, stripe.Customer) and created.id


def test_invoice_create_retrieve_and_search(mock_gateway: StripeGateway) -> None:
    invoice = sample_invoices()[0]
    created = mock_gateway.create_invoice(customer_id="cus_123", **invoice_create_args(invoice))
    assert isinstance(created, stripe.Invoice)
    assert isinstance(created.status, str) and isinstance(created.total, int)
    assert isinstance(created.customer, str)
    again = mock_gateway.retrieve_invoice(created.id)
    assert again.id == created.id
    found = mock_gateway.find_invoice(invoice.invoice_id)
    assert found is None or isinstance(found.total, int)


def test_items_including_negative_amounts_and_lines(mock_gateway: StripeGateway) -> None:
    invoice = sample_invoices()[0]
    items = planned_items(invoice)
    assert any(i.amount_cents < 0 for i in items)
    for item in items:
        created = mock_gateway.create_item(
            customer_id="cus_123",
            stripe_invoice_id="in_123",
            amount_cents=item.amount_cents,
            currency=invoice.currency,
            description=item.description,
            metadata={"invoice_id": invoice.invoice_id, "pf_line": item.ref, "code": item.code},
            idempotency_key=item.idempotency_key,
        )
        assert isinstance(created, stripe.InvoiceItem) and isinstance(created.amount, int)
    lines = mock_gateway.list_lines("in_123")
    assert lines and all(isinstance(line, stripe.InvoiceLineItem) for line in lines)
    assert all(isinstance(line.amount, int) for line in lines)
    assert all(line.metadata is not None for line in lines)


def test_finalize(mock_gateway: StripeGateway) -> None:
    finalized = mock_gateway.finalize_invoice("in_123", finalize_key("inv-acme-2025-01"))
    assert isinstance(finalized, stripe.Invoice) and isinstance(finalized.total, int)


def test_void_delete_and_credit_notes(mock_gateway: StripeGateway) -> None:
    invoice = voided_invoice(sample_invoices()[0])
    done = mock_gateway.void_invoice("in_123", void_key(invoice.invoice_id))
    assert isinstance(done, stripe.Invoice) and isinstance(done.status, str)
    mock_gateway.delete_invoice("in_123")
    notes = mock_gateway.list_credit_notes("in_123")
    assert all(isinstance(n, stripe.CreditNote) and n.metadata is not None for n in notes)
    note = mock_gateway.create_credit_note(
        stripe_invoice_id="in_123",
        amount_cents=invoice.total_cents,
        memo=credit_note_memo(invoice),
        metadata={"invoice_id": invoice.invoice_id},
        idempotency_key=credit_note_key(invoice.invoice_id),
    )
    assert isinstance(note, stripe.CreditNote) and isinstance(note.id, str)


def voided_invoice(invoice: Invoice) -> Invoice:
    return invoice.model_copy(update={"status": InvoiceStatus.void, "void_reason": "wrong"})


def test_stripe_mock_rejects_what_stripe_rejects(mock_gateway: StripeGateway) -> None:
    """The contract tests can fail: stripe-mock refuses a parameter Stripe does not know."""
    unknown: Any = {"customer": "cus_123", "amount": 1, "currency": "usd", "bogus": "x"}
    with pytest.raises(stripe.InvalidRequestError, match="additional properties"):
        mock_gateway.client.v1.invoice_items.create(params=unknown)


def operation(call: Call) -> tuple[str, str]:
    path = re.sub(r"^/v1/invoices/(?!search$)[^/]+", "/v1/invoices/{id}", call.path)
    return call.method, path


def replay(base: str, call: Call) -> tuple[int, str]:
    """Send a recorded request again, to stripe-mock, with the headers stripe-python sent."""
    url = base + call.path
    if call.method in ("GET", "DELETE") and call.params:
        url += "?" + urllib.parse.urlencode(_flatten(call.params))
    keep = ("authorization", "stripe-version", "content-type", "idempotency-key", "user-agent")
    request = urllib.request.Request(
        url,
        data=call.body if call.method == "POST" else None,  # GET and DELETE: the query
        headers={k: v for k, v in call.headers.items() if k in keep},
        method=call.method,
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _flatten(params: dict[str, object], prefix: str = "") -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for key, value in params.items():
        name = f"{prefix}[{key}]" if prefix else key
        if isinstance(value, dict):
            out.extend(_flatten(value, name))
        else:
            out.append((name, str(value)))
    return out


VOID_OPERATIONS = {
    ("GET", "/v1/invoices/search"),
    ("GET", "/v1/invoices/{id}"),
    ("POST", "/v1/invoices/{id}/void"),
    ("DELETE", "/v1/invoices/{id}"),
    ("GET", "/v1/credit_notes"),
    ("POST", "/v1/credit_notes"),
}


def test_every_request_of_a_resumed_void_is_valid_for_stripe_mock(
    stripe_mock_url: str, tmp_path: Path
) -> None:
    """An open one voided, a paid one credited (its answer lost, then resumed), a draft
    deleted, one found by search: every request replayed to stripe-mock."""
    fake = FakeStripe(api_key=API_KEY)
    invoices = sample_invoices()
    with running(fake), LocalBilling(tmp_path / "billing.duckdb").warm() as billing:
        billing.add(*invoices)
        fake.inject("fail", status=400, when=lambda c: c.path.endswith("/finalize"), times=1)
        assert [r.ok for r in billing.pusher(make_gateway(fake.url)).push_all(invoices)] == [
            False,
            True,
            True,
        ]
        fake.pay(fake.invoices_for(invoices[1].invoice_id)[0]["id"])
        with billing.connect() as con:  # the third is found by metadata, not from our state
            con.execute("DELETE FROM stripe_pushes WHERE invoice_id = ?", [invoices[2].invoice_id])
        fake.inject("drop", when=lambda c: c.method == "POST" and c.path == "/v1/credit_notes")
        start = len(fake.calls)
        voider = StripeVoider(make_gateway(fake.url), billing.connect)
        first = [voider.void(voided_invoice(i)) for i in invoices]
        assert [r.ok for r in first] == [True, False, True]
        assert all(voider.void(voided_invoice(i)).ok for i in invoices)
    calls = fake.calls[start:]
    assert {operation(c) for c in calls} == VOID_OPERATIONS
    for call in calls:
        status, body = replay(stripe_mock_url, call)
        assert status == 200, (call.method, call.path, call.params, body[:500])


def test_every_request_of_a_resumed_push_is_valid_for_stripe_mock(
    stripe_mock_url: str, tmp_path: Path
) -> None:
    fake = FakeStripe(api_key=API_KEY)
    invoices = sample_invoices() + priced_invoices()  # graduated, package and true-up lines too
    with running(fake), LocalBilling(tmp_path / "billing.duckdb").warm() as billing:
        billing.add(*invoices)
        fake.inject("drop", when=lambda c: c.path.endswith("/finalize"))
        first = billing.pusher(make_gateway(fake.url)).push_all(invoices)
        assert not first[0].ok
        rerun = [billing.get(i.invoice_id) for i in invoices]
        assert all(r.ok for r in billing.pusher(make_gateway(fake.url)).push_all(rerun))
    assert {operation(c) for c in fake.calls} == OPERATIONS
    assert all("stripe-version" in c.headers for c in fake.calls)
    for call in fake.calls:
        status, body = replay(stripe_mock_url, call)
        assert status == 200, (call.method, call.path, call.params, body[:500])


def test_corrections_and_credits_reach_stripe_to_the_cent_and_every_request_is_valid(
    stripe_mock_url: str, pfm: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``bill --stripe`` with a period credited after it was pushed: negative items (the
    correction, the credit applied), a 0.00 invoice (paid as it is finalized, as Stripe
    does), each Stripe total equal to ours, and every request valid for stripe-mock."""
    fake = FakeStripe(api_key=API_KEY)
    with running(fake):
        monkeypatch.setenv("STRIPE_SECRET_KEY", API_KEY)
        monkeypatch.setenv("STRIPE_API_BASE", fake.url)
        pfm.publish(event("acme", "2025-01", **{**SEED, "violations": 122}))
        assert pfm("bill", "--as-of", "2025-02-01T02:00:00Z", "--stripe").code == 0
        pfm.publish(correction("acme", "2025-01", violations=-120))
        assert pfm("bill", "--as-of", "2025-05-01T02:00:00Z", "--stripe").code == 0
        invoices = Books().invoices("acme")
        assert [str(i.total) for i in invoices] == ["173.66", "0.00", "0.00", "30.00"]
        codes = set()
        for invoice in invoices:
            assert invoice.status is InvoiceStatus.sent
            (remote,) = fake.invoices_for(invoice.invoice_id)
            items = fake.items_of(remote["id"])
            assert sum(item["amount"] for item in items) == invoice.total_cents
            assert fake.total_of(remote["id"]) == invoice.total_cents
            assert remote["status"] == ("paid" if invoice.total == 0 else "open")
            assert [i["amount"] for i in items] == [i.amount_cents for i in planned_items(invoice)]
            codes |= {i["metadata"]["code"] for i in items if i["amount"] < 0}
        assert codes == {USAGE_CORRECTION, CREDIT_APPLIED}
        assert CREDIT_CARRIED in {ln.code for ln in invoices[1].lines}
    for call in fake.calls:
        status, body = replay(stripe_mock_url, call)
        assert status == 200, (call.method, call.path, call.params, body[:500])
