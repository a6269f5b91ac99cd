"""Read snapshots: what readers see while a worker holds the ledger files.

DuckDB lets one process open a file read-write and nobody else open it at all, so each
worker publishes, per partition, its aggregates and dead letters as Parquet files plus a
manifest, by write-then-rename (readers see the old or the new file, never half of one),
every ``METERING_SNAPSHOT_SECONDS`` and when it releases the partition.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb

from aggregator.files import topic_folder
from common.sqltext import sql_string
from schemas.codec import COUNTERS

log = logging.getLogger(__name__)

TABLES = ("aggregates", "dead_letters", "corrections")
WIDE_COLUMNS = {"aggregates": COUNTERS}
"""Columns written as DECIMAL(38, 0): Parquet has no 128-bit integer (DuckDB would write a
HUGEINT as DOUBLE, exact only to 2**53), and every counter total fits 38 digits."""


def _select(alias: str, table: str) -> str:
    wide = WIDE_COLUMNS.get(table, ())
    if not wide:
        return f"SELECT * FROM {alias}.{table}"
    casts = ", ".join(f"{c}::DECIMAL(38, 0) AS {c}" for c in wide)
    return f"SELECT * REPLACE ({casts}) FROM {alias}.{table}"


def topic_dir(snapshot_dir: Path, topic: str) -> Path:
    return snapshot_dir / topic_folder(topic)


def partition_file(snapshot_dir: Path, topic: str, partition: int, table: str) -> Path:
    return topic_dir(snapshot_dir, topic) / f"p-{partition:04d}.{table}.parquet"


def publish_partition(
    con: duckdb.DuckDBPyConnection,
    alias: str,
    snapshot_dir: Path,
    topic: str,
    partition: int,
    *,
    committed_at: float | None = None,
    log_end: int | None = None,
) -> None:
    """Write this partition's tables and manifest atomically (each file by rename).

    The manifest says how current the files are: ``committed_at`` (wall clock of the newest
    commit they hold; None keeps the previous manifest's) and ``log_end`` (the partition's
    end offset as the writer last saw it, None if not known)."""
    folder = topic_dir(snapshot_dir, topic)
    folder.mkdir(parents=True, exist_ok=True)
    for table in TABLES:
        final = partition_file(snapshot_dir, topic, partition, table)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        con.execute(f"COPY ({_select(alias, table)}) TO {sql_string(tmp)} (FORMAT parquet)")
        os.replace(tmp, final)
    row = con.execute(
        f"SELECT next_offset FROM {alias}.offsets WHERE topic = ? AND partition = ?",
        [topic, partition],
    ).fetchone()
    final = manifest_path(snapshot_dir, topic, partition)
    if committed_at is None:
        try:
            before = read_manifest(final)
        except ValueError:
            before = None
        committed_at = before.committed_at if before is not None else None
    manifest = {
        "topic": topic,
        "partition": partition,
        "next_offset": row[0] if row else 0,
        "published_at": time.time(),
        "committed_at": committed_at,
        "log_end_offset": log_end,
        "writer_pid": os.getpid(),
    }
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, final)


@dataclass(frozen=True)
class Freshness:
    """How current the snapshot a reader sees is: the newest commit it holds, and how many
    records its partitions' writers had not yet committed when they last published."""

    partitions: int
    oldest_published_at: float | None
    newest_published_at: float | None
    newest_committed_at: float | None = None
    behind: int | None = None  # records short of the log end (None: an end not known)
    lake_snapshot: int | None = None  # cluster mode: the DuckLake snapshot read

    def describe(self, now: float | None = None) -> str:
        if self.newest_published_at is None:
            return "no usage data published yet (has a worker run?)"
        now = time.time() if now is None else now
        moment = self.newest_committed_at or self.newest_published_at
        age = max(0.0, now - moment)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))
        if self.behind is None:
            end = "log end not known"
        elif self.behind == 0:
            end = "caught up with the log end"
        else:
            end = f"{self.behind:,} record(s) behind the log end"
        where = "" if self.lake_snapshot is None else f" at lake snapshot {self.lake_snapshot}"
        return (
            f"usage data as of {stamp} ({age:.0f} s old, newest commit; {end}; snapshot of "
            f"{self.partitions} partition(s){where})"
        )


@dataclass(frozen=True)
class Manifest:
    """What a worker said when it last published a partition."""

    topic: str
    partition: int
    next_offset: int
    published_at: float
    committed_at: float | None = None
    log_end_offset: int | None = None


MAX_MANIFEST_BYTES = 64 * 1024


def manifest_path(snapshot_dir: Path, topic: str, partition: int) -> Path:
    return topic_dir(snapshot_dir, topic) / f"p-{partition:04d}.manifest.json"


def read_manifest(path: Path) -> Manifest | None:
    """The manifest at ``path``, None if there is none; ValueError if it is damaged (not
    a JSON object of the fields and types ``publish_partition`` writes, or oversized)."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ValueError(f"manifest {path.name} unreadable: {exc.strerror}") from exc
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ValueError(f"manifest {path.name} is oversized")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"manifest {path.name} is not JSON") from exc
    fields = {"topic": str, "partition": int, "next_offset": int, "published_at": float}
    if not isinstance(doc, dict):
        raise ValueError(f"manifest {path.name} is not a JSON object")
    for name, kind in fields.items():
        value = doc.get(name)
        ok = isinstance(value, int | float) if kind is float else isinstance(value, kind)
        if not ok or isinstance(value, bool):
            raise ValueError(f"manifest {path.name}: {name} missing or not a {kind.__name__}")
    if doc["next_offset"] < 0 or not math.isfinite(doc["published_at"]):
        raise ValueError(f"manifest {path.name}: next_offset or published_at out of range")
    committed, end = doc.get("committed_at"), doc.get("log_end_offset")
    return Manifest(
        doc["topic"],
        doc["partition"],
        doc["next_offset"],
        float(doc["published_at"]),
        _finite(committed),
        end if isinstance(end, int) and not isinstance(end, bool) and end >= 0 else None,
    )


def _finite(value: object) -> float | None:
    """``value`` as a finite float, None if it is not a finite number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def freshness(snapshot_dir: Path, topic: str) -> Freshness:
    """How fresh the snapshot is; a damaged manifest is skipped with a warning."""
    stamps: list[float] = []
    committed: list[float] = []
    behind: int | None = 0
    for path in topic_dir(snapshot_dir, topic).glob("p-*.manifest.json"):
        try:
            manifest = read_manifest(path)
        except ValueError as exc:
            log.warning("snapshot: %s; skipped", exc)
            continue
        if manifest is None:
            continue
        stamps.append(manifest.published_at)
        if manifest.committed_at is not None:
            committed.append(manifest.committed_at)
        if behind is not None and manifest.log_end_offset is not None:
            behind += max(0, manifest.log_end_offset - manifest.next_offset)
        else:
            behind = None
    if not stamps:
        return Freshness(0, None, None)
    newest = max(committed) if committed else None
    return Freshness(len(stamps), min(stamps), max(stamps), newest, behind)


def snapshot_files(snapshot_dir: Path, topic: str, table: str) -> list[Path]:
    return sorted(topic_dir(snapshot_dir, topic).glob(f"p-*.{table}.parquet"))
