"""The alert watcher (``pf-metering alerts watch``): every few seconds it reads the committed
usage (what every reader sees: the published snapshot, or the lake in cluster mode), records
each threshold an open period has crossed in the outbox (once per tenant, period and
threshold), and delivers what is due.

Open periods are those not closed yet (end + ``METERING_GRACE``), from the tenant's first
period on: the month in progress, and the one before during its grace. A tenant on a tier
missing from the tiers file is skipped (``bill`` reports it). Detection lag: the workers'
``METERING_SNAPSHOT_SECONDS`` plus the watcher's interval (5 + 5 s by default).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from aggregator.views import UsageReader
from billing.alerts import store
from billing.alerts.delivery import Endpoint
from billing.alerts.evaluate import crossings
from billing.alerts.model import Crossing
from billing.db import Connect, transaction
from billing.invoicing import OpenDrafts, Rules, UsageData
from billing.tenants import Tenant, load_tenants
from common.errors import StorageError, UserError
from schemas.periods import Period

log = logging.getLogger("billing.alerts")

LEASE_MARGIN = timedelta(seconds=30)


@dataclass
class AlertMetrics:
    """The watcher's Prometheus metrics, served on ``alerts watch --metrics-port``."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.emitted = Counter(
            "pf_alerts_emitted", "Threshold crossings recorded in the outbox", registry=r
        )
        self.deliveries = Counter(
            "pf_alert_deliveries", "Alerts delivered (answered with a 2xx)", registry=r
        )
        self.failures = Counter(
            "pf_alert_delivery_failures",
            "Failed delivery attempts (non-2xx, timeout, connection error), each retried",
            registry=r,
        )
        self.pending = Gauge("pf_alerts_pending", "Alerts recorded but not delivered", registry=r)
        self.evaluations = Counter(
            "pf_alert_evaluations", "Passes over the committed usage", registry=r
        )
        self.last_evaluation = Gauge(
            "pf_alerts_last_evaluation_timestamp_seconds",
            "Unix time of the last pass over the committed usage",
            registry=r,
        )

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)


def _draft_total(drafts: OpenDrafts, tenant: Tenant, period: Period) -> Decimal | None:
    """The total of the period's draft invoice, or None (logged) if it cannot be made."""
    try:
        return drafts.draft(tenant, period).total
    except UserError as exc:
        log.warning("amount alerts of %s, %s skipped: %s", tenant.tenant_id, period, exc)
        return None


def open_periods(tenant: Tenant, now: datetime, grace: timedelta) -> Iterator[Period]:
    """The tenant's periods that have started and are not closed at ``now``."""
    period = Period.of(now)
    while period >= tenant.first_period and not period.is_closed(now, grace):
        yield period
        period = period.previous()


