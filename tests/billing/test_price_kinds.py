"""Price forms and minimum commitments (README, "Billing"): each form against an independent
computation in exact fractions, more usage never lowering a line where the form allows it,
the true-up line exactly max(0, minimum - rated total), and every malformed price range in a
tiers file refused when it is loaded, naming the file, tier, counter and what is wrong."""

from __future__ import annotations

import json
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billing.invoicing import prices_text
from billing.model import InvoiceLine
from billing.rating import MIB, Usage, rate
from billing.tiers import (
    BUILTIN_TIERS,
    PRICE_FIELDS,
    GraduatedPrice,
    PackagePrice,
    PriceForm,
    Prices,
    Tier,
    UnitPrice,
    VolumePrice,
    parse_tiers_file,
    tier_from_facts,
)
from common.errors import TierFileError
from schemas.codec import COUNTERS as USAGE_COUNTERS
from tests.fixtures.cli import Cli
from tests.fixtures.seeds import CUSTOM, PRICED, SEED, event
from tests.support.books import Books
from tests.support.price_forms import (
    COMMITMENT,
    forms,
    graduated_amount,
    packages,
    volume_price,
    written_ranges,
)

BASIC = BUILTIN_TIERS["basic"]
BOUND = 10**6  # ranges and packages small enough that usage crosses them
UNITS = st.integers(min_value=0, max_value=4 * BOUND)
COUNTERS = st.sampled_from(list(PRICE_FIELDS))  # network in bytes, so MiB fractions too


def cents(amount: Fraction) -> Fraction:
    """To the cent, half away from zero (amounts here are never negative)."""
    scaled = amount * 100
    whole = int(scaled)
    return Fraction(whole + (scaled - whole >= Fraction(1, 2)), 100)


def priced(code: str, form: PriceForm, **changes: object) -> Tier:
    """Basic with ``code`` priced by ``form`` instead of its unit price."""
    return BASIC.model_copy(
        update={
            "name": "priced",
            "prices": Prices(**{code: form}),
            PRICE_FIELDS[code]: None,
            **changes,
        }
    )


def line_of(tier: Tier, code: str, units: int) -> InvoiceLine:
    """``code``'s line with ``units`` of its counter (and no other usage)."""
    counter = "cpu_ms" if code == "cpu" else "network_bytes" if code == "network" else code
    (line,) = (ln for ln in rate(tier, Usage(**{counter: units})).lines if ln.code == code)
    return line


def billable(code: str, units: int) -> Fraction:
    """The quantity ``units`` of ``code``'s counter is billed as (network: MiB)."""
    return Fraction(units, MIB if code == "network" else 1)


def exact(line: InvoiceLine) -> Fraction:
    """The exact sum of a line's parts."""
    assert line.parts is not None
    return sum((Fraction(p.amount) for p in line.parts), Fraction(0))


@settings(max_examples=150, deadline=None)
@given(
    form=forms(BOUND).filter(lambda f: isinstance(f, GraduatedPrice)), units=UNITS, code=COUNTERS
)
def test_graduated_is_the_sum_of_its_ranges_each_at_its_own_price(
    form: GraduatedPrice, units: int, code: str
) -> None:
    line = line_of(priced(code, form), code, units)
    assert exact(line) == graduated_amount(form, billable(code, units))
    assert Fraction(line.amount) == cents(
        graduated_amount(form, billable(code, units))
    )  # rounded once
    assert line.parts is not None and sum(p.quantity for p in line.parts) == billable(code, units)
    for part, (start, up_to, price) in zip(line.parts, written_ranges(form), strict=False):
        assert (Fraction(part.start or 0), Fraction(part.unit_price)) == (start, price)
        assert part.up_to == (None if up_to is None else Decimal(int(up_to)))


@settings(max_examples=150, deadline=None)
@given(form=forms(BOUND).filter(lambda f: isinstance(f, VolumePrice)), units=UNITS, code=COUNTERS)
def test_volume_prices_every_unit_at_the_reached_range(
    form: VolumePrice, units: int, code: str
) -> None:
    line = line_of(priced(code, form), code, units)
    assert exact(line) == billable(code, units) * volume_price(form, billable(code, units))
    assert Fraction(line.amount) == cents(
        billable(code, units) * volume_price(form, billable(code, units))
    )
    assert Fraction(line.unit_price) == volume_price(form, billable(code, units))


