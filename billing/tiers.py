"""Billing tiers: the three built-in tiers of the original tool (exact values) plus custom
tiers from a TOML file (``METERING_TIERS_FILE``), validated strictly.

A custom tiers file looks like this (every price is required; quotas are optional)::

    [tiers.startup]
    display_name = "Startup"
    base_price_usd = 20.00
    cpu_price_per_ms = 0.0000001
    network_price_per_mb = 0.05
    api_call_price = 0.001
    tool_execution_price = 0.01
    data_retrieval_price = 0.005
    egress_scan_price = 0.002
    policy_check_price = 0.001
    violation_price = 1.00
    risk_multiplier = 1.0
    quota_mode = "included"      # "reported" (default): quotas are only reported

    [tiers.startup.quotas]
    cpu_ms = 3_600_000
    network_mb = 1_000

Any counter may instead be priced under ``[tiers.<name>.prices]`` by its line code (its unit
price field is then left out): ``unit`` (``price``), ``graduated`` (each range's units at its
own price), ``volume`` (the range the usage reaches prices every unit) or ``package``
(``ceil(units / size)`` packages at ``price`` each); ranges are in the counter's units (ms,
MiB, counts), ``from`` inclusive and ``up_to`` inclusive, contiguous from 0, the last one
open-ended. ``minimum_commitment_usd`` sets a floor on a period's rated total::

    minimum_commitment_usd = 100.00

    [tiers.startup.prices.api_calls]
    kind = "graduated"
    ranges = [{ up_to = 10_000, price = 0.001 }, { from = 10_000, price = 0.0005 }]

Usage alert thresholds per tier (built-in or custom) go under ``alerts`` (see
``billing.alerts.model``)::

    [[alerts.startup]]
    quota_percent = 80          # of every quota; counter = "cpu_ms" for one
    [[alerts.basic]]
    amount_usd = 100.00         # the open period's amount

TOML floats are read as ``Decimal`` (``parse_float=Decimal``), so ``0.0000001`` stays exact.
Built-in tiers cannot be redefined: invoices already rated with them must stay explainable.
"""

from __future__ import annotations

import json
import tomllib
from decimal import Decimal
from functools import lru_cache
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from billing.alerts.model import Threshold, quota_problem
from billing.model import plain
from common.errors import TierFileError, UserError

DEFAULT_TIER = "basic"

MAX_PRICE = Decimal(10**12)
"""The largest base fee or unit price a tiers file may set, in usd."""
PRICE_PLACES = 12
"""The most decimal places of a price (a millionth of a micro-dollar)."""
Price = Annotated[
    Decimal,
    Field(ge=0, le=MAX_PRICE, allow_inf_nan=False, max_digits=26, decimal_places=PRICE_PLACES),
]
Limit = Annotated[int, Field(ge=0, le=10**19)]
"""A quota, a range bound or a package size, in the counter's units."""
Money = Annotated[
    Decimal, Field(ge=0, le=MAX_PRICE, allow_inf_nan=False, max_digits=15, decimal_places=2)
]
TierName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]


class Quotas(BaseModel):
    """Monthly quotas; a missing one means no quota for that meter. Network is in MiB."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu_ms: Limit | None = None
    network_mb: Limit | None = None
    api_calls: Limit | None = None
    tool_executions: Limit | None = None
    data_retrievals: Limit | None = None
    egress_scans: Limit | None = None
    policy_checks: Limit | None = None
    violations: Limit | None = None


PRICE_FIELDS: dict[str, str] = {
    "cpu": "cpu_price_per_ms",
    "network": "network_price_per_mb",
    "api_calls": "api_call_price",
    "tool_executions": "tool_execution_price",
    "data_retrievals": "data_retrieval_price",
    "egress_scans": "egress_scan_price",
    "policy_checks": "policy_check_price",
    "violations": "violation_price",
}
"""Usage line code -> the tier field holding its unit price."""


class UnitPrice(BaseModel):
    """Every unit at ``price`` (what a ``*_price`` field of the tier says)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["unit"] = "unit"
    price: Price


