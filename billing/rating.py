"""Rating: usage + tier -> invoice lines (docs/spec.md, "Rating"). Pure: no I/O, Decimal only.

Each line amount is quantity x unit price rounded to the cent, half away from zero.
Network is priced per MiB (bytes / 1,048,576, a fractional quantity). The risk adjustment is
its own line, round(subtotal x (risk_multiplier - 1)) with subtotal = base + usage lines, shown
as quantity = subtotal and unit price = multiplier - 1 so it explains itself; a tier with
multiplier 1 has no such line. total = sum of all lines.

With ``quota_mode = "included"`` a quota is a free allowance: the line's quantity is the usage
above it. Otherwise quotas are only reported (utilisation and whether exceeded).

A counter's billable quantity q (its usage, less any included allowance: the allowance comes
off the bottom, before any range) is priced by its tier's form: unit (q x price), graduated
(each range's units at its price), volume (every unit at the price of the range q reaches;
``up_to`` is inclusive) or package (ceil(q / size) started packages x price). A line of one
of the last three lists its parts and rounds once, their exact sum. A tier's minimum
commitment compares with the period's rated total after the risk adjustment: when that is
under it, a ``minimum_commitment`` line of the difference brings the period up to it (the
line is there, 0.00 or more, whenever the tier sets a commitment).

A late-usage line is the difference between the period rated on its usage now and rated on
what was already billed (same tier, base included on both sides so it cancels): summed with the
earlier invoice, the period costs exactly what it would have cost had all usage been on time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from decimal import ROUND_CEILING, Decimal
from functools import lru_cache

from billing.model import EXACT, InvoiceLine, LinePart, QuotaUsage, add_up, plain
from billing.tiers import GraduatedPrice, PackagePrice, PriceForm, Tier, UnitPrice, VolumePrice

MIB = 1_048_576
CENT = Decimal("0.01")
_CTX = EXACT
"""All arithmetic here: enough digits that no product or quotient is ever inexact (a byte
count over 2**20 has up to 20 decimals, a 128-bit count 39 digits), and half-away-from-zero
rounding to the cent."""


def round_cents(value: Decimal) -> Decimal:
    """To the cent, half away from zero (Decimal's ROUND_HALF_UP); never -0.00."""
    return _CTX.plus(value.quantize(CENT, context=_CTX))


def _amount(quantity: Decimal, unit_price: Decimal) -> Decimal:
    return round_cents(_CTX.multiply(quantity, unit_price))


@dataclass(frozen=True)
class Usage:
    """The eight billable counters of one tenant in one period."""

    cpu_ms: int = 0
    network_bytes: int = 0
    api_calls: int = 0
    tool_executions: int = 0
    data_retrievals: int = 0
    egress_scans: int = 0
    policy_checks: int = 0
    violations: int = 0

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> Usage:
        """From a row or dict with (at least) the counter names; missing or null is 0."""
        return cls(*(int(values.get(name) or 0) for name in _COUNTER_NAMES))  # type: ignore[call-overload]

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def delta(self, earlier: Usage) -> dict[str, int]:
        """Counters that changed since ``earlier``, with the change."""
        now, before = self.as_dict(), earlier.as_dict()
        return {k: now[k] - before[k] for k in now if now[k] != before[k]}


_COUNTER_NAMES = tuple(f.name for f in fields(Usage))


@dataclass(frozen=True)
class Meter:
    """A usage line: its code, the counter it reads, its unit and its quota key."""

    code: str
    counter: str
    description: str
    quota: str
    per: int = 1  # counter units per billed unit (MIB for network)

    def quantity(self, usage: Usage) -> Decimal:
        raw = Decimal(getattr(usage, self.counter))
        return raw if self.per == 1 else _CTX.divide(raw, Decimal(self.per))


METERS: tuple[Meter, ...] = (
    Meter("cpu", "cpu_ms", "CPU time (ms)", "cpu_ms"),
    Meter("network", "network_bytes", "network transfer (MiB)", "network_mb", MIB),
    Meter("api_calls", "api_calls", "API calls", "api_calls"),
    Meter("tool_executions", "tool_executions", "tool executions", "tool_executions"),
    Meter("data_retrievals", "data_retrievals", "data retrievals", "data_retrievals"),
    Meter("egress_scans", "egress_scans", "egress scans", "egress_scans"),
    Meter("policy_checks", "policy_checks", "policy checks", "policy_checks"),
    Meter("violations", "violations", "policy violations", "violations"),
)


@dataclass(frozen=True)
class Rating:
    """The rated lines of one period (base, usage, risk adjustment) and its quota report."""

    tier: str
    lines: tuple[InvoiceLine, ...]
    quotas: tuple[QuotaUsage, ...]

    @property
    def subtotal(self) -> Decimal:
        """Base plus usage lines: what the risk adjustment applies to."""
        return add_up(ln.amount for ln in self.lines if ln.code not in _ON_SUBTOTAL)

    @property
    def total(self) -> Decimal:
        return add_up(ln.amount for ln in self.lines)


_ON_SUBTOTAL = frozenset({"risk_adjustment", "minimum_commitment"})
"""The lines computed from the subtotal rather than making it up."""


def _line(code: str, description: str, quantity: Decimal, unit_price: Decimal) -> InvoiceLine:
    return InvoiceLine(
        code=code,
        description=description,
        quantity=quantity,
        unit_price=unit_price,
        amount=_amount(quantity, unit_price),
    )


@dataclass(frozen=True)
class _Charge:
    """One meter as a tier prices it: price form, free allowance (if included), description."""

    meter: Meter
    form: PriceForm
    allowance: Decimal | None
    description: str


@lru_cache(maxsize=256)
def _charges(tier: Tier) -> tuple[_Charge, ...]:
    """Per tier once: the lookups every rating of it repeats (``bill`` rates thousands)."""
    charges = []
    for meter in METERS:
        limit = tier.quota_of(meter.quota)
        free = Decimal(limit) if tier.quota_mode == "included" and limit is not None else None
        text = meter.description if free is None else f"{meter.description} above {free} included"
        form = tier.pricing(meter.code)
        if isinstance(form, PackagePrice):
            text = f"{text}, per package of {form.size:,}"
        elif not isinstance(form, UnitPrice):
            text = f"{text}, {form.kind}"
        charges.append(_Charge(meter, form, free, text))
    return tuple(charges)


def graduated_parts(form: GraduatedPrice, quantity: Decimal) -> list[LinePart]:
    """The units of ``quantity`` in each range it reaches (the first range at least), each at
    its range's price."""
    parts: list[LinePart] = []
    for start, up_to, price in form.spans():
        if parts and quantity <= start:
            break
        top = quantity if up_to is None else min(quantity, Decimal(up_to))
        units = max(_CTX.subtract(top, Decimal(start)), Decimal(0))
        parts.append(_part(units, price, start, up_to))
    return parts


def volume_part(form: VolumePrice, quantity: Decimal) -> LinePart:
    """Every unit of ``quantity`` at the price of the range it reaches (``up_to`` inclusive)."""
    spans = form.spans()
    start, up_to, price = next(s for s in spans if s[1] is None or quantity <= s[1])
    return _part(quantity, price, start, up_to)


def package_part(form: PackagePrice, quantity: Decimal) -> LinePart:
    """ceil(quantity / size) started packages at the package price."""
    packages = _CTX.divide(quantity, Decimal(form.size)).to_integral_value(
        rounding=ROUND_CEILING, context=_CTX
    )
    return LinePart(
        quantity=packages,
        unit_price=form.price,
        amount=_CTX.multiply(packages, form.price),
        package_size=form.size,
    )


def _part(units: Decimal, price: Decimal, start: int, up_to: int | None) -> LinePart:
    return LinePart(
        quantity=units,
        unit_price=price,
        amount=_CTX.multiply(units, price),
        start=Decimal(start),
        up_to=None if up_to is None else Decimal(up_to),
    )


def price_line(code: str, description: str, quantity: Decimal, form: PriceForm) -> InvoiceLine:
    """The line of ``quantity`` billable units priced by ``form``, rounded once."""
    if isinstance(form, UnitPrice):
        return _line(code, description, quantity, form.price)
    if isinstance(form, GraduatedPrice):
        parts = graduated_parts(form, quantity)
    elif isinstance(form, VolumePrice):
        parts = [volume_part(form, quantity)]
    else:
        parts = [package_part(form, quantity)]
    return InvoiceLine(
        code=code,
        description=description,
        quantity=quantity,
        unit_price=parts[-1].unit_price,
        amount=round_cents(add_up(p.amount for p in parts)),
        parts=parts,
    )


def quota_report(tier: Tier, usage: Usage) -> tuple[QuotaUsage, ...]:
    """Utilisation of every quota the tier defines (network in MiB)."""
    report = []
    for meter in METERS:
        limit = tier.quota_of(meter.quota)
        if limit is None:
            continue
        used = meter.quantity(usage)
        pct = None
        if limit > 0:
            pct = round_cents(_CTX.divide(_CTX.multiply(used, Decimal(100)), Decimal(limit)))
        report.append(
            QuotaUsage(
                quota=meter.quota,
                used=used,
                limit=Decimal(limit),
                utilisation_pct=pct,
                exceeded=used > limit,
            )
        )
    return tuple(report)


def rate(tier: Tier, usage: Usage) -> Rating:
    """Rate one tenant-period: base line, one line per meter, the risk adjustment, then the
    minimum commitment's true-up. A pure function of the tier and the period's totals."""
    lines = [
        _line("base", f"{tier.display_name} base fee (month)", Decimal(1), tier.base_price_usd)
    ]
    for charge in _charges(tier):
        quantity = charge.meter.quantity(usage)
        if charge.allowance is not None:
            quantity = max(_CTX.subtract(quantity, charge.allowance), Decimal(0))
        lines.append(price_line(charge.meter.code, charge.description, quantity, charge.form))
    if tier.risk_multiplier != 1:
        subtotal = add_up(ln.amount for ln in lines)
        factor = _CTX.subtract(tier.risk_multiplier, Decimal(1))
        lines.append(
            _line("risk_adjustment", f"risk multiplier {tier.risk_multiplier}", subtotal, factor)
        )
    if tier.minimum_commitment_usd > 0:
        lines.append(
            commitment_line(tier.minimum_commitment_usd, add_up(ln.amount for ln in lines))
        )
    return Rating(tier=tier.name, lines=tuple(lines), quotas=quota_report(tier, usage))


def commitment_line(minimum: Decimal, rated: Decimal) -> InvoiceLine:
    """The true-up that brings a period rated at ``rated`` up to ``minimum``: max(0, minimum -
    rated), one line (0.00 when the period reached it)."""
    shortfall = max(_CTX.subtract(minimum, rated), Decimal(0))
    return _line(
        "minimum_commitment",
        f"minimum commitment {plain(minimum, 2)} per period (rated {plain(rated, 2)})",
        Decimal(1),
        shortfall,
    )


def late_usage_amount(tier: Tier, billed: Usage, now: Usage) -> Decimal:
    """What the period costs now minus what was already billed for it (exact to the cent)."""
    return _CTX.subtract(rate(tier, now).total, rate(tier, billed).total)


def late_usage_line(period: str, tier: Tier, billed: Usage, now: Usage) -> InvoiceLine:
    """The correction for usage of ``period`` that arrived after its invoice was final."""
    amount = late_usage_amount(tier, billed, now)
    changes = ", ".join(f"{k} +{v}" for k, v in now.delta(billed).items())
    return InvoiceLine(
        code="late_usage",
        description=f"late usage for {period} ({tier.name}): {changes or 'no change'}",
        quantity=Decimal(1),
        unit_price=amount,
        amount=amount,
        period=period,
    )