@settings(max_examples=150, deadline=None)
@given(form=forms(BOUND).filter(lambda f: isinstance(f, PackagePrice)), units=UNITS, code=COUNTERS)
def test_package_charges_every_started_package(form: PackagePrice, units: int, code: str) -> None:
    line = line_of(priced(code, form), code, units)
    assert exact(line) == packages(form.size, billable(code, units)) * Fraction(form.price)
    assert Fraction(line.amount) == cents(exact(line))


def test_package_rounds_a_partial_package_up_and_network_counts_mib() -> None:
    form = PackagePrice(kind="package", size=100, price=Decimal("0.50"))
    tier = priced("api_calls", form)
    amounts = [line_of(tier, "api_calls", n).amount for n in (0, 1, 100, 101)]
    assert amounts == [Decimal("0.00"), Decimal("0.50"), Decimal("0.50"), Decimal("1.00")]
    tier = priced("network", PackagePrice(kind="package", size=10, price=Decimal(1)))
    line = line_of(tier, "network", 10 * MIB + 1)  # just over 10 MiB: two packages
    assert line.amount == Decimal("2.00") and line.parts and line.parts[0].quantity == 2


def test_included_quota_comes_off_the_bottom_before_the_ranges() -> None:
    form = GraduatedPrice.model_validate(
        {"kind": "graduated", "ranges": [{"up_to": 100, "price": "1"}, {"price": "0.1"}]}
    )
    tier = priced("api_calls", form, quota_mode="included")  # basic: 10,000 api calls free
    line = line_of(tier, "api_calls", 10_150)  # 150 billable: 100 x 1 + 50 x 0.1
    assert (line.quantity, line.amount) == (Decimal(150), Decimal("105.00"))


def _monotone(form: PriceForm) -> bool:
    """Whether ``form`` can never charge less for more: all but volume, and volume whose
    prices never fall from one range to the next."""
    if not isinstance(form, VolumePrice):
        return True
    prices = [price for _s, _u, price in written_ranges(form)]
    return prices == sorted(prices)


@settings(max_examples=200, deadline=None)
@given(form=forms(BOUND), units=UNITS, extra=UNITS, code=COUNTERS)
def test_more_usage_never_lowers_a_line_of_any_price_form(
    form: PriceForm, units: int, extra: int, code: str
) -> None:
    tier = priced(code, form)
    before, after = line_of(tier, code, units).amount, line_of(tier, code, units + extra).amount
    if isinstance(form, VolumePrice):
        low, high = billable(code, units), billable(code, units + extra)
        same = volume_price(form, low) == volume_price(form, high)
        if same or _monotone(form):
            assert after >= before
    else:
        assert after >= before


def test_a_volume_discount_lowers_the_line_when_usage_crosses_into_the_cheaper_range() -> None:
    """What volume pricing is (and why the property above exempts it): 1,000 calls at 0.01
    cost more than 1,001 at 0.005."""
    form = VolumePrice.model_validate(
        {"kind": "volume", "ranges": [{"up_to": 1000, "price": "0.01"}, {"price": "0.005"}]}
    )
    tier = priced("api_calls", form)
    assert line_of(tier, "api_calls", 1000).amount == Decimal("10.00")
    assert line_of(tier, "api_calls", 1001).amount == Decimal("5.01")


@st.composite
def committed_tiers(draw: st.DrawFn) -> Tier:
    code = draw(COUNTERS)
    return priced(
        code,
        draw(forms(BOUND)),
        minimum_commitment_usd=draw(COMMITMENT.filter(lambda m: m > 0)),
        risk_multiplier=draw(st.decimals(min_value=0, max_value=3, places=2)),
    )


USAGES = st.builds(Usage, **{c: UNITS for c in USAGE_COUNTERS})


@settings(max_examples=200, deadline=None)
@given(tier=committed_tiers(), usage=USAGES)
def test_the_true_up_is_exactly_the_minimum_less_the_rated_total(tier: Tier, usage: Usage) -> None:
    rating = rate(tier, usage)
    *rated, true_up = rating.lines
    assert true_up.code == "minimum_commitment"
    rated_total = sum(ln.amount for ln in rated)  # base, usage and the risk adjustment
    assert true_up.amount == max(Decimal(0), tier.minimum_commitment_usd - rated_total)
    assert rating.total == sum(ln.amount for ln in rating.lines)
    assert rating.total == max(tier.minimum_commitment_usd, rated_total)
    assert rating.subtotal == sum(ln.amount for ln in rated if ln.code != "risk_adjustment")


