"""Invoices and what each period has been billed for, in the billing DuckDB file.

``invoices`` holds one invoice per tenant and period that is not void, and any number of void
ones: ``live_key`` is ``"<tenant_id> <period>"`` while an invoice is not void and NULL once it
is, and is UNIQUE (DuckDB has no partial unique index; NULLs never collide), so two writers
racing to make a period's live invoice cannot both commit. A draft row is replaced when it is
recomputed or finalized (same invoice_id), a finalized row is never rewritten: only its status,
Stripe id and void facts (reason, who, when, ``replaced_by``) move. ``billed_usage`` holds, per
finalized (tenant, period), the counters its invoices have charged so far, so usage that
arrives later is charged exactly once, as a late_usage line on a later invoice.

Rows are written in bulk from Arrow tables: the nightly job writes thousands at once.
The Stripe push and the webhook server call ``mark_sent``, ``set_status_by_invoice_id`` and
``get_invoice``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import duckdb
import pyarrow as pa
from pydantic import TypeAdapter

from billing import credit_store
from billing.db import changed, column_types, register_migration, register_schema, widen
from billing.model import (
    INVOICES_SHOWN_SQL,
    MONEY_SQL,
    Invoice,
    InvoiceLine,
    InvoiceStatus,
    QuotaUsage,
)
from billing.rating import Usage
from common.jsonfmt import json_default
from schemas.codec import COUNTERS

log = logging.getLogger("billing.invoices")

_INVOICES_DDL = f"""
    CREATE TABLE IF NOT EXISTS invoices (
        invoice_id VARCHAR PRIMARY KEY,
        tenant_id VARCHAR NOT NULL,
        period VARCHAR NOT NULL,
        period_start TIMESTAMPTZ NOT NULL,
        period_end TIMESTAMPTZ NOT NULL,
        tier VARCHAR NOT NULL,
        currency VARCHAR NOT NULL,
        status VARCHAR NOT NULL,
        subtotal {MONEY_SQL} NOT NULL,
        total {MONEY_SQL} NOT NULL,
        due_date TIMESTAMPTZ NOT NULL,
        created_at TIMESTAMPTZ NOT NULL,
        finalized_at TIMESTAMPTZ,
        stripe_invoice_id VARCHAR,
        lines VARCHAR NOT NULL,
        quotas VARCHAR NOT NULL,
        computed_from VARCHAR NOT NULL,
        credit_balance {MONEY_SQL} NOT NULL DEFAULT 0,
        void_reason VARCHAR,
        voided_at TIMESTAMPTZ,
        voided_by VARCHAR,
        replaces VARCHAR,
        replaced_by VARCHAR,
        live_key VARCHAR UNIQUE,
        lake_snapshot BIGINT
    )
    """
register_schema(_INVOICES_DDL)
LIVE_KEY_SQL = "CASE WHEN status = 'void' THEN NULL ELSE tenant_id || ' ' || period END"
"""``live_key`` of a row: set while the invoice is not void."""
# The invoices with the status people see (``overdue`` once an unpaid one is past due) and
# the stored one beside it: what ``sql`` offers as ``invoices``, and what the plain duckdb
# CLI reads from this file.
register_schema(f"CREATE VIEW IF NOT EXISTS invoices_shown AS {INVOICES_SHOWN_SQL}")
COUNTER_SQL = "HUGEINT"  # as wide as the usage view's sums
_COUNTER_COLUMNS = ",\n".join(f"        {c} {COUNTER_SQL} NOT NULL" for c in COUNTERS)
register_schema(
    f"""
    CREATE TABLE IF NOT EXISTS billed_usage (
        tenant_id VARCHAR NOT NULL,
        period VARCHAR NOT NULL,
        tier VARCHAR NOT NULL,
{_COUNTER_COLUMNS},
        invoice_id VARCHAR NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL,
        prices VARCHAR,
        PRIMARY KEY (tenant_id, period)
    )
    """
)


def _rebuild_for_voids(con: duckdb.DuckDBPyConnection) -> None:
    """A file from before voids had UNIQUE(tenant_id, period), which DuckDB cannot drop: the
    table is rebuilt with the void columns and ``live_key`` (rows and values kept)."""
    if "live_key" in column_types(con, "invoices"):
        return
    con.execute("ALTER TABLE invoices RENAME TO invoices_before_voids")
    con.execute(_INVOICES_DDL)
    con.execute(
        f"INSERT INTO invoices BY NAME SELECT *, {LIVE_KEY_SQL} AS live_key "
        "FROM invoices_before_voids"
    )
    con.execute("DROP TABLE invoices_before_voids")
    con.execute(f"CREATE OR REPLACE VIEW invoices_shown AS {INVOICES_SHOWN_SQL}")


def _migrate(con: duckdb.DuckDBPyConnection) -> None:
    """Files from before: the invoices table gets its void columns, money DECIMAL(18, 2) and
    BIGINT billed counters are widened, invoices from before credit balances get a balance
    of 0, and billed usage without its prices gets those its period's invoice recorded."""
    _rebuild_for_voids(con)
    widen(con, "invoices", {"subtotal": MONEY_SQL, "total": MONEY_SQL})
    present = column_types(con, "invoices")
    if "credit_balance" not in present:
        con.execute(f"ALTER TABLE invoices ADD COLUMN credit_balance {MONEY_SQL} DEFAULT 0")
    if "lake_snapshot" not in present:
        con.execute("ALTER TABLE invoices ADD COLUMN lake_snapshot BIGINT")
    widen(con, "billed_usage", dict.fromkeys(COUNTERS, COUNTER_SQL))
    if "prices" in column_types(con, "billed_usage"):
        return
    con.execute("ALTER TABLE billed_usage ADD COLUMN prices VARCHAR")
    con.execute(
        """UPDATE billed_usage b SET prices = json_extract(i.computed_from, '$.tier')::VARCHAR
           FROM invoices i WHERE b.prices IS NULL AND i.tenant_id = b.tenant_id
             AND i.period = b.period AND i.status <> 'draft'"""
    )


