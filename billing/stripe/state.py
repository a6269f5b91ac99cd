"""What we know about Stripe, kept in the billing DuckDB file: customers, pushes, webhook events.

Each row is written right after the Stripe call that produced it, on a short-lived connection,
so a rerun knows which calls it can skip. The tables are a cache of Stripe's state plus a replay
guard for webhooks: losing them costs extra look-ups on the next push, never a duplicate.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import duckdb

from billing.db import Connect, changed, column_types, register_migration, register_schema

__all__ = ["Connect"]  # (defined with the billing file, used here by every caller)

register_schema(
    """
    CREATE TABLE IF NOT EXISTS stripe_customers (
        tenant_id VARCHAR PRIMARY KEY,
        customer_id VARCHAR NOT NULL,
        recorded_at TIMESTAMPTZ NOT NULL
    )
    """
)
register_schema(
    """
    CREATE TABLE IF NOT EXISTS stripe_pushes (
        invoice_id VARCHAR PRIMARY KEY,
        stripe_invoice_id VARCHAR NOT NULL,
        customer_id VARCHAR NOT NULL,
        finalized_at TIMESTAMPTZ,
        stripe_total_cents BIGINT,
        updated_at TIMESTAMPTZ NOT NULL,
        void_action VARCHAR,
        credit_note_id VARCHAR,
        void_done_at TIMESTAMPTZ
    )
    """
)
_VOID_COLUMNS = {
    "void_action": "VARCHAR",
    "credit_note_id": "VARCHAR",
    "void_done_at": "TIMESTAMPTZ",
}


def _add_void_columns(con: duckdb.DuckDBPyConnection) -> None:
    """A file from before voids: the push rows gain the void step's columns."""
    present = column_types(con, "stripe_pushes")
    for name, kind in _VOID_COLUMNS.items():
        if name not in present:
            con.execute(f"ALTER TABLE stripe_pushes ADD COLUMN {name} {kind}")


register_migration(_add_void_columns)
register_schema(
    """
    CREATE TABLE IF NOT EXISTS webhook_events (
        event_id VARCHAR PRIMARY KEY,
        type VARCHAR NOT NULL,
        invoice_id VARCHAR,
        outcome VARCHAR NOT NULL,
        received_at TIMESTAMPTZ NOT NULL
    )
    """
)


@dataclass(frozen=True)
class PushState:
    """One local invoice's Stripe invoice, how far the push got, and (once it is void) how
    far voiding it in Stripe got: ``void_action`` is set when that is done."""

    invoice_id: str
    stripe_invoice_id: str
    customer_id: str
    finalized: bool
    stripe_total_cents: int | None
    void_action: str | None = None
    credit_note_id: str | None = None


def _now() -> datetime:
    return datetime.now(UTC)


def get_customer(con: duckdb.DuckDBPyConnection, tenant_id: str) -> str | None:
    row = con.execute(
        "SELECT customer_id FROM stripe_customers WHERE tenant_id = ?", [tenant_id]
    ).fetchone()
    return str(row[0]) if row else None


def put_customer(con: duckdb.DuckDBPyConnection, tenant_id: str, customer_id: str) -> None:
    con.execute(
        "INSERT INTO stripe_customers VALUES (?, ?, ?) "
        "ON CONFLICT (tenant_id) DO UPDATE SET customer_id = excluded.customer_id, "
        "recorded_at = excluded.recorded_at",
        [tenant_id, customer_id, _now()],
    )


def get_push(con: duckdb.DuckDBPyConnection, invoice_id: str) -> PushState | None:
    row = con.execute(
        "SELECT invoice_id, stripe_invoice_id, customer_id, finalized_at IS NOT NULL, "
        "stripe_total_cents, void_action, credit_note_id "
        "FROM stripe_pushes WHERE invoice_id = ?",
        [invoice_id],
    ).fetchone()
    if row is None:
        return None
    return PushState(str(row[0]), str(row[1]), str(row[2]), bool(row[3]), row[4], row[5], row[6])


def put_push(
    con: duckdb.DuckDBPyConnection, invoice_id: str, stripe_invoice_id: str, customer_id: str
) -> None:
    """Record the Stripe invoice of a local invoice (as soon as it exists, still a draft)."""
    con.execute(
        "INSERT INTO stripe_pushes (invoice_id, stripe_invoice_id, customer_id, updated_at) "
        "VALUES (?, ?, ?, ?) "
        "ON CONFLICT (invoice_id) DO UPDATE SET stripe_invoice_id = excluded.stripe_invoice_id, "
        "customer_id = excluded.customer_id, updated_at = excluded.updated_at",
        [invoice_id, stripe_invoice_id, customer_id, _now()],
    )


def mark_finalized(con: duckdb.DuckDBPyConnection, invoice_id: str, total_cents: int) -> None:
    con.execute(
        "UPDATE stripe_pushes SET finalized_at = coalesce(finalized_at, ?), "
        "stripe_total_cents = ?, updated_at = ? WHERE invoice_id = ?",
        [_now(), total_cents, _now(), invoice_id],
    )


def mark_void_done(
    con: duckdb.DuckDBPyConnection, invoice_id: str, action: str, credit_note_id: str | None
) -> None:
    """Voiding the invoice in Stripe is done (``action``: voided, credited or deleted)."""
    con.execute(
        "UPDATE stripe_pushes SET void_action = ?, credit_note_id = ?, void_done_at = ?, "
        "updated_at = ? WHERE invoice_id = ?",
        [action, credit_note_id, _now(), _now(), invoice_id],
    )


def invoice_id_for(con: duckdb.DuckDBPyConnection, stripe_invoice_id: str) -> str | None:
    row = con.execute(
        "SELECT invoice_id FROM stripe_pushes WHERE stripe_invoice_id = ?", [stripe_invoice_id]
    ).fetchone()
    return str(row[0]) if row else None


def record_event(
    con: duckdb.DuckDBPyConnection,
    event_id: str,
    event_type: str,
    invoice_id: str | None,
    outcome: str,
) -> bool:
    """Remember a webhook event; False if it was seen before (a replay)."""
    sql = "INSERT INTO webhook_events VALUES (?, ?, ?, ?, ?) ON CONFLICT (event_id) DO NOTHING"
    return changed(con, sql, [event_id, event_type, invoice_id, outcome, _now()]) > 0


def event_seen(con: duckdb.DuckDBPyConnection, event_id: str) -> bool:
    row = con.execute("SELECT 1 FROM webhook_events WHERE event_id = ?", [event_id]).fetchone()
    return row is not None