@dataclass
class Watcher:
    """Detection and delivery; ``endpoint`` None records alerts without posting them."""

    connect: Connect
    read_usage: Callable[[], UsageReader]
    rules: Rules
    endpoint: Endpoint | None
    metrics: AlertMetrics = field(default_factory=AlertMetrics)
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    _evaluated: dict[tuple[str, str], object] = field(default_factory=dict, init=False)

    def detect(self) -> list[str]:
        """One pass over the committed usage; returns the event ids recorded by it. A tenant's
        period whose usage, tier and thresholds are what this watcher evaluated last time is
        not rated again (after a restart, every one is)."""
        now = self.clock()
        with self.read_usage() as reader:
            usage = UsageData.read(reader)
        with self.connect() as con, transaction(con):
            tenants = load_tenants(con, usage.first_periods())
            own = store.tenant_thresholds(con)
            drafts = OpenDrafts.read(con, usage, self.rules, tenants, now)
            found: list[Crossing] = []
            periods: set[str] = set()
            seen: dict[tuple[str, str], object] = {}
            for tenant in tenants.values():
                for period in open_periods(tenant, now, self.rules.grace):
                    tier = self.rules.tiers.get(tenant.tier_for(period))
                    mine = own.get(tenant.tenant_id, [])
                    if tier is None or not (tier.alerts or mine):
                        continue
                    use = usage.usage(tenant.tenant_id, period)
                    key = (tenant.tenant_id, str(period))
                    inputs = drafts.inputs(tenant.tenant_id)
                    seen[key] = state = (tier.name, tuple(mine), use, inputs)
                    if self._evaluated.get(key) == state:
                        continue
                    periods.add(str(period))
                    amount = partial(_draft_total, drafts, tenant, period)
                    found += crossings(tenant.tenant_id, str(period), tier, use, mine, amount)
            done = store.recorded(con, periods)
            found = [c for c in found if c.event_id not in done]
            new = store.record_crossings(con, found, now)
            pending = store.pending_count(con)
        self._evaluated = seen
        by_id = {c.event_id: c for c in found}
        for event_id in new:
            c = by_id[event_id]
            log.info(
                "alert %s: tenant %s, %s, %s crossed (tier %s)",
                event_id,
                c.tenant_id,
                c.period,
                c.threshold.key,
                c.tier,
            )
        self.metrics.emitted.inc(len(new))
        self.metrics.evaluations.inc()
        self.metrics.last_evaluation.set(now.timestamp())
        self.metrics.pending.set(pending)
        return new

    def deliver(self, most: int = 100) -> int:
        """Post the alerts due now, one claim at a time (a lease covers one post, so it never
        runs out while earlier ones are posted), each at most once, at most ``most``;
        returns how many were delivered."""
        if self.endpoint is None:
            return 0
        lease = timedelta(seconds=self.endpoint.timeout) + LEASE_MARGIN
        started = self.clock()  # one that fails now is due again later: not in this pass
        delivered = 0
        for _ in range(most):
            with self.connect() as con, transaction(con):
                due = store.claim_due(con, self.clock(), lease, limit=1, due_by=started)
            if not due:
                break
            delivered += self._post(due[0])
        return delivered

    def _post(self, claimed: store.Claimed) -> int:
        """One attempt at ``claimed``, its outcome recorded; 1 if it was delivered."""
        assert self.endpoint is not None
        outcome = self.endpoint.post(claimed.event_id, claimed.payload, self.clock())
        moment = self.clock()
        with self.connect() as con, transaction(con):
            if outcome.delivered:
                store.mark_delivered(con, claimed.event_id, moment)
            else:
                retry_at = self.endpoint.retry_at(claimed.attempt, moment)
                store.mark_failed(con, claimed.event_id, outcome.error or "", retry_at)
            self.metrics.pending.set(store.pending_count(con))
        if outcome.delivered:
            self.metrics.deliveries.inc()
            log.info("alert %s delivered (attempt %d)", claimed.event_id, claimed.attempt)
            return 1
        self.metrics.failures.inc()
        log.warning(
            "alert %s: attempt %d failed: %s; retrying",
            claimed.event_id,
            claimed.attempt,
            outcome.error,
        )
        return 0

    def seconds_to_next_due(self, interval: float) -> float:
        """How long to wait before the next pass: ``interval``, or less if a retry is due."""
        if self.endpoint is None:
            return interval
        with self.connect() as con:
            due = store.next_due(con)
        if due is None:
            return interval
        return min(interval, max(0.05, (due - self.clock()).total_seconds()))

    def run(self, stop: threading.Event, interval: float) -> None:
        """Detect and deliver every ``interval`` seconds until ``stop`` is set. Storage that
        cannot be read right now (a snapshot being replaced, the billing file held too long)
        is logged and tried again on the next pass."""
        while not stop.is_set():
            wait = interval
            try:
                self.detect()
                self.deliver()
                wait = self.seconds_to_next_due(interval)
            except StorageError as exc:
                log.warning("alert pass skipped: %s", exc)
            stop.wait(wait)