class PriceRange(BaseModel):
    """Units ``from`` (default: where the previous range ends, 0 for the first) up to and
    including ``up_to`` (none: no end) at ``price`` each."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    start: Limit | None = Field(default=None, alias="from")
    up_to: Limit | None = None
    price: Price


class RangedPrice(BaseModel):
    """Ranges contiguous from 0, sorted, each non-empty, the last one open-ended (checked
    when loaded, so every usage has exactly one price)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ranges: tuple[PriceRange, ...] = Field(min_length=1, max_length=100)

    @model_validator(mode="after")
    def _contiguous(self) -> RangedPrice:
        self.spans()
        return self

    def spans(self) -> tuple[tuple[int, int | None, Decimal], ...]:
        """(from, up_to or None, price) per range, ``from`` filled in; a malformed range
        list is a ``price_ranges`` error saying which range and why."""
        for bound, verb in (("start", "starts"), ("up_to", "ends")):
            given = [
                (i, v) for i, r in enumerate(self.ranges) if (v := getattr(r, bound)) is not None
            ]
            for (j, before), (i, value) in pairwise(given):
                if value < before:
                    _bad(f"ranges are not sorted: ranges.{i} {verb} at {value}, below ranges.{j}")
        spans: list[tuple[int, int | None, Decimal]] = []
        end: int | None = 0
        for i, rng in enumerate(self.ranges):
            if end is None:
                _bad(f"ranges.{i - 1} has no up_to: only the last range may be open-ended")
            start = end if rng.start is None else rng.start
            if start < end:
                _bad(f"ranges.{i} starts at {start}, overlapping ranges.{i - 1} (up to {end})")
            if start > end:
                _bad(f"gap: no price from {end} to {start} (ranges must be contiguous from 0)")
            if rng.up_to is not None and rng.up_to <= start:
                _bad(f"ranges.{i} is empty: up_to {rng.up_to} is not above its from {start}")
            spans.append((start, rng.up_to, rng.price))
            end = rng.up_to
        if end is not None:
            _bad(f"the last range ends at {end}: it must be open-ended (no up_to)")
        return tuple(spans)


def _bad(message: str) -> NoReturn:
    raise PydanticCustomError("price_ranges", message)


class GraduatedPrice(RangedPrice):
    """Each range's units at that range's price, summed."""

    kind: Literal["graduated"]


class VolumePrice(RangedPrice):
    """Every unit at the price of the range the usage reaches."""

    kind: Literal["volume"]


class PackagePrice(BaseModel):
    """``price`` per started package of ``size`` units: ceil(units / size) x price."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["package"]
    size: Annotated[int, Field(ge=1, le=10**19)]
    price: Price


PriceForm = Annotated[
    UnitPrice | GraduatedPrice | VolumePrice | PackagePrice, Field(discriminator="kind")
]


class Prices(BaseModel):
    """Price forms by line code; a counter not named here has its tier's unit price field."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu: PriceForm | None = None
    network: PriceForm | None = None
    api_calls: PriceForm | None = None
    tool_executions: PriceForm | None = None
    data_retrievals: PriceForm | None = None
    egress_scans: PriceForm | None = None
    policy_checks: PriceForm | None = None
    violations: PriceForm | None = None


