"""Lake maintenance while a cluster-mode worker consumes (the real ledger in the DuckLake, on
loopback): maintenance runs round after round, merging the files the worker appends, and the
worker commits every batch (none refused, no error) and ends with exactly the totals of the
independent fold."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pytest

from aggregator.lake import open_lake
from aggregator.lake_ledger import partition_schemas
from aggregator.lake_maintenance import maintain
from common.settings import load_settings
from schemas.codec import COUNTERS
from tests.support import worker_harness as harness

COLUMNS = ["events", "sessions", *COUNTERS]


def _union(con: duckdb.DuckDBPyConnection, topic: str, table: str) -> str | None:
    schemas = partition_schemas(con, topic).values()
    return " UNION ALL ".join(f"SELECT * FROM {s}.{table}" for s in schemas) or None


def _stored(con: duckdb.DuckDBPyConnection, topic: str) -> int:
    union = _union(con, topic, "offsets")
    row = (
        con.execute(f"SELECT sum(coalesce(next_offset, 0)) FROM ({union})").fetchone()
        if union
        else None
    )
    return int(row[0] or 0) if row else 0


def _totals(con: duckdb.DuckDBPyConnection, topic: str) -> dict[tuple[str, str], dict[str, int]]:
    sums = ", ".join(f"sum({c})" for c in COLUMNS)
    rows = con.execute(
        f"SELECT tenant_id, period, {sums} FROM ({_union(con, topic, 'aggregates')}) GROUP BY ALL"
    ).fetchall()
    return {(r[0], r[1]): dict(zip(COLUMNS, map(int, r[2:]), strict=True)) for r in rows}


def test_maintenance_under_a_running_worker_changes_no_total(
    env: dict[str, str],
    cluster_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("METERING_LAKE_RETENTION", "1s")
    monkeypatch.setenv("METERING_LAKE_FILE_GRACE", "1s")
    settings = load_settings()
    run = {**env, **cluster_env, "METERING_BATCH_SIZE": "300", "METERING_LATE_USAGE_MONTHS": "0"}
    log = tmp_path / "worker.log"
    worker = harness.start_worker(run, log=log)
    con = open_lake(settings)
    unique: list[dict[str, Any]] = []
    rounds = merged = 0
    try:
        for chunk in range(4):
            events = harness.random_events(1_500, tenants=12, seed=40 + chunk)
            harness.produce(env["KAFKA_BOOTSTRAP_SERVERS"], env["METERING_TOPIC"], events)
            unique += events
            done = maintain(con, settings, now=datetime.now(UTC))
            rounds, merged = rounds + 1, merged + done.files_merged
        while _stored(con, env["METERING_TOPIC"]) < len(unique):
            assert worker.poll() is None, log.read_text()[-3000:]
            done = maintain(con, settings, now=datetime.now(UTC))
            rounds, merged = rounds + 1, merged + done.files_merged
    finally:
        worker.terminate()
        worker.wait(180)
    text = log.read_text(errors="replace")
    assert worker.returncode == 0, text[-3000:]
    assert "Traceback" not in text and "conflict" not in text.lower(), text[-3000:]
    assert "refused" not in text.lower()
    assert merged > 0, f"{rounds} rounds merged nothing"
    assert _totals(con, env["METERING_TOPIC"]) == harness.expected_totals(unique)
