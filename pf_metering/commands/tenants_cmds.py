"""``tenants add | set-tier | list``: the tenant registry and tier history."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import typer

from billing import invoicing, tenants
from billing.alerts import store as alert_store
from billing.alerts.evaluate import tier_quotas
from billing.alerts.model import MAX_PERCENT, Threshold, quota_problem
from billing.db import transaction
from billing.model import MAX_MONEY, QUOTA_KEYS, money
from billing.tiers import get_tier, load_tiers
from common.errors import UserError
from pf_metering.commands.books import billing, read_usage, utc_now
from pf_metering.commands.common import (
    FORMAT_OPTION,
    NUMBERS_AS_ARGUMENTS,
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


def _number(text: str, option: str, most: Decimal, what: str) -> Decimal:
    """``text`` as a number above 0, at most ``most``, with at most 2 decimals."""
    accepted = f"{option} takes a number above 0 and at most {what}, with at most 2 decimals"
    try:
        value = Decimal(text.strip())
    except InvalidOperation as exc:
        raise UserError(f"invalid {option} {text[:40]!r}: {accepted}") from exc
    if not value.is_finite() or value <= 0 or value > most or value != round(value, 2):
        raise UserError(f"invalid {option} {text[:40]!r}: {accepted}")
    return value


def threshold_of(percent: str | None, counter: str | None, amount: str | None) -> Threshold:
    """The threshold ``set-alert``'s options name (checked alone, before anything is read)."""
    if (percent is None) == (amount is None):
        raise UserError("give one of --quota-percent PCT (with --counter QUOTA) and --amount USD")
    if counter is not None and percent is None:
        raise UserError("--counter goes with --quota-percent (a percentage of that quota)")
    if counter is not None and counter not in QUOTA_KEYS:
        raise UserError(f"unknown --counter {counter[:40]!r}: one of {', '.join(QUOTA_KEYS)}")
    if percent is not None:
        pct = _number(percent, "--quota-percent", MAX_PERCENT, f"{MAX_PERCENT} (percent)")
        return Threshold(quota_percent=pct, counter=counter)
    assert amount is not None
    usd = _number(amount, "--amount", MAX_MONEY, f"{money(MAX_MONEY)} (usd)")
    return Threshold(amount_usd=usd)


@tenants_app.command("set-alert", context_settings=NUMBERS_AS_ARGUMENTS)
def tenants_set_alert(
    ctx: typer.Context,
    tenant_id: str = TENANT_ARGUMENT,
    percent: str = typer.Option(
        None, "--quota-percent", help="alert at this percentage of a quota (e.g. 80)"
    ),
    counter: str = typer.Option(
        None, "--counter", help="the quota: cpu_ms, network_mb, api_calls, ... (default: each)"
    ),
    amount: str = typer.Option(
        None, "--amount", help="alert when the open period's amount reaches this (usd)"
    ),
    remove: bool = typer.Option(False, "--remove", help="remove this threshold instead"),
) -> None:
    """Alert when a tenant's open period reaches a percentage of a quota or an amount; one
    alert per tenant, period and threshold (see alerts watch)."""
    cfg = settings_of(ctx)
    check_tenant(tenant_id)
    threshold = threshold_of(percent, counter, amount)
    tiers = load_tiers(cfg.metering_tiers_file)
    usage = read_usage(cfg, tenant_id, quiet=True)
    now = utc_now()
    with billing(cfg) as con, transaction(con):
        tenant = invoicing.known_tenant(con, usage, tenant_id)
        if remove:
            if not alert_store.remove_threshold(con, tenant_id, threshold):
                raise UserError(f"tenant {tenant_id!r} has no alert at {threshold.describe()}")
        else:
            tier = get_tier(tiers, tenant.tier_for(Period.of(now)))
            problem = quota_problem(threshold, tier_quotas(tier))
            if problem is not None:
                option = "--counter" if threshold.counter else "--quota-percent"
                raise UserError(
                    f"{option}: tenant {tenant_id!r} is on tier {tier.name}, and {problem}: "
                    "a percentage of nothing never crosses"
                )
            alert_store.set_threshold(con, tenant_id, threshold, now)
    state = "removed" if remove else "set"
    print(f"tenant {tenant_id}: alert at {threshold.describe()} {state}", file=sys.stderr)


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
