"""A writer on the lake the way a worker writes: ``python -m tests.support.lake_writer N``
commits N batches, each inserting ROWS rows into ``lake.events`` and adding them to a
counter row of ``lake.progress`` in the same transaction; it prints how many commits failed
and exits 1 if any did. Settings come from the environment (``METERING_CATALOG``...)."""

from __future__ import annotations

import sys

import duckdb

from aggregator.lake import open_lake
from common.settings import load_settings

ROWS = 200
SCHEMA = [
    "CREATE TABLE IF NOT EXISTS lake.events (batch INTEGER NOT NULL, units BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS lake.progress (slot INTEGER NOT NULL, units BIGINT NOT NULL)",
]


def create(con: duckdb.DuckDBPyConnection) -> None:
    """The two tables, with 50 counter slots (more than DuckLake inlines: a data file)."""
    for ddl in SCHEMA:
        con.execute(ddl)
    con.execute("INSERT INTO lake.progress SELECT i, 0 FROM range(50) t(i)")


def write(con: duckdb.DuckDBPyConnection, batches: int) -> int:
    """Commit ``batches`` batches; returns how many commits failed."""
    failed = 0
    for batch in range(batches):
        try:
            con.execute("BEGIN")
            con.execute(f"INSERT INTO lake.events SELECT {batch}, 1 FROM range({ROWS})")
            con.execute(f"UPDATE lake.progress SET units = units + {ROWS} WHERE slot = 0")
            con.execute("COMMIT")
        except duckdb.Error as exc:
            failed += 1
            print(f"commit {batch} failed: {exc}", file=sys.stderr, flush=True)
            con.execute("ROLLBACK")
    return failed


if __name__ == "__main__":
    lake = open_lake(load_settings())
    failures = write(lake, int(sys.argv[1]))
    print(f"failed commits: {failures}", flush=True)
    sys.exit(1 if failures else 0)