register_migration(_migrate)

_COLUMNS = (
    "invoice_id, tenant_id, period, period_start, period_end, tier, currency, status, "
    "subtotal, total, due_date, created_at, finalized_at, stripe_invoice_id, lines, quotas, "
    "computed_from, credit_balance, void_reason, voided_at, voided_by, replaces, replaced_by, "
    "lake_snapshot"
)
_LINES = TypeAdapter(list[InvoiceLine])
_QUOTAS = TypeAdapter(list[QuotaUsage])
_TS = pa.timestamp("us", tz="UTC")
_MONEY = pa.decimal128(38, 2)
_COUNT = pa.decimal128(38, 0)


def to_json_text(data: Any) -> str:
    """Compact JSON with Decimals as fixed-point strings (what the JSON columns hold)."""
    return json.dumps(data, default=json_default, separators=(",", ":"))


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


def _from_row(row: tuple[Any, ...]) -> Invoice:
    (iid, tenant, period, start, end, tier, currency, status, subtotal, total, due, created,
     finalized, stripe_id, lines, quotas, computed, credit, reason, voided, by, replaces,
     replaced_by, lake_snapshot) = row  # fmt: skip
    return Invoice(
        invoice_id=iid,
        tenant_id=tenant,
        period=period,
        period_start=start.astimezone(UTC),
        period_end=end.astimezone(UTC),
        tier=tier,
        currency=currency,
        status=InvoiceStatus(status),
        lines=_LINES.validate_json(lines),
        subtotal=subtotal,
        total=total,
        due_date=due.astimezone(UTC),
        created_at=created.astimezone(UTC),
        finalized_at=_utc(finalized),
        stripe_invoice_id=stripe_id,
        computed_from=json.loads(computed),
        quotas=_QUOTAS.validate_json(quotas),
        credit_balance=credit,
        void_reason=reason,
        voided_at=_utc(voided),
        voided_by=by,
        replaces=replaces,
        replaced_by=replaced_by,
        lake_snapshot=lake_snapshot,
    )


def _select(con: duckdb.DuckDBPyConnection, where: str, params: Sequence[Any]) -> list[Invoice]:
    rows = con.execute(f"SELECT {_COLUMNS} FROM invoices {where}", list(params)).fetchall()
    return [_from_row(r) for r in rows]


# --- the Stripe hook-up -----------------------------------------------------------------


def get_invoice(con: duckdb.DuckDBPyConnection, invoice_id: str) -> Invoice | None:
    found = _select(con, "WHERE invoice_id = ?", [invoice_id])
    return found[0] if found else None


def mark_sent(con: duckdb.DuckDBPyConnection, invoice_id: str, stripe_invoice_id: str) -> None:
    """The invoice is in Stripe: status sent (unless a webhook already moved it on)."""
    con.execute(
        "UPDATE invoices SET stripe_invoice_id = ?, "
        "status = CASE WHEN status = 'finalized' THEN 'sent' ELSE status END "
        "WHERE invoice_id = ? AND status <> 'draft'",
        [stripe_invoice_id, invoice_id],
    )


