"""The arroyo peer's state: the fold in memory, made durable in one DuckDB file.

``write(events)`` folds a batch into the in-memory tenant states, then writes what it
changed (the fresh event ids, the sessions they opened, the touched aggregates) in one
transaction; the caller commits Kafka offsets only after it returns. A restarted process
``load``s the file back, so a batch delivered again (at-least-once) finds its ids seen:
exactly-once effect. If the transaction fails, memory is ahead of the file: the process
must stop (the exception propagates) and restart from the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from bench.peers.fold import (
    AGG,
    Aggregate,
    DictState,
    fold_event,
    new_aggregate,
    seen_key,
    session_key,
)
from schemas.codec import COUNTERS
from schemas.periods import period_of

_COLUMNS = tuple(new_aggregate("", ""))
_DDL = (
    "CREATE TABLE IF NOT EXISTS seen (tenant_id VARCHAR, event_id VARCHAR, "
    "PRIMARY KEY (tenant_id, event_id))",
    "CREATE TABLE IF NOT EXISTS sessions (tenant_id VARCHAR, period VARCHAR, "
    "session_id VARCHAR, PRIMARY KEY (tenant_id, period, session_id))",
    "CREATE TABLE IF NOT EXISTS aggregates (tenant_id VARCHAR, period VARCHAR, "
    f"events BIGINT, sessions BIGINT, {', '.join(f'{c} BIGINT' for c in COUNTERS)}, "
    "risk_score_sum DOUBLE, risk_score_count BIGINT, risk_score_max DOUBLE, "
    "PRIMARY KEY (tenant_id, period))",
)


class DuckSink:
    """Tenant states in memory, their durable copy in the DuckDB file at ``path``."""

    def __init__(self, path: Path) -> None:
        self.con = duckdb.connect(str(path))
        for ddl in _DDL:
            self.con.execute(ddl)
        self.states: dict[str, DictState] = {}
        self.load()

    def _state(self, tenant: str) -> DictState:
        state = self.states.get(tenant)
        if state is None:
            state = self.states[tenant] = DictState()
        return state

    def load(self) -> None:
        """Rebuild the in-memory states from the file."""
        con = self.con
        for tenant, event_id in con.execute("SELECT * FROM seen").fetchall():
            self._state(tenant).set(seen_key(event_id), 1)
        for tenant, period, session in con.execute("SELECT * FROM sessions").fetchall():
            self._state(tenant).set(session_key(period, session), 1)
        cursor = con.execute(f"SELECT {', '.join(_COLUMNS)} FROM aggregates")
        for row in cursor.fetchall():
            agg = dict(zip(_COLUMNS, row, strict=True))
            self._state(agg["tenant_id"]).set(AGG + agg["period"], agg)

    def write(self, events: list[dict[str, Any]]) -> int:
        """Fold ``events`` and commit what changed; returns how many were fresh."""
        touched: dict[tuple[str, str], Aggregate] = {}
        fresh: list[dict[str, Any]] = []
        for event in events:
            agg = fold_event(self._state(event["tenant_id"]), event)
            if agg is not None:
                fresh.append(event)
                touched[agg["tenant_id"], agg["period"]] = agg
        if not fresh:
            return 0
        batch = pa.table(
            {
                "tenant_id": [e["tenant_id"] for e in fresh],
                "event_id": [e["event_id"] for e in fresh],
                "period": [period_of(e["occurred_at"]) for e in fresh],
                "session_id": [e["session_id"] for e in fresh],
            }
        )
        aggs = pa.table({c: [a[c] for a in touched.values()] for c in _COLUMNS})
        con = self.con
        con.register("batch", batch)
        con.register("aggs", aggs)
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute("INSERT INTO seen SELECT tenant_id, event_id FROM batch")
            con.execute(
                "INSERT INTO sessions SELECT DISTINCT tenant_id, period, session_id FROM batch "
                "ON CONFLICT DO NOTHING"
            )
            con.execute(f"INSERT OR REPLACE INTO aggregates SELECT {', '.join(_COLUMNS)} FROM aggs")
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        finally:
            con.unregister("batch")
            con.unregister("aggs")
        return len(fresh)

    def aggregates(self) -> list[Aggregate]:
        return [agg for state in self.states.values() for agg in state.aggregates()]

    def close(self) -> None:
        self.con.close()