class TierSpec(BaseModel):
    """One tier as written in the TOML file (the field names of the original tool); each
    counter has either its unit price field or an entry in ``prices``, never both."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    display_name: str | None = None
    base_price_usd: Price
    cpu_price_per_ms: Price | None = None
    network_price_per_mb: Price | None = None
    api_call_price: Price | None = None
    tool_execution_price: Price | None = None
    data_retrieval_price: Price | None = None
    egress_scan_price: Price | None = None
    policy_check_price: Price | None = None
    violation_price: Price | None = None
    risk_multiplier: Price = Decimal(1)
    quota_mode: Literal["reported", "included"] = "reported"
    quotas: Quotas = Field(default_factory=Quotas)
    prices: Prices = Field(default_factory=Prices)
    minimum_commitment_usd: Money = Decimal(0)

    @model_validator(mode="after")
    def _one_price_per_counter(self) -> TierSpec:
        for code, field in PRICE_FIELDS.items():
            unit, form = getattr(self, field), getattr(self.prices, code)
            if unit is None and form is None:
                raise PydanticCustomError(
                    "price_missing",
                    "Field required (or a prices.{code} table)",
                    {"key": field, "code": code},
                )
            if unit is not None and form is not None:
                raise PydanticCustomError(
                    "price_twice",
                    "prices.{code} prices it too: keep one of the two",
                    {"key": field, "code": code},
                )
        return self


class Tier(TierSpec):
    """A tier with its name; ``pricing(code)`` gives how a usage line is priced."""

    name: TierName
    display_name: str
    alerts: tuple[Threshold, ...] = ()

    def pricing(self, code: str) -> UnitPrice | GraduatedPrice | VolumePrice | PackagePrice:
        form = getattr(self.prices, code)
        return form if form is not None else UnitPrice(price=getattr(self, PRICE_FIELDS[code]))

    def quota_of(self, quota: str) -> int | None:
        value = getattr(self.quotas, quota)
        return None if value is None else int(value)


def price_form_json(
    form: UnitPrice | GraduatedPrice | VolumePrice | PackagePrice,
) -> dict[str, Any]:
    """A price form as plain JSON (decimal strings, ranges with ``from`` filled in)."""
    if isinstance(form, UnitPrice):
        return {"kind": "unit", "price": plain(form.price, 2)}
    if isinstance(form, PackagePrice):
        return {"kind": "package", "size": form.size, "price": plain(form.price, 2)}
    ranges = [
        {"from": start, "up_to": up_to, "price": plain(price, 2)}
        for start, up_to, price in form.spans()
    ]
    return {"kind": form.kind, "ranges": ranges}


def price_form_text(form: UnitPrice | GraduatedPrice | VolumePrice | PackagePrice) -> str:
    """A price form in one line, e.g. ``graduated: 0-10,000 at 0.001; 10,000+ at 0.0005``."""
    if isinstance(form, UnitPrice):
        return f"{plain(form.price, 2)} per unit"
    if isinstance(form, PackagePrice):
        return f"{plain(form.price, 2)} per package of {form.size:,} (each started package)"
    ranges = "; ".join(
        f"{start:,}+ at {plain(price, 2)}"
        if up_to is None
        else f"{start:,}-{up_to:,} at {plain(price, 2)}"
        for start, up_to, price in form.spans()
    )
    return f"{form.kind}: {ranges}"


def tier_terms(tier: Tier) -> dict[str, Any]:
    """The tier's prices (decimal strings; null for a counter priced under ``prices``), risk
    multiplier, quota mode and quotas as plain JSON, then ``prices`` and
    ``minimum_commitment_usd`` when the tier sets them, in the order ``tiers -f json`` and an
    invoice's ``computed_from.tier`` show them."""
    terms: dict[str, Any] = {"base_price_usd": plain(tier.base_price_usd, 2)}
    for field in PRICE_FIELDS.values():
        unit = getattr(tier, field)
        terms[field] = None if unit is None else plain(unit, 2)
    terms.update(
        risk_multiplier=plain(tier.risk_multiplier, 1),
        quota_mode=tier.quota_mode,
        quotas=tier.quotas.model_dump(exclude_none=True),
    )
    forms = {
        code: price_form_json(form)
        for code in PRICE_FIELDS
        if (form := getattr(tier.prices, code)) is not None
    }
    if forms:
        terms["prices"] = forms
    if tier.minimum_commitment_usd > 0:
        terms["minimum_commitment_usd"] = plain(tier.minimum_commitment_usd, 2)
    return terms


class TiersFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tiers: dict[TierName, TierSpec] = Field(default_factory=dict)
    alerts: dict[TierName, tuple[Threshold, ...]] = Field(default_factory=dict)


def _builtin(name: str, display: str, values: dict[str, str], quotas: Quotas) -> Tier:
    return Tier(
        name=name,
        display_name=display,
        quotas=quotas,
        **{k: Decimal(v) for k, v in values.items()},  # type: ignore[arg-type]
    )


BUILTIN_TIERS: dict[str, Tier] = {
    "basic": _builtin(
        "basic",
        "Basic",
        {
            "base_price_usd": "50.00",
            "cpu_price_per_ms": "0.0000001",
            "network_price_per_mb": "0.05",
            "api_call_price": "0.001",
            "tool_execution_price": "0.01",
            "data_retrieval_price": "0.005",
            "egress_scan_price": "0.002",
            "policy_check_price": "0.001",
            "violation_price": "1.00",
            "risk_multiplier": "1.0",
        },
        Quotas(
            cpu_ms=3_600_000,
            network_mb=1_000,
            api_calls=10_000,
            tool_executions=1_000,
            data_retrievals=500,
        ),
    ),
    "professional": _builtin(
        "professional",
        "Professional",
        {
            "base_price_usd": "200.00",
            "cpu_price_per_ms": "0.00000008",
            "network_price_per_mb": "0.04",
            "api_call_price": "0.0008",
            "tool_execution_price": "0.008",
            "data_retrieval_price": "0.004",
            "egress_scan_price": "0.0015",
            "policy_check_price": "0.0008",
            "violation_price": "0.80",
            "risk_multiplier": "0.9",
        },
        Quotas(
            cpu_ms=7_200_000,
            network_mb=5_000,
            api_calls=50_000,
            tool_executions=5_000,
            data_retrievals=2_500,
        ),
    ),
    "enterprise": _builtin(
        "enterprise",
        "Enterprise",
        {
            "base_price_usd": "500.00",
            "cpu_price_per_ms": "0.00000006",
            "network_price_per_mb": "0.03",
            "api_call_price": "0.0005",
            "tool_execution_price": "0.005",
            "data_retrieval_price": "0.003",
            "egress_scan_price": "0.001",
            "policy_check_price": "0.0005",
            "violation_price": "0.50",
            "risk_multiplier": "0.8",
        },
        Quotas(
            cpu_ms=18_000_000,
            network_mb=20_000,
            api_calls=200_000,
            tool_executions=20_000,
            data_retrievals=10_000,
        ),
    ),
}


