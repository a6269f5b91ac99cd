"""``tiers``: every billing tier with its prices and quotas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from billing.tiers import Tier, load_tiers, tier_terms
from pf_metering.commands.books import TABLE_JSON_OPTION, TableOrJson, table_or_json
from pf_metering.commands.common import OUTPUT_OPTION, output_path, settings_of
from pf_metering.output import render


def tier_json(tier: Tier) -> dict[str, Any]:
    head = {"name": tier.name, "display_name": tier.display_name, "currency": "usd"}
    return {**head, **tier_terms(tier)}


def _tiers_table(data: list[dict[str, Any]]) -> Table:
    table = Table(title="Billing tiers (usd; network per MiB, cpu per ms)")
    table.add_column("field")
    for tier in data:
        table.add_column(tier["name"], justify="right")
    fields = [k for k in data[0] if k not in ("name", "quotas")]
    for field in fields:
        table.add_row(field, *(str(t[field]) for t in data))
    quota_keys = sorted({k for t in data for k in t["quotas"]})
    for key in quota_keys:
        limits = (t["quotas"].get(key) for t in data)
        table.add_row(f"quota {key}", *("-" if v is None else f"{v:,}" for v in limits))
    return table


def tiers_cmd(
    ctx: typer.Context, fmt: TableOrJson | None = TABLE_JSON_OPTION, output: Path = OUTPUT_OPTION
) -> None:
    """List billing tiers with every price and quota (built in, plus METERING_TIERS_FILE)."""
    data = [tier_json(t) for t in load_tiers(settings_of(ctx).metering_tiers_file).values()]
    render(
        table_or_json(fmt, output),
        output_path(output),
        json_data=data,
        table=lambda: _tiers_table(data),
    )


def register(app: typer.Typer) -> None:
    app.command("tiers")(tiers_cmd)
