"""The Stripe push against our stateful fake Stripe: the flow, retries, and resumability with a
fault at every call (no response, failure before, error after), then a rerun."""

from __future__ import annotations

import random
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
import stripe

from billing.backoff import RetryPolicy
from billing.model import Invoice, InvoiceStatus
from billing.stripe.gateway import StripeCallError, StripeGateway, is_retryable
from billing.stripe.push import PushOutcome, PushResult, days_until_due, planned_items
from common import settings as config
from common.errors import OperationError, UserError
from pf_metering.commands.stripe_cmds import push_to_stripe, stripe_requested
from tests.fixtures.stripe import (
    API_KEY,
    LocalBilling,
    Sleeps,
    fault_scenario,
    forget_everything,
    make_gateway,
    make_invoice,
    priced_invoices,
    sample_invoices,
)
from tests.support.stripe_server import FakeStripe, FaultKind, running


def refuse_invoice_create(fake_stripe: FakeStripe, invoice_id: str) -> None:
    """Stripe answers 400 to every attempt to create ``invoice_id``'s invoice."""
    fake_stripe.inject(
        "fail",
        status=400,
        when=lambda c: (
            c.path == "/v1/invoices" and c.params["metadata"]["invoice_id"] == invoice_id
        ),
    )


def push(
    fake: FakeStripe,
    billing: LocalBilling,
    invoices: list[Invoice],
    *,
    attempts: int = 1,
    sleeps: Sleeps | None = None,
) -> list[PushResult]:
    gateway = make_gateway(fake.url, attempts=attempts, sleeps=sleeps)
    return billing.pusher(gateway).push_all(invoices)


def current(billing: LocalBilling, invoices: list[Invoice]) -> list[Invoice]:
    """The invoices as the store has them now (what ``bill`` would push on a rerun)."""
    return [billing.get(i.invoice_id) for i in invoices]


def expected_cents(invoice: Invoice) -> list[int]:
    return sorted(int(line.amount * 100) for line in invoice.lines if line.amount != 0)


def assert_consistent(fake: FakeStripe, billing: LocalBilling, invoices: list[Invoice]) -> None:
    """Exactly one customer per tenant and one finalized Stripe invoice per local invoice, with
    one item per non-zero line, Stripe's total equal to ours, and the local invoice sent."""
    customers = {}
    for tenant in {i.tenant_id for i in invoices}:
        found = fake.customers_for(tenant)
        assert len(found) == 1, (tenant, found)
        customers[tenant] = found[0]["id"]
    assert len(fake.state.customers) == len(customers)
    assert len(fake.state.invoices) == len(invoices)
    assert fake.pending_items() == []
    for invoice in invoices:
        remote = fake.invoices_for(invoice.invoice_id)
        assert len(remote) == 1, (invoice.invoice_id, remote)
        stripe_invoice = remote[0]
        items = fake.items_of(stripe_invoice["id"])
        assert sorted(i["amount"] for i in items) == expected_cents(invoice)
        assert len({i["metadata"]["pf_line"] for i in items}) == len(items)
        assert sum(i["amount"] for i in items) == invoice.total_cents
        assert stripe_invoice["status"] == "open"
        assert stripe_invoice["customer"] == customers[invoice.tenant_id]
        local = billing.get(invoice.invoice_id)
        assert local.status is InvoiceStatus.sent
        assert local.stripe_invoice_id == stripe_invoice["id"]
    assert len(fake.state.items) == sum(len(expected_cents(i)) for i in invoices)


# --- the flow ------------------------------------------------------------------------------


def test_push_makes_one_customer_per_tenant_and_one_item_per_nonzero_line(
    fake_stripe: FakeStripe, local_billing: LocalBilling
) -> None:
    invoices = local_billing.add_samples()
    results = push(fake_stripe, local_billing, invoices)
    assert [r.outcome for r in results] == [PushOutcome.sent] * 3
    assert_consistent(fake_stripe, local_billing, invoices)
    acme = fake_stripe.invoices_for("inv-acme-2025-01")[0]
    amounts = {i["metadata"]["code"]: i["amount"] for i in fake_stripe.items_of(acme["id"])}
    assert amounts["risk_adjustment"] == -53 and amounts["base"] == 5000
    assert "policy_checks" not in amounts  # a zero line is no item
    assert sum(amounts.values()) == 5263  # 52.63 = the lines to the cent
    assert [r.stripe_invoice_id for r in results] == [
        fake_stripe.invoices_for(i.invoice_id)[0]["id"] for i in invoices
    ]


