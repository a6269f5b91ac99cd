"""The tenant registry: who exists, since which period, and which tier rates each period.

A tenant exists once it has sent an event (it appears in the ``usage`` view) or was added with
``tenants add``. Its first period, the first one billed (base fee, usage or not), is the earlier
of its first usage and the month it was added. Its tier has a history of (from period, tier)
entries; the entry in force on a period's first day rates that period; no entry means basic.
A period whose invoice is finalized keeps the tier it was rated with, so history can only be
changed after the tenant's last finalized period.

Once a tenant's first invoice is finalized, its first period is fixed (``billing_starts``):
usage that arrives later for an earlier period does not open invoices back in time; it is
charged as a late-usage line on the tenant's next invoice (``billing.invoicing``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

import duckdb
import pyarrow as pa

from billing import invoice_store
from billing.db import register_migration, register_schema
from billing.tiers import DEFAULT_TIER
from common.errors import UserError
from schemas.periods import Period

BEGINNING = Period(1970, 1)
"""The ``from`` of a tier given at ``tenants add``: it rates every period."""

register_schema(
    """
    CREATE TABLE IF NOT EXISTS tenants (
        tenant_id VARCHAR PRIMARY KEY,
        added_at TIMESTAMPTZ NOT NULL,
        added_period VARCHAR NOT NULL
    )
    """
)
register_schema(
    """
    CREATE TABLE IF NOT EXISTS tenant_tiers (
        tenant_id VARCHAR NOT NULL,
        effective_from VARCHAR NOT NULL,
        tier VARCHAR NOT NULL,
        set_at TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (tenant_id, effective_from)
    )
    """
)


def _add_billing_starts(con: duckdb.DuckDBPyConnection) -> None:
    """Create ``billing_starts`` (tenant -> first billed period) once, from the invoices
    already finalized in a file written before it existed."""
    found = con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() "
        "AND table_name = 'billing_starts'"
    ).fetchone()
    if found and found[0]:
        return
    con.execute(
        """CREATE TABLE billing_starts (
            tenant_id VARCHAR PRIMARY KEY, first_period VARCHAR NOT NULL)"""
    )
    con.execute(
        "INSERT INTO billing_starts SELECT tenant_id, min(period) FROM invoices "
        "WHERE status <> 'draft' GROUP BY tenant_id"
    )


register_migration(_add_billing_starts)


def record_starts(con: duckdb.DuckDBPyConnection, starts: Mapping[str, Period]) -> None:
    """Fix the first billed period of tenants finalized for the first time (others keep
    theirs)."""
    if not starts:
        return
    rows = pa.table(
        {
            "tenant_id": pa.array(list(starts), pa.string()),
            "first_period": pa.array([str(p) for p in starts.values()], pa.string()),
        }
    )
    con.register("_new_starts", rows)  # one statement: executemany is ~7 ms a row
    try:
        con.execute("INSERT INTO billing_starts SELECT * FROM _new_starts ON CONFLICT DO NOTHING")
    finally:
        con.unregister("_new_starts")


@dataclass(frozen=True)
class TierChange:
    effective_from: Period
    tier: str


@dataclass
class Tenant:
    tenant_id: str
    first_period: Period
    added_at: datetime | None = None
    first_usage: Period | None = None
    history: list[TierChange] = field(default_factory=list)  # sorted by effective_from
    billed_from: Period | None = None  # fixed at its first finalized invoice

    def tier_for(self, period: Period) -> str:
        """The tier in force on the first day of ``period``."""
        tier = DEFAULT_TIER
        for change in self.history:
            if change.effective_from > period:
                break
            tier = change.tier
        return tier

    def billed_history(self) -> list[TierChange]:
        """The tier history from the first period on, as billing applies it: the entry in
        force then shown as starting there (a tier given at ``tenants add`` rates every
        period, but none before the first exists)."""
        shown = [TierChange(self.first_period, self.tier_for(self.first_period))]
        shown += [c for c in self.history if c.effective_from > self.first_period]
        return shown


def load_tenants(
    con: duckdb.DuckDBPyConnection,
    first_usage: Mapping[str, Period],
    tenant_id: str | None = None,
) -> dict[str, Tenant]:
    """Every known tenant (or just ``tenant_id``, if known), by id.

    ``first_usage`` maps tenant ids to their first period with usage (from the usage view)."""
    where, params = ("WHERE tenant_id = ?", [tenant_id]) if tenant_id else ("", [])
    added = con.execute(
        f"SELECT tenant_id, added_at, added_period FROM tenants {where}", params
    ).fetchall()
    tenants: dict[str, Tenant] = {}
    for tid, first in first_usage.items():
        if tenant_id is None or tid == tenant_id:
            tenants[tid] = Tenant(tid, first, first_usage=first)
    for tid, added_at, added_period in added:
        period = Period.parse(added_period)
        known = tenants.get(tid)
        if known is None:
            tenants[tid] = Tenant(tid, period, added_at=added_at)
        else:
            known.added_at = added_at
            known.first_period = min(known.first_period, period)
    starts = con.execute(
        f"SELECT tenant_id, first_period FROM billing_starts {where}", params
    ).fetchall()
    for tid, start in starts:
        if tid in tenants:
            tenants[tid].billed_from = tenants[tid].first_period = Period.parse(start)
    changes = con.execute(
        f"SELECT tenant_id, effective_from, tier FROM tenant_tiers {where} "
        "ORDER BY tenant_id, effective_from",
        params,
    ).fetchall()
    for tid, start, tier in changes:
        if tid in tenants:
            tenants[tid].history.append(TierChange(Period.parse(start), tier))
    return tenants


def _check_not_invoiced(con: duckdb.DuckDBPyConnection, tenant_id: str, start: Period) -> None:
    last = invoice_store.last_final_period(con, tenant_id)
    if last is not None and Period.parse(last) >= start:
        after = Period.parse(last).next()
        raise UserError(
            f"tenant {tenant_id!r} has finalized invoices up to {last}; "
            f"a tier can only change from {after} on (use --from {after})"
        )


def _put_tier(
    con: duckdb.DuckDBPyConnection, tenant_id: str, tier: str, start: Period, now: datetime
) -> None:
    _check_not_invoiced(con, tenant_id, start)
    con.execute(
        "INSERT OR REPLACE INTO tenant_tiers VALUES (?, ?, ?, ?)",
        [tenant_id, str(start), tier, now],
    )


def add_tenant(
    con: duckdb.DuckDBPyConnection,
    tenant: Tenant | None,
    tenant_id: str,
    tier: str | None,
    now: datetime,
) -> bool:
    """Register ``tenant_id`` (``tenant`` is what is known of it already, if anything), with
    ``tier`` for every period. Adding again with the same or no tier changes nothing (False);
    with another tier it is an error: that is ``set-tier``'s job."""
    if tenant is not None and tenant.added_at is not None:
        if tier is not None and tier != tenant.tier_for(Period.of(now)):
            raise UserError(
                f"tenant {tenant_id!r} already exists with tier "
                f"{tenant.tier_for(Period.of(now))!r}; use tenants set-tier to change it"
            )
        return False
    con.execute(
        "INSERT INTO tenants VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
        [tenant_id, now, str(Period.of(now))],
    )
    if tier is not None and (tenant is None or tier != tenant.tier_for(Period.of(now))):
        _put_tier(con, tenant_id, tier, BEGINNING, now)
    return True


def set_tier(
    con: duckdb.DuckDBPyConnection, tenant_id: str, tier: str, start: Period, now: datetime
) -> None:
    """Rate ``tenant_id`` with ``tier`` from ``start`` on (until a later change)."""
    _put_tier(con, tenant_id, tier, start, now)