STRIPE_VOIDER = "stripe"
"""``voided_by`` of an invoice voided in Stripe (an ``invoice.voided`` webhook)."""


def set_status_by_invoice_id(
    con: duckdb.DuckDBPyConnection, invoice_id: str, status: InvoiceStatus
) -> bool:
    """Move an invoice's status (never its lines or amounts); False if there is no such one.

    Void (a webhook: voided in Stripe) records who and when, reverses the invoice's credit
    movements as ``invoices void`` does (unless a later invoice uses credit it carried: Stripe
    voided it anyway, so that is logged and the ledger kept), and frees the period to be
    billed again."""
    if InvoiceStatus(status) is InvoiceStatus.void:
        voided = changed(
            con,
            "UPDATE invoices SET status = 'void', live_key = NULL, "
            "voided_at = coalesce(voided_at, now()), voided_by = coalesce(voided_by, ?), "
            "void_reason = coalesce(void_reason, 'voided in Stripe') "
            "WHERE invoice_id = ? AND status <> 'void'",
            [STRIPE_VOIDER, invoice_id],
        )
        if not voided:
            return get_invoice(con, invoice_id) is not None
        row = con.execute(
            "SELECT voided_at FROM invoices WHERE invoice_id = ?", [invoice_id]
        ).fetchone()
        assert row is not None
        users = credit_store.reverse(con, invoice_id, row[0])
        if users:
            log.warning(
                "invoice %s was voided in Stripe, but %s use credit it carried: its credit "
                "movements are kept; void those too to take that credit back",
                invoice_id,
                ", ".join(uid for uid, _ in users),
            )
        return True
    sql = "UPDATE invoices SET status = ? WHERE invoice_id = ?"
    return changed(con, sql, [InvoiceStatus(status).value, invoice_id]) > 0


def finalized_unsent(con: duckdb.DuckDBPyConnection) -> list[Invoice]:
    """Finalized invoices not yet in Stripe, oldest period first (what ``bill --stripe`` pushes)."""
    return _select(
        con,
        "WHERE status = 'finalized' AND stripe_invoice_id IS NULL ORDER BY period, tenant_id",
        [],
    )


def void_invoices(con: duckdb.DuckDBPyConnection) -> list[Invoice]:
    """Every void invoice, oldest void first (``bill --stripe`` resumes voiding them there)."""
    return _select(con, "WHERE status = 'void' ORDER BY voided_at, invoice_id", [])


# --- reading ----------------------------------------------------------------------------


# Of a period's invoices, the one that stands for it: the live one, else the void one not
# replaced yet (there is at most one), else the latest void one.
_STANDING_FIRST = "(status = 'void'), (replaced_by IS NOT NULL), created_at DESC, invoice_id"


def list_invoices(con: duckdb.DuckDBPyConnection, tenant_id: str) -> list[Invoice]:
    """Every invoice of a tenant (void ones too), oldest period first; within a period in
    the order they were made (a void invoice before its replacement)."""
    return _select(con, "WHERE tenant_id = ? ORDER BY period, created_at, invoice_id", [tenant_id])


def invoice_for(con: duckdb.DuckDBPyConnection, tenant_id: str, period: str) -> Invoice | None:
    """The period's invoice that is not void, else its latest void one."""
    found = _select(
        con,
        f"WHERE tenant_id = ? AND period = ? ORDER BY {_STANDING_FIRST} LIMIT 1",
        [tenant_id, period],
    )
    return found[0] if found else None


@dataclass(frozen=True)
class InvoiceKey:
    """Just enough of an existing invoice to plan the next run."""

    invoice_id: str
    status: InvoiceStatus
    created_at: datetime

    @property
    def is_draft(self) -> bool:
        return self.status is InvoiceStatus.draft

    @property
    def to_bill(self) -> bool:
        """A draft, or void (the period's invoices are all void): ``bill`` finalizes it."""
        return self.status in (InvoiceStatus.draft, InvoiceStatus.void)


