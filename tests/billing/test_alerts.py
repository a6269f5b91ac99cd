"""Usage alerts below the CLI: thresholds and their crossings (pure), the tiers file's
``alerts``, and the watcher against a real billing file, a real snapshot and a real HTTP
receiver (signatures checked with the secret, a 500 retried, no duplicate after a restart)."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from aggregator.views import usage_reader
from bench.ledger_load import publish_usage
from billing import invoicing
from billing.alerts import store
from billing.alerts.delivery import Endpoint
from billing.alerts.evaluate import applicable, crossings
from billing.alerts.model import AlertRecord, Threshold, event_id
from billing.alerts.watch import Watcher
from billing.backoff import RetryPolicy
from billing.db import billing_db, transaction
from billing.invoicing import Rules, UsageData
from billing.model import QUOTA_KEYS, add_up, money
from billing.rating import METERS, Usage
from billing.tiers import Quotas, load_tiers
from common.errors import TierFileError
from common.settings import Settings, load_settings
from schemas.codec import COUNTERS
from schemas.periods import Period
from tests.fixtures.seeds import STARTUP_PRICES
from tests.support.alert_receiver import Receiver, alert_receiver
from tests.support.events import make_event
from tests.support.waiting import wait_for

SECRET = "whsec_alerts_0123456789abcdef"
TIERS = load_tiers(None)
BASIC = TIERS["basic"]


def now_event(tenant: str, **counters: int) -> dict[str, Any]:
    """An event of the month in progress with exactly ``counters`` (others 0)."""
    values = {c: counters.get(c, 0) for c in COUNTERS}
    return make_event(tenant, occurred_at=int(time.time() * 1_000_000) - 1_000_000, **values)


# --- thresholds and crossings (pure) -------------------------------------------------------


def no_amount() -> Decimal | None:
    raise AssertionError("no amount threshold applies: the amount is never asked for")


def test_a_quota_percentage_is_crossed_on_reaching_it() -> None:
    eighty = Threshold(quota_percent=Decimal(80), counter="cpu_ms")
    below = Usage(cpu_ms=2_879_999)  # 80% of 3,600,000 is 2,880,000
    assert crossings("t", "2026-12", BASIC, below, [eighty], no_amount) == []
    [hit] = crossings("t", "2026-12", BASIC, Usage(cpu_ms=2_880_000), [eighty], no_amount)
    assert hit.observed == 2_880_000 and hit.limit == 3_600_000 and hit.source == "tenant"
    assert hit.event_id == event_id("t", "2026-12", "quota_percent:cpu_ms:80")


def test_an_amount_is_reached_by_the_amount_given_asked_once() -> None:
    sixty, seventy = Threshold(amount_usd=Decimal("60.00")), Threshold(amount_usd=Decimal(70))
    asked: list[int] = []

    def amount(value: str | None) -> Callable[[], Decimal | None]:
        def ask() -> Decimal | None:
            asked.append(1)
            return None if value is None else Decimal(value)

        return ask

    assert crossings("t", "2026-12", BASIC, Usage(), [sixty, seventy], amount("59.99")) == []
    [hit] = crossings("t", "2026-12", BASIC, Usage(), [sixty, seventy], amount("60.00"))
    assert hit.observed == Decimal("60.00") and hit.limit is None
    assert crossings("t", "2026-12", BASIC, Usage(), [sixty], amount(None)) == []  # unknown
    assert len(asked) == 3


def test_a_percentage_without_counter_stands_for_every_quota_and_keys_are_one_each() -> None:
    every = Threshold(quota_percent=Decimal(50))
    keys = [t.key for t, _ in applicable(BASIC, [every, every])]
    quotas = BASIC.quotas.model_dump(exclude_none=True)
    assert keys == [f"quota_percent:{q}:50" for q in quotas]
    tier = BASIC.model_copy(update={"alerts": (Threshold(quota_percent=Decimal(50)),)})
    sources = {
        s for _, s in applicable(tier, [Threshold(quota_percent=Decimal(50), counter="cpu_ms")])
    }
    assert sources == {"tier"}  # the same threshold from the tenant is the same alert
    # no egress_scans quota on basic: such a threshold can never apply
    assert applicable(BASIC, [Threshold(quota_percent=Decimal(50), counter="egress_scans")]) == []


def test_an_alert_counter_is_one_quota_key_of_the_tiers_and_the_meters() -> None:
    assert QUOTA_KEYS == tuple(Quotas.model_fields) == tuple(m.quota for m in METERS)
    assert Threshold(quota_percent=Decimal(5), counter="network_mb").counter == "network_mb"
    with pytest.raises(ValidationError, match="unknown counter 'network_bytes': one of cpu_ms"):
        Threshold(quota_percent=Decimal(5), counter="network_bytes")


def test_event_ids_are_stable_and_distinct() -> None:
    ids = {event_id(t, p, k) for t in ("a", "b") for p in ("2026-11", "2026-12") for k in "xy"}
    assert len(ids) == 8 and event_id("a", "2026-11", "x") in ids
    assert Threshold.from_key("amount_usd:100.00") == Threshold(amount_usd=Decimal(100))
    assert Threshold.from_key("quota_percent:*:80").counter is None


@pytest.mark.parametrize(
    "given",
    [
        {"quota_percent": 0},
        {"quota_percent": -5},
        {"amount_usd": 0},
        {"amount_usd": "-1"},
        {"amount_usd": "1.001"},
        {"quota_percent": 80, "amount_usd": 10},
        {},
        {"amount_usd": 10, "counter": "cpu_ms"},
        {"quota_percent": 80, "counter": "cpu"},
    ],
)
def test_a_threshold_is_one_positive_kind(given: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Threshold.model_validate(given)


# --- the tiers file -------------------------------------------------------------------------

ALERTS = f"""
[tiers.startup]
base_price_usd = 20
{STARTUP_PRICES}[tiers.startup.quotas]
cpu_ms = 1_000_000

