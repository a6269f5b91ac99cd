"""Voiding in Stripe against our stateful fake Stripe: an open invoice is voided, a paid one
gets one credit note for its total, a draft an interrupted push left is deleted; every call
carries its deterministic key, and a fault at any call (no response, failure before, error
after; keys expired and push state lost too), then a rerun, leaves exactly that. Then the
command line: ``invoices void --stripe`` and ``invoices reissue --stripe`` on the real invoice
store, resumed by a rerun or by ``bill --stripe``."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from billing import invoice_store, invoicing
from billing.invoicing import Reissue, Rules, UsageData
from billing.model import Invoice, InvoiceStatus
from billing.stripe.push import StripePusher
from billing.stripe.voiding import StripeVoider, VoidAction, VoidResult
from billing.tiers import load_tiers
from schemas.codec import COUNTERS
from tests.fixtures.cli import Cli
from tests.fixtures.seeds import SEED, event
from tests.fixtures.stripe import (
    API_KEY,
    LocalBilling,
    fault_scenario,
    forget_everything,
    make_gateway,
    make_invoice,
    utc,
)
from tests.support.stripe_server import FakeStripe, FaultKind, StripeErr


def two_invoices() -> list[Invoice]:
    return [
        make_invoice("acme", "2025-01", [("base", "50.00"), ("risk_adjustment", "-0.53")]),
        make_invoice("acme", "2025-02", [("base", "50.00"), ("violations", "2.00")]),
    ]


def voided(invoice: Invoice) -> Invoice:
    return invoice.model_copy(
        update={"status": InvoiceStatus.void, "void_reason": "tier was wrong", "voided_by": "ops"}
    )


def pushed(fake: FakeStripe, billing: LocalBilling, invoices: list[Invoice]) -> list[str]:
    """Push ``invoices``; their Stripe ids."""
    billing.add(*invoices)
    assert all(r.ok for r in billing.pusher(make_gateway(fake.url)).push_all(invoices))
    return [fake.invoices_for(i.invoice_id)[0]["id"] for i in invoices]


def void_all(fake: FakeStripe, billing: LocalBilling, invoices: list[Invoice]) -> list[VoidResult]:
    voider = StripeVoider(make_gateway(fake.url), billing.connect)
    return [voider.void(voided(i)) for i in invoices]


def assert_voided(
    fake: FakeStripe, invoices: list[Invoice], paid: set[str], extra: int = 0
) -> None:
    """Each Stripe invoice void, or (paid) still paid with exactly one credit note of ours
    for its total credited to the customer's balance; nothing else created (but ``extra``
    other invoices)."""
    credited = 0
    for invoice in invoices:
        (remote,) = fake.invoices_for(invoice.invoice_id)
        notes = fake.credit_notes_of(remote["id"])
        if invoice.invoice_id in paid:
            assert remote["status"] == "paid"
            (note,) = notes
            assert note["amount"] == note["credit_amount"] == invoice.total_cents
            assert note["type"] == "post_payment"
            assert note["metadata"]["invoice_id"] == invoice.invoice_id
            credited += invoice.total_cents
        else:
            assert remote["status"] == "void" and notes == []
    (customer,) = fake.customers_for("acme")
    assert customer["balance"] == -credited
    assert len(fake.state.invoices) == len(invoices) + extra
    assert len(fake.state.credit_notes) == len(paid)


def test_an_open_invoice_is_voided_and_a_paid_one_credited(
    fake_stripe: FakeStripe, local_billing: LocalBilling
) -> None:
    invoices = two_invoices()
    ids = pushed(fake_stripe, local_billing, invoices)
    fake_stripe.pay(ids[1])
    before = len(fake_stripe.calls)
    results = void_all(fake_stripe, local_billing, invoices)
    assert [r.action for r in results] == [VoidAction.voided, VoidAction.credited]
    assert results[1].credit_note_id == fake_stripe.credit_notes_of(ids[1])[0]["id"]
    assert_voided(fake_stripe, invoices, paid={invoices[1].invoice_id})
    posts = [(c.path, c.idempotency_key) for c in fake_stripe.calls[before:] if c.method == "POST"]
    assert posts == [
        (f"/v1/invoices/{ids[0]}/void", "pf-void-inv-acme-2025-01"),
        ("/v1/credit_notes", "pf-credit-note-inv-acme-2025-02"),
    ]
    note = next(
        c for c in fake_stripe.calls if c.method == "POST" and c.path == "/v1/credit_notes"
    ).params
    assert note["memo"] == "pf-metering inv-acme-2025-02 (2025-02) void: tier was wrong"
    assert note["invoice"] == ids[1] and note["amount"] == note["credit_amount"] == "5200"
    calls = len(fake_stripe.calls)
    again = void_all(fake_stripe, local_billing, invoices)  # done: no call at all
    assert [r.action for r in again] == [VoidAction.voided, VoidAction.credited]
    assert len(fake_stripe.calls) == calls


def test_a_draft_left_by_an_interrupted_push_is_deleted(
    fake_stripe: FakeStripe, local_billing: LocalBilling
) -> None:
    invoice = two_invoices()[0]
    local_billing.add(invoice)
    fake_stripe.inject("fail", status=400, when=lambda c: c.path.endswith("/finalize"))
    assert not local_billing.pusher(make_gateway(fake_stripe.url)).push(invoice).ok
    (draft,) = fake_stripe.invoices_for(invoice.invoice_id)
    assert draft["status"] == "draft" and fake_stripe.items_of(draft["id"])
    (result,) = void_all(fake_stripe, local_billing, [invoice])
    assert result.action is VoidAction.deleted
    assert fake_stripe.state.invoices == {} and fake_stripe.state.items == {}


def test_an_invoice_never_pushed_is_left_alone(
    fake_stripe: FakeStripe, local_billing: LocalBilling
) -> None:
    invoice = two_invoices()[0]
    (result,) = void_all(fake_stripe, local_billing, [invoice])
    assert result.action is VoidAction.absent
    assert [(c.method, c.path) for c in fake_stripe.calls] == [("GET", "/v1/invoices/search")]


def test_only_a_void_local_invoice_is_voided_in_stripe(
    fake_stripe: FakeStripe, local_billing: LocalBilling
) -> None:
    invoice = two_invoices()[0]
    pushed(fake_stripe, local_billing, [invoice])
    result = StripeVoider(make_gateway(fake_stripe.url), local_billing.connect).void(invoice)
    assert not result.ok and "only a void invoice" in (result.error or "")
    assert fake_stripe.invoices_for(invoice.invoice_id)[0]["status"] == "open"


def test_the_fake_refuses_what_stripe_refuses(fake_stripe: FakeStripe) -> None:
    customer = fake_stripe._create_customer({"metadata": {"tenant_id": "t"}})
    draft = fake_stripe._create_invoice({"customer": customer["id"]})
    with pytest.raises(StripeErr, match="only void an open"):
        fake_stripe._void(draft)
    with pytest.raises(StripeErr, match="open or paid"):
        fake_stripe._create_credit_note({"invoice": draft["id"], "amount": "1"})
    fake_stripe._create_item(
        {"customer": customer["id"], "invoice": draft["id"], "amount": "500", "currency": "usd"}
    )
    fake_stripe._finalize(fake_stripe.state.invoices[draft["id"]], {})
    with pytest.raises(StripeErr, match="only delete draft"):
        fake_stripe._delete(fake_stripe.state.invoices[draft["id"]])
    fake_stripe.pay(draft["id"])
    with pytest.raises(StripeErr, match="only void an open"):
        fake_stripe._void(fake_stripe.state.invoices[draft["id"]])
    with pytest.raises(StripeErr, match="must equal the credit note total"):
        fake_stripe._create_credit_note({"invoice": draft["id"], "amount": "500"})
    with pytest.raises(StripeErr, match="at most what the invoice has left"):
        fake_stripe._create_credit_note(
            {"invoice": draft["id"], "amount": "501", "credit_amount": "501"}
        )
    note = {"invoice": draft["id"], "amount": "500", "refund_amount": "500"}
    fake_stripe._create_credit_note(note)
    with pytest.raises(StripeErr, match="at most what the invoice has left"):
        fake_stripe._create_credit_note(note)  # nothing left to credit


# --- resumability: a fault at every call, then a rerun ---------------------------------

# An open invoice: retrieve, void. A paid one: retrieve, list its credit notes, create one.
VOID_FAULT_POINTS = 5


def test_the_fault_matrix_covers_every_call_of_a_void(tmp_path: Path) -> None:
    with fault_scenario(tmp_path / "count.duckdb") as (fake, billing):
        invoices = two_invoices()
        fake.pay(pushed(fake, billing, invoices)[1])
        before = len(fake.calls)
        assert all(r.ok for r in void_all(fake, billing, invoices))
        assert len(fake.calls) - before == VOID_FAULT_POINTS


def run_void_fault_then_rerun(
    tmp_path: Path, kind: FaultKind, at: int, *, forget: bool = False
) -> None:
    with fault_scenario(tmp_path / f"void-{kind}-{at}-{forget}.duckdb") as (fake, billing):
        invoices = two_invoices()
        fake.pay(pushed(fake, billing, invoices)[1])
        fake.inject(kind, at=at)
        first = void_all(fake, billing, invoices)
        assert not all(r.ok for r in first), f"fault {kind} at call {at} stopped nothing"
        if forget:  # rerun after Stripe's 24 h window, with our Stripe state lost
            forget_everything(fake, billing, "stripe_pushes")
        second = void_all(fake, billing, invoices)
        assert [r.action for r in second] == [VoidAction.voided, VoidAction.credited], second
        assert_voided(fake, invoices, paid={invoices[1].invoice_id})


@pytest.mark.parametrize("kind", ["fail", "drop", "error_after"])
def test_rerun_after_a_fault_at_any_call_of_a_void_voids_or_credits_once(
    tmp_path: Path, kind: FaultKind
) -> None:
    for at in range(1, VOID_FAULT_POINTS + 1):
        run_void_fault_then_rerun(tmp_path, kind, at)


def test_rerun_of_a_void_with_keys_expired_and_state_lost(tmp_path: Path) -> None:
    for at in range(1, VOID_FAULT_POINTS + 1):
        run_void_fault_then_rerun(tmp_path, "drop", at, forget=True)


# --- reissue with Stripe: the void side as above, then the replacement's push -----------


def _usage(*rows: tuple[str, str, dict[str, int]]) -> UsageData:
    """The usage view's rows (tenant, period, counters), without a snapshot."""
    data: list[dict[str, Any]] = [
        {
            "tenant_id": tenant,
            "period": period,
            "events": 1,
            "sessions": 1,
            **{c: counters.get(c, 0) for c in COUNTERS},
            "risk_score_avg": None,
            "risk_score_max": None,
        }
        for tenant, period, counters in rows
    ]
    table = pa.Table.from_pylist(data)
    return UsageData(table, {(r["tenant_id"], r["period"]): r for r in data})


