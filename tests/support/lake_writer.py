"""A writer on the lake the way a worker writes: ``python -m tests.support.lake_writer N``
commits N batches, each in one transaction inserting ROWS rows into ``lake.events``
(append-only, like dedup ids), inserting KEYS new rows into ``lake.aggregates`` and updating
half of the previous batch's (like the fold's MERGE), and adding ROWS to a counter row of
``lake.offsets``; it prints how many commits failed and exits 1 if any did. Settings come
from the environment (``METERING_CATALOG``...)."""

from __future__ import annotations

import sys

import duckdb

from aggregator.lake import open_lake
from common.settings import load_settings

ROWS = 200
KEYS = 40
SCHEMA = [
    "CREATE TABLE IF NOT EXISTS lake.events (batch INTEGER NOT NULL, units BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS lake.aggregates (batch INTEGER, k INTEGER, units BIGINT)",
    "CREATE TABLE IF NOT EXISTS lake.offsets (slot INTEGER NOT NULL, units BIGINT NOT NULL)",
]


def create(con: duckdb.DuckDBPyConnection) -> None:
    """The tables, with 50 counter slots (more than DuckLake inlines: a data file)."""
    for ddl in SCHEMA:
        con.execute(ddl)
    con.execute("INSERT INTO lake.offsets SELECT i, 0 FROM range(50) t(i)")


def write(con: duckdb.DuckDBPyConnection, batches: int) -> int:
    """Commit ``batches`` batches; returns how many commits failed."""
    failed = 0
    for batch in range(batches):
        try:
            con.execute("BEGIN")
            con.execute(f"INSERT INTO lake.events SELECT {batch}, 1 FROM range({ROWS})")
            con.execute(f"INSERT INTO lake.aggregates SELECT {batch}, k, 1 FROM range({KEYS}) t(k)")
            con.execute(
                f"UPDATE lake.aggregates SET units = units + 1 "
                f"WHERE batch = {batch - 1} AND k < {KEYS // 2}"
            )
            con.execute(f"UPDATE lake.offsets SET units = units + {ROWS} WHERE slot = 0")
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
