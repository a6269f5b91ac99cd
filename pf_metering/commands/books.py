"""What the billing commands share: usage from the published snapshot (a freshness line on
stderr), the billing DuckDB file opened for one unit of work at a time, the table-or-JSON
format choice (JSON is the default with ``-o``, as the original tool saved JSON) and the quota
table."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

import duckdb
import typer
from rich.table import Table

from aggregator.views import usage_reader
from billing.invoicing import Rules, UsageData
from billing.model import QuotaUsage
from billing.render.invoice_json import quota_json
from common.settings import Settings
from pf_metering.commands.common import billing_connect, check_tenant, output_path, parse_period
from pf_metering.output import Format, readable
from schemas.periods import Period


class TableOrJson(StrEnum):
    table = "table"
    json = "json"


class InvoiceFormat(StrEnum):
    table = "table"
    json = "json"
    html = "html"


TABLE_JSON_OPTION = typer.Option(
    None, "-f", "--format", help="table or json (default: table; json with -o)"
)
INVOICE_FORMAT_OPTION = typer.Option(
    None, "-f", "--format", help="table, json or html (default: table; json with -o)"
)
STRIPE_OPTION = typer.Option(
    False, "--stripe", help="push finalized invoices to Stripe (also: STRIPE_ENABLED=true)"
)


def table_or_json(fmt: TableOrJson | InvoiceFormat | None, output: Path | None) -> Format:
    """The format asked for; without one, JSON when writing to a file, else a table."""
    if fmt is None:
        return Format.json if output is not None else Format.table
    return Format(fmt.value)


def utc_now() -> datetime:
    return datetime.now(UTC)


def billing(cfg: Settings) -> AbstractContextManager[duckdb.DuckDBPyConnection]:
    """The billing file, open for one unit of work."""
    return billing_connect(cfg)()


def read_usage(cfg: Settings, tenant_id: str | None = None, *, quiet: bool = False) -> UsageData:
    """The snapshot's usage (all tenants, or one), saying how fresh it is on stderr."""
    reader = usage_reader(cfg)
    try:
        if not quiet:
            print(reader.freshness.describe(), file=sys.stderr)
        return UsageData.read(reader, tenant_id)
    finally:
        reader.close()


@dataclass(frozen=True)
class TenantPeriod:
    """What a command about one tenant's period works from."""

    tenant_id: str
    period: Period
    usage: UsageData
    rules: Rules


def tenant_period(
    cfg: Settings, tenant_id: str, period: str, *, output: Path | None = None
) -> TenantPeriod:
    """The checked tenant id and period, the tenant's usage (its freshness on stderr) and the
    rating rules; ``output``, if given, is checked before the usage is read."""
    check_tenant(tenant_id)
    target = parse_period(period)
    output_path(output)
    usage = read_usage(cfg, tenant_id)
    return TenantPeriod(tenant_id, target, usage, Rules.from_settings(cfg))


def right(table: Table, *names: str) -> None:
    """Add right-aligned (numeric) columns."""
    for name in names:
        table.add_column(name, justify="right")


def quotas_table(quotas: Sequence[QuotaUsage], title: str) -> Table:
    table = Table(title=title)
    table.add_column("quota")
    right(table, "used", "limit", "utilisation %")
    table.add_column("exceeded")
    for q in quotas:
        j = quota_json(q)
        exceeded = "YES" if q.exceeded else "no"
        used, limit = readable(q.used), readable(q.limit)
        table.add_row(q.quota, used, limit, j["utilisation_pct"] or "-", exceeded)
    return table
