"""``tiers``: every billing tier with its prices, quotas and usage-alert thresholds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from billing.tiers import PRICE_FIELDS, Tier, load_tiers, price_form_text, tier_terms
from pf_metering.commands.books import TABLE_JSON_OPTION, TableOrJson, table_or_json
from pf_metering.commands.common import OUTPUT_OPTION, output_path, settings_of
from pf_metering.output import render

PRICE_CODES = {field: code for code, field in PRICE_FIELDS.items()}


def tier_json(tier: Tier) -> dict[str, Any]:
    head = {"name": tier.name, "display_name": tier.display_name, "currency": "usd"}
    return {**head, **tier_terms(tier), "alerts": [t.as_json() for t in tier.alerts]}


def _cell(tier: Tier, data: dict[str, Any], field: str) -> str:
    """A price field's cell; a counter priced under ``prices`` shows its form instead."""
    code = PRICE_CODES.get(field)
    if code is not None and data[field] is None:
        return price_form_text(tier.pricing(code))
    return str(data.get(field, "-"))


def _tiers_table(tiers: list[Tier], data: list[dict[str, Any]]) -> Table:
    table = Table(title="Billing tiers (usd; network per MiB, cpu per ms)")
    table.add_column("field")
    for tier in data:
        table.add_column(tier["name"], justify="right", overflow="fold")
    fields = [k for k in data[0] if k not in ("name", "quotas", "alerts")]
    if any(t.minimum_commitment_usd > 0 for t in tiers):
        fields.append("minimum_commitment_usd")
    for field in fields:
        table.add_row(field, *(_cell(t, d, field) for t, d in zip(tiers, data, strict=True)))
    quota_keys = sorted({k for t in data for k in t["quotas"]})
    for key in quota_keys:
        limits = (t["quotas"].get(key) for t in data)
        table.add_row(f"quota {key}", *("-" if v is None else f"{v:,}" for v in limits))
    if any(t.alerts for t in tiers):
        table.add_row("alerts", *(", ".join(a.describe() for a in t.alerts) or "-" for t in tiers))
    return table


def tiers_cmd(
    ctx: typer.Context, fmt: TableOrJson | None = TABLE_JSON_OPTION, output: Path = OUTPUT_OPTION
) -> None:
    """List billing tiers with every price and quota (built in, plus METERING_TIERS_FILE)."""
    tiers = list(load_tiers(settings_of(ctx).metering_tiers_file).values())
    data = [tier_json(t) for t in tiers]
    render(
        table_or_json(fmt, output),
        output_path(output),
        json_data=data,
        table=lambda: _tiers_table(tiers, data),
    )


def register(app: typer.Typer) -> None:
    app.command("tiers")(tiers_cmd)