[[alerts.startup]]
quota_percent = 80
[[alerts.basic]]
amount_usd = 100.00
"""


def test_the_tiers_file_gives_thresholds_to_custom_and_built_in_tiers(tmp_path: Path) -> None:
    path = tmp_path / "tiers.toml"
    path.write_text(ALERTS)
    tiers = load_tiers(path)
    assert [t.key for t in tiers["startup"].alerts] == ["quota_percent:*:80"]
    assert [t.key for t in tiers["basic"].alerts] == ["amount_usd:100.00"]
    assert tiers["professional"].alerts == ()
    assert tiers["basic"].pricing("cpu") == BASIC.pricing("cpu")


@pytest.mark.parametrize(
    ("extra", "where"),
    [
        ('[[alerts.basic]]\nquota_percent = 80\ncounter = "egress_scans"\n', "alerts.basic[0]"),
        ("[[alerts.nope]]\namount_usd = 5\n", "alerts.nope: no such tier"),
        ("[[alerts.basic]]\nquota_percent = 0\n", "alerts.basic.0.quota_percent"),
        ("[[alerts.basic]]\namount_usd = -3\n", "alerts.basic.0.amount_usd"),
        ("[[alerts.basic]]\nunits = 3\n", "alerts.basic.0.units"),
    ],
)
def test_bad_thresholds_in_the_tiers_file_name_the_key(
    tmp_path: Path, extra: str, where: str
) -> None:
    path = tmp_path / "tiers.toml"
    path.write_text(extra)
    with pytest.raises(TierFileError, match=f"{path}: {where}".replace("[", r"\[")):
        load_tiers(path)


# --- the watcher: real billing file, snapshot and HTTP receiver ---------------------------


def _settings(tmp_path: Path) -> Settings:
    return load_settings(metering_data_dir=tmp_path / "data", metering_late_usage_months=0)


def _watcher(cfg: Settings, receiver: Receiver | None, url: str | None = None) -> Watcher:
    fast = RetryPolicy(max_attempts=0, base_delay=0.05, max_delay=0.2)
    target = url or (receiver.url if receiver else "http://127.0.0.1:9/")
    endpoint = Endpoint(target, SecretStr(SECRET), 5.0, retry=fast)
    connect = partial(billing_db, cfg.billing_db, 10.0)
    return Watcher(connect, partial(usage_reader, cfg), Rules.from_settings(cfg), endpoint)


def _set(cfg: Settings, tenant: str, *thresholds: Threshold) -> None:
    with billing_db(cfg.billing_db, 10.0) as con, transaction(con):
        for threshold in thresholds:
            store.set_threshold(con, tenant, threshold, datetime.now(UTC))


def _log(cfg: Settings) -> list[AlertRecord]:
    with billing_db(cfg.billing_db, 10.0) as con:
        return store.list_alerts(con)


def _until_delivered(watcher: Watcher, cfg: Settings, count: int) -> None:
    def done() -> bool:
        watcher.deliver()
        return bool(sum(r.status == "delivered" for r in _log(cfg)) >= count)

    wait_for(done, f"{count} alerts delivered", timeout=60, every=0.05)


def test_two_thresholds_in_one_batch_give_two_signed_alerts_once_each(tmp_path: Path) -> None:
    cfg = _settings(tmp_path)
    publish_usage(cfg, [now_event("acme", api_calls=1), now_event("quiet", api_calls=1)])
    both = (
        Threshold(quota_percent=Decimal(80), counter="cpu_ms"),
        Threshold(amount_usd=Decimal(60)),
    )
    _set(cfg, "acme", *both)
    _set(cfg, "quiet", *both)
    with alert_receiver(500) as receiver:
        watcher = _watcher(cfg, receiver)
        assert watcher.detect() == []  # below both thresholds: nothing recorded, nothing sent
        # one batch crossing both for acme (cpu 80% and 10 violations: 60.00 + cpu), and
        # still below both for quiet
        publish_usage(cfg, [now_event("acme", cpu_ms=2_880_000, violations=10), now_event("quiet")])
        new = watcher.detect()
        assert len(new) == 2
        _until_delivered(watcher, cfg, 2)
        assert len(receiver.received) == 3  # the first answered 500, retried
        assert sorted(receiver.ids()) == sorted(new)  # each delivered once
        assert all(r.signed_with(SECRET) for r in receiver.received)
        assert not any(r.signed_with(SECRET + "x") for r in receiver.received)
        assert receiver.received[0].path == "/hooks/pf?k=1"
        events = {r.event["data"]["threshold"]["key"]: r.event for r in receiver.delivered()}
        period = str(Period.of(datetime.now(UTC) - timedelta(seconds=1)))
        quota = events["quota_percent:cpu_ms:80"]["data"]
        assert quota["tenant_id"] == "acme" and quota["period"] == period
        assert quota["quota"] == {"used": "2880000", "limit": "3600000"}
        amount = events["amount_usd:60.00"]["data"]
        assert amount["amount_usd"] == "60.29"  # 50 base + 10 violations + 2.88M ms x 1e-7
        for r in receiver.delivered():
            assert r.headers["pf-metering-event-id"] == r.event["id"]
        log = {r.event_id: r for r in _log(cfg)}
        assert sorted(a.attempts for a in log.values()) == [1, 2]
        retried = next(a for a in log.values() if a.attempts == 2)
        assert retried.status == "delivered" and retried.last_error is None

        # a restart: a new watcher over the same files sends nothing again, even with more
        # usage above the thresholds
        publish_usage(cfg, [now_event("acme", cpu_ms=1_000_000, violations=3)])
        again = _watcher(cfg, receiver)
        assert again.detect() == [] and again.deliver() == 0
        assert len(receiver.received) == 3
        assert {r.tenant_id for r in _log(cfg)} == {"acme"}  # quiet stayed below


def test_an_amount_counts_every_line_the_draft_invoice_has(tmp_path: Path) -> None:
    """Late usage of the closed period goes on the open period's invoice, and so into the
    amount an alert compares: the watcher's amount is the total of the draft, line for line."""
    cfg = _settings(tmp_path)
    rules = Rules.from_settings(cfg)
    now = datetime.now(UTC)
    closed, current = rules.last_closed(now), Period.of(now)
    old = int((closed.start + timedelta(days=3)).timestamp() * 1_000_000)
    publish_usage(cfg, [make_event("acme", occurred_at=old, api_calls=1), now_event("acme")])
    with usage_reader(cfg) as reader:
        usage = UsageData.read(reader)
    with billing_db(cfg.billing_db, 10.0) as con:
        billed = invoicing.bill(con, usage, rules, as_of=now)
    assert [i.period for i in billed.invoices] == [str(closed)]
    _set(cfg, "acme", Threshold(amount_usd=Decimal(70)))
    watcher = _watcher(cfg, None)
    assert watcher.detect() == []  # 50.00 of its own
    publish_usage(cfg, [make_event("acme", occurred_at=old, violations=25)])  # late: 25.00
    assert watcher.detect()
    with usage_reader(cfg) as reader:
        usage = UsageData.read(reader, "acme")
    with billing_db(cfg.billing_db, 10.0) as con:
        draft = invoicing.generate(con, usage, rules, "acme", current)
    assert [ln.code for ln in draft.lines if ln.period == str(closed)] == ["late_usage"]
    [record] = [r for r in _log(cfg) if r.period == str(current)]
    own = add_up(ln.amount for ln in draft.lines if ln.period is None)
    assert own < 70 <= draft.total  # crossed by the late line
    assert record.observed == money(draft.total)