REISSUE_USAGE = _usage(
    ("acme", "2025-01", {"api_calls": 700}), ("acme", "2025-02", {"violations": 1})
)
RULES = Rules(load_tiers(None), timedelta(hours=1), 30)


def reissued_with_stripe(fake: FakeStripe, billing: LocalBilling) -> list[Reissue]:
    """January (open in Stripe) and February (paid there) billed, pushed, then reissued here
    (nothing in Stripe yet)."""
    pusher = StripePusher(make_gateway(fake.url), invoice_store, billing.connect)
    with billing.connect() as con:
        jan, feb = invoicing.bill(
            con, REISSUE_USAGE, RULES, as_of=utc("2025-03-02T00:00:00")
        ).invoices
    assert all(r.ok for r in pusher.push_all([jan, feb]))
    fake.pay(fake.invoices_for(feb.invoice_id)[0]["id"])
    with billing.connect() as con:
        return [
            invoicing.reissue(
                con, REISSUE_USAGE, RULES, i.invoice_id, by="ops", now=utc(f"2025-06-0{n}T00:00:00")
            )
            for n, i in enumerate((jan, feb), 1)
        ]


def finish_in_stripe(fake: FakeStripe, billing: LocalBilling, done: list[Reissue]) -> bool:
    """What ``invoices reissue --stripe`` does after its transaction (and a rerun, or ``bill
    --stripe``, again): void the old invoice there, then push the new one; all went well?"""
    gateway = make_gateway(fake.url)
    voider = StripeVoider(gateway, billing.connect)
    pusher = StripePusher(gateway, invoice_store, billing.connect)
    ok = True
    for r in done:
        if not voider.void(r.void).ok:
            ok = False
            continue
        with billing.connect() as con:
            new = invoice_store.get_invoice(con, r.invoice.invoice_id)
        assert new is not None
        ok = pusher.push(new).ok and ok
    return ok