def test_graduated_package_and_true_up_lines_reach_stripe_to_the_cent(
    fake_stripe: FakeStripe, local_billing: LocalBilling
) -> None:
    """Lines priced in ranges (parts in fractions of a cent), per package, the risk adjustment
    and the minimum commitment's true-up: one item per non-zero line, the sum Stripe keeps
    equal to our total to the cent."""
    invoices = priced_invoices()
    assert any(ln.parts and len(ln.parts) == 3 for ln in invoices[1].lines)
    assert [ln.amount for ln in invoices[0].lines if ln.code == "minimum_commitment"] == [
        Decimal("86.90")
    ]
    local_billing.add(*invoices)
    results = push(fake_stripe, local_billing, invoices)
    assert [r.outcome for r in results] == [PushOutcome.sent] * 2
    assert_consistent(fake_stripe, local_billing, invoices)
    gateway = make_gateway(fake_stripe.url)
    for invoice in invoices:
        remote = fake_stripe.invoices_for(invoice.invoice_id)[0]
        assert gateway.retrieve_invoice(remote["id"]).total == invoice.total_cents  # 10000, 25329
        codes = {i["metadata"]["code"] for i in fake_stripe.items_of(remote["id"])}
        assert ("minimum_commitment" in codes) == (invoice.period == "2025-01")  # 0.00: no item


def test_every_create_carries_its_deterministic_idempotency_key(
    fake_stripe: FakeStripe, local_billing: LocalBilling
) -> None:
    invoice = make_invoice("acme", "2025-03", [("base", "50.00"), ("risk_adjustment", "-1.50")])
    local_billing.add(invoice)
    push(fake_stripe, local_billing, [invoice])
    stripe_id = fake_stripe.invoices_for(invoice.invoice_id)[0]["id"]
    posts = [c for c in fake_stripe.calls if c.method == "POST"]
    assert [(c.path, c.idempotency_key) for c in posts] == [
        ("/v1/customers", "pf-customer-acme"),
        ("/v1/invoices", "pf-invoice-inv-acme-2025-03"),
        ("/v1/invoiceitems", "pf-item-inv-acme-2025-03-0-base"),
        ("/v1/invoiceitems", "pf-item-inv-acme-2025-03-1-risk_adjustment"),
        (f"/v1/invoices/{stripe_id}/finalize", "pf-finalize-inv-acme-2025-03"),
    ]
    create = posts[1].params
    assert create["auto_advance"] == "false"
    assert create["collection_method"] == "send_invoice"
    assert create["pending_invoice_items_behavior"] == "exclude"
    assert create["days_until_due"] == "30"
    assert create["metadata"] == {
        "invoice_id": "inv-acme-2025-03",
        "tenant_id": "acme",
        "period": "2025-03",
    }
    item = posts[3].params
    assert item["amount"] == "-150" and item["currency"] == "usd"
    assert item["invoice"] == stripe_id


def test_pushing_again_changes_nothing_at_stripe(
    fake_stripe: FakeStripe, local_billing: LocalBilling
) -> None:
    invoices = local_billing.add_samples()
    push(fake_stripe, local_billing, invoices)
    posts = sum(c.method == "POST" for c in fake_stripe.calls)
    again = push(fake_stripe, local_billing, current(local_billing, invoices))
    assert [r.outcome for r in again] == [PushOutcome.already_sent] * 3
    # Local "sent" lost (e.g. a crash before it was written): Stripe is asked, nothing created.
    resent = push(fake_stripe, local_billing, invoices)
    assert [r.outcome for r in resent] == [PushOutcome.sent] * 3
    assert sum(c.method == "POST" for c in fake_stripe.calls) == posts
    assert_consistent(fake_stripe, local_billing, invoices)


def test_existing_customer_is_found_by_metadata_not_duplicated(
    fake_stripe: FakeStripe, local_billing: LocalBilling
) -> None:
    existing = fake_stripe._create_customer({"name": "acme", "metadata": {"tenant_id": "acme"}})
    invoice = make_invoice("acme", "2025-01", [("base", "50.00")])
    local_billing.add(invoice)
    assert push(fake_stripe, local_billing, [invoice])[0].ok
    assert [c["id"] for c in fake_stripe.customers_for("acme")] == [existing["id"]]
    assert fake_stripe.invoices_for(invoice.invoice_id)[0]["customer"] == existing["id"]