def _where(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def parse_tiers_file(path: Path) -> dict[str, Tier]:
    """The custom tiers of ``path`` (and the built-in ones it gives alerts); any problem is
    one TierFileError naming the file and key."""
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh, parse_float=Decimal)
    except OSError as exc:
        raise TierFileError(f"cannot read tiers file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise TierFileError(f"invalid tiers file {path}: not UTF-8 text") from exc
    except ValueError as exc:  # TOMLDecodeError, or an integer of thousands of digits
        raise TierFileError(f"invalid tiers file {path}: {str(exc).splitlines()[0]}") from exc
    except RecursionError as exc:
        raise TierFileError(f"invalid tiers file {path}: nested too deeply") from exc
    try:
        parsed = TiersFile.model_validate(raw)
    except ValidationError as exc:
        # an unknown key first: a misspelt key also shows up as the right one missing
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        first = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        key = first.get("ctx", {}).get("key")  # a tier-wide check names its key
        loc = (*first["loc"], key) if key else first["loc"]
        raise TierFileError(
            f"invalid tiers file {path}: {_where(loc)}: {first['msg']}{more}"
        ) from exc
    tiers: dict[str, Tier] = {}
    for name, spec in parsed.tiers.items():
        if name in BUILTIN_TIERS:
            raise TierFileError(
                f"invalid tiers file {path}: tiers.{name}: built-in tier, cannot be redefined"
            )
        fields = spec.model_dump(exclude={"display_name"}, by_alias=True)
        tiers[name] = Tier.model_validate(
            {**fields, "name": name, "display_name": spec.display_name or name}
        )
    for name, thresholds in parsed.alerts.items():
        tier = tiers.get(name) or BUILTIN_TIERS.get(name)
        if tier is None:
            raise TierFileError(f"invalid tiers file {path}: alerts.{name}: no such tier")
        for n, threshold in enumerate(thresholds):
            problem = quota_problem(threshold, tier.quotas.model_dump())
            if problem is not None:
                raise TierFileError(f"invalid tiers file {path}: alerts.{name}[{n}]: {problem}")
        tiers[name] = tier.model_copy(update={"alerts": thresholds})
    return tiers


def load_tiers(path: Path | None) -> dict[str, Tier]:
    """Built-in tiers, then the custom ones of ``path`` (if any), by name."""
    tiers = dict(BUILTIN_TIERS)
    if path is not None:
        tiers.update(parse_tiers_file(path))
    return tiers


@lru_cache(maxsize=256)
def price_facts(tier: Tier) -> dict[str, Any]:
    """Everything that rates a period with ``tier``, as plain JSON (decimal strings, exact):
    what an invoice records as the prices it was rated with. ``tier_from_facts`` reads it
    back. Cached per tier: do not mutate the result."""
    return {"name": tier.name, "display_name": tier.display_name, **tier_terms(tier)}


@lru_cache(maxsize=1024)
def tier_from_facts(text: str) -> Tier:
    """The tier ``price_facts`` recorded (JSON text), whatever the tiers file says now.
    Facts recorded before ``display_name`` was kept show the tier's name instead."""
    facts = json.loads(text)
    facts.setdefault("display_name", facts["name"])
    return Tier.model_validate(facts)


def get_tier(tiers: dict[str, Tier], name: str) -> Tier:
    try:
        return tiers[name]
    except KeyError as exc:
        raise UserError(f"unknown tier {name!r}; known tiers: {', '.join(tiers)}") from exc
