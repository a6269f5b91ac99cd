"""File-level recovery of ledger files, before DuckDB opens them."""

from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path

# The logger these lines were always written under (operators know them by it).
log = logging.getLogger("consumer.worker")

# DuckDB writes its main header and two database headers (3 x 4 KiB) when it creates a file.
DUCKDB_HEADER_BYTES = 12_288


def set_aside_torn_ledger(path: Path) -> bool:
    """Move aside a ledger file whose creation the storage cut short; True if it did.

    DuckDB writes a new file's headers before anything else, so a file shorter than them,
    with no write-ahead log beside it, holds no data, yet DuckDB refuses to open it ever
    again ("not a valid DuckDB database file"): a disk that filled up while a partition's
    ledger was created would stop the worker for good. The file is renamed, never deleted,
    and only while no one holds DuckDB's lock on it.
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
        if size >= DUCKDB_HEADER_BYTES or path.with_name(path.name + ".wal").exists():
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