def test_only_finalized_invoices_are_pushed(
    fake_stripe: FakeStripe, local_billing: LocalBilling
) -> None:
    draft = make_invoice("acme", "2025-04", [("base", "50.00")], status=InvoiceStatus.draft)
    result = push(fake_stripe, local_billing, [draft])[0]
    assert result.outcome is PushOutcome.failed
    assert "only finalized" in (result.error or "")
    assert fake_stripe.calls == []


def test_a_total_mismatch_is_never_finalized(
    fake_stripe: FakeStripe, local_billing: LocalBilling
) -> None:
    """Someone added a line to our draft in the dashboard: we stop before finalizing."""
    invoice = make_invoice("acme", "2025-01", [("base", "50.00")])
    local_billing.add(invoice)
    customer = fake_stripe._create_customer({"metadata": {"tenant_id": "acme"}})
    draft = fake_stripe._create_invoice(
        {
            "customer": customer["id"],
            "pending_invoice_items_behavior": "exclude",
            "metadata": {"invoice_id": invoice.invoice_id},
        }
    )
    fake_stripe._create_item(
        {"customer": customer["id"], "invoice": draft["id"], "amount": "999", "currency": "usd"}
    )
    result = push(fake_stripe, local_billing, [invoice])[0]
    assert result.outcome is PushOutcome.failed
    assert "not finalizing" in (result.error or "") and "5999" in (result.error or "")
    assert fake_stripe.state.invoices[draft["id"]]["status"] == "draft"
    assert local_billing.get(invoice.invoice_id).status is InvoiceStatus.finalized


def test_planned_items_skip_zero_lines_and_keep_line_positions() -> None:
    invoice = sample_invoices()[0]
    items = planned_items(invoice)
    assert [i.ref for i in items][-2:] == ["8-violations", "9-risk_adjustment"]
    assert "7-policy_checks" not in {i.ref for i in items}
    assert sum(i.amount_cents for i in items) == invoice.total_cents == 5263


def test_days_until_due_is_fixed_by_the_invoice() -> None:
    invoice = make_invoice("acme", "2025-01", [("base", "1.00")], due_days=30)
    assert days_until_due(invoice) == 30  # finalized 2 h after the period, due 30 days after it
    assert days_until_due(invoice.model_copy(update={"due_date": invoice.period_end})) == 1


# --- retries -------------------------------------------------------------------------------


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    policy = RetryPolicy(max_attempts=8, base_delay=1.0, max_delay=8.0)
    for seed in range(20):
        rng = random.Random(seed)
        for failed, ceiling in zip(range(1, 8), [1, 2, 4, 8, 8, 8, 8], strict=True):
            assert ceiling / 2 <= policy.delay(failed, rng) < ceiling
    draws = {round(policy.delay(3, random.Random(s)), 6) for s in range(20)}
    assert len(draws) > 10  # jittered, not a fixed schedule


def test_stripe_should_retry_header_overrides_the_status() -> None:
    def error(status: int | None, **headers: str) -> stripe.StripeError:
        return stripe.StripeError("x", http_status=status, headers=headers)

    assert is_retryable(error(None))  # no response at all: a connection error
    assert is_retryable(error(500)) and is_retryable(error(503))
    assert is_retryable(error(429)) and is_retryable(error(409))
    assert not is_retryable(error(400)) and not is_retryable(error(404))
    assert not is_retryable(error(500, **{"Stripe-Should-Retry": "false"}))
    assert is_retryable(error(400, **{"stripe-should-retry": "true"}))


@pytest.mark.parametrize(
    ("kind", "status"), [("fail", 500), ("fail", 429), ("fail", 503), ("drop", 500)]
)
def test_transient_failures_are_retried_within_one_run(
    fake_stripe: FakeStripe, local_billing: LocalBilling, kind: FaultKind, status: int
) -> None:
    invoices = local_billing.add_samples()
    for at in (1, 4, 9, 20):  # spread over searches, creates and items
        fake_stripe.inject(kind, at=at, status=status)
    sleeps = Sleeps()
    results = push(fake_stripe, local_billing, invoices, attempts=4, sleeps=sleeps)
    assert all(r.ok for r in results), results
    assert len(sleeps.pauses) == 4
    assert all(0.0005 <= p < 0.001 for p in sleeps.pauses)  # first retry: half to all of base
    assert_consistent(fake_stripe, local_billing, invoices)


