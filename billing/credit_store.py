"""The credit ledger in the billing DuckDB file: one row per movement of a tenant's credit
balance (``billing.credits``), written in the transaction that finalizes the invoice it is
on, so a balance moves exactly once per invoice whatever runs at once or crashes.

``credit_movements``: ``invoice_id`` (the invoice the movement is on), ``source_invoice_id``
(the invoice whose credit lot it creates, itself, or consumes), ``amount`` (+ carried,
- applied), ``reversal`` (true: the row undoes that movement, written when the invoice is
voided). A tenant's balance is the sum of its rows; a lot's remainder the sum of the rows
naming it. PRIMARY KEY (invoice_id, source_invoice_id, reversal) refuses a movement (or its
reversal) written twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal

import duckdb
import pyarrow as pa

from billing.credits import CreditLot, CreditMovement, reversing
from billing.db import column_types, register_migration, register_schema
from billing.model import MONEY_SQL

_DDL = f"""
    CREATE TABLE IF NOT EXISTS credit_movements (
        tenant_id VARCHAR NOT NULL,
        invoice_id VARCHAR NOT NULL,
        source_invoice_id VARCHAR NOT NULL,
        amount {MONEY_SQL} NOT NULL,
        created_at TIMESTAMPTZ NOT NULL,
        reversal BOOLEAN NOT NULL DEFAULT false,
        PRIMARY KEY (invoice_id, source_invoice_id, reversal)
    )
    """
register_schema(_DDL)


def _migrate(con: duckdb.DuckDBPyConnection) -> None:
    """A ledger from before reversals: DuckDB cannot change a primary key, so the table is
    rebuilt with ``reversal`` (false on every row kept)."""
    if "reversal" in column_types(con, "credit_movements"):
        return
    con.execute("ALTER TABLE credit_movements RENAME TO credit_movements_before_reversals")
    con.execute(_DDL)
    con.execute(
        "INSERT INTO credit_movements BY NAME SELECT *, false AS reversal "
        "FROM credit_movements_before_reversals"
    )
    con.execute("DROP TABLE credit_movements_before_reversals")


register_migration(_migrate)


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
            "reversal": pa.array([m.reversal for m in movements], pa.bool_()),
        }
    )
    con.register("_new_movements", table)
    try:
        con.execute("INSERT INTO credit_movements BY NAME SELECT * FROM _new_movements")
    finally:
        con.unregister("_new_movements")


def movements_of(con: duckdb.DuckDBPyConnection, tenant_id: str) -> list[CreditMovement]:
    """Every movement of a tenant's balance, by the period of the invoice it is on, then of
    the invoice whose lot it moves (a reversal after what it reverses)."""
    return _movements(con, "m.tenant_id = ?", tenant_id)


def movements_on(con: duckdb.DuckDBPyConnection, invoice_id: str) -> list[CreditMovement]:
    """The movements on ``invoice_id`` (reversals too)."""
    return _movements(con, "m.invoice_id = ?", invoice_id)


def _movements(con: duckdb.DuckDBPyConnection, where: str, value: str) -> list[CreditMovement]:
    rows = con.execute(
        f"""SELECT m.tenant_id, m.invoice_id, m.source_invoice_id, m.amount, m.reversal
           FROM credit_movements m
           JOIN invoices i ON i.invoice_id = m.invoice_id
           JOIN invoices s ON s.invoice_id = m.source_invoice_id
           WHERE {where} ORDER BY i.period, s.period, m.invoice_id, m.reversal""",
        [value],
    ).fetchall()
    return [CreditMovement(t, iid, src, Decimal(amt), rev) for t, iid, src, amt, rev in rows]


def lot_users(con: duckdb.DuckDBPyConnection, source_invoice_id: str) -> list[tuple[str, str]]:
    """The invoices other than ``source_invoice_id`` that still use its credit lot (a net
    movement on it; a void one's is reversed): (invoice_id, period), oldest period first."""
    rows = con.execute(
        """SELECT m.invoice_id, i.period FROM credit_movements m
           JOIN invoices i ON i.invoice_id = m.invoice_id
           WHERE m.source_invoice_id = ? AND m.invoice_id <> m.source_invoice_id
           GROUP BY m.invoice_id, i.period HAVING sum(m.amount) <> 0
           ORDER BY i.period, m.invoice_id""",
        [source_invoice_id],
    ).fetchall()
    return [(iid, period) for iid, period in rows]


def reverse(
    con: duckdb.DuckDBPyConnection, invoice_id: str, now: datetime
) -> list[tuple[str, str]]:
    """Reverse the movements on ``invoice_id``, being voided (inside the caller's
    transaction), so the balance is as if it never existed; unless a later invoice still
    uses credit it carried: then nothing is written and those invoices are returned."""
    users = lot_users(con, invoice_id)
    if not users:
        record_movements(con, reversing(movements_on(con, invoice_id)), now)
    return users
