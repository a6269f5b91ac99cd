"""Usage alerts while a real worker consumes from the real broker: the watcher service
(``alerts watch``, a real process) detects crossings in the committed usage and posts them to
a real HTTP server, which checks their signatures with the secret and answers 500 first:
the alert is retried and delivered once; two thresholds crossed by one batch give two
alerts; usage below a threshold gives none; a restarted watcher sends nothing again. Every
wait is on a state (the receiver's requests, the delivery log, the snapshot, the watcher's
pass counter), never a sleep."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from aggregator.views import open_usage
from common.settings import load_settings
from schemas.codec import COUNTERS
from tests.support.alert_receiver import alert_receiver
from tests.support.cli_runner import BIN, run_cli
from tests.support.events import make_event
from tests.support.waiting import free_port, scrape, wait_for
from tests.support.worker_harness import SMALL_BATCHES, produce, start_worker

SECRET = "whsec_broker_alerts_SECRET_0042"


def now_event(tenant: str, **counters: int) -> dict[str, Any]:
    values = {c: counters.get(c, 0) for c in COUNTERS}
    return make_event(tenant, occurred_at=int(time.time() * 1_000_000) - 1_000_000, **values)


def send(env: dict[str, str], *events: dict[str, Any]) -> None:
    produce(env["KAFKA_BOOTSTRAP_SERVERS"], env["METERING_TOPIC"], list(events))


def start_watcher(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[str]:
    with log.open("a") as out:
        return subprocess.Popen(
            [str(BIN), "alerts", "watch", "--interval", "1", "--metrics-port", str(port)],
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )


def events_seen(tenant: str) -> int:
    """Events of ``tenant`` in the published snapshot (what the watcher reads)."""
    cfg = load_settings()
    with open_usage(cfg.snapshot_dir, cfg.metering_topic) as reader:
        row = reader.con.execute(
            "SELECT sum(events) FROM usage WHERE tenant_id = ?", [tenant]
        ).fetchone()
    return int(row[0] or 0) if row else 0


def passes(port: int) -> float:
    try:
        return scrape(port).get("pf_alert_evaluations_total", 0.0)
    except OSError:
        return 0.0


def one_full_pass_after(port: int, proc: subprocess.Popen[str]) -> None:
    """Wait until the watcher has begun and finished a pass after this moment."""
    start = passes(port)
    wait_for(lambda: proc.poll() is None and passes(port) >= start + 2, "two watcher passes")


def log_rows(env: dict[str, str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(
        run_cli("alerts", "list", "-f", "json", env=env, check=True).stdout
    )
    return rows


def test_alerts_are_detected_signed_retried_and_sent_once(
    env: dict[str, str], tmp_path: Path
) -> None:
    with alert_receiver(500) as receiver:
        run_env = {
            **env,
            **SMALL_BATCHES,
            "METERING_ALERT_URL": receiver.url,
            "METERING_ALERT_SECRET": SECRET,
        }
        for tenant in ("acme", "quiet"):
            run_cli("tenants", "add", tenant, env=run_env, check=True)
            cpu = ("--quota-percent", "80", "--counter", "cpu_ms")
            run_cli("tenants", "set-alert", tenant, *cpu, env=run_env, check=True)
            run_cli("tenants", "set-alert", tenant, "--amount", "60", env=run_env, check=True)
        worker = start_worker(run_env, log=tmp_path / "worker.log")
        port = free_port()
        watcher = start_watcher(run_env, port, tmp_path / "watcher.log")
        try:
            # below both thresholds: committed, seen by a whole pass, and nothing sent
            send(env, now_event("acme", cpu_ms=1_000), now_event("quiet", cpu_ms=1_000))
            wait_for(lambda: events_seen("acme") == 1 and events_seen("quiet") == 1, "usage")
            one_full_pass_after(port, watcher)
            assert receiver.received == [] and log_rows(run_env) == []

            # one batch takes acme over both (80% cpu, and 50 + 10 violations + cpu > 60 usd)
            produced = time.time()
            send(env, now_event("acme", cpu_ms=2_880_000, violations=10), now_event("quiet"))
            wait_for(lambda: len(receiver.delivered()) == 2, "two alerts delivered")
            delivered = time.time()
            assert len(receiver.received) == 3  # the first answered 500 and was sent again
            assert all(r.signed_with(SECRET) for r in receiver.received)
            assert len(set(receiver.ids())) == 2
            kinds = {r.event["data"]["threshold"]["key"] for r in receiver.delivered()}
            assert kinds == {"quota_percent:cpu_ms:80", "amount_usd:60.00"}
            assert {r.event["data"]["tenant_id"] for r in receiver.received} == {"acme"}
            wait_for(lambda: {r["status"] for r in log_rows(run_env)} == {"delivered"}, "log")
            rows = log_rows(run_env)
            assert sorted(r["attempts"] for r in rows) == [1, 2]
            assert sorted(r["event_id"] for r in rows) == sorted(receiver.ids())
            metrics = scrape(port)
            assert metrics["pf_alerts_emitted_total"] == 2
            assert metrics["pf_alert_deliveries_total"] == 2
            assert metrics["pf_alert_delivery_failures_total"] == 1
            assert metrics["pf_alerts_pending"] == 0
            print(f"\nproduced to both alerts delivered: {delivered - produced:.1f} s")
            assert delivered - produced < 60  # the contract: within a minute, a retry included

            # a restart, then more usage over the thresholds: nothing is sent again
            watcher.terminate()
            assert watcher.wait(timeout=60) == 0
            watcher = start_watcher(run_env, port, tmp_path / "watcher.log")
            send(env, now_event("acme", cpu_ms=500_000, violations=5))
            wait_for(lambda: events_seen("acme") == 3, "more usage in the snapshot")
            one_full_pass_after(port, watcher)
            assert len(receiver.received) == 3 and len(log_rows(run_env)) == 2
            assert scrape(port)["pf_alerts_emitted_total"] == 0
        finally:
            for proc in (watcher, worker):
                proc.terminate()
            for proc in (watcher, worker):
                proc.wait(timeout=120)
    watcher_log = (tmp_path / "watcher.log").read_text()
    assert SECRET not in watcher_log and "attempt 1 failed: HTTP 500" in watcher_log
