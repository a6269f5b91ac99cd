"""File-level recovery of ledger files, before DuckDB opens them: telling a ledger whose
creation was cut short from a damaged one.

A disk that fills up while DuckDB creates a partition's ledger leaves a file shorter than
DuckDB's headers, which DuckDB then refuses to open ever again; such a file holds nothing
and may be set aside so the partition starts over. Anything else DuckDB refuses may hold
counted events whose records the topic no longer keeps, so it is never set aside.

The rule: a file is provably created empty only if its bytes are a strict prefix of the
file this DuckDB writes for a new, empty database (DuckDB writes its headers front to back,
and a data-holding file's first database header differs from an empty one's), no
write-ahead log lies beside it, and the partition's published snapshot, if any, says no
record was ever committed (a data-holding file cut back to its first 4 KiB, the main
header every file of a DuckDB version shares, is told apart only by that).
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from functools import cache
from pathlib import Path

import duckdb

from aggregator.snapshot import read_manifest
from common.sqltext import sql_string

# The logger these lines were always written under (operators know them by it).
log = logging.getLogger("consumer.worker")


@cache
def empty_file_bytes() -> bytes:
    """The whole file this DuckDB writes when it creates an empty database (by ATTACH, as
    the ledgers are created)."""
    with tempfile.TemporaryDirectory(prefix="pf-empty-ledger-") as folder:
        path = Path(folder) / "empty.duckdb"
        con = duckdb.connect(":memory:")
        try:
            con.execute(f"ATTACH {sql_string(path)} AS empty")
            con.execute("DETACH empty")
        finally:
            con.close()
        return path.read_bytes()


def provably_created_empty(content: bytes, *, has_wal: bool, published_offset: int | None) -> bool:
    """Whether a ledger file holding ``content`` was cut short while DuckDB created it, so
    it holds no data. ``published_offset``: the next offset its partition's snapshot
    manifest names (None when there is no manifest)."""
    fresh = empty_file_bytes()
    return (
        len(content) < len(fresh)
        and fresh.startswith(content)
        and not has_wal
        and not published_offset
    )


def set_aside_torn_ledger(path: Path, manifest: Path | None = None) -> bool:
    """Move aside a ledger file provably created empty (``provably_created_empty``, with the
    partition's snapshot ``manifest``); True if it did. Any other file is left as it is,
    for DuckDB to refuse. The file is renamed, never deleted, and only while no one holds
    DuckDB's lock on it.
    """
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False  # missing, or unwritable: opening the ledger will say what is wrong
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the lock DuckDB takes
        except OSError:
            return False  # open in another process: not torn, or not ours to judge
        size = os.fstat(fd).st_size
        try:
            published = read_manifest(manifest) if manifest is not None else None
        except ValueError:
            return False  # a damaged manifest proves nothing
        content = os.pread(fd, len(empty_file_bytes()), 0)
        has_wal = path.with_name(path.name + ".wal").exists()
        offset = published.next_offset if published is not None else None
        if not provably_created_empty(content, has_wal=has_wal, published_offset=offset):
            return False
        aside = path.with_name(f"{path.name}.torn-{time.time_ns()}")
        os.replace(path, aside)
    finally:
        os.close(fd)
    log.warning(
        "ledger %s was cut short at creation (%d bytes, no data): moved to %s",
        path,
        size,
        aside.name,
    )
    return True
