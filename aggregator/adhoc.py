"""Ad-hoc SQL over a reader's in-memory copy of the views: one query, read-only, bounded.

What may run is decided from DuckDB's own parse of the text (the statement type of the one
statement it holds), never from words in it: ``WHERE tenant_id = 'reset-corp'`` is a query,
``PRAGMA enable_profiling`` is not. Only ``SELECT`` statements run (DuckDB parses ``WITH``,
``FROM``, ``VALUES``, ``DESCRIBE``, ``SHOW``, ``SUMMARIZE`` and pragma functions as such).

Bounds: the query is interrupted after ``seconds`` (a timer thread calls
``interrupt``, fetching included), DuckDB's memory is capped at ``memory`` and what it
spills at ``spill``, in a private folder (mode 0700, removed afterwards) that no query can
read because file access is switched off; at most ``max_rows`` rows come back. Hitting a
bound raises ``UserError`` naming the setting.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from common.errors import OperationError, StorageError, UserError

FETCH_ROWS = 10_000


@dataclass(frozen=True)
class QueryLimits:
    """Bounds of one ad-hoc query; sizes are DuckDB size strings (``1GB``)."""

    seconds: float
    memory: str
    spill: str
    max_rows: int


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_only_statement(con: duckdb.DuckDBPyConnection, query: str) -> duckdb.Statement:
    """The one SELECT statement ``query`` holds, as DuckDB parsed it; else a UserError."""
    try:
        statements = con.extract_statements(query)
    except duckdb.Error as exc:
        raise UserError(f"query failed: {_first_line(exc)}") from exc
    if len(statements) != 1:
        raise UserError(f"sql takes exactly one statement (got {len(statements)})")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise UserError(
            f"sql is read-only: a {kind.name} statement is refused; only queries run "
            "(SELECT, WITH, FROM, VALUES, DESCRIBE, SHOW, SUMMARIZE)"
        )
    return statements[0]


@contextmanager
def spill_folder(data_dir: Path) -> Iterator[Path]:
    """A private folder under ``data_dir`` for one query's spill, removed afterwards."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=".sql-spill-", dir=data_dir))  # mode 0700
    except OSError as exc:
        raise StorageError(
            f"cannot create a spill folder in METERING_DATA_DIR {data_dir}: {exc.strerror}"
        ) from exc
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def lock_down(con: duckdb.DuckDBPyConnection, spill: Path, limits: QueryLimits) -> None:
    """Bound memory and spill, switch file access off, and lock every setting."""
    con.execute("SET memory_limit = ?", [limits.memory])
    con.execute("SET temp_directory = ?", [str(spill)])
    con.execute("SET max_temp_directory_size = ?", [limits.spill])
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def run_query(
    con: duckdb.DuckDBPyConnection, statement: duckdb.Statement, limits: QueryLimits
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Columns and rows of ``statement``, within ``limits`` (``lock_down`` first)."""
    timer = threading.Timer(limits.seconds, con.interrupt)
    timer.daemon = True
    deadline = time.monotonic() + limits.seconds
    timer.start()
    try:
        result = con.execute(statement)
        cols = [d[0] for d in result.description or []]
        rows: list[tuple[Any, ...]] = []
        while chunk := result.fetchmany(FETCH_ROWS):
            rows.extend(chunk)
            if len(rows) > limits.max_rows:
                raise UserError(
                    f"query stopped: more than METERING_SQL_MAX_ROWS ({limits.max_rows:,}) "
                    "rows; aggregate or add a LIMIT"
                )
            if time.monotonic() > deadline:
                raise duckdb.InterruptException("interrupted")
    except duckdb.InterruptException as exc:
        raise UserError(
            f"query stopped: it ran longer than METERING_SQL_TIMEOUT ({limits.seconds:g} s)"
        ) from exc
    except duckdb.OutOfMemoryException as exc:
        raise UserError(
            f"query stopped: it needed more than METERING_SQL_MEMORY_LIMIT ({limits.memory}) "
            f"of memory and METERING_SQL_SPILL_LIMIT ({limits.spill}) of spill space"
        ) from exc
    except duckdb.Error as exc:
        raise UserError(f"query failed: {_first_line(exc)}") from exc
    except MemoryError as exc:
        raise OperationError("query stopped: out of memory while collecting its rows") from exc
    finally:
        timer.cancel()
    return cols, rows
