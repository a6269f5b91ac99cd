"""Moving an embedded installation's usage into cluster mode's lake, partition by partition.

Each embedded partition ledger (``ledger_path``) is copied into its lake schema in one lake
transaction: its stored offset, the dedup ids (the embedded ``md5_number`` turned into the
lake's UUID of the same MD5), aggregates, sessions, duplicates, dead letters with their
replay states, forwarded records, corrections and replay requests. Cluster workers then
resume each partition exactly where the embedded workers stopped: what they counted is
recognised as counted, what they had not read is read once.

Safe to run again, and after a crash midway: a partition whose lake ledger already stores
the embedded file's offset is skipped (migrated before); one whose lake ledger stores
anything else is refused and left as it is (cluster workers counted there: merging would
double). The transaction is fenced like a worker's commit (``LakePartitionLedger``), so a
cluster worker claiming the partition meanwhile makes it fail rather than interleave. The
embedded files are opened read-only, which DuckDB refuses while an embedded worker holds
them: the embedded workers must be stopped first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb

from aggregator.files import topic_folder
from aggregator.lake_ledger import LakePartitionLedger
from common.errors import UserError
from common.sqltext import sql_string

SOURCE = "embedded_ledger"
"""The alias each embedded ledger file is attached under while it is copied."""
MIGRATION_OWNER = "pf-metering lake migrate"

# The lake's dedup id of an embedded one: md5_number is the MD5's 16 bytes read
# little-endian, the lake's UUID the same bytes in order.
_HEX = "printf('%032x', h)"
_UUID_OF_NUMBER = (
    "concat(" + ", ".join(f"substr({_HEX}, {31 - 2 * i}, 2)" for i in range(16)) + ")::UUID"
)


@dataclass(frozen=True)
class PartitionMigration:
    """What became of one partition: ``migrated``, ``already migrated`` or ``empty``."""

    partition: int
    outcome: str
    next_offset: int | None
    rows: int  # rows copied over every table

    def as_row(self) -> dict[str, object]:
        return {
            "partition": self.partition,
            "outcome": self.outcome,
            "next_offset": self.next_offset,
            "rows": self.rows,
        }


def embedded_ledgers(ledger_dir: Path, topic: str) -> dict[int, Path]:
    """Partition -> embedded ledger file of ``topic`` under ``ledger_dir``."""
    folder = ledger_dir / topic_folder(topic)
    found = {}
    for path in folder.glob("p-*.duckdb"):
        digits = path.stem.removeprefix("p-")
        if digits.isdigit():
            found[int(digits)] = path
    return dict(sorted(found.items()))


def migrate_usage(
    con: duckdb.DuckDBPyConnection, ledger_dir: Path, topic: str
) -> list[PartitionMigration]:
    """Copy every embedded partition ledger of ``topic`` into the lake attached on ``con``."""
    ledgers = embedded_ledgers(ledger_dir, topic)
    if not ledgers:
        raise UserError(
            f"no embedded ledgers of topic {topic} under {ledger_dir} (--from names the "
            "embedded METERING_DATA_DIR; METERING_TOPIC the topic)"
        )
    return [_migrate_partition(con, path, topic, p) for p, path in ledgers.items()]


def _migrate_partition(
    con: duckdb.DuckDBPyConnection, path: Path, topic: str, partition: int
) -> PartitionMigration:
    try:
        con.execute(f"ATTACH {sql_string(str(path))} AS {SOURCE} (READ_ONLY)")
    except duckdb.Error as exc:
        raise UserError(
            f"cannot open the embedded ledger {path}: {str(exc).splitlines()[0]} (stop the "
            "embedded workers first; nothing of this partition was migrated)"
        ) from exc
    try:
        row = con.execute(f"SELECT max(next_offset), max(max_occurred_at) FROM {SOURCE}.offsets")
        source_offset, source_max = row.fetchone() or (None, None)
        ledger = LakePartitionLedger(con, topic, partition, MIGRATION_OWNER)
        stored = ledger.next_offset
        if stored is not None:
            if stored == source_offset:
                return PartitionMigration(partition, "already migrated", stored, 0)
            raise UserError(
                f"partition {partition} of {topic} already holds usage in the lake (offset "
                f"{stored}, the embedded ledger {source_offset}): cluster workers have "
                "counted there, so merging would double; nothing of it was changed"
            )
        if source_offset is None:
            return PartitionMigration(partition, "empty", None, 0)
        copied: list[int] = []
        ledger.import_rows(
            lambda: copied.append(_copy_tables(con, ledger.alias)), source_offset, source_max
        )
        return PartitionMigration(partition, "migrated", source_offset, copied[-1])
    finally:
        con.execute(f"DETACH {SOURCE}")


def _columns(con: duckdb.DuckDBPyConnection, database: str, schema: str, table: str) -> list[str]:
    rows = con.execute(
        "SELECT column_name FROM duckdb_columns() WHERE database_name = ? AND schema_name = ? "
        "AND table_name = ? ORDER BY column_index",
        [database, schema, table],
    ).fetchall()
    return [r[0] for r in rows]


def _copy_tables(con: duckdb.DuckDBPyConnection, alias: str) -> int:
    """Every table of the embedded ledger but ``offsets`` into the lake schema ``alias``,
    the columns both have (a ledger from before a column was added lacks it: the lake's
    default stands); returns the rows copied."""
    database, schema = alias.split(".", 1)
    schema = schema.strip('"')
    total = 0
    tables = con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE database_name = ? AND table_name <> "
        "'offsets' ORDER BY table_name",
        [SOURCE],
    ).fetchall()
    for (table,) in tables:
        target = _columns(con, database, schema, table)
        source = set(_columns(con, SOURCE, "main", table))
        shared = [c for c in target if c in source]
        names = ", ".join(f'"{c}"' for c in shared)
        values = ", ".join(_UUID_OF_NUMBER if c == "h" else f'"{c}"' for c in shared)
        count = con.execute(
            f"INSERT INTO {alias}.{table} ({names}) SELECT {values} FROM {SOURCE}.main.{table}"
        ).fetchone()
        total += int(count[0]) if count else 0
    return total


__all__ = ["PartitionMigration", "embedded_ledgers", "migrate_usage"]
