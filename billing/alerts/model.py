"""Usage alerts, the pure part: what a threshold is, its stable key, the event id of a crossing
and the rows of the delivery log (no I/O).

A threshold is either a percentage of one quota (``quota_percent`` with ``counter``, a quota
key of the tier: ``cpu_ms``, ``network_mb``, ...; without ``counter`` it stands for every quota
the tier defines) or an amount of money for the open period (``amount_usd``: the total of the
period's draft invoice, every line it would have: its own rating, the late usage and
corrections it carries, the credit it applies). Crossing means reaching it: used x 100 >=
percent x quota, or amount >= amount_usd. One tenant, period and threshold key make one alert,
whose event id is a hash of the three, so it is the same however often it is detected.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from billing.model import MAX_MONEY, QUOTA_KEYS, money, plain

MAX_PERCENT = Decimal(10_000)
Percent = Annotated[
    Decimal, Field(gt=0, le=MAX_PERCENT, allow_inf_nan=False, max_digits=7, decimal_places=2)
]
Amount = Annotated[
    Decimal, Field(gt=0, le=MAX_MONEY, allow_inf_nan=False, max_digits=38, decimal_places=2)
]
Source = Literal["tier", "tenant"]
EVENT_TYPE = "usage.threshold_crossed"


class Threshold(BaseModel):
    """One alert threshold, as the tiers file and ``tenants set-alert`` give it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    quota_percent: Percent | None = None
    counter: str | None = None  # one of QUOTA_KEYS
    amount_usd: Amount | None = None

    @field_validator("counter")
    @classmethod
    def _known_counter(cls, counter: str | None) -> str | None:
        if counter is not None and counter not in QUOTA_KEYS:
            raise ValueError(f"unknown counter {counter[:40]!r}: one of {', '.join(QUOTA_KEYS)}")
        return counter

    @model_validator(mode="after")
    def _one_kind(self) -> Threshold:
        if (self.quota_percent is None) == (self.amount_usd is None):
            raise ValueError("give exactly one of quota_percent and amount_usd")
        if self.counter is not None and self.quota_percent is None:
            raise ValueError("counter goes with quota_percent only")
        return self

    @property
    def kind(self) -> Literal["quota_percent", "amount_usd"]:
        return "quota_percent" if self.quota_percent is not None else "amount_usd"

    @property
    def key(self) -> str:
        """Stable text naming the threshold: ``quota_percent:cpu_ms:80``, ``amount_usd:100.00``
        (``quota_percent:*:80`` before it is expanded over a tier's quotas)."""
        if self.quota_percent is not None:
            return f"quota_percent:{self.counter or '*'}:{plain(self.quota_percent)}"
        assert self.amount_usd is not None
        return f"amount_usd:{money(self.amount_usd)}"

    def describe(self) -> str:
        if self.quota_percent is not None:
            what = f"the {self.counter} quota" if self.counter else "each quota"
            return f"{plain(self.quota_percent)}% of {what}"
        assert self.amount_usd is not None
        return f"{money(self.amount_usd)} usd for the period"

    def as_json(self) -> dict[str, str]:
        if self.quota_percent is not None:
            out = {"kind": "quota_percent", "quota_percent": plain(self.quota_percent)}
            return {**out, "counter": self.counter} if self.counter else out
        assert self.amount_usd is not None
        return {"kind": "amount_usd", "amount_usd": money(self.amount_usd)}

    @classmethod
    def from_key(cls, key: str) -> Threshold:
        """The threshold ``key`` names (the inverse of ``key``)."""
        kind, _, rest = key.partition(":")
        if kind == "amount_usd":
            return cls(amount_usd=Decimal(rest))
        counter, _, pct = rest.partition(":")
        return cls(quota_percent=Decimal(pct), counter=None if counter == "*" else counter)


def quota_problem(threshold: Threshold, quotas: Mapping[str, int | None]) -> str | None:
    """Why ``threshold`` cannot apply to a tier with ``quotas`` (quota key -> limit), or None:
    a percentage of a quota the tier does not set (or sets to 0) is a percentage of nothing."""
    if threshold.quota_percent is None:
        return None
    present = sorted(k for k, v in quotas.items() if v)
    if threshold.counter is None:
        return None if present else "the tier sets no quota to take a percentage of"
    if not quotas.get(threshold.counter):
        known = ", ".join(present) or "none"
        return f"the tier sets no {threshold.counter} quota (its quotas: {known})"
    return None


def event_id(tenant_id: str, period: str, key: str) -> str:
    """The alert's id, the same whoever detects it and however often: ``alert_<32 hex>``."""
    digest = hashlib.sha256("\x1f".join((tenant_id, period, key)).encode()).hexdigest()
    return f"alert_{digest[:32]}"


@dataclass(frozen=True)
class Crossing:
    """A threshold a tenant's open period has reached: ``observed`` is the quota used (in the
    quota's unit) or the period's amount; ``limit`` the quota (None for an amount)."""

    tenant_id: str
    period: str
    tier: str
    threshold: Threshold
    source: Source
    observed: Decimal
    limit: Decimal | None

    @property
    def event_id(self) -> str:
        return event_id(self.tenant_id, self.period, self.threshold.key)

    @property
    def observed_text(self) -> str:
        """The quota used (exact) or the amount (two places)."""
        return plain(self.observed) if self.limit is not None else money(self.observed)

    def payload(self, crossed_at: datetime) -> dict[str, object]:
        """The webhook body (JSON): what was crossed, by how much, when."""
        data: dict[str, object] = {
            "tenant_id": self.tenant_id,
            "period": self.period,
            "tier": self.tier,
            "threshold": {**self.threshold.as_json(), "key": self.threshold.key},
            "source": self.source,
            "crossed_at": crossed_at.isoformat(),
        }
        if self.limit is not None:
            data["quota"] = {"used": self.observed_text, "limit": plain(self.limit)}
        else:
            data["amount_usd"] = self.observed_text
        return {
            "id": self.event_id,
            "type": EVENT_TYPE,
            "created": int(crossed_at.timestamp()),
            "data": data,
        }


Status = Literal["pending", "delivered"]


@dataclass(frozen=True)
class AlertRecord:
    """One row of the delivery log (``alerts list``)."""

    event_id: str
    tenant_id: str
    period: str
    threshold: str  # the key
    source: Source
    observed: str  # quota used or amount, as text
    crossed_at: datetime
    attempts: int
    status: Status
    last_error: str | None
    last_attempt_at: datetime | None
    delivered_at: datetime | None

    def describe(self) -> str:
        return Threshold.from_key(self.threshold).describe()

    def as_json(self) -> dict[str, object]:
        return {
            "event_id": self.event_id,
            "tenant_id": self.tenant_id,
            "period": self.period,
            "threshold": self.threshold,
            "threshold_text": self.describe(),
            "source": self.source,
            "observed": self.observed,
            "crossed_at": self.crossed_at,
            "attempts": self.attempts,
            "status": self.status,
            "last_error": self.last_error,
            "last_attempt_at": self.last_attempt_at,
            "delivered_at": self.delivered_at,
        }