def test_an_amount_beyond_stripes_limit_stops_only_that_invoice_before_any_call(
    fake_stripe: FakeStripe, local_billing: LocalBilling
) -> None:
    huge = make_invoice("huge", "2025-01", [("base", "50.00"), ("tool_executions", "1000000.00")])
    invoices = [huge, *sample_invoices()]
    local_billing.add(*invoices)
    results = push(fake_stripe, local_billing, invoices)
    assert [r.outcome for r in results] == [PushOutcome.failed] + [PushOutcome.sent] * 3
    assert results[0].error is not None
    assert (
        f"invoice {huge.invoice_id}: line 1-tool_executions is 100000000 cents" in results[0].error
    )
    assert "Stripe accepts at most 99999999 cents" in results[0].error
    assert fake_stripe.customers_for("huge") == []  # nothing of it reached Stripe
    assert not any("huge" in str(c.params) for c in fake_stripe.calls)
    assert_consistent(fake_stripe, local_billing, invoices[1:])


def test_a_non_retryable_error_stops_only_that_invoice(
    fake_stripe: FakeStripe, local_billing: LocalBilling
) -> None:
    invoices = local_billing.add_samples()
    refuse_invoice_create(fake_stripe, "inv-acme-2025-01")
    results = push(fake_stripe, local_billing, invoices, attempts=5)
    assert [r.outcome for r in results] == [PushOutcome.failed, PushOutcome.sent, PushOutcome.sent]
    assert results[0].error is not None
    assert "create invoice inv-acme-2025-01" in results[0].error
    assert "HTTP 400 invalid_request_error" in results[0].error
    creates = [c for c in fake_stripe.calls if c.method == "POST" and c.path == "/v1/invoices"]
    assert len(creates) == 3  # the failed one was not retried
    rerun = push(fake_stripe, local_billing, current(local_billing, invoices))
    assert [r.outcome for r in rerun] == [PushOutcome.sent] + [PushOutcome.already_sent] * 2
    assert_consistent(fake_stripe, local_billing, invoices)


def test_retries_give_up_after_max_attempts(
    fake_stripe: FakeStripe, local_billing: LocalBilling
) -> None:
    invoices = local_billing.add_samples()
    fake_stripe.inject("fail", status=502, times=None, when=lambda c: c.path.endswith("/finalize"))
    sleeps = Sleeps()
    results = push(fake_stripe, local_billing, invoices, attempts=3, sleeps=sleeps)
    assert [r.outcome for r in results] == [PushOutcome.failed] * 3
    assert all("gave up after 3 attempts" in (r.error or "") for r in results)
    assert sum(c.path.endswith("/finalize") for c in fake_stripe.calls) == 9
    assert len(sleeps.pauses) == 6
    assert all(local_billing.get(i.invoice_id).status is InvoiceStatus.finalized for i in invoices)


def test_unreachable_stripe_is_a_clear_per_invoice_failure(local_billing: LocalBilling) -> None:
    fake = FakeStripe(api_key=API_KEY)
    with running(fake) as url:
        pass  # now nobody listens there
    invoices = sample_invoices()[:2]
    local_billing.add(*invoices)
    results = push(fake, local_billing, invoices, attempts=2)
    assert [r.outcome for r in results] == [PushOutcome.failed] * 2
    assert all(f"cannot reach Stripe at {url}" in (r.error or "") for r in results)


def test_the_secret_key_never_appears_in_errors(
    fake_stripe: FakeStripe, local_billing: LocalBilling
) -> None:
    wrong_key = "sk_test_wrong0123456789TOPSECRET"
    invoice = sample_invoices()[1]
    local_billing.add(invoice)
    gateway = make_gateway(fake_stripe.url, api_key=wrong_key)
    result = local_billing.pusher(gateway).push(invoice)
    assert result.outcome is PushOutcome.failed
    assert "HTTP 401" in (result.error or "")
    assert wrong_key not in (result.error or "") and "[redacted]" in (result.error or "")