def assert_reissued(fake: FakeStripe, billing: LocalBilling, done: list[Reissue]) -> None:
    """The old January void in Stripe, the old (paid) February with one credit note for its
    total, each replacement exactly one open Stripe invoice equal to ours, sent here."""
    assert_voided(fake, [r.void for r in done], paid={done[1].void.invoice_id}, extra=2)
    for r in done:
        (remote,) = fake.invoices_for(r.invoice.invoice_id)
        assert remote["status"] == "open"
        assert sum(i["amount"] for i in fake.items_of(remote["id"])) == r.invoice.total_cents
        with billing.connect() as con:
            new = invoice_store.get_invoice(con, r.invoice.invoice_id)
        assert new is not None and new.status is InvoiceStatus.sent
        assert new.stripe_invoice_id == remote["id"] and new.replaces == r.void.invoice_id


def test_the_fault_matrix_covers_every_call_of_a_reissue(tmp_path: Path) -> None:
    with fault_scenario(tmp_path / "count.duckdb") as (fake, billing):
        done = reissued_with_stripe(fake, billing)
        before = len(fake.calls)
        assert finish_in_stripe(fake, billing, done)
        assert len(fake.calls) - before == REISSUE_FAULT_POINTS
        assert_reissued(fake, billing, done)
        calls = len(fake.calls)
        assert finish_in_stripe(fake, billing, done)  # done: a rerun calls nothing
        assert len(fake.calls) == calls


