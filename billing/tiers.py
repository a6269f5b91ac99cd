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

TOML floats are read as ``Decimal`` (``parse_float=Decimal``), so ``0.0000001`` stays exact.
Built-in tiers cannot be redefined: invoices already rated with them must stay explainable.
"""

from __future__ import annotations

import json
import tomllib
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

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


class TierSpec(BaseModel):
    """One tier as written in the TOML file (the field names of the original tool)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    display_name: str | None = None
    base_price_usd: Price
    cpu_price_per_ms: Price
    network_price_per_mb: Price
    api_call_price: Price
    tool_execution_price: Price
    data_retrieval_price: Price
    egress_scan_price: Price
    policy_check_price: Price
    violation_price: Price
    risk_multiplier: Price = Decimal(1)
    quota_mode: Literal["reported", "included"] = "reported"
    quotas: Quotas = Field(default_factory=Quotas)


class Tier(TierSpec):
    """A tier with its name; ``price_of(code)`` gives the unit price of a usage line."""

    name: TierName
    display_name: str

    def price_of(self, code: str) -> Decimal:
        return Decimal(getattr(self, PRICE_FIELDS[code]))

    def quota_of(self, quota: str) -> int | None:
        value = getattr(self.quotas, quota)
        return None if value is None else int(value)


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


def tier_terms(tier: Tier) -> dict[str, Any]:
    """The tier's prices (decimal strings), risk multiplier, quota mode and quotas as plain
    JSON, in the order ``tiers -f json`` and an invoice's ``computed_from.tier`` show them."""
    return {
        "base_price_usd": plain(tier.base_price_usd, 2),
        **{field: plain(tier.price_of(code), 2) for code, field in PRICE_FIELDS.items()},
        "risk_multiplier": plain(tier.risk_multiplier, 1),
        "quota_mode": tier.quota_mode,
        "quotas": tier.quotas.model_dump(exclude_none=True),
    }


class TiersFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tiers: dict[TierName, TierSpec]


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
    """The custom tiers of ``path``; any problem is one TierFileError naming the file and key."""
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
        raise TierFileError(
            f"invalid tiers file {path}: {_where(first['loc'])}: {first['msg']}{more}"
        ) from exc
    tiers: dict[str, Tier] = {}
    for name, spec in parsed.tiers.items():
        if name in BUILTIN_TIERS:
            raise TierFileError(
                f"invalid tiers file {path}: tiers.{name}: built-in tier, cannot be redefined"
            )
        fields = spec.model_dump(exclude={"display_name"})
        tiers[name] = Tier(name=name, display_name=spec.display_name or name, **fields)
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