def test_no_true_up_line_without_a_commitment_and_the_seed_still_costs_53_66() -> None:
    rating = rate(BASIC, Usage(**SEED))
    assert "minimum_commitment" not in {ln.code for ln in rating.lines}
    assert rating.total == Decimal("53.66")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tiers.toml"
    path.write_text(text)
    return path


def test_a_tiers_file_with_every_form_loads_rates_and_is_recorded_exactly(tmp_path: Path) -> None:
    tier = parse_tiers_file(write(tmp_path, PRICED))["scale"]
    assert isinstance(tier.pricing("api_calls"), GraduatedPrice)
    assert isinstance(tier.pricing("tool_executions"), PackagePrice)
    assert tier.pricing("cpu") == UnitPrice(price=Decimal("0.0000001"))
    rating = rate(tier, Usage(**SEED))
    amounts = {ln.code: ln.amount for ln in rating.lines}
    assert amounts["api_calls"] == Decimal("1.00")  # 100 calls in the first range, at 0.01
    assert amounts["tool_executions"] == Decimal("0.50")  # 50 executions: one package
    assert amounts["minimum_commitment"] == Decimal("85.44") and rating.total == Decimal("100.00")
    # what an invoice records reads back as the same tier, whatever the file says later
    recorded = tier_from_facts(prices_text(tier))
    assert prices_text(recorded) == prices_text(tier)
    assert rate(recorded, Usage(**SEED)) == rating


