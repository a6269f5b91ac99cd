"""Properties of corrections and the credit balance over a tenant's life (hypothesis): usage of
finalized periods moved up and down between bills, each period on its own tier (unit,
graduated, volume and package prices, quotas, minimum commitments). Money is
conserved (the totals of every invoice, less the credit balance still owed to the tenant,
equal the rating of every period's final usage), no total or balance is ever negative, every
invoice's lines sum to its total, and each earlier period's lines sum to its rating now
minus what was billed."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from billing.credits import CreditLot, balance, settle
from billing.invoice_store import Billed
from billing.invoicing import LateUsage, settled_invoice
from billing.model import EARLIER_PERIODS, Invoice, InvoiceStatus, add_up
from billing.rating import Usage, rate
from billing.tiers import BUILTIN_TIERS, PRICE_FIELDS, Prices, Quotas, Tier
from schemas.codec import COUNTERS
from schemas.periods import Period
from tests.support.price_forms import COMMITMENT, forms

COUNT = st.integers(min_value=0, max_value=10**9) | st.sampled_from([0, 1, 999, 1000, 1001])


PRICED = st.builds(Prices, **{code: st.none() | forms(10**6) for code in Prices.model_fields})


@st.composite
def _custom(draw: st.DrawFn) -> Tier:
    """Any tier: unit prices, or graduated, volume and package forms, quotas either way, a
    risk multiplier and a minimum commitment."""
    price = st.decimals(min_value=0, max_value=5, places=4, allow_nan=False, allow_infinity=False)
    prices = draw(PRICED)
    unit: dict[str, Any] = {
        field: None if getattr(prices, code) is not None else draw(price)
        for code, field in PRICE_FIELDS.items()
    }
    return Tier(
        name="custom",
        display_name="Custom",
        base_price_usd=draw(st.decimals(min_value=0, max_value=100, places=2)),
        risk_multiplier=draw(st.decimals(min_value=0, max_value=2, places=2)),
        quota_mode=draw(st.sampled_from(["reported", "included"])),
        quotas=Quotas(**{q: draw(st.none() | COUNT) for q in Quotas.model_fields}),
        prices=prices,
        minimum_commitment_usd=draw(COMMITMENT),
        **unit,
    )


TIERS = st.sampled_from(list(BUILTIN_TIERS.values())) | _custom()
USAGES = st.builds(Usage, **{c: COUNT for c in COUNTERS})
# Before each bill, some earlier periods get new totals: up (late usage) or down (corrections).
CHANGES = st.lists(st.tuples(st.integers(0, 5), st.sampled_from(COUNTERS), COUNT), max_size=4)


def _name(index: int) -> str:
    return str(Period(2025, index + 1))


def _invoice(
    period: int,
    tier: Tier,
    usage: Usage,
    late: list[LateUsage],
    credit: tuple[CreditLot, ...],
) -> tuple[Invoice, tuple[CreditLot, ...]]:
    moment = datetime(2025, period + 2, 1, 2, tzinfo=UTC)
    invoice, settlement = settled_invoice(
        invoice_id=f"INV-{period}",
        tenant_id="t",
        period=Period(2025, period + 1),
        tier=tier,
        usage_row=usage.as_dict(),
        late=late,
        status=InvoiceStatus.finalized,
        created_at=moment,
        finalized_at=moment,
        due_days=30,
        credit=credit,
    )
    return invoice, settlement.lots


@settings(max_examples=300, deadline=None)
@given(
    periods=st.lists(st.tuples(TIERS, USAGES, CHANGES), min_size=1, max_size=6),
)
def test_money_is_conserved_and_no_total_or_balance_is_ever_negative(
    periods: list[tuple[Tier, Usage, list[tuple[int, str, int]]]],
) -> None:
    tiers = [tier for tier, _, _ in periods]
    now: list[Usage] = []  # each billed period's usage as the data says now
    billed: list[Usage] = []  # what the invoices have charged for it
    credit: tuple[CreditLot, ...] = ()
    invoices = []
    for k, (tier, usage, changes) in enumerate(periods):
        for target, counter, value in changes:
            if target < len(now):
                now[target] = Usage.from_mapping({**now[target].as_dict(), counter: value})
        late = [
            LateUsage(Billed("t", _name(p), tiers[p].name, billed[p], "", None), tiers[p], now[p])
            for p in range(k)
            if now[p] != billed[p]
        ]
        invoice, credit = _invoice(k, tier, usage, late, credit)
        invoices.append(invoice)
        now.append(usage)
        billed = list(now)

        assert invoice.total >= 0 and invoice.credit_balance >= 0
        assert invoice.total == add_up(ln.amount for ln in invoice.lines)
        assert invoice.credit_balance == balance(credit)
        for item in late:
            carried = [
                ln.amount
                for ln in invoice.lines
                if ln.code in EARLIER_PERIODS and ln.period == item.billed.period
            ]
            assert (
                add_up(carried)
                == rate(item.tier, item.now).total - rate(item.tier, item.billed.usage).total
            )

    final = add_up(rate(tiers[p], now[p]).total for p in range(len(now)))
    # what the tenant paid, less the credit it is still owed, is what its usage costs
    assert add_up(i.total for i in invoices) - balance(credit) == final
    assert all(lot.remaining > 0 for lot in credit)


@settings(max_examples=200, deadline=None)
@given(charges=st.lists(st.decimals(-500, 500, places=2), min_size=1, max_size=12))
def test_the_balance_is_the_sum_of_what_was_carried_minus_what_was_applied(
    charges: list[Decimal],
) -> None:
    """Any sequence of invoice sums: each total is max(0, sum - balance available)."""
    lots: tuple[CreditLot, ...] = ()
    for n, charge in enumerate(charges):
        before = balance(lots)
        settlement = settle("t", f"INV-{n}", str(Period(2025 + n // 12, n % 12 + 1)), charge, lots)
        lots = settlement.lots
        total = charge + (settlement.line.amount if settlement.line else Decimal(0))
        assert total == max(Decimal(0), charge - before)
        assert balance(lots) == before + sum(m.amount for m in settlement.movements)
        assert balance(lots) == max(Decimal(0), before - charge)
