"""Rating (docs/spec.md, "Rating"): exact lines for the original tool's case, rounding, network
per MiB, risk adjustment, included quotas, quota reports, and properties over random usage and
tiers (hypothesis)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billing.rating import MIB, Usage, late_usage_amount, late_usage_line, rate, round_cents
from billing.tiers import BUILTIN_TIERS, PRICE_FIELDS, Quotas, Tier

SEED_USAGE = Usage(
    cpu_ms=3_600_000,
    network_bytes=1_048_576,
    api_calls=100,
    tool_executions=50,
    data_retrievals=25,
    egress_scans=10,
    policy_checks=500,
    violations=2,
)
BASIC = BUILTIN_TIERS["basic"]
# Every line code an invoice line can carry, in the order lines are made.
LINE_CODES = ("base", *PRICE_FIELDS, "risk_adjustment", "late_usage")
PRO = BUILTIN_TIERS["professional"]


def amounts(usage: Usage, tier: Tier = BASIC) -> dict[str, Decimal]:
    return {ln.code: ln.amount for ln in rate(tier, usage).lines}


def custom_tier(**changes: object) -> Tier:
    return BASIC.model_copy(update={"name": "custom", "display_name": "Custom", **changes})


def test_seed_case_lines_and_total() -> None:
    rating = rate(BASIC, SEED_USAGE)
    assert [str(ln.amount) for ln in rating.lines] == [
        "50.00", "0.36", "0.05", "0.10", "0.50", "0.13", "0.02", "0.50", "2.00",
    ]  # fmt: skip
    assert [ln.code for ln in rating.lines] == list(LINE_CODES[:9])
    assert rating.total == Decimal("53.66") and rating.subtotal == Decimal("53.66")


def test_professional_risk_adjustment_is_its_own_line() -> None:
    rating = rate(PRO, SEED_USAGE)
    risk = rating.lines[-1]
    assert risk.code == "risk_adjustment"
    assert risk.quantity == Decimal("202.93") == rating.subtotal
    assert risk.unit_price == Decimal("-0.1")
    assert risk.amount == Decimal("-20.29")  # -20.293
    assert rating.total == Decimal("182.64")


def test_every_line_is_quantity_times_unit_price_rounded() -> None:
    for tier in BUILTIN_TIERS.values():
        for ln in rate(tier, SEED_USAGE).lines:
            assert ln.amount == round_cents(ln.quantity * ln.unit_price), ln


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0.125", "0.13"), ("0.135", "0.14"), ("-5.005", "-5.01"), ("-0.004", "0.00"), ("2", "2.00")],
)
def test_rounding_is_half_away_from_zero(value: str, expected: str) -> None:
    assert str(round_cents(Decimal(value))) == expected


def test_network_is_priced_per_mib_with_fractional_quantity() -> None:
    half = rate(BASIC, Usage(network_bytes=MIB // 2)).lines[2]
    assert half.quantity == Decimal("0.5") and half.amount == Decimal("0.03")  # 0.025 rounds up
    one_byte = rate(BASIC, Usage(network_bytes=1)).lines[2]
    assert one_byte.quantity == Decimal(1) / Decimal(MIB)  # exact: 0.00000095367431640625
    assert one_byte.amount == Decimal("0.00")


def test_base_fee_without_usage() -> None:
    rating = rate(BUILTIN_TIERS["enterprise"], Usage())
    assert rating.total == Decimal("400.00")  # 500 x 0.8
    assert amounts(Usage())["base"] == Decimal("50.00")


def test_negative_risk_adjustment_rounds_away_from_zero() -> None:
    tier = custom_tier(base_price_usd=Decimal("50.05"), risk_multiplier=Decimal("0.9"))
    risk = rate(tier, Usage()).lines[-1]
    assert risk.amount == Decimal("-5.01")  # -5.005


def test_included_quotas_are_free_allowances() -> None:
    tier = custom_tier(quota_mode="included", quotas=Quotas(cpu_ms=1_000, network_mb=1))
    got = amounts(Usage(cpu_ms=1_500, network_bytes=3 * MIB, api_calls=10), tier)
    assert got["cpu"] == Decimal("0.00")  # 500 ms x 0.0000001
    cpu_line = rate(tier, Usage(cpu_ms=10_001_000)).lines[1]
    assert cpu_line.quantity == Decimal(10_000_000) and cpu_line.amount == Decimal("1.00")
    assert got["network"] == Decimal("0.10")  # 2 MiB above the 1 included
    assert got["api_calls"] == Decimal("0.01")  # no quota for it: all billed
    assert amounts(Usage(cpu_ms=999), tier)["cpu"] == Decimal("0.00")


def test_quota_report_utilisation_and_exceeded() -> None:
    report = {q.quota: q for q in rate(BASIC, Usage(cpu_ms=7_200_000, api_calls=2_500)).quotas}
    assert set(report) == {
        "cpu_ms",
        "network_mb",
        "api_calls",
        "tool_executions",
        "data_retrievals",
    }
    assert report["cpu_ms"].exceeded and report["cpu_ms"].utilisation_pct == Decimal("200.00")
    assert not report["api_calls"].exceeded
    assert report["api_calls"].utilisation_pct == Decimal("25.00")
    assert report["network_mb"].used == 0 and report["network_mb"].limit == 1_000


def test_late_usage_line_is_the_exact_difference() -> None:
    billed = Usage(api_calls=5)
    now = Usage(api_calls=5, data_retrievals=1, violations=1)
    line = late_usage_line("2025-01", PRO, billed, now)
    assert line.code == "late_usage" and line.period == "2025-01"
    assert line.amount == rate(PRO, now).total - rate(PRO, billed).total
    assert "data_retrievals +1" in line.description and "violations +1" in line.description


# --- properties -----------------------------------------------------------------------------

COUNT = st.integers(min_value=0, max_value=10**12)
usages = st.builds(
    Usage,
    cpu_ms=COUNT,
    network_bytes=COUNT,
    api_calls=COUNT,
    tool_executions=COUNT,
    data_retrievals=COUNT,
    egress_scans=COUNT,
    policy_checks=COUNT,
    violations=COUNT,
)
PRICE = st.decimals(min_value=0, max_value=1000, places=8, allow_nan=False, allow_infinity=False)
LIMIT = st.none() | st.integers(min_value=0, max_value=10**9)


@st.composite
def custom_tiers(draw: st.DrawFn) -> Tier:
    return custom_tier(
        **{field: draw(PRICE) for field in PRICE_FIELDS.values()},
        base_price_usd=draw(st.decimals(min_value=0, max_value=10_000, places=2)),
        risk_multiplier=draw(st.decimals(min_value=0, max_value=3, places=2)),
        quota_mode=draw(st.sampled_from(["reported", "included"])),
        quotas=Quotas(**{name: draw(LIMIT) for name in Quotas.model_fields}),
    )


tiers = st.sampled_from(list(BUILTIN_TIERS.values())) | custom_tiers()


def _grow(usage: Usage, extra: Usage) -> Usage:
    a, b = usage.as_dict(), extra.as_dict()
    return Usage(**{k: a[k] + b[k] for k in a})


@settings(max_examples=150, deadline=None)
@given(tier=tiers, usage=usages)
def test_total_is_the_sum_of_lines_and_lines_are_non_negative(tier: Tier, usage: Usage) -> None:
    rating = rate(tier, usage)
    assert rating.total == sum(ln.amount for ln in rating.lines)
    assert all(ln.code in LINE_CODES for ln in rating.lines)
    for ln in rating.lines:
        assert ln.amount == ln.amount.quantize(Decimal("0.01"))
        if ln.code != "risk_adjustment":
            assert ln.amount >= 0, ln


@settings(max_examples=150, deadline=None)
@given(tier=tiers, usage=usages, extra=usages)
def test_more_usage_never_lowers_a_line_or_the_total(
    tier: Tier, usage: Usage, extra: Usage
) -> None:
    before, after = rate(tier, usage), rate(tier, _grow(usage, extra))
    for old, new in zip(before.lines, after.lines, strict=True):
        assert old.code == new.code
        if new.code == "risk_adjustment":
            assert abs(new.amount) >= abs(old.amount)
        else:
            assert new.amount >= old.amount, (old, new)
    assert after.total >= before.total


@settings(max_examples=100, deadline=None)
@given(tier=tiers, billed=usages, extra=usages)
def test_late_usage_makes_the_period_cost_exactly_its_full_rating(
    tier: Tier, billed: Usage, extra: Usage
) -> None:
    now = _grow(billed, extra)
    delta = late_usage_amount(tier, billed, now)
    assert delta >= 0
    assert rate(tier, billed).total + delta == rate(tier, now).total
