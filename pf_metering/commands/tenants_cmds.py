"""``tenants add | set-tier | list``: the tenant registry and tier history."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer

from billing import invoicing, tenants
from billing.db import transaction
from billing.tiers import get_tier, load_tiers
from pf_metering.commands.books import billing, read_usage, utc_now
from pf_metering.commands.common import (
    FORMAT_OPTION,
    OUTPUT_OPTION,
    TENANT_ARGUMENT,
    check_tenant,
    output_path,
    parse_period,
    settings_of,
)
from pf_metering.output import Format, render, rows_table
from schemas.periods import Period

tenants_app = typer.Typer(help="The tenant registry and tier history.", no_args_is_help=True)


def _tenant_json(tenant: tenants.Tenant, now: datetime) -> dict[str, Any]:
    return {
        "tenant_id": tenant.tenant_id,
        "tier": tenant.tier_for(Period.of(now)),
        "first_period": str(tenant.first_period),
        "first_usage_period": str(tenant.first_usage) if tenant.first_usage else None,
        "added_at": tenant.added_at.astimezone(UTC) if tenant.added_at else None,
        "tier_history": [
            {"from": str(c.effective_from), "tier": c.tier} for c in tenant.billed_history()
        ],
    }


@tenants_app.command("add")
def tenants_add(
    ctx: typer.Context,
    tenant_id: str = typer.Argument(..., help="tenant identifier, e.g. acme-corp"),
    tier: str = typer.Option(None, "--tier", help="its tier for every period (default: basic)"),
) -> None:
    """Register a tenant (it also exists once it has sent an event)."""
    cfg = settings_of(ctx)
    check_tenant(tenant_id)
    if tier is not None:
        get_tier(load_tiers(cfg.metering_tiers_file), tier)
    usage = read_usage(cfg, tenant_id, quiet=True)
    now = utc_now()
    with billing(cfg) as con, transaction(con):
        known = tenants.load_tenants(con, usage.first_periods(), tenant_id).get(tenant_id)
        added = tenants.add_tenant(con, known, tenant_id, tier, now)
        current = tenants.load_tenants(con, usage.first_periods(), tenant_id)[tenant_id]
    if not added:
        state = "already registered:"
    elif known is not None:
        state = f"registered (known from its usage since {known.first_period}):"
    else:
        state = "added"
    print(f"{state} tenant {tenant_id}, tier {current.tier_for(Period.of(now))}", file=sys.stderr)


@tenants_app.command("set-tier")
def tenants_set_tier(
    ctx: typer.Context,
    tenant_id: str = TENANT_ARGUMENT,
    tier: str = typer.Argument(..., help="tier name, e.g. professional"),
    start: str = typer.Option(
        None, "--from", help="first period rated with TIER, YYYY-MM (default: this month)"
    ),
) -> None:
    """Change a tenant's tier from a period on; earlier periods keep their tier."""
    cfg = settings_of(ctx)
    check_tenant(tenant_id)
    get_tier(load_tiers(cfg.metering_tiers_file), tier)
    now = utc_now()
    period = parse_period(start, "--from", future=True) if start is not None else Period.of(now)
    usage = read_usage(cfg, tenant_id, quiet=True)
    with billing(cfg) as con, transaction(con):
        invoicing.known_tenant(con, usage, tenant_id)
        tenants.set_tier(con, tenant_id, tier, period, now)
    print(f"tenant {tenant_id}: tier {tier} from {period}", file=sys.stderr)


@tenants_app.command("list")
def tenants_list(
    ctx: typer.Context, fmt: Format = FORMAT_OPTION, output: Path = OUTPUT_OPTION
) -> None:
    """Every known tenant with its current tier, first period and tier history."""
    cfg = settings_of(ctx)
    usage = read_usage(cfg)
    now = utc_now()
    with billing(cfg) as con:
        known = tenants.load_tenants(con, usage.first_periods())
    rows = [_tenant_json(known[t], now) for t in sorted(known)]

    def flat() -> list[dict[str, Any]]:
        return [
            {
                **r,
                "tier_history": "; ".join(
                    f"{h['tier']} from {h['from']}" for h in r["tier_history"]
                ),
            }
            for r in rows
        ]

    render(
        fmt,
        output_path(output),
        json_data=rows,
        csv_rows=flat,
        table=lambda: rows_table(flat(), title=f"{len(rows)} tenants"),
    )


def register(app: typer.Typer) -> None:
    app.add_typer(tenants_app, name="tenants")