def test_the_invoice_json_and_table_show_each_range_and_the_true_up(
    data_env: dict[str, str], pfm: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METERING_TIERS_FILE", str(write(tmp_path, PRICED)))
    Books().publish(event("scale-co", "2025-01", **{**SEED, "api_calls": 12_345}))
    assert pfm("tenants", "add", "scale-co", "--tier", "scale").code == 0
    run = pfm("generate-invoice", "scale-co", "2025-01", "-f", "json")
    assert run.code == 0, run.err
    doc = json.loads(run.out)
    lines = {ln["code"]: ln for ln in doc["lines"]}
    assert lines["api_calls"]["amount"] == "57.35" and lines["api_calls"]["quantity"] == "12345"
    assert lines["api_calls"]["parts"] == [
        {"from": "0", "up_to": "1000", "quantity": "1000", "unit_price": "0.01", "amount": "10.00"},
        {"from": "1000", "up_to": "10000", "quantity": "9000", "unit_price": "0.005",
         "amount": "45.00"},
        {"from": "10000", "up_to": None, "quantity": "2345", "unit_price": "0.001",
         "amount": "2.345"},
    ]  # fmt: skip
    assert lines["tool_executions"]["parts"] == [
        {"package_size": 100, "quantity": "1", "unit_price": "0.50", "amount": "0.50"}
    ]
    assert "parts" not in lines["cpu"]
    # 10.00 + 0.36 + 0.05 + 57.35 + 0.50 + 0.13 + 0.02 + 0.50 + 2.00 = 70.91
    assert lines["minimum_commitment"]["amount"] == "29.09" and doc["total"] == "100.00"
    assert sum(Decimal(ln["amount"]) for ln in doc["lines"]) == Decimal(doc["total"])
    assert doc["computed_from"]["tier"]["minimum_commitment_usd"] == "100.00"
    assert doc["computed_from"]["tier"]["prices"]["api_calls"]["kind"] == "graduated"
    table = pfm("generate-invoice", "scale-co", "2025-01")
    assert table.code == 0 and "units 10,000 and above" in table.out, table.out
    assert "minimum_commitment" in table.out


UNIT_API = "api_call_price = 0.001\n"
BAD_PRICES = {
    "overlapping": ('ranges = [{ up_to = 100, price = 1 }, { from = 50, price = 0.5 }]',
                    "ranges.1 starts at 50, overlapping ranges.0"),
    "unsorted": ('ranges = [{ up_to = 100, price = 1 }, { from = 200, up_to = 300, price = 1 },'
                 ' { from = 100, up_to = 200, price = 1 }, { from = 300, price = 1 }]',
                 "ranges are not sorted"),
    "gap": ('ranges = [{ up_to = 100, price = 1 }, { from = 150, price = 0.5 }]',
            "gap: no price from 100 to 150"),
    "not from 0": ('ranges = [{ from = 10, price = 1 }]', "gap: no price from 0 to 10"),
    "empty range": ('ranges = [{ up_to = 0, price = 1 }, { price = 0.5 }]', "ranges.0 is empty"),
    "closed": ('ranges = [{ up_to = 100, price = 1 }]', "must be open-ended"),
    "open twice": ('ranges = [{ price = 1 }, { price = 0.5 }]', "only the last range"),
    "no ranges": ("ranges = []", "graduated.ranges: Tuple should have at least 1 item"),
    "negative price": ('ranges = [{ up_to = 100, price = -1 }, { price = 0.5 }]',
                       "graduated.ranges.0.price: Input should be greater than or equal to 0"),
    "negative bound": ('ranges = [{ up_to = -100, price = 1 }, { price = 0.5 }]',
                       "graduated.ranges.0.up_to: Input should be greater than or equal to 0"),
    "price too big": ('ranges = [{ up_to = 100, price = 1e13 }, { price = 0.5 }]',
                      "graduated.ranges.0.price: Input should be less than or equal to"),
    "bound too big": ('ranges = [{ up_to = 100_000_000_000_000_000_000, price = 1 }, {price = 1}]',
                      "graduated.ranges.0.up_to: Input should be less than or equal to"),
}  # fmt: skip


def _with_api_prices(body: str) -> str:
    assert UNIT_API in CUSTOM
    return CUSTOM.replace(UNIT_API, "") + f"\n[tiers.startup.prices.api_calls]\n{body}\n"


BROKEN = {
    **{name: (_with_api_prices(f'kind = "graduated"\n{body}'), why)
       for name, (body, why) in BAD_PRICES.items()},
    "package of 0": (_with_api_prices('kind = "package"\nsize = 0\nprice = 1'),
                     "package.size: Input should be greater than or equal to 1"),
    "unknown kind": (_with_api_prices('kind = "tiered"\nprice = 1'),
                     "Input tag 'tiered' found using 'kind' does not match"),
    "no kind": (_with_api_prices("price = 1"), "Unable to extract tag using discriminator 'kind'"),
    "priced twice": (CUSTOM + '\n[tiers.startup.prices.api_calls]\nkind = "unit"\nprice = 1\n',
                     "tiers.startup.api_call_price: prices.api_calls prices it too"),
    "negative commitment": (CUSTOM.replace("[tiers.startup]\n",
                                           "[tiers.startup]\nminimum_commitment_usd = -1\n"),
                            "tiers.startup.minimum_commitment_usd: Input should be greater"),
    "commitment in fractions of a cent": (
        CUSTOM.replace("[tiers.startup]\n", "[tiers.startup]\nminimum_commitment_usd = 1.001\n"),
        "tiers.startup.minimum_commitment_usd: Decimal input should have no more than 2"),
}  # fmt: skip
"""Malformed prices: the tiers file, and a fragment of the one-line error it must give."""


@pytest.mark.parametrize("kind", list(BROKEN))
def test_a_malformed_price_is_refused_naming_file_tier_counter_and_why(
    tmp_path: Path, kind: str
) -> None:
    text, why = BROKEN[kind]
    path = write(tmp_path, text)
    with pytest.raises(TierFileError) as err:
        parse_tiers_file(path)
    message = str(err.value)
    assert message.startswith(f"invalid tiers file {path}: tiers.startup"), message
    assert why in message and "\n" not in message, message
    if "commitment" not in kind:
        assert "api_call" in message, message


def test_tiers_shows_each_price_form_in_a_line_and_as_json(
    pfm: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METERING_TIERS_FILE", str(write(tmp_path, PRICED)))
    table = pfm("tiers")
    assert table.code == 0, table.err
    text = " ".join(table.out.split())
    assert "graduated: 0-1,000 at 0.01; 1,000-10,000 at 0.005; 10,000+ at 0.001" in text, text
    assert "0.50 per package of 100 (each started package)" in text and "100.00" in text
    out = tmp_path / "tiers.json"
    assert pfm("tiers", "-f", "json", "-o", str(out)).code == 0
    scale = next(t for t in json.loads(out.read_text()) if t["name"] == "scale")
    assert scale["api_call_price"] is None and scale["minimum_commitment_usd"] == "100.00"
    assert scale["prices"]["tool_executions"] == {"kind": "package", "size": 100, "price": "0.50"}
    assert scale["prices"]["api_calls"]["ranges"][2] == {
        "from": 10000,
        "up_to": None,
        "price": "0.001",
    }
