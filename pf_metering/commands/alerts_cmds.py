"""``alerts watch`` (the service that detects threshold crossings and delivers them) and
``alerts list`` (the delivery log). Thresholds: the tiers file and ``tenants set-alert``."""

from __future__ import annotations

import sys
import threading
from datetime import UTC
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Any

import typer

from aggregator.views import usage_reader
from billing.alerts import store
from billing.alerts.delivery import Endpoint
from billing.alerts.model import AlertRecord, Threshold
from billing.alerts.watch import AlertMetrics, Watcher
from billing.invoicing import Rules
from billing.tiers import load_tiers
from common.errors import UserError
from common.settings import Settings
from common.stopping import on_stop
from pf_metering.commands.books import billing
from pf_metering.commands.common import (
    FORMAT_OPTION,
    OUTPUT_OPTION,
    billing_connect,
    check_tenant,
    output_path,
    parse_period,
    settings_of,
)
from pf_metering.output import Format, printable, render, rows_table

alerts_app = typer.Typer(
    help="Usage alerts: the watcher that sends them and the delivery log.", no_args_is_help=True
)


class StatusFilter(StrEnum):
    pending = "pending"
    delivered = "delivered"


def endpoint_of(cfg: Settings) -> Endpoint:
    """Where ``cfg`` sends alerts; both settings are required."""
    if cfg.metering_alert_url is None:
        raise UserError(
            "METERING_ALERT_URL is not set: alerts watch posts alerts there "
            "(an http:// or https:// URL)"
        )
    secret = cfg.metering_alert_secret
    if secret is None or not secret.get_secret_value():
        raise UserError("METERING_ALERT_SECRET is not set; it is needed to sign alerts")
    return Endpoint(cfg.metering_alert_url, secret, cfg.metering_alert_timeout)


@alerts_app.command("watch")
def watch(
    ctx: typer.Context,
    interval: float = typer.Option(
        5.0, "--interval", min=0.1, max=60.0, help="seconds between passes over the usage"
    ),
    metrics_port: int = typer.Option(None, "--metrics-port", help="serve Prometheus /metrics"),
    once: bool = typer.Option(False, "--once", help="one pass (detect, deliver what is due)"),
) -> None:
    """Detect threshold crossings in the committed usage and post each alert once, signed,
    retrying with backoff until it is delivered (SIGTERM/SIGINT stop it)."""
    cfg = settings_of(ctx)
    endpoint = endpoint_of(cfg)
    stop = threading.Event()
    on_stop(lambda signum: stop.set())
    metrics = AlertMetrics()
    if metrics_port is not None:
        try:
            metrics.serve(metrics_port)
        except OSError as exc:
            raise UserError(f"cannot serve metrics on port {metrics_port}: {exc.strerror}") from exc
    watcher = Watcher(
        billing_connect(cfg),
        partial(usage_reader, cfg),
        Rules.from_settings(cfg),
        endpoint,
        metrics,
    )
    if once:
        new = watcher.detect()
        delivered = watcher.deliver()
        print(f"{len(new)} new alert(s), {delivered} delivered", file=sys.stderr)
        return
    print(f"watching usage every {interval:g} s; alerts to {endpoint.where}", file=sys.stderr)
    watcher.run(stop, interval)
    print("stopped", file=sys.stderr)


def _row(record: AlertRecord) -> dict[str, Any]:
    return {
        "event_id": record.event_id,
        "tenant": record.tenant_id,
        "period": record.period,
        "threshold": record.describe(),
        "crossed_at": record.crossed_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ"),
        "attempts": record.attempts,
        "status": record.status,
        "last_error": record.last_error or "",
    }


@alerts_app.command("list")
def list_cmd(
    ctx: typer.Context,
    tenant_id: str = typer.Option(None, "--tenant", help="only this tenant's alerts"),
    period: str = typer.Option(None, "--period", help="only this period's, YYYY-MM"),
    status: StatusFilter = typer.Option(None, "--status", help="pending or delivered"),
    fmt: Format = FORMAT_OPTION,
    output: Path = OUTPUT_OPTION,
) -> None:
    """The delivery log: every alert with its tenant, period, threshold, when it was crossed,
    attempts, status (pending, delivered) and last error."""
    if tenant_id is not None:
        check_tenant(tenant_id)
    periods = [str(parse_period(period, "--period"))] if period is not None else None
    out = output_path(output)
    cfg = settings_of(ctx)
    with billing(cfg) as con:
        found = store.list_alerts(con, tenant_id, periods)
    if status is not None:
        found = [r for r in found if r.status == status.value]
    data = [r.as_json() for r in found]
    shown = [{k: printable(v) for k, v in _row(r).items()} for r in found]
    render(
        fmt,
        out,
        json_data=data,
        csv_rows=lambda: [{k: printable(v) for k, v in d.items()} for d in data],
        table=lambda: rows_table(shown, title=f"{len(found)} alerts"),
    )


@alerts_app.command("thresholds")
def thresholds_cmd(
    ctx: typer.Context,
    tenant_id: str = typer.Option(None, "--tenant", help="only this tenant's own thresholds"),
    fmt: Format = FORMAT_OPTION,
    output: Path = OUTPUT_OPTION,
) -> None:
    """The thresholds set: each tier's (tiers file) and each tenant's own (set-alert); a
    tenant is watched for its tier's and its own."""
    if tenant_id is not None:
        check_tenant(tenant_id)
    out = output_path(output)
    cfg = settings_of(ctx)
    rows: list[dict[str, Any]] = []
    if tenant_id is None:
        for tier in load_tiers(cfg.metering_tiers_file).values():
            rows += [_threshold_row("tier", tier.name, t) for t in tier.alerts]
    with billing(cfg) as con:
        own = store.tenant_thresholds(con, tenant_id)
    for tenant in sorted(own):
        rows += [_threshold_row("tenant", tenant, t) for t in own[tenant]]
    shown = [{k: printable(v) for k, v in r.items()} for r in rows]
    render(
        fmt,
        out,
        json_data=rows,
        csv_rows=lambda: shown,
        table=lambda: rows_table(shown, title=f"{len(rows)} alert thresholds"),
    )


def _threshold_row(scope: str, name: str, threshold: Threshold) -> dict[str, Any]:
    return {"scope": scope, "name": name, "threshold": threshold.key, "text": threshold.describe()}


def register(app: typer.Typer) -> None:
    app.add_typer(alerts_app, name="alerts")