def test_same_key_with_other_parameters_is_an_idempotency_error(fake_stripe: FakeStripe) -> None:
    gateway = make_gateway(fake_stripe.url, attempts=3)
    first = gateway.create_customer("acme", {"tenant_id": "acme"}, "k-1")
    assert gateway.create_customer("acme", {"tenant_id": "acme"}, "k-1").id == first.id
    with pytest.raises(StripeCallError) as caught:
        gateway.create_customer("acme", {"tenant_id": "other"}, "k-1")
    assert caught.value.http_status == 400 and caught.value.attempts == 1
    assert "idempotency_error" in str(caught.value)
    assert len(fake_stripe.state.customers) == 1


def test_replayed_errors_are_replayed_including_5xx(fake_stripe: FakeStripe) -> None:
    gateway = make_gateway(fake_stripe.url, attempts=1)
    fake_stripe.inject("error_after", at=1, status=500)
    for _ in range(2):
        with pytest.raises(StripeCallError, match="HTTP 500"):
            gateway.create_customer("acme", {"tenant_id": "acme"}, "k-2")
    assert len(fake_stripe.state.customers) == 1  # ran once, then replayed
    assert gateway.find_customer("acme") is not None


def test_invoices_created_without_exclude_sweep_pending_items(fake_stripe: FakeStripe) -> None:
    """Why the push creates the invoice first: Stripe attaches stray pending items."""
    customer = fake_stripe._create_customer({"metadata": {"tenant_id": "t"}})
    fake_stripe._create_item({"customer": customer["id"], "amount": "100", "currency": "usd"})
    swept = fake_stripe._create_invoice({"customer": customer["id"]})
    assert swept["total"] == 100 and fake_stripe.pending_items() == []


# --- resumability: a fault at every call, then a rerun -----------------------------------


def fault_invoices() -> list[Invoice]:
    """Two invoices of one tenant (customer reuse), a zero line and a negative line: 14 calls."""
    return [
        make_invoice(
            "acme",
            "2025-01",
            [
                ("base", "50.00"),
                ("policy_checks", "0.00"),
                ("violations", "2.00"),
                ("risk_adjustment", "-0.53"),
            ],
        ),
        make_invoice("acme", "2025-02", [("base", "50.00"), ("risk_adjustment", "0.00")]),
    ]


FAULT_POINTS = 14


def test_the_fault_matrix_covers_every_call_of_a_push(tmp_path: Path) -> None:
    fake = FakeStripe(api_key=API_KEY)
    with running(fake):
        billing = LocalBilling(tmp_path / "count.duckdb")
        invoices = fault_invoices()
        billing.add(*invoices)
        assert all(r.ok for r in push(fake, billing, invoices))
    # acme-01: search+create customer, search+create invoice, list lines, 3 items, finalize;
    # acme-02: search+create invoice, list lines, 1 item, finalize (customer known locally).
    assert len(fake.calls) == FAULT_POINTS


def run_fault_then_rerun(tmp_path: Path, kind: FaultKind, at: int, *, forget: bool = False) -> None:
    path = tmp_path / f"{kind}-{at}-{forget}.duckdb"
    with fault_scenario(path) as (fake, billing):
        invoices = fault_invoices()
        billing.add(*invoices)
        fake.inject(kind, at=at)
        first = push(fake, billing, invoices)
        assert not all(r.ok for r in first), f"fault {kind} at call {at} stopped nothing"
        if forget:  # rerun after Stripe's 24 h window, with our push state lost
            forget_everything(fake, billing, "stripe_pushes", "stripe_customers")
        second = push(fake, billing, current(billing, invoices))
        assert all(r.ok for r in second), (kind, at, second)
        assert_consistent(fake, billing, invoices)


@pytest.mark.parametrize("kind", ["fail", "drop", "error_after"])
def test_rerun_after_a_fault_at_any_call_leaves_exactly_one_invoice_each(
    tmp_path: Path, kind: FaultKind
) -> None:
    """fail: crash before the call; drop: the call ran but its response was lost (a crash
    right after it); error_after: it ran and Stripe answered (and will replay) a 500."""
    for at in range(1, FAULT_POINTS + 1):
        run_fault_then_rerun(tmp_path, kind, at)