# Void January (retrieve, void), push its replacement (search, create, list lines, 2 items,
# finalize); credit February (retrieve, list credit notes, create), push its replacement
# (the same 6).
REISSUE_FAULT_POINTS = 17


def run_reissue_fault_then_rerun(
    tmp_path: Path, kind: FaultKind, at: int, *, forget: bool = False
) -> None:
    with fault_scenario(tmp_path / f"reissue-{kind}-{at}-{forget}.duckdb") as (fake, billing):
        done = reissued_with_stripe(fake, billing)
        fake.inject(kind, at=at)
        assert not finish_in_stripe(fake, billing, done), f"fault {kind} at {at} stopped nothing"
        if forget:  # rerun after Stripe's 24 h window, with our Stripe state lost
            forget_everything(fake, billing, "stripe_pushes")
        assert finish_in_stripe(fake, billing, done), (kind, at)
        assert_reissued(fake, billing, done)


@pytest.mark.parametrize("kind", ["fail", "drop", "error_after"])
def test_rerun_after_a_fault_at_any_call_of_a_reissue_leaves_each_side_once(
    tmp_path: Path, kind: FaultKind
) -> None:
    for at in range(1, REISSUE_FAULT_POINTS + 1):
        run_reissue_fault_then_rerun(tmp_path, kind, at)


def test_rerun_of_a_reissue_with_keys_expired_and_state_lost(tmp_path: Path) -> None:
    for at in range(1, REISSUE_FAULT_POINTS + 1):
        run_reissue_fault_then_rerun(tmp_path, "drop", at, forget=True)


# --- the command line, on the real invoice store ----------------------------------------


@pytest.fixture
def stripe_cli(pfm: Cli, monkeypatch: pytest.MonkeyPatch, fake_stripe: FakeStripe) -> Iterator[Cli]:
    monkeypatch.setenv("STRIPE_SECRET_KEY", API_KEY)
    monkeypatch.setenv("STRIPE_API_BASE", fake_stripe.url)
    pfm.publish(event("acme", "2025-01", **SEED), event("acme", "2025-02", api_calls=7))
    assert pfm("bill", "--as-of", "2025-03-01T02:00:00Z", "--stripe", "-q").code == 0
    yield pfm


def ids_of(pfm: Cli) -> dict[str, str]:
    return {d["period"]: d["invoice_id"] for d in pfm("invoices", "acme", "-f", "json").json()}