def test_an_alert_recorded_while_the_receiver_is_down_is_delivered_after_a_restart(
    tmp_path: Path,
) -> None:
    cfg = _settings(tmp_path)
    publish_usage(cfg, [now_event("acme", violations=60)])
    _set(cfg, "acme", Threshold(amount_usd=Decimal(100)))
    down = _watcher(cfg, None)  # nobody listens on port 9
    [alert] = down.detect()
    assert down.deliver() == 0
    [failed] = _log(cfg)
    assert failed.status == "pending" and failed.attempts == 1
    assert failed.last_error is not None and "127.0.0.1:9" in failed.last_error
    assert SECRET not in failed.last_error
    with alert_receiver() as receiver:
        restarted = _watcher(cfg, receiver)
        assert restarted.detect() == []  # recorded once, before the restart
        _until_delivered(restarted, cfg, 1)
        assert receiver.ids() == [alert]
        assert restarted.metrics.deliveries._value.get() == 1


def test_a_lease_keeps_a_second_watcher_from_posting_the_same_alert(tmp_path: Path) -> None:
    cfg = _settings(tmp_path)
    publish_usage(cfg, [now_event("acme", violations=60)])
    _set(cfg, "acme", Threshold(amount_usd=Decimal(100)))
    _watcher(cfg, None).detect()
    connect: Callable[[], Any] = partial(billing_db, cfg.billing_db, 10.0)
    now = datetime.now(UTC)
    with connect() as con, transaction(con):
        [claimed] = store.claim_due(con, now, timedelta(seconds=60))
        assert store.claim_due(con, now, timedelta(seconds=60)) == []  # leased
        # a watcher that died holding it: the lease runs out and the alert is due again
        [again] = store.claim_due(con, now + timedelta(seconds=61), timedelta(seconds=60))
    assert again.event_id == claimed.event_id and again.attempt == 2
