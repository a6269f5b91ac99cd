"""``tenants set-alert``, ``alerts list`` and ``alerts watch --once`` from the command line:
thresholds set and removed, the delivery log in every format, and bad input (a percentage of
a quota the tier does not have, zero or negative values, an unknown tenant, a bad
``METERING_ALERT_URL``) refused in one line with nothing stored changed."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from schemas.codec import COUNTERS
from tests.fixtures.cli import Cli
from tests.support.alert_receiver import alert_receiver
from tests.support.books import stored
from tests.support.cli_runner import BIN
from tests.support.events import make_event
from tests.support.waiting import wait_for

SECRET = "whsec_cli_alerts_SECRET_42"


def now_event(tenant: str, **counters: int) -> dict[str, Any]:
    values = {c: counters.get(c, 0) for c in COUNTERS}
    return make_event(tenant, occurred_at=int(time.time() * 1_000_000) - 1_000_000, **values)


def start_watch(env: dict[str, str], log: Path) -> subprocess.Popen[str]:
    """``alerts watch`` as a process (every 0.2 s), its output appended to ``log``."""
    with log.open("a") as out:
        return subprocess.Popen(
            [str(BIN), "alerts", "watch", "--interval", "0.2"],
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )


@pytest.fixture
def books(pfm: Cli, data_env: dict[str, str]) -> Path:
    pfm.publish(now_event("acme", cpu_ms=3_000_000, violations=1))
    assert pfm("tenants", "add", "beta", "--tier", "professional").code == 0
    return Path(data_env["METERING_DATA_DIR"])


def test_set_alert_then_watch_once_delivers_and_lists(
    billing_mode: str, pfm: Cli, books: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    done = pfm("tenants", "set-alert", "acme", "--quota-percent", "80", "--counter", "cpu_ms")
    assert done.code == 0 and "80% of the cpu_ms quota set" in done.err
    assert pfm("tenants", "set-alert", "acme", "--amount", "1000").code == 0
    assert pfm("tenants", "set-alert", "beta", "--quota-percent", "90").code == 0
    with alert_receiver() as receiver:
        monkeypatch.setenv("METERING_ALERT_URL", receiver.url)
        monkeypatch.setenv("METERING_ALERT_SECRET", SECRET)
        run = pfm("alerts", "watch", "--once")
        assert run.code == 0 and "1 new alert(s), 1 delivered" in run.err, run.err
        [got] = receiver.delivered()
        assert got.signed_with(SECRET)
        assert pfm("alerts", "watch", "--once").err.count("0 new alert(s), 0 delivered") == 1
    assert len(receiver.received) == 1
    [row] = pfm("alerts", "list", "-f", "json").json()
    assert row["event_id"] == got.event["id"] and row["tenant_id"] == "acme"
    assert row["threshold"] == "quota_percent:cpu_ms:80" and row["status"] == "delivered"
    assert row["attempts"] == 1 and row["last_error"] is None and row["observed"] == "3000000"
    table = pfm("alerts", "list")
    assert "80% of the cpu_ms quota" in table.out and "delivered" in table.out
    assert "acme" in pfm("alerts", "list", "-f", "csv", "--status", "delivered").out
    assert pfm("alerts", "list", "--tenant", "beta", "-f", "json").json() == []
    assert pfm("alerts", "list", "--status", "pending", "-f", "json").json() == []
    gone = pfm("tenants", "set-alert", "acme", "--amount", "1000.00", "--remove")
    assert gone.code == 0 and "removed" in gone.err
    for out in (run, table):
        assert SECRET not in out.out + out.err


def test_amount_alerts_fire_on_the_draft_total(
    pfm: Cli, books: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert pfm("tenants", "set-alert", "acme", "--amount", "51.30").code == 0  # 51.30 exactly
    assert pfm("tenants", "set-alert", "acme", "--amount", "51.31").code == 0  # not yet
    monkeypatch.setenv("METERING_ALERT_URL", "http://127.0.0.1:9/down")
    monkeypatch.setenv("METERING_ALERT_SECRET", SECRET)
    run = pfm("alerts", "watch", "--once")
    assert run.code == 0 and "1 new alert(s), 0 delivered" in run.err
    [row] = pfm("alerts", "list", "-f", "json").json()
    assert row["threshold"] == "amount_usd:51.30" and row["observed"] == "51.30"
    assert row["status"] == "pending" and "127.0.0.1:9" in row["last_error"]
    assert "/down" not in row["last_error"]


BAD = [
    (["acme", "--quota-percent", "80", "--counter", "egress_scans"], "--counter: tenant 'acme'"),
    (["acme", "--quota-percent", "0"], "invalid --quota-percent '0'"),
    (["acme", "--quota-percent", "-5"], "invalid --quota-percent '-5'"),
    (["acme", "--quota-percent", "ten"], "invalid --quota-percent 'ten'"),
    (["acme", "--quota-percent", "12.345"], "at most 2 decimals"),
    (["acme", "--quota-percent", "NaN"], "invalid --quota-percent"),
    (["acme", "--amount", "0"], "invalid --amount '0'"),
    (["acme", "--amount", "-100"], "invalid --amount '-100'"),
    (["acme", "--amount", "1e400"], "invalid --amount"),
    (["acme"], "give one of --quota-percent"),
    (["acme", "--quota-percent", "80", "--amount", "5"], "give one of --quota-percent"),
    (["acme", "--amount", "5", "--counter", "cpu_ms"], "--counter goes with --quota-percent"),
    (["acme", "--quota-percent", "5", "--counter", "cpu"], "unknown --counter 'cpu'"),
    (["nobody", "--amount", "5"], "unknown tenant 'nobody'"),
    (["bad id!", "--amount", "5"], "invalid tenant id"),
    (["acme", "--amount", "5", "--remove"], "has no alert at 5.00 usd"),
]


@pytest.mark.parametrize(("args", "fragment"), BAD)
def test_bad_thresholds_are_refused_and_change_nothing(
    pfm: Cli, books: Path, args: list[str], fragment: str
) -> None:
    assert pfm("tenants", "set-alert", "acme", "--amount", "70").code == 0
    before = stored(books)
    pfm("tenants", "set-alert", *args).error(fragment)
    assert stored(books) == before


def test_a_tier_without_quotas_takes_no_percentage(
    pfm: Cli, books: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiers = tmp_path / "tiers.toml"
    tiers.write_text(
        "[tiers.flat]\nbase_price_usd = 9\ncpu_price_per_ms = 0\nnetwork_price_per_mb = 0\n"
        "api_call_price = 0\ntool_execution_price = 0\ndata_retrieval_price = 0\n"
        "egress_scan_price = 0\npolicy_check_price = 0\nviolation_price = 0\n"
    )
    monkeypatch.setenv("METERING_TIERS_FILE", str(tiers))
    assert pfm("tenants", "add", "flat-co", "--tier", "flat").code == 0
    before = stored(books)
    pfm("tenants", "set-alert", "flat-co", "--quota-percent", "80").error(
        "--quota-percent: tenant 'flat-co' is on tier flat, and the tier sets no quota"
    )
    assert stored(books) == before


@pytest.mark.parametrize(
    "url",
    ["ftp://hooks.internal/x", "hooks.internal", "https://u:pw@h.internal/", "http://:8080/x"],
)
def test_a_bad_alert_url_is_refused_by_name(
    pfm: Cli, books: Path, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    before = stored(books)
    monkeypatch.setenv("METERING_ALERT_URL", url)
    run = pfm("alerts", "watch", "--once")
    run.error("invalid METERING_ALERT_URL")
    assert url not in run.err and "pw" not in run.err
    assert stored(books) == before


def test_watch_needs_the_url_and_the_secret(
    pfm: Cli, books: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pfm("alerts", "watch", "--once").error("METERING_ALERT_URL is not set")
    monkeypatch.setenv("METERING_ALERT_URL", "http://127.0.0.1:9/")
    pfm("alerts", "watch", "--once").error("METERING_ALERT_SECRET is not set")


def test_alerts_list_refuses_bad_filters(pfm: Cli, books: Path) -> None:
    pfm("alerts", "list", "--period", "2025-13").error("invalid period '2025-13' for --period")
    pfm("alerts", "list", "--tenant", "a b").error("invalid tenant id")
    assert json.loads(pfm("alerts", "list", "-f", "json").out) == []


def test_a_watcher_killed_while_retrying_neither_loses_nor_repeats_the_alert(
    pfm: Cli, books: Path, data_env: dict[str, str], tmp_path: Path
) -> None:
    assert pfm("tenants", "set-alert", "acme", "--quota-percent", "50").code == 0
    with alert_receiver(*[503] * 1000) as receiver:
        env = {
            **data_env,
            "METERING_ALERT_URL": receiver.url,
            "METERING_ALERT_SECRET": SECRET,
            "METERING_ALERT_TIMEOUT": "2",
        }
        log = tmp_path / "watcher.log"
        watcher = start_watch(env, log)
        wait_for(lambda: len(receiver.received) >= 2, "two failed attempts")
        watcher.kill()  # SIGKILL: no clean stop, maybe mid-post
        watcher.wait(timeout=60)
        [pending] = pfm("alerts", "list", "-f", "json").json()
        assert pending["status"] == "pending" and "HTTP 503" in (pending["last_error"] or "")
        receiver.script.clear()  # from now on: 200
        watcher = start_watch(env, log)
        try:
            wait_for(lambda: receiver.delivered(), "the alert delivered after the restart")
            wait_for(
                lambda: pfm("alerts", "list", "-f", "json").json()[0]["status"] == "delivered",
                "the delivery recorded",
            )
        finally:
            watcher.terminate()
            assert watcher.wait(timeout=60) == 0
    assert len(receiver.delivered()) == 1
    assert {r.event["id"] for r in receiver.received} == {pending["event_id"]}  # one alert
    [done] = pfm("alerts", "list", "-f", "json").json()
    assert done["attempts"] >= len(receiver.received)  # a claim killed before its post counts
    assert SECRET not in log.read_text()


def test_tiers_show_their_thresholds_and_tenants_get_them(
    pfm: Cli, books: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiers = tmp_path / "tiers.toml"
    tiers.write_text('[[alerts.basic]]\nquota_percent = 80\ncounter = "cpu_ms"\n')
    monkeypatch.setenv("METERING_TIERS_FILE", str(tiers))
    shown = {t["name"]: t["alerts"] for t in pfm("tiers", "-f", "json").json()}
    assert shown["basic"] == [{"kind": "quota_percent", "quota_percent": "80", "counter": "cpu_ms"}]
    assert shown["professional"] == []
    assert "80% of the cpu_ms quota" in pfm("tiers").out
    monkeypatch.setenv("METERING_ALERT_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("METERING_ALERT_SECRET", SECRET)
    assert "1 new alert(s)" in pfm("alerts", "watch", "--once").err  # acme: 3,000,000 ms
    [row] = pfm("alerts", "list", "-f", "json").json()
    assert row["tenant_id"] == "acme" and row["source"] == "tier"
    assert pfm("tenants", "set-alert", "beta", "--amount", "250").code == 0
    listed = pfm("alerts", "thresholds", "-f", "json").json()
    assert [(r["scope"], r["name"], r["threshold"]) for r in listed] == [
        ("tier", "basic", "quota_percent:cpu_ms:80"),
        ("tenant", "beta", "amount_usd:250.00"),
    ]
    assert pfm("alerts", "thresholds", "--tenant", "beta", "-f", "json").json()[0]["text"] == (
        "250.00 usd for the period"
    )
    assert "80% of the cpu_ms quota" in pfm("alerts", "thresholds").out