def test_void_and_reissue_with_stripe(stripe_cli: Cli, fake_stripe: FakeStripe) -> None:
    jan, feb = ids_of(stripe_cli)["2025-01"], ids_of(stripe_cli)["2025-02"]
    fake_stripe.pay(fake_stripe.invoices_for(feb)[0]["id"])
    run = stripe_cli("invoices", "reissue", jan, "--reason", "wrong tier", "--stripe", "-f", "json")
    new = run.json()
    assert "voided in Stripe as in_" in run.err
    assert fake_stripe.invoices_for(jan)[0]["status"] == "void"
    assert new["status"] == "sent" and new["replaces"] == jan
    (remote,) = fake_stripe.invoices_for(new["invoice_id"])
    assert remote["status"] == "open" and remote["id"] == new["stripe_invoice_id"]
    assert sum(i["amount"] for i in fake_stripe.items_of(remote["id"])) == 5366
    paid = stripe_cli("invoices", "reissue", feb, "--stripe", "-f", "json")
    assert paid.code == 0 and "credit note cn_" in paid.err
    (note,) = fake_stripe.credit_notes_of(fake_stripe.invoices_for(feb)[0]["id"])
    assert note["amount"] == 5001
    assert paid.json()["status"] == "sent" and paid.json()["replaces"] == feb
    stripe_cli("invoices", "reissue", jan, "--stripe").error("is void")  # nothing to resume
    stripe_cli("invoices", "void", jan, "--reason", "again", "--stripe").error("is void already")
    again = stripe_cli("invoices", "void", new["invoice_id"], "--reason", "x")  # not there
    assert again.code == 0 and fake_stripe.invoices_for(new["invoice_id"])[0]["status"] == "open"
    run = stripe_cli("generate-invoice", "acme", "2025-01", "--stripe", "-f", "json")
    third = run.json()
    assert third["replaces"] == new["invoice_id"] and third["status"] == "sent"
    assert fake_stripe.invoices_for(new["invoice_id"])[0]["status"] == "void"  # voided first
    assert "voided in Stripe" in run.err
    assert [i["status"] for i in fake_stripe.invoices_for(third["invoice_id"])] == ["open"]


def test_an_interrupted_reissue_with_stripe_is_resumed_by_a_rerun(
    stripe_cli: Cli, fake_stripe: FakeStripe
) -> None:
    jan = ids_of(stripe_cli)["2025-01"]
    fake_stripe.inject("fail", status=500, times=None, when=lambda c: c.path.endswith("/void"))
    run = stripe_cli("invoices", "reissue", jan, "--stripe")
    run.error(f"invoice {jan} is void, but voiding it in Stripe failed; rerun")
    listed = stripe_cli("invoices", "acme", "-f", "json").json()
    new = listed[0]["replaced_by"]
    assert listed[0]["status"] == "void" and fake_stripe.invoices_for(new) == []
    fake_stripe.faults.clear()
    again = stripe_cli("invoices", "reissue", jan, "--stripe", "-f", "json")
    assert again.json()["invoice_id"] == new and again.json()["status"] == "sent"
    assert fake_stripe.invoices_for(jan)[0]["status"] == "void"
    assert [i["status"] for i in fake_stripe.invoices_for(new)] == ["open"]
    stripe_cli("invoices", "reissue", jan, "--stripe").error(f"replaced by {new}")


def test_a_failed_stripe_void_is_resumed_by_a_rerun_or_by_bill(
    stripe_cli: Cli, fake_stripe: FakeStripe
) -> None:
    jan, feb = ids_of(stripe_cli)["2025-01"], ids_of(stripe_cli)["2025-02"]
    fake_stripe.inject("fail", status=500, times=None, when=lambda c: c.path.endswith("/void"))
    run = stripe_cli("invoices", "void", jan, "--reason", "wrong tier", "--stripe")
    run.error(f"invoice {jan} is void, but voiding it in Stripe failed; rerun")
    assert "void invoice in_" in run.err and "gave up after" in run.err
    assert stripe_cli("invoices", "acme", "-f", "json").json()[0]["status"] == "void"
    stripe_cli("invoices", "void", feb, "--reason", "too", "--stripe").error("Stripe failed")
    fake_stripe.faults.clear()
    again = stripe_cli("invoices", "void", jan, "--reason", "any", "--stripe")
    assert again.code == 0 and "voided in Stripe" in again.err
    assert fake_stripe.invoices_for(jan)[0]["status"] == "void"
    assert fake_stripe.invoices_for(feb)[0]["status"] == "open"
    bill = stripe_cli("bill", "--as-of", "2025-03-01T02:00:00Z", "--stripe", "-q")
    assert bill.code == 0, bill.err
    assert fake_stripe.invoices_for(feb)[0]["status"] == "void"
    listed = stripe_cli("invoices", "acme", "-f", "json").json()
    assert listed[0]["void_reason"] == "wrong tier"  # the rerun's --reason does not replace it
    replacements = [d for d in listed if d["replaces"] in (jan, feb)]  # bill billed both again
    assert [d["period"] for d in replacements] == ["2025-01", "2025-02"]
    for d in replacements:  # and pushed them
        (remote,) = fake_stripe.invoices_for(d["invoice_id"])
        assert remote["id"] == d["stripe_invoice_id"] and remote["status"] == "open"
