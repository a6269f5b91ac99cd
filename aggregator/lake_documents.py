"""Cluster mode's shared documents (``common.documents``) in the lake: the published schema
versions and the replay requests with their outcomes, seen by every host.

One table, ``lake.main.pf_documents`` (area, name, body, written_at), and one lock row per
area in ``lake.main.pf_document_locks``. DuckLake has no UNIQUE constraint and lets two
transactions append to one table side by side, so every write first updates its area's
lock row: of two writers, DuckLake refuses the second COMMIT (that row changed since its
snapshot), and the write is run again from its start, re-reading whether the name exists.
So ``create`` is taken once per name, whichever host asks. Each instance has its own
connection (the worker's ledger connection is its committer's), used under a lock.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import duckdb

from aggregator.lake import LAKE, catalog_lost, discard
from aggregator.lake_ledger import CONFLICT_ATTEMPTS, CONFLICT_PAUSE_SECONDS, is_conflict
from common.errors import CatalogError

T = TypeVar("T")
_TABLE = f"{LAKE}.main.pf_documents"
_LOCKS = f"{LAKE}.main.pf_document_locks"
_DDL = [
    f"""CREATE TABLE IF NOT EXISTS {_TABLE} (area VARCHAR NOT NULL, name VARCHAR NOT NULL,
        body VARCHAR NOT NULL, written_at TIMESTAMPTZ NOT NULL)""",
    f"CREATE TABLE IF NOT EXISTS {_LOCKS} (area VARCHAR NOT NULL, writes BIGINT NOT NULL)",
]


class LakeDocuments:
    """The documents of ``area`` (``schemas``, ``replay``) in the lake on ``con``."""

    def __init__(
        self,
        con: duckdb.DuckDBPyConnection,
        area: str,
        reconnect: Callable[[], duckdb.DuckDBPyConnection] | None = None,
    ) -> None:
        self.con = con
        self.area = area
        self.reconnect = reconnect  # a new connection after a catalog outage (else: the same)
        self._lock = threading.Lock()
        self._run(self._create_tables)

    def _create_tables(self) -> None:
        for ddl in _DDL:
            self.con.execute(ddl)
        row = self.con.execute(
            f"SELECT count(*) FROM {_LOCKS} WHERE area = ?", [self.area]
        ).fetchone()
        if not row or not row[0]:
            self.con.execute(f"INSERT INTO {_LOCKS} VALUES (?, 0)", [self.area])

    def _run(self, body: Callable[[], T]) -> T:
        """``body`` in one transaction, run again from its start while DuckLake refuses the
        commit as conflicting."""
        with self._lock:
            for attempt in range(CONFLICT_ATTEMPTS):
                try:
                    self.con.execute("BEGIN TRANSACTION")
                    out = body()
                    self.con.execute("COMMIT")
                    return out
                except duckdb.Error as exc:
                    with contextlib.suppress(duckdb.Error):
                        self.con.execute("ROLLBACK")
                    if self.reconnect is not None and catalog_lost(exc):
                        self._replace()  # this call fails; the next one may find the catalog
                    if not is_conflict(exc) or attempt == CONFLICT_ATTEMPTS - 1:
                        raise CatalogError(
                            f"cannot use the lake's {self.area} documents: "
                            f"{str(exc).splitlines()[0]}"
                        ) from exc
                time.sleep(CONFLICT_PAUSE_SECONDS * (attempt + 1))
        raise AssertionError("unreachable")

    def _replace(self) -> None:
        """A new connection for the next call (the lost one may have had its database
        invalidated by DuckDB: ``discard``); while the catalog is away, none yet."""
        assert self.reconnect is not None
        try:
            con = self.reconnect()
        except (CatalogError, duckdb.Error):
            return
        discard(self.con)
        self.con = con

    def _exists(self, name: str) -> bool:
        row = self.con.execute(
            f"SELECT count(*) FROM {_TABLE} WHERE area = ? AND name = ?", [self.area, name]
        ).fetchone()
        return bool(row and row[0])

    def _take_lock(self) -> None:
        self.con.execute(f"UPDATE {_LOCKS} SET writes = writes + 1 WHERE area = ?", [self.area])

    def names(self, pattern: str) -> list[str]:
        def list_names() -> list[str]:
            rows = self.con.execute(
                f"SELECT DISTINCT name FROM {_TABLE} WHERE area = ? AND name GLOB ? "
                "AND length(name) - length(replace(name, '/', '')) = ? ORDER BY name",
                [self.area, pattern, pattern.count("/")],
            ).fetchall()
            return [r[0] for r in rows]

        return self._reading(list_names, [])

    def read(self, name: str) -> str | None:
        def read_body() -> str | None:
            row = self.con.execute(
                f"SELECT body FROM {_TABLE} WHERE area = ? AND name = ? "
                "ORDER BY written_at DESC LIMIT 1",
                [self.area, name],
            ).fetchone()
            return str(row[0]) if row else None

        return self._reading(read_body, None)

    def _reading(self, body: Callable[[], T], unreachable: T) -> T:
        """A read; while the catalog cannot be reached, ``unreachable`` (a worker goes on
        with what it knows and looks again on its next check)."""
        try:
            return self._run(body)
        except CatalogError:
            return unreachable

    def create(self, name: str, text: str) -> bool:
        def create_once() -> bool:
            self._take_lock()
            if self._exists(name):
                return False
            self._insert(name, text)
            return True

        return self._run(create_once)

    def put(self, name: str, text: str) -> None:
        def put_once() -> None:
            self._take_lock()
            self.con.execute(f"DELETE FROM {_TABLE} WHERE area = ? AND name = ?", [self.area, name])
            self._insert(name, text)

        self._run(put_once)

    def _insert(self, name: str, text: str) -> None:
        self.con.execute(f"INSERT INTO {_TABLE} VALUES (?, ?, ?, now())", [self.area, name, text])


__all__ = ["LakeDocuments"]
