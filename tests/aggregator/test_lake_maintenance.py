"""Lake maintenance against a real PostgreSQL catalog: small files merged, old snapshots
expired (kept ones and time travel to them survive), unneeded files deleted, totals identical
before and after; a writer committing the whole time has no commit refused; one maintainer
at a time."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import psycopg
import pytest

from aggregator.lake import open_lake
from aggregator.lake_maintenance import LOCK_KEY, keep_snapshot, maintain
from common.settings import load_settings
from tests.support import REPO
from tests.support.lake_writer import KEYS, ROWS, create, write


def _totals(con: duckdb.DuckDBPyConnection) -> tuple[int, int]:
    row = con.execute("SELECT count(*), sum(units) FROM lake.events").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def test_maintenance_merges_expires_and_keeps_totals(
    cluster_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METERING_LAKE_RETENTION", "0s")
    monkeypatch.setenv("METERING_LAKE_FILE_GRACE", "0s")
    settings = load_settings()
    con = open_lake(settings)
    create(con)
    assert write(con, 12) == 0
    pinned = con.execute("SELECT id FROM ducklake_current_snapshot('lake')").fetchone()
    assert pinned is not None
    keep_snapshot(con, pinned[0], "an invoice computed here")
    assert write(con, 12) == 0
    before = _totals(con)
    lake = Path(cluster_env["METERING_LAKE_PATH"])
    files_on_disk = len(list(lake.rglob("*.parquet")))

    done = maintain(con, settings, now=datetime.now(UTC))

    assert not done.skipped
    assert done.files_after < done.files_before and done.files_merged >= 24
    assert done.tables_skipped == 2  # aggregates and offsets: updated in place
    assert done.snapshots_expired > 0 and done.snapshots_kept == 1 and done.files_deleted > 0
    assert _totals(con) == before == (24 * ROWS, 24 * ROWS)
    assert con.execute("SELECT units FROM lake.offsets WHERE slot = 0").fetchone() == (24 * ROWS,)
    at_pin = con.execute(f"SELECT count(*) FROM lake.events AT (VERSION => {pinned[0]})")
    assert at_pin.fetchone() == (12 * ROWS,)  # time travel to a kept snapshot still works
    assert len(list(lake.rglob("*.parquet"))) < files_on_disk
    other_host = open_lake(load_settings(METERING_DATA_DIR=settings.metering_data_dir / "h2"))
    assert _totals(other_host) == before


def test_a_running_writer_is_not_disturbed(
    cluster_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METERING_LAKE_RETENTION", "1s")
    monkeypatch.setenv("METERING_LAKE_FILE_GRACE", "1s")
    settings = load_settings()
    con = open_lake(settings)
    create(con)
    batches = 80
    writer = subprocess.Popen(
        [sys.executable, "-m", "tests.support.lake_writer", str(batches)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    rounds = merged = 0
    while writer.poll() is None or rounds == 0:
        done = maintain(con, settings, now=datetime.now(UTC))
        rounds += 1
        merged += done.files_merged
    out, err = writer.communicate(timeout=300)
    assert writer.returncode == 0, err
    assert "failed commits: 0" in out
    assert merged > 0, "maintenance merged files while the writer ran"
    assert _totals(con) == (batches * ROWS, batches * ROWS)
    aggregates = con.execute("SELECT count(*), sum(units) FROM lake.aggregates").fetchone()
    assert aggregates == (batches * KEYS, batches * KEYS + (batches - 1) * (KEYS // 2))
    assert con.execute("SELECT units FROM lake.offsets WHERE slot = 0").fetchone() == (
        batches * ROWS,
    )


def test_a_second_maintainer_skips(cluster_env: dict[str, str], catalog: str) -> None:
    settings = load_settings()
    con = open_lake(settings)
    with psycopg.connect(catalog, autocommit=True) as other:
        assert other.execute("SELECT pg_try_advisory_lock(%s)", [LOCK_KEY]).fetchone() == (True,)
        assert maintain(con, settings, now=datetime.now(UTC)).skipped
    assert not maintain(con, settings, now=datetime.now(UTC)).skipped