def test_rerun_after_a_lost_response_with_keys_expired_and_push_state_lost(
    tmp_path: Path,
) -> None:
    for at in range(1, FAULT_POINTS + 1):
        run_fault_then_rerun(tmp_path, "drop", at, forget=True)


def test_amounts_are_integer_cents_rounded_as_the_invoice_rounds() -> None:
    invoice = make_invoice("acme", "2025-01", [("base", "50.00"), ("risk_adjustment", "-0.53")])
    assert [i.amount_cents for i in planned_items(invoice)] == [5000, -53]
    assert invoice.total == Decimal("49.47") and invoice.total_cents == 4947


# --- the wiring for ``bill --stripe`` and ``generate-invoice --stripe`` ---------------------


@pytest.fixture
def stripe_env(
    data_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, fake_stripe: FakeStripe
) -> Iterator[LocalBilling]:
    """Settings pointing at the fake Stripe; the billing file of those settings."""
    monkeypatch.setenv("STRIPE_SECRET_KEY", API_KEY)
    monkeypatch.setenv("STRIPE_API_BASE", fake_stripe.url)
    monkeypatch.delenv("STRIPE_ENABLED", raising=False)
    with LocalBilling(config.load_settings().billing_db).warm() as billing:
        yield billing


def test_push_to_stripe_reports_each_invoice_and_fails_if_any_did(
    stripe_env: LocalBilling, fake_stripe: FakeStripe, capsys: pytest.CaptureFixture[str]
) -> None:
    invoices = stripe_env.add_samples()
    refuse_invoice_create(fake_stripe, "inv-acme-2025-01")
    with pytest.raises(OperationError) as caught:
        push_to_stripe(config.load_settings(), invoices, store=stripe_env.store)
    assert str(caught.value) == ("1 of 3 invoices failed to push to Stripe: inv-acme-2025-01")
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("stripe: inv-acme-2025-01 (acme) failed: create invoice")
    assert lines[1].startswith("stripe: inv-acme-2025-02 (acme) sent as in_")
    assert lines[2].startswith("stripe: inv-globex.eu-2025-01 (globex.eu) sent as in_")
    assert API_KEY not in "\n".join(lines)
    results = push_to_stripe(
        config.load_settings(), current(stripe_env, invoices), store=stripe_env.store
    )
    assert [r.outcome for r in results] == [PushOutcome.sent] + [PushOutcome.already_sent] * 2


def test_stripe_is_off_unless_enabled_or_asked(
    data_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STRIPE_ENABLED", raising=False)
    cfg = config.load_settings()
    assert not stripe_requested(cfg, False) and stripe_requested(cfg, True)
    monkeypatch.setenv("STRIPE_ENABLED", "true")
    assert stripe_requested(config.load_settings(), False)


def test_missing_key_or_bad_api_base_are_user_errors() -> None:
    with pytest.raises(UserError, match="STRIPE_SECRET_KEY is not set"):
        StripeGateway.from_settings(config.load_settings(stripe_secret_key=None))
    with pytest.raises(UserError, match="invalid STRIPE_API_BASE"):
        StripeGateway.from_settings(
            config.load_settings(stripe_secret_key=API_KEY, stripe_api_base="localhost:12111")
        )
    gateway = StripeGateway.from_settings(
        config.load_settings(stripe_secret_key=API_KEY, stripe_api_base="http://127.0.0.1:1/")
    )
    assert gateway.api_base == "http://127.0.0.1:1"


def test_bill_stripe_wiring_with_the_real_invoice_store(
    stripe_env: LocalBilling, fake_stripe: FakeStripe
) -> None:
    """What ``bill --stripe`` does: push every finalized, unsent invoice; a rerun has none."""
    from billing import invoice_store

    with stripe_env.connect() as con:
        invoice_store.write_invoices(con, sample_invoices())
        pending = invoice_store.finalized_unsent(con)
    results = push_to_stripe(config.load_settings(), pending)
    assert [r.outcome for r in results] == [PushOutcome.sent] * 3
    with stripe_env.connect() as con:
        assert invoice_store.finalized_unsent(con) == []
        stored = [invoice_store.get_invoice(con, i.invoice_id) for i in sample_invoices()]
    for invoice in stored:
        assert invoice is not None and invoice.status is InvoiceStatus.sent
        assert fake_stripe.invoices_for(invoice.invoice_id)[0]["id"] == invoice.stripe_invoice_id
