"""Which thresholds a tenant's open period has crossed (pure: usage, tier, thresholds and the
period's amount in, crossings out). The amount is the caller's: the watcher passes the total
of the period's draft invoice (``billing.invoicing.OpenDrafts``), so an alert counts exactly
the lines the invoice would."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from decimal import Decimal

from billing.alerts.model import Crossing, Source, Threshold, quota_problem
from billing.model import EXACT
from billing.rating import METERS, Usage
from billing.tiers import Tier

_METER_OF_QUOTA = {m.quota: m for m in METERS}


def tier_quotas(tier: Tier) -> dict[str, int | None]:
    """Quota key -> limit (None: no quota) of ``tier``."""
    return {key: tier.quota_of(key) for key in _METER_OF_QUOTA}


def applicable(
    tier: Tier, tenant_thresholds: Iterable[Threshold]
) -> list[tuple[Threshold, Source]]:
    """The tier's thresholds then the tenant's, each percentage without a counter expanded
    over the tier's quotas, those that cannot apply to ``tier`` left out, one per key (the
    tier's first)."""
    quotas = tier_quotas(tier)
    found: dict[str, tuple[Threshold, Source]] = {}
    given: list[tuple[Threshold, Source]] = [(t, "tier") for t in tier.alerts]
    given += [(t, "tenant") for t in tenant_thresholds]
    for threshold, source in given:
        if quota_problem(threshold, quotas) is not None:
            continue
        if threshold.quota_percent is not None and threshold.counter is None:
            expanded = [
                Threshold(quota_percent=threshold.quota_percent, counter=key)
                for key, limit in quotas.items()
                if limit
            ]
        else:
            expanded = [threshold]
        for concrete in expanded:
            found.setdefault(concrete.key, (concrete, source))
    return list(found.values())


def crossings(
    tenant_id: str,
    period: str,
    tier: Tier,
    usage: Usage,
    tenant_thresholds: Sequence[Threshold],
    amount: Callable[[], Decimal | None],
) -> list[Crossing]:
    """Every applicable threshold the period has reached: quotas by ``usage``, amounts by
    ``amount()`` (asked once, only if an amount threshold applies; None: the period's amount
    cannot be told now, so no amount threshold is crossed)."""
    found: list[Crossing] = []
    total: Decimal | None = None
    asked = False
    for threshold, source in applicable(tier, tenant_thresholds):
        if threshold.amount_usd is not None:
            if not asked:
                total, asked = amount(), True
            if total is not None and total >= threshold.amount_usd:
                found.append(Crossing(tenant_id, period, tier.name, threshold, source, total, None))
            continue
        assert threshold.counter is not None and threshold.quota_percent is not None
        limit = Decimal(tier.quota_of(threshold.counter) or 0)
        used = _METER_OF_QUOTA[threshold.counter].quantity(usage)
        if EXACT.multiply(used, Decimal(100)) >= EXACT.multiply(threshold.quota_percent, limit):
            found.append(Crossing(tenant_id, period, tier.name, threshold, source, used, limit))
    return found
