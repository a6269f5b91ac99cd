"""Cluster mode's ledgers outlive a PostgreSQL restart (a real server of their own, stopped
and started again on its port): a commit cut off waits for the catalog (the watch says
so: ``pf_catalog_connected`` 0, then 1), and a COMMIT whose outcome the client could not
know is settled by reading the partition's offsets row back, both ways: not stored, it is
committed again; stored, it is counted once. Totals match the batches exactly."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

import duckdb
import pytest

from aggregator.lake import CatalogWatch, open_lake
from aggregator.lake_ledger import LakeLedgerSet, LakePartitionLedger
from common.settings import Settings, load_settings
from common.stopping import StopRequested
from tests.support.lake_reads import TOPIC, batch, events, totals
from tests.support.postgres import create_database, local_postgres, running_postgres
from tests.support.waiting import free_port, wait_for


@dataclass
class Server:
    port: int
    settings: Settings
    states: list[int] = field(default_factory=list)  # what the watch's gauge was given

    def stop(self) -> None:
        assert local_postgres("stop", self.port).returncode == 0

    def start(self) -> None:
        assert local_postgres("start", self.port).returncode == 0

    def restart_once_waiting(self) -> threading.Thread:
        """Start the server again (in a thread) once the watch says it is waiting."""

        def run() -> None:
            wait_for(lambda: self.states[-1:] == [0], "the worker to wait for the catalog")
            self.start()

        thread = threading.Thread(target=run)
        thread.start()
        return thread


@pytest.fixture
def server(data_env: dict[str, str], tmp_path: Path) -> Iterator[Server]:
    port = free_port()
    with running_postgres(port) as uri:
        settings = load_settings(
            metering_catalog=create_database(uri), metering_lake_path=str(tmp_path / "lake")
        )
        yield Server(port, settings)


class CutInCommit:
    """A real lake connection that, once ``armed``, stops the server at one chosen instant of
    the next COMMIT: just before it (the COMMIT then fails: nothing stored) or just after it
    (stored, but the client is told the connection was lost: the reply that never came)."""

    def __init__(self, con: duckdb.DuckDBPyConnection, server: Server, after: bool) -> None:
        self._con, self._server, self._after = con, server, after
        self.armed = self.cut = False

    def execute(self, query: str, *args: Any) -> Any:
        if query != "COMMIT" or self.cut or not self.armed:
            return self._con.execute(query, *args)
        self.cut = True
        if not self._after:
            self._server.stop()
            return self._con.execute(query, *args)
        self._con.execute(query, *args)
        self._server.stop()
        raise duckdb.IOException("server closed the connection unexpectedly (no reply)")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._con, name)


def cut_set(server: Server, after: bool) -> LakeLedgerSet:
    """A ledger set whose first connection cuts a COMMIT once armed (later ones are plain
    connections: what ``recover`` opens)."""
    opened: list[object] = []

    def connect() -> duckdb.DuckDBPyConnection:
        con = open_lake(server.settings)
        if not opened:
            opened.append(con)
            return cast(duckdb.DuckDBPyConnection, CutInCommit(con, server, after))
        return con

    watch = CatalogWatch("test", server.states.append)
    return LakeLedgerSet(connect, TOPIC, owner="w", watch=watch)


@pytest.mark.parametrize("after", [False, True], ids=["cut-before-commit", "cut-after-commit"])
def test_a_commit_cut_off_in_commit_is_resolved_by_the_offsets_row(
    server: Server, after: bool, caplog: pytest.LogCaptureFixture
) -> None:
    ledgers = cut_set(server, after)
    try:
        ledger = ledgers.acquire(0)
        assert isinstance(ledger, LakePartitionLedger)
        cast(CutInCommit, ledgers.con).armed = True
        restart = server.restart_once_waiting()
        result = ledger.commit(batch(0, 0, events(20)))
        restart.join(120)
        assert result.counted == 20 and ledger.next_offset == 20
        assert server.states[0] == 1 and server.states[-1] == 1 and 0 in server.states
        assert ledgers.watch.outages == 1
        said = "stored: counted once" if after else "not stored: committing again"
        assert f"the lake says it was {said}" in caplog.text
        ledger.commit(batch(0, 20, events(5, start=20)))  # goes on, on the new connection
    finally:
        ledgers.close(None)
    assert sum(t[0] for t in totals(server.settings).values()) == 25


def test_a_claim_and_reads_wait_while_the_catalog_is_down(server: Server) -> None:
    """Stopped between commits: acquiring a partition waits, then claims it."""
    watch = CatalogWatch("test", server.states.append)
    ledgers = LakeLedgerSet(partial(open_lake, server.settings), TOPIC, owner="w", watch=watch)
    try:
        first = ledgers.acquire(0)
        first.commit(batch(0, 0, events(10)))
        server.stop()
        restart = server.restart_once_waiting()
        second = ledgers.acquire(1)  # created and claimed once the server is back
        restart.join(120)
        assert isinstance(second, LakePartitionLedger) and second.epoch == 1
        assert first.open_dead_letters() == {}
        first.commit(batch(0, 10, events(10, start=10)))
    finally:
        ledgers.close(None)
    assert sum(t[0] for t in totals(server.settings).values()) == 20


def test_the_watch_says_it_once_a_minute_and_a_stop_ends_the_wait(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    states: list[int] = []
    stop = threading.Event()
    watch = CatalogWatch("postgresql://u@h:5432/db", states.append, stop, clock=lambda: now[0])
    for _ in range(4):  # at 100, 125, 150, 175 s: said at 100 and 175
        watch.lost("Connection refused")
        now[0] += 25
    assert caplog.text.count("cannot reach the catalog (METERING_CATALOG postgresql://") == 2
    assert states == [1, 0] and watch.outages == 1 and not watch.connected
    watch.reached()
    assert states == [1, 0, 1] and "answers again after 100 s; resuming" in caplog.text
    watch.lost("again")
    stop.set()
    with pytest.raises(StopRequested, match="waiting for the catalog"):
        watch.pause()
    assert watch.outages == 2
