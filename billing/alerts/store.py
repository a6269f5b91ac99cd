"""Usage alerts in the billing file: per-tenant thresholds, and the outbox that is also the
delivery log.

The outbox is what makes one alert per tenant, period and threshold: a crossing is inserted
with its deterministic event id as the primary key (a second detection, by this watcher after
a restart or by another one, inserts nothing), with the exact body to send. Delivery claims
due rows with a lease (so two watchers never post the same alert at once), posts with the
billing file closed, then records the outcome: ``delivered`` after a 2xx, else the error and
the next attempt's time (exponential backoff). A crash between the 2xx and that record leaves
the row pending and it is posted again, same event id: receivers deduplicate on it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

import duckdb
import pyarrow as pa

from billing.alerts.model import AlertRecord, Crossing, Threshold
from billing.db import changed, register_schema

register_schema(
    """
    CREATE TABLE IF NOT EXISTS tenant_alerts (
        tenant_id VARCHAR NOT NULL,
        threshold VARCHAR NOT NULL,
        set_at TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (tenant_id, threshold)
    )
    """
)
register_schema(
    """
    CREATE TABLE IF NOT EXISTS alert_outbox (
        event_id VARCHAR PRIMARY KEY,
        tenant_id VARCHAR NOT NULL,
        period VARCHAR NOT NULL,
        threshold VARCHAR NOT NULL,
        source VARCHAR NOT NULL,
        observed VARCHAR NOT NULL,
        payload VARCHAR NOT NULL,
        crossed_at TIMESTAMPTZ NOT NULL,
        status VARCHAR NOT NULL,
        attempts INTEGER NOT NULL,
        next_attempt_at TIMESTAMPTZ NOT NULL,
        lease_until TIMESTAMPTZ,
        last_attempt_at TIMESTAMPTZ,
        last_error VARCHAR,
        delivered_at TIMESTAMPTZ
    )
    """
)


# --- thresholds per tenant --------------------------------------------------------------


def tenant_thresholds(
    con: duckdb.DuckDBPyConnection, tenant_id: str | None = None
) -> dict[str, list[Threshold]]:
    """Tenant -> its own thresholds (all tenants, or one), in the order they were set."""
    where, params = ("WHERE tenant_id = ?", [tenant_id]) if tenant_id else ("", [])
    rows = con.execute(
        f"SELECT tenant_id, threshold FROM tenant_alerts {where} ORDER BY set_at, threshold",
        params,
    ).fetchall()
    found: dict[str, list[Threshold]] = {}
    for tid, key in rows:
        found.setdefault(tid, []).append(_parsed(key))
    return found


@lru_cache(maxsize=4096)
def _parsed(key: str) -> Threshold:
    """The threshold ``key`` names (once per key: a watcher pass reads every tenant's)."""
    return Threshold.from_key(key)


def set_threshold(
    con: duckdb.DuckDBPyConnection, tenant_id: str, threshold: Threshold, now: datetime
) -> bool:
    """Add ``threshold`` to ``tenant_id``; False if it was set already (nothing changes)."""
    sql = "INSERT INTO tenant_alerts VALUES (?, ?, ?) ON CONFLICT DO NOTHING"
    return changed(con, sql, [tenant_id, threshold.key, now]) > 0


def remove_threshold(con: duckdb.DuckDBPyConnection, tenant_id: str, threshold: Threshold) -> bool:
    """Remove ``threshold`` from ``tenant_id``; False if it was not set."""
    sql = "DELETE FROM tenant_alerts WHERE tenant_id = ? AND threshold = ?"
    return changed(con, sql, [tenant_id, threshold.key]) > 0


# --- the outbox ---------------------------------------------------------------------------


def record_crossings(
    con: duckdb.DuckDBPyConnection, crossings: Sequence[Crossing], now: datetime
) -> list[str]:
    """Insert the crossings not recorded before (by event id); returns the new event ids."""
    if not crossings:
        return []
    unique = {c.event_id: c for c in crossings}
    rows = pa.table(
        {
            "event_id": list(unique),
            "tenant_id": [c.tenant_id for c in unique.values()],
            "period": [c.period for c in unique.values()],
            "threshold": [c.threshold.key for c in unique.values()],
            "source": [c.source for c in unique.values()],
            "observed": [c.observed_text for c in unique.values()],
            "payload": [json.dumps(c.payload(now), sort_keys=True) for c in unique.values()],
        }
    )
    con.register("_crossings", rows)
    try:  # (the billing database's unit of work is alone: nothing lands in between)
        added = con.execute(
            "SELECT event_id FROM _crossings ANTI JOIN alert_outbox USING (event_id)"
        ).fetchall()
        con.execute(
            """INSERT INTO alert_outbox
               SELECT event_id, tenant_id, period, threshold, source, observed, payload,
                      $now, 'pending', 0, $now, NULL, NULL, NULL, NULL
               FROM _crossings ON CONFLICT DO NOTHING""",
            {"now": now},
        ).fetchall()
    finally:
        con.unregister("_crossings")
    return [row[0] for row in added]


def recorded(con: duckdb.DuckDBPyConnection, periods: Iterable[str]) -> set[str]:
    """Event ids already in the outbox for ``periods``."""
    wanted = sorted(set(periods))
    if not wanted:
        return set()
    rows = con.execute(
        f"SELECT event_id FROM alert_outbox WHERE period IN ({', '.join('?' for _ in wanted)})",
        wanted,
    ).fetchall()
    return {row[0] for row in rows}


@dataclass(frozen=True)
class Claimed:
    """An alert claimed for one delivery attempt (``attempt`` counts from 1)."""

    event_id: str
    payload: bytes
    attempt: int


def claim_due(
    con: duckdb.DuckDBPyConnection,
    now: datetime,
    lease: timedelta,
    limit: int = 100,
    due_by: datetime | None = None,
) -> list[Claimed]:
    """Pending alerts due for an attempt by ``due_by`` (default ``now``) and not leased by
    another watcher, oldest first, leased to this one until ``now + lease`` (their attempt
    counted now: a crash mid-post still counts)."""
    due = con.execute(
        """SELECT event_id, payload, attempts + 1 FROM alert_outbox
           WHERE status = 'pending' AND next_attempt_at <= $due
             AND (lease_until IS NULL OR lease_until <= $now)
           ORDER BY crossed_at, event_id LIMIT $limit""",
        {"now": now, "limit": limit, "due": due_by or now},
    ).fetchall()
    if due:  # (the billing database's unit of work is alone: nothing lands in between)
        con.execute(
            "UPDATE alert_outbox SET lease_until = $until, attempts = attempts + 1, "
            "last_attempt_at = $now WHERE event_id IN (SELECT unnest($ids))",
            {"now": now, "until": now + lease, "ids": [row[0] for row in due]},
        ).fetchall()
    return [Claimed(eid, payload.encode(), attempts) for eid, payload, attempts in due]


def mark_delivered(con: duckdb.DuckDBPyConnection, event_id: str, now: datetime) -> None:
    con.execute(
        "UPDATE alert_outbox SET status = 'delivered', delivered_at = ?, lease_until = NULL, "
        "last_error = NULL WHERE event_id = ?",
        [now, event_id],
    )


def mark_failed(
    con: duckdb.DuckDBPyConnection, event_id: str, error: str, retry_at: datetime
) -> None:
    con.execute(
        "UPDATE alert_outbox SET last_error = ?, next_attempt_at = ?, lease_until = NULL "
        "WHERE event_id = ? AND status = 'pending'",
        [error, retry_at, event_id],
    )


def next_due(con: duckdb.DuckDBPyConnection) -> datetime | None:
    """When the next pending alert is due (None: none pending)."""
    row = con.execute(
        "SELECT min(greatest(next_attempt_at, coalesce(lease_until, next_attempt_at))) "
        "FROM alert_outbox WHERE status = 'pending'"
    ).fetchone()
    return row[0] if row else None


def pending_count(con: duckdb.DuckDBPyConnection) -> int:
    row = con.execute("SELECT count(*) FROM alert_outbox WHERE status = 'pending'").fetchone()
    return int(row[0]) if row else 0


_COLUMNS = (
    "event_id, tenant_id, period, threshold, source, observed, crossed_at, attempts, status, "
    "last_error, last_attempt_at, delivered_at"
)


def list_alerts(
    con: duckdb.DuckDBPyConnection,
    tenant_id: str | None = None,
    periods: Iterable[str] | None = None,
) -> list[AlertRecord]:
    """The delivery log (all, one tenant's, or of some periods), oldest crossing first."""
    where, params = ["true"], []
    if tenant_id is not None:
        where.append("tenant_id = ?")
        params.append(tenant_id)
    if periods is not None:
        wanted = list(periods)
        if not wanted:
            return []
        where.append(f"period IN ({', '.join('?' for _ in wanted)})")
        params.extend(wanted)
    rows = con.execute(
        f"SELECT {_COLUMNS} FROM alert_outbox WHERE {' AND '.join(where)} "
        "ORDER BY crossed_at, tenant_id, period, threshold",
        params,
    ).fetchall()
    return [AlertRecord(*row) for row in rows]


def alerts_table_exists(con: duckdb.DuckDBPyConnection) -> bool:
    found: Any = con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() "
        "AND table_name = 'alert_outbox'"
    ).fetchone()
    return bool(found and found[0])