def invoice_index(
    con: duckdb.DuckDBPyConnection, tenant_id: str | None = None
) -> dict[tuple[str, str], InvoiceKey]:
    """(tenant_id, period) -> its invoice (the live one, else the latest void one), for every
    invoiced period (or one tenant's). A period whose only invoices are void is in it with
    the latest: billing it again makes one that replaces that one."""
    where, params = ("WHERE tenant_id = ?", [tenant_id]) if tenant_id else ("", [])
    rows = con.execute(
        f"SELECT tenant_id, period, invoice_id, status, created_at FROM invoices {where} "
        f"QUALIFY row_number() OVER (PARTITION BY tenant_id, period "
        f"ORDER BY {_STANDING_FIRST}) = 1",
        params,
    ).fetchall()
    return {
        (t, p): InvoiceKey(iid, InvoiceStatus(s), created.astimezone(UTC))
        for t, p, iid, s, created in rows
    }


def unreplaced_voids(con: duckdb.DuckDBPyConnection, tenant_id: str | None = None) -> set[str]:
    """The ids of void invoices nothing replaces yet (their periods are billed again next)."""
    where, params = ("AND tenant_id = ?", [tenant_id]) if tenant_id else ("", [])
    rows = con.execute(
        f"SELECT invoice_id FROM invoices WHERE status = 'void' AND replaced_by IS NULL {where}",
        params,
    ).fetchall()
    return {iid for (iid,) in rows}


def last_final_period(con: duckdb.DuckDBPyConnection, tenant_id: str) -> str | None:
    row = con.execute(
        "SELECT max(period) FROM invoices WHERE tenant_id = ? AND status <> 'draft'", [tenant_id]
    ).fetchone()
    return None if row is None or row[0] is None else str(row[0])


# --- writing ----------------------------------------------------------------------------


def _invoice_table(invoices: Sequence[Invoice]) -> pa.Table:
    def col(name: str) -> list[Any]:
        return [getattr(inv, name) for inv in invoices]

    return pa.table(
        {
            "invoice_id": pa.array(col("invoice_id"), pa.string()),
            "tenant_id": pa.array(col("tenant_id"), pa.string()),
            "period": pa.array(col("period"), pa.string()),
            "period_start": pa.array(col("period_start"), _TS),
            "period_end": pa.array(col("period_end"), _TS),
            "tier": pa.array(col("tier"), pa.string()),
            "currency": pa.array(col("currency"), pa.string()),
            "status": pa.array([inv.status.value for inv in invoices], pa.string()),
            "subtotal": pa.array(col("subtotal"), _MONEY),
            "total": pa.array(col("total"), _MONEY),
            "due_date": pa.array(col("due_date"), _TS),
            "created_at": pa.array(col("created_at"), _TS),
            "finalized_at": pa.array(col("finalized_at"), _TS),
            "stripe_invoice_id": pa.array(col("stripe_invoice_id"), pa.string()),
            "lines": pa.array([_LINES.dump_json(inv.lines).decode() for inv in invoices]),
            "quotas": pa.array([_QUOTAS.dump_json(inv.quotas).decode() for inv in invoices]),
            "computed_from": pa.array([to_json_text(c) for c in col("computed_from")], pa.string()),
            "credit_balance": pa.array(col("credit_balance"), _MONEY),
            "void_reason": pa.array(col("void_reason"), pa.string()),
            "voided_at": pa.array(col("voided_at"), _TS),
            "voided_by": pa.array(col("voided_by"), pa.string()),
            "replaces": pa.array(col("replaces"), pa.string()),
            "replaced_by": pa.array(col("replaced_by"), pa.string()),
            "lake_snapshot": pa.array(col("lake_snapshot"), pa.int64()),
        }
    )


def write_invoices(con: duckdb.DuckDBPyConnection, invoices: Sequence[Invoice]) -> None:
    """Insert invoices in one statement, replacing drafts with the same invoice_id.

    A finalized invoice is never replaced: writing one again violates the primary key and
    fails (run this inside the caller's transaction, so nothing else is written either)."""
    if not invoices:
        return
    con.register("_new_invoices", _invoice_table(invoices))
    try:
        con.execute(
            "DELETE FROM invoices WHERE status = 'draft' "
            "AND invoice_id IN (SELECT invoice_id FROM _new_invoices)"
        )
        con.execute(
            f"INSERT INTO invoices ({_COLUMNS}, live_key) "
            f"SELECT {_COLUMNS}, {LIVE_KEY_SQL} FROM _new_invoices"
        )
    finally:
        con.unregister("_new_invoices")


