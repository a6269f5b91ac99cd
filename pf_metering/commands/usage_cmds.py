"""``usage`` (one tenant's totals in a period, with quota utilisation) and ``export-metrics``
(every tenant's usage as Prometheus text)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from billing import invoicing
from billing.rating import quota_report
from billing.render.invoice_json import quota_json
from billing.tiers import get_tier
from pf_metering.commands.books import billing, quotas_table, read_usage, right, tenant_period
from pf_metering.commands.common import (
    FORMAT_OPTION,
    OUTPUT_OPTION,
    PERIOD_ARGUMENT,
    TENANT_ARGUMENT,
    output_path,
    settings_of,
)
from pf_metering.output import Format, readable, render, write
from schemas.codec import COUNTERS


def usage_cmd(
    ctx: typer.Context,
    tenant_id: str = TENANT_ARGUMENT,
    period: str = PERIOD_ARGUMENT,
    fmt: Format = FORMAT_OPTION,
    output: Path = OUTPUT_OPTION,
) -> None:
    """Usage totals of a tenant in a period, with quota utilisation for its tier."""
    cfg = settings_of(ctx)
    asked = tenant_period(cfg, tenant_id, period)
    usage, target = asked.usage, asked.period
    with billing(cfg) as con:
        tenant = invoicing.known_tenant(con, usage, tenant_id)
    tier = get_tier(asked.rules.tiers, tenant.tier_for(target))
    row = usage.row(tenant_id, target) or {}
    quotas = quota_report(tier, usage.usage(tenant_id, target))
    data: dict[str, Any] = {"tenant_id": tenant_id, "period": str(target), "tier": tier.name}
    for key in ("events", "sessions", *COUNTERS):
        data[key] = int(row.get(key) or 0)
    data["risk_score_avg"] = row.get("risk_score_avg")
    data["risk_score_max"] = row.get("risk_score_max")
    data["quotas"] = [quota_json(q) for q in quotas]

    def csv_rows() -> list[dict[str, Any]]:
        flat = {k: v for k, v in data.items() if k != "quotas"}
        for q in data["quotas"]:
            flat[f"quota_{q['quota']}_pct"] = q["utilisation_pct"]
            flat[f"quota_{q['quota']}_exceeded"] = q["exceeded"]
        return [flat]

    def table() -> Table:
        grid = Table.grid(padding=(1, 0))
        facts = Table(title="Usage")
        facts.add_column("metric")
        right(facts, "value")
        for key, value in data.items():
            if key in ("tenant_id", "period", "tier"):
                facts.add_row(key, value)
            elif key != "quotas":
                facts.add_row(key, "-" if value is None else readable(value))
        grid.add_row(facts)
        grid.add_row(quotas_table(quotas, "Quotas"))
        return grid

    render(fmt, output_path(output), json_data=data, csv_rows=csv_rows, table=table)


def export_metrics(
    ctx: typer.Context,
    output: Path = OUTPUT_OPTION,
    base_units: bool = typer.Option(
        False, "--base-units", help="CPU only in seconds (leaves out pf_usage_cpu_ms_total)"
    ),
) -> None:
    """Per-tenant, per-period usage in Prometheus text exposition format."""
    from billing.render.prometheus_export import exposition  # only this command needs the library

    out = output_path(output)
    usage = read_usage(settings_of(ctx))
    write(exposition(usage.rows.values(), base_units=base_units), out)


def register(app: typer.Typer) -> None:
    app.command("usage")(usage_cmd)
    app.command("export-metrics")(export_metrics)
