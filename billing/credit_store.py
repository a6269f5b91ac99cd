"""The credit ledger in the billing DuckDB file: one row per movement of a tenant's credit
balance (``billing.credits``), written in the transaction that finalizes the invoice it is
on, so a balance moves exactly once per invoice whatever runs at once or crashes.

``credit_movements``: ``invoice_id`` (the invoice the movement is on), ``source_invoice_id``
(the invoice whose credit lot it creates, itself, or consumes), ``amount`` (+ carried,
- applied). A tenant's balance is the sum of its rows; a lot's remainder the sum of the rows
naming it. PRIMARY KEY (invoice_id, source_invoice_id) refuses a movement written twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal

import duckdb
import pyarrow as pa

from billing.credits import CreditLot, CreditMovement
from billing.db import register_schema
from billing.model import MONEY_SQL

register_schema(
    f"""
    CREATE TABLE IF NOT EXISTS credit_movements (
        tenant_id VARCHAR NOT NULL,
        invoice_id VARCHAR NOT NULL,
        source_invoice_id VARCHAR NOT NULL,
        amount {MONEY_SQL} NOT NULL,
        created_at TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (invoice_id, source_invoice_id)
    )
    """
)


def credit_lots(
    con: duckdb.DuckDBPyConnection, tenant_id: str | None = None
) -> dict[str, tuple[CreditLot, ...]]:
    """Per tenant, the credit lots with something left, oldest invoice's period first."""
    where, params = ("WHERE m.tenant_id = ?", [tenant_id]) if tenant_id else ("", [])
    rows = con.execute(
        f"""SELECT m.tenant_id, m.source_invoice_id, i.period, sum(m.amount)
            FROM credit_movements m JOIN invoices i ON i.invoice_id = m.source_invoice_id
            {where}
            GROUP BY m.tenant_id, m.source_invoice_id, i.period
            HAVING sum(m.amount) > 0
            ORDER BY m.tenant_id, i.period, m.source_invoice_id""",
        params,
    ).fetchall()
    lots: dict[str, list[CreditLot]] = {}
    for tenant, source, period, remaining in rows:
        lots.setdefault(tenant, []).append(CreditLot(source, period, Decimal(remaining)))
    return {tenant: tuple(found) for tenant, found in lots.items()}


def record_movements(
    con: duckdb.DuckDBPyConnection, movements: Sequence[CreditMovement], now: datetime
) -> None:
    """Insert ``movements`` in one statement (inside the caller's transaction)."""
    if not movements:
        return
    table = pa.table(
        {
            "tenant_id": pa.array([m.tenant_id for m in movements], pa.string()),
            "invoice_id": pa.array([m.invoice_id for m in movements], pa.string()),
            "source_invoice_id": pa.array([m.source_invoice_id for m in movements], pa.string()),
            "amount": pa.array([m.amount for m in movements], pa.decimal128(38, 2)),
            "created_at": pa.array([now] * len(movements), pa.timestamp("us", tz="UTC")),
        }
    )
    con.register("_new_movements", table)
    try:
        con.execute("INSERT INTO credit_movements BY NAME SELECT * FROM _new_movements")
    finally:
        con.unregister("_new_movements")


def movements_of(con: duckdb.DuckDBPyConnection, tenant_id: str) -> list[CreditMovement]:
    """Every movement of a tenant's balance, by the period of the invoice it is on, then of
    the invoice whose lot it moves."""
    rows = con.execute(
        """SELECT m.tenant_id, m.invoice_id, m.source_invoice_id, m.amount
           FROM credit_movements m
           JOIN invoices i ON i.invoice_id = m.invoice_id
           JOIN invoices s ON s.invoice_id = m.source_invoice_id
           WHERE m.tenant_id = ? ORDER BY i.period, s.period""",
        [tenant_id],
    ).fetchall()
    return [CreditMovement(t, iid, src, Decimal(amount)) for t, iid, src, amount in rows]


def moved_by(con: duckdb.DuckDBPyConnection, invoice_id: str) -> bool:
    """Whether ``invoice_id`` carries or applies credit (has a movement on it)."""
    row = con.execute(
        "SELECT 1 FROM credit_movements WHERE invoice_id = ? LIMIT 1", [invoice_id]
    ).fetchone()
    return row is not None