def void_invoice(
    con: duckdb.DuckDBPyConnection, invoice_id: str, reason: str, by: str, now: datetime
) -> bool:
    """Mark a finalized (sent, paid) invoice void, keeping everything else; False when it is
    missing, a draft or void already (the caller checked and explains)."""
    sql = (
        "UPDATE invoices SET status = 'void', live_key = NULL, void_reason = ?, voided_by = ?, "
        "voided_at = ? WHERE invoice_id = ? AND status NOT IN ('draft', 'void')"
    )
    return changed(con, sql, [reason, by, now, invoice_id]) > 0


def link_replacement(con: duckdb.DuckDBPyConnection, void_id: str, new_id: str) -> bool:
    """Name ``new_id`` as the replacement of void ``void_id``; False if it has one already."""
    sql = (
        "UPDATE invoices SET replaced_by = ? WHERE invoice_id = ? AND status = 'void' "
        "AND replaced_by IS NULL"
    )
    return changed(con, sql, [new_id, void_id]) > 0


def get_billed(con: duckdb.DuckDBPyConnection, tenant_id: str, period: str) -> Billed | None:
    """What the invoices of ``period`` have charged so far, if any has."""
    cols = ", ".join(COUNTERS)
    row = con.execute(
        f"SELECT tier, invoice_id, prices, {cols} FROM billed_usage "
        "WHERE tenant_id = ? AND period = ?",
        [tenant_id, period],
    ).fetchone()
    if row is None:
        return None
    tier, iid, prices, *counts = row
    return Billed(tenant_id, period, tier, Usage(*(int(c) for c in counts)), iid, prices)


@dataclass(frozen=True)
class Billed:
    """What the invoices of one finalized (tenant, period) have charged so far, and the
    prices they charged it at (``billing.tiers.price_facts`` as JSON; None: never billed)."""

    tenant_id: str
    period: str
    tier: str
    usage: Usage
    invoice_id: str  # the invoice that last charged it ("" if none has)
    prices: str | None


def record_billed(con: duckdb.DuckDBPyConnection, rows: Iterable[Billed], now: datetime) -> None:
    """Upsert billed usage in one statement."""
    items = list(rows)
    if not items:
        return
    data: dict[str, pa.Array] = {
        "tenant_id": pa.array([b.tenant_id for b in items], pa.string()),
        "period": pa.array([b.period for b in items], pa.string()),
        "tier": pa.array([b.tier for b in items], pa.string()),
    }
    for counter in COUNTERS:
        data[counter] = pa.array([Decimal(getattr(b.usage, counter)) for b in items], _COUNT)
    data["invoice_id"] = pa.array([b.invoice_id for b in items], pa.string())
    data["updated_at"] = pa.array([now] * len(items), _TS)
    data["prices"] = pa.array([b.prices for b in items], pa.string())
    con.register("_new_billed", pa.table(data))
    try:
        con.execute("INSERT OR REPLACE INTO billed_usage BY NAME SELECT * FROM _new_billed")
    finally:
        con.unregister("_new_billed")


def changed_since_billed(con: duckdb.DuckDBPyConnection, usage_view: str) -> list[Billed]:
    """Billed (tenant, period)s whose usage in ``usage_view`` (a table or view registered on
    ``con`` with tenant_id, period and the counters) differs from what was billed."""
    differs = " OR ".join(f"u.{c} <> b.{c}" for c in COUNTERS)
    billed_cols = ", ".join(f"b.{c}" for c in COUNTERS)
    rows = con.execute(
        f"SELECT b.tenant_id, b.period, b.tier, b.invoice_id, b.prices, {billed_cols} "
        f"FROM billed_usage b JOIN {usage_view} u USING (tenant_id, period) "
        f"WHERE {differs} ORDER BY b.tenant_id, b.period"
    ).fetchall()
    return [
        Billed(t, p, tier, Usage(*counts), iid, prices) for t, p, tier, iid, prices, *counts in rows
    ]


def never_billed_before(
    con: duckdb.DuckDBPyConnection, usage_view: str, starts: str
) -> list[tuple[str, str]]:
    """(tenant_id, period)s of ``usage_view`` before the tenant's first billed period
    (``starts``: a table of tenant_id, first_period) that no invoice has charged yet."""
    rows = con.execute(
        f"""SELECT u.tenant_id, u.period FROM {usage_view} u
            JOIN {starts} s ON s.tenant_id = u.tenant_id AND u.period < s.first_period
            ANTI JOIN billed_usage b ON b.tenant_id = u.tenant_id AND b.period = u.period
            ORDER BY u.tenant_id, u.period"""
    ).fetchall()
    return [(t, p) for t, p in rows]
