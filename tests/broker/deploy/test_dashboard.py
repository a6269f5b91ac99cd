"""The Grafana dashboard queries only series that exist: the worker's, scraped from a real worker
(real broker, real ledger) on ``--metrics-port``; the nightly job's, from the textfile that
``billing.job_metrics`` writes. Also: that textfile's counters keep counting across runs."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from billing.job_metrics import BillRun, write_job_metrics
from billing.stripe.push import PushOutcome, PushResult
from tests.support import REPO
from tests.support.events import make_event
from tests.support.worker_harness import produce, start_worker

DASHBOARD = REPO / "deploy" / "grafana" / "pf-metering.json"
METRIC = re.compile(r"\bpf_[a-z0-9_]+\b")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
SCRAPE_LABELS = {"instance", "job"}  # added by Prometheus when it scrapes
Series = dict[str, set[str]]  # sample name -> label names seen on it


def _dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression: panel targets and template variable queries."""
    exprs = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            exprs.append(query["query"])
    return exprs


def series_of(text: str) -> Series:
    found: Series = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, set()).update(sample.labels)
    return found


def check_queries(exprs: list[str], served: Series) -> None:
    """Each metric an expression names is served, and so is each label it groups by."""
    for expr in exprs:
        names = METRIC.findall(expr)
        missing = [n for n in names if n not in served]
        assert not missing, f"{missing} in {expr!r} are not served"
        labels = SCRAPE_LABELS.union(*(served[n] for n in names))
        for group in GROUPING.findall(expr):
            wanted = {g.strip() for g in group.split(",") if g.strip()}
            assert wanted <= labels, f"{expr!r} groups by {wanted - labels}, not on its series"


def _job_series(tmp_path: Path) -> Series:
    path = tmp_path / "pf_metering_bill.prom"
    write_job_metrics(path, BillRun(finalized=2, pushed=1, stripe_errors=1, succeeded=False))
    return series_of(path.read_text())


def test_dashboard_is_well_formed_and_covers_the_issue() -> None:
    dashboard = _dashboard()
    panels = list(_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["title"] and {"x", "y", "w", "h"} <= panel["gridPos"].keys()
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
            refs = [t["refId"] for t in panel["targets"]]
            assert refs and len(refs) == len(set(refs))
    used = {m for e in queries(dashboard) for m in METRIC.findall(e)}
    for wanted in (
        "pf_events_consumed_total",  # throughput
        "pf_consumer_lag",  # lag
        "pf_events_dead_lettered_total",  # dead letters (by reason)
        "pf_batch_duration_seconds_bucket",  # batch latency
        "pf_invoices_pushed_total",  # invoices pushed
        "pf_stripe_errors_total",  # Stripe errors
    ):
        assert wanted in used, wanted
    assert any("by (reason)" in e for e in queries(dashboard))


def test_job_panels_query_what_the_bill_job_writes(tmp_path: Path) -> None:
    job = _job_series(tmp_path)
    job_exprs = [e for e in queries(_dashboard()) if set(METRIC.findall(e)) & job.keys()]
    assert len(job_exprs) >= 3
    check_queries(job_exprs, job)


def test_job_metrics_count_across_runs(tmp_path: Path) -> None:
    path = tmp_path / "bill.prom"
    pushes = [
        PushResult("INV-1", "a", PushOutcome.sent, "in_1"),
        PushResult("INV-2", "b", PushOutcome.already_sent, "in_2"),
        PushResult("INV-3", "c", PushOutcome.failed, error="HTTP 500"),
    ]
    write_job_metrics(path, BillRun.of(3, pushes, succeeded=False), now=1000.0)
    write_job_metrics(path, BillRun(finalized=1, pushed=1, succeeded=True), now=2000.0)
    write_job_metrics(path, BillRun(finalized=4, succeeded=False), now=3000.0)
    values = {
        s.name: s.value for f in text_string_to_metric_families(path.read_text()) for s in f.samples
    }
    assert values == {
        "pf_invoices_finalized_total": 8.0,
        "pf_invoices_pushed_total": 2.0,  # an invoice already in Stripe is not pushed again
        "pf_stripe_errors_total": 1.0,
        "pf_bill_last_success_timestamp_seconds": 2000.0,  # the failed run does not move it
        "pf_bill_last_run_timestamp_seconds": 3000.0,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape_when_ready(proc: subprocess.Popen[str], port: int, needed: set[str]) -> Series:
    """Scrape until the worker has consumed and measured lag (it needs a rebalance first)."""
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, f"worker exited: {proc.communicate()[1]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                served = series_of(r.read().decode())
            if needed <= served.keys():
                return served
        except (urllib.error.URLError, ConnectionError):
            served = {}
        if time.monotonic() > deadline:
            raise AssertionError(f"worker never served {needed - served.keys()}")
        time.sleep(0.5)


def test_worker_panels_query_what_a_running_worker_serves(
    env: dict[str, str], tmp_path: Path
) -> None:
    job = _job_series(tmp_path)
    worker_exprs = [e for e in queries(_dashboard()) if not set(METRIC.findall(e)) & job.keys()]
    produce(
        env["KAFKA_BOOTSTRAP_SERVERS"],
        env["METERING_TOPIC"],
        [make_event(f"tenant-{i}") for i in range(6)],
    )
    port = _free_port()
    proc = start_worker(env, "--metrics-port", str(port))
    try:
        served = _scrape_when_ready(
            proc, port, {"pf_events_consumed_total", "pf_consumer_lag", "pf_rebalances_total"}
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    assert not served.keys() & job.keys()
    check_queries(worker_exprs, served)
