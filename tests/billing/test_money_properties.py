"""Properties over the whole range of an Avro long, for every counter and every tier, any
price form and minimum commitment included (hypothesis): sums never wrap, totals are never
negative, lines add up to the total, amounts agree with an independent recomputation in exact
fractions, and the cents Stripe gets are integers equal to our lines (or the invoice is
refused, that one alone, naming the limit)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from tempfile import TemporaryDirectory

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.fold import COUNTER_CEILING, deltas_of
from billing import invoice_store
from billing.db import billing_db
from billing.invoice_store import Billed
from billing.invoicing import InvoiceRefused, LateUsage, settled_invoice
from billing.model import MAX_MONEY, Invoice, InvoiceStatus
from billing.rating import METERS, MIB, Usage, rate
from billing.stripe.push import STRIPE_MAX_AMOUNT, PushRefused, check_stripe_limits, planned_items
from billing.tiers import BUILTIN_TIERS, MAX_PRICE, PRICE_FIELDS, Prices, Quotas, Tier
from schemas.codec import COUNTERS
from schemas.periods import Period
from tests.support.price_forms import COMMITMENT, PRICES, form_amount

AVRO_LONG = st.integers(min_value=0, max_value=2**63 - 1)  # a negative one is dead-lettered
# One partition's total can reach the ceiling; a view sums at most 2**31 partitions.
TOTAL = AVRO_LONG | st.integers(min_value=0, max_value=COUNTER_CEILING * 2**31)


def _custom(name: str, price: st.SearchStrategy[Decimal]) -> st.SearchStrategy[Tier]:
    """Any tier: unit prices from ``price`` or, per counter, any price form; a minimum
    commitment or none."""

    @st.composite
    def build(draw: st.DrawFn) -> Tier:
        prices = draw(st.just(Prices()) | PRICES)
        units = {
            field: draw(price)
            for code, field in PRICE_FIELDS.items()
            if getattr(prices, code) is None
        }
        return Tier(
            name=name,
            display_name=name,
            base_price_usd=draw(st.decimals(min_value=0, max_value=10_000, places=2)),
            risk_multiplier=draw(st.decimals(min_value=0, max_value=3, places=2)),
            quota_mode=draw(st.sampled_from(["reported", "included"])),
            quotas=Quotas(**{q: draw(st.none() | AVRO_LONG) for q in Quotas.model_fields}),
            prices=prices,
            minimum_commitment_usd=draw(COMMITMENT),
            **units,  # type: ignore[arg-type]
        )

    return build()


PRICE = st.decimals(min_value=0, max_value=1000, places=8, allow_nan=False, allow_infinity=False)
DEAR = st.decimals(
    min_value=0, max_value=MAX_PRICE, places=2, allow_nan=False, allow_infinity=False
)
TIERS = (
    st.sampled_from(list(BUILTIN_TIERS.values())) | _custom("custom", PRICE) | _custom("dear", DEAR)
)
USAGES = st.builds(Usage, **{c: TOTAL for c in COUNTERS})


def _cents(amount: Fraction) -> Fraction:
    """To the cent, half away from zero, in exact fractions (independent of Decimal)."""
    scaled = abs(amount) * 100
    whole = int(scaled)
    if scaled - whole >= Fraction(1, 2):
        whole += 1
    return Fraction(whole if amount >= 0 else -whole, 100)


def _expected_lines(tier: Tier, usage: Usage) -> list[Fraction]:
    """Base, one line per meter, the risk adjustment (if any) and the minimum commitment's
    true-up (if any), recomputed in fractions."""
    lines = [_cents(Fraction(tier.base_price_usd))]
    for meter in METERS:
        quantity = Fraction(getattr(usage, meter.counter), MIB if meter.code == "network" else 1)
        limit = tier.quota_of(meter.quota)
        if tier.quota_mode == "included" and limit is not None:
            quantity = max(quantity - limit, Fraction(0))
        lines.append(_cents(form_amount(tier.pricing(meter.code), quantity)))
    if tier.risk_multiplier != 1:
        lines.append(_cents(sum(lines, Fraction(0)) * (Fraction(tier.risk_multiplier) - 1)))
    if tier.minimum_commitment_usd > 0:
        rated = sum(lines, Fraction(0))
        lines.append(max(Fraction(tier.minimum_commitment_usd) - rated, Fraction(0)))
    return lines


def _expected_total(tier: Tier, usage: Usage) -> Fraction:
    return sum(_expected_lines(tier, usage), Fraction(0))


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.tuples(*[AVRO_LONG] * len(COUNTERS)), min_size=1, max_size=40))
def test_the_fold_sums_any_avro_longs_exactly(values: list[tuple[int, ...]]) -> None:
    events = pl.DataFrame(
        {
            "tenant_id": ["t"] * len(values),
            "period": ["2025-01"] * len(values),
            **{
                c: pl.Series([v[i] for v in values], dtype=pl.Int64) for i, c in enumerate(COUNTERS)
            },
            "risk_score": [None] * len(values),
            "occurred_at": [0] * len(values),
        }
    )
    (row,) = deltas_of(events).to_dicts()
    for i, counter in enumerate(COUNTERS):
        assert int(row[counter]) == sum(v[i] for v in values) >= 0


@settings(max_examples=300, deadline=None)
@given(tier=TIERS, usage=USAGES)
def test_rating_is_exact_never_negative_and_lines_sum_to_the_total(
    tier: Tier, usage: Usage
) -> None:
    rating = rate(tier, usage)
    assert Fraction(rating.total) == sum(Fraction(ln.amount) for ln in rating.lines)
    assert Fraction(rating.total) == _expected_total(tier, usage)  # never wrapped, never rounded
    assert rating.total >= 0


def _invoice_or_refusal(tier: Tier, usage: Usage, late: Usage) -> Invoice | InvoiceRefused:
    billed = Billed("t", "2024-12", tier.name, Usage(), "INV-0", None)
    moment = datetime(2025, 2, 1, 2, tzinfo=UTC)
    try:
        return settled_invoice(
            invoice_id="INV-1",
            tenant_id="t",
            period=Period(2025, 1),
            tier=tier,
            usage_row=usage.as_dict(),
            late=[LateUsage(billed, tier, late)],
            status=InvoiceStatus.finalized,
            created_at=moment,
            finalized_at=moment,
            due_days=30,
        )[0]
    except InvoiceRefused as exc:
        return exc


@settings(max_examples=300, deadline=None)
@given(tier=TIERS, usage=USAGES, late=USAGES)
def test_stripe_cents_are_integers_equal_to_our_lines_or_the_invoice_is_refused(
    tier: Tier, usage: Usage, late: Usage
) -> None:
    lines = _expected_lines(tier, usage)
    lines.append(_expected_total(tier, late) - _expected_total(tier, Usage()))  # late usage
    subtotal = sum(lines[: len(METERS) + 1], Fraction(0))  # base + usage
    expected = sum(lines, Fraction(0))
    made = _invoice_or_refusal(tier, usage, late)
    beyond = any(abs(amount) > MAX_MONEY for amount in [*lines, subtotal, expected])
    assert isinstance(made, InvoiceRefused) == beyond
    if isinstance(made, InvoiceRefused):
        return
    invoice = made
    assert Fraction(invoice.total) == expected and invoice.total >= 0
    assert Fraction(invoice.total) == sum(Fraction(ln.amount) for ln in invoice.lines)
    cents = [invoice.cents(ln) for ln in invoice.lines]
    assert all(isinstance(c, int) for c in cents)
    assert [Fraction(c, 100) for c in cents] == [Fraction(ln.amount) for ln in invoice.lines]
    assert sum(cents) == invoice.total_cents
    items = planned_items(invoice)
    assert [i.amount_cents for i in items] == [c for c in cents if c != 0]
    too_big = any(abs(c) > STRIPE_MAX_AMOUNT for c in cents)
    too_big = too_big or abs(invoice.total_cents) > STRIPE_MAX_AMOUNT
    if too_big:
        with pytest.raises(PushRefused, match=f"invoice INV-1: .*{STRIPE_MAX_AMOUNT} cents"):
            check_stripe_limits(invoice)
    else:
        check_stripe_limits(invoice)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tier=TIERS, usage=USAGES)
def test_every_amount_an_invoice_holds_is_stored_and_read_back_exactly(
    tier: Tier, usage: Usage
) -> None:
    made = _invoice_or_refusal(tier, usage, Usage())
    if isinstance(made, InvoiceRefused):
        return
    invoice = made
    with TemporaryDirectory() as folder, billing_db(Path(folder) / "b.duckdb", 5) as con:
        invoice_store.write_invoices(con, [invoice])
        stored = invoice_store.get_invoice(con, "INV-1")
    assert stored is not None
    assert (stored.total, stored.subtotal) == (invoice.total, invoice.subtotal)
    assert [ln.amount for ln in stored.lines] == [ln.amount for ln in invoice.lines]
