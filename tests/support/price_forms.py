"""Price forms for property tests: hypothesis strategies that draw valid unit, graduated,
volume and package prices, and the reference pricing in exact fractions, computed from the
ranges as written (not from ``billing``'s own normalisation)."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

from hypothesis import strategies as st

from billing.tiers import (
    GraduatedPrice,
    PackagePrice,
    PriceForm,
    PriceRange,
    Prices,
    UnitPrice,
    VolumePrice,
)

PRICE = st.decimals(min_value=0, max_value=1000, places=8, allow_nan=False, allow_infinity=False)


@st.composite
def ranges(draw: st.DrawFn, bound: int = 10**12) -> tuple[PriceRange, ...]:
    """1 to 5 contiguous ranges from 0, the last open-ended; ``from`` given or left out."""
    ends = sorted(draw(st.sets(st.integers(min_value=1, max_value=bound), max_size=4)))
    starts = [0, *ends]
    return tuple(
        PriceRange.model_validate(
            {
                "from": start if draw(st.booleans()) else None,
                "up_to": ends[i] if i < len(ends) else None,
                "price": draw(PRICE),
            }
        )
        for i, start in enumerate(starts)
    )


def forms(bound: int = 10**12) -> st.SearchStrategy[PriceForm]:
    """Any valid price form, ranges and package sizes up to ``bound`` units."""
    unit = st.builds(UnitPrice, price=PRICE)
    graduated = st.builds(GraduatedPrice, kind=st.just("graduated"), ranges=ranges(bound))
    volume = st.builds(VolumePrice, kind=st.just("volume"), ranges=ranges(bound))
    package = st.builds(
        PackagePrice,
        kind=st.just("package"),
        size=st.integers(min_value=1, max_value=bound),
        price=PRICE,
    )
    return unit | graduated | volume | package


PRICES = st.builds(Prices, **{code: st.none() | forms() for code in Prices.model_fields})
COMMITMENT = st.just(Decimal(0)) | st.decimals(min_value=0, max_value=10**6, places=2)


def written_ranges(
    form: GraduatedPrice | VolumePrice,
) -> list[tuple[Fraction, Fraction | None, Fraction]]:
    """(from, up_to, price) as the file means them: a missing ``from`` is the previous up_to."""
    out: list[tuple[Fraction, Fraction | None, Fraction]] = []
    end = Fraction(0)
    for rng in form.ranges:
        start = end if rng.start is None else Fraction(rng.start)
        up_to = None if rng.up_to is None else Fraction(rng.up_to)
        out.append((start, up_to, Fraction(rng.price)))
        end = up_to if up_to is not None else end
    return out


def graduated_amount(form: GraduatedPrice, quantity: Fraction) -> Fraction:
    """Sum over ranges of (units of ``quantity`` inside the range) x its price."""
    total = Fraction(0)
    for start, up_to, price in written_ranges(form):
        top = quantity if up_to is None else min(quantity, up_to)
        total += max(top - start, Fraction(0)) * price
    return total


def volume_price(form: VolumePrice, quantity: Fraction) -> Fraction:
    """The price of the range ``quantity`` falls in (``up_to`` inclusive; 0 is in the first)."""
    for _start, up_to, price in written_ranges(form):
        if up_to is None or quantity <= up_to:
            return price
    raise AssertionError("the last range is open-ended")


def packages(size: int, quantity: Fraction) -> int:
    """Started packages: ceil(quantity / size)."""
    return -((-quantity) // size)


def form_amount(form: PriceForm, quantity: Fraction) -> Fraction:
    """What ``quantity`` billable units cost under ``form``, exact and unrounded."""
    if isinstance(form, UnitPrice):
        return quantity * Fraction(form.price)
    if isinstance(form, GraduatedPrice):
        return graduated_amount(form, quantity)
    if isinstance(form, VolumePrice):
        return quantity * volume_price(form, quantity)
    return packages(form.size, quantity) * Fraction(form.price)
