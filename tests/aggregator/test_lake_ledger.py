"""Cluster mode's ledgers on a real PostgreSQL catalog: the same fold as embedded mode, one
schema per partition, and the owner epoch that refuses a commit from a worker that lost the
partition, including one whose transaction began before the takeover."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from aggregator.lake import open_lake
from aggregator.lake_ledger import LakeLedgerSet, LakePartitionLedger, open_lake_usage
from aggregator.ledger import LedgerSet, OwnershipLost
from common.settings import Settings, load_settings
from schemas.codec import COUNTERS
from tests.support.lake_reads import TOPIC, batch, events, totals


@pytest.fixture
def cfg(cluster_env: dict[str, str]) -> Settings:
    return load_settings()


@pytest.fixture
def lake_sets(cfg: Settings) -> Iterator[list[LakeLedgerSet]]:
    """Make ``LakeLedgerSet``s (each its own DuckDB instance, as on its own host)."""
    made: list[LakeLedgerSet] = []
    yield made
    for ledgers in made:
        ledgers.close(None)


def new_set(cfg: Settings, made: list[LakeLedgerSet], owner: str) -> LakeLedgerSet:
    ledgers = LakeLedgerSet(partial(open_lake, cfg), TOPIC, owner=owner)
    made.append(ledgers)
    return ledgers


def test_the_lake_folds_exactly_as_the_embedded_ledger(
    cfg: Settings, lake_sets: list[LakeLedgerSet], tmp_path: Path
) -> None:
    sent = events(40)
    batches = [
        batch(0, 0, sent[:25]),
        batch(0, 25, [*sent[20:40], sent[3]]),  # 6 duplicates
    ]
    lake = new_set(cfg, lake_sets, "a").acquire(0)
    embedded_set = LedgerSet(tmp_path / "ledger", TOPIC, lock_timeout=5)
    embedded = embedded_set.acquire(0)
    try:
        results = [(lake.commit(b), embedded.commit(b)) for b in batches]
        for in_lake, in_file in results:
            assert in_lake == in_file
        assert [r[0].counted for r in results] == [25, 15]
        assert lake.next_offset == embedded.next_offset == 46
        cols = f"tenant_id, period, events, sessions, {', '.join(COUNTERS)}"
        order = " ORDER BY tenant_id, period"
        assert (
            lake.con.execute(f"SELECT {cols} FROM {lake.alias}.aggregates{order}").fetchall()
            == embedded.con.execute(f"SELECT {cols} FROM p0.aggregates{order}").fetchall()
        )
        dup = "SELECT count(*) FROM {}.duplicates"
        assert lake.con.execute(dup.format(lake.alias)).fetchone() == (6,)
    finally:
        embedded_set.close(None)
    assert sum(t[0] for t in totals(cfg).values()) == 40


def test_a_new_owner_fences_the_old_one_out(cfg: Settings, lake_sets: list[LakeLedgerSet]) -> None:
    old = new_set(cfg, lake_sets, "old").acquire(2)
    old.commit(batch(2, 0, events(10)))
    new = new_set(cfg, lake_sets, "new").acquire(2)
    assert isinstance(old, LakePartitionLedger) and isinstance(new, LakePartitionLedger)
    assert (old.epoch, new.epoch) == (1, 2)
    assert new.next_offset == 10  # resumes where the old owner's last commit ended

    with pytest.raises(OwnershipLost, match="no longer ours"):
        old.commit(batch(2, 10, events(5, start=10)))
    assert old.next_offset == 10
    new.commit(batch(2, 10, events(5, start=10)))
    assert sum(t[0] for t in totals(cfg).values()) == 15  # the refused batch stored nothing


class PausedLedger(LakePartitionLedger):
    """Stops inside its first commit's transaction, right after its fenced offset update
    succeeded, until ``go`` is set: the worker SIGSTOPped mid-commit."""

    inside = threading.Event()
    go = threading.Event()

    def _store_offset(self, next_offset: int, max_at: int | None) -> None:
        super()._store_offset(next_offset, max_at)
        if not self.inside.is_set():
            self.inside.set()
            assert self.go.wait(120)


def test_a_commit_begun_before_the_takeover_is_refused(
    cfg: Settings, lake_sets: list[LakeLedgerSet]
) -> None:
    old_set = new_set(cfg, lake_sets, "old")
    old = PausedLedger(old_set.con, TOPIC, 1, "old")
    outcome: list[BaseException | None] = []

    def commit() -> None:
        try:
            old.commit(batch(1, 0, events(8)))
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=commit)
    thread.start()
    assert PausedLedger.inside.wait(120)
    # the old owner's transaction holds its updated offset row, uncommitted: take over
    new = new_set(cfg, lake_sets, "new").acquire(1)
    assert new.next_offset is None
    PausedLedger.go.set()
    thread.join(120)
    # DuckLake refused its COMMIT (the claim changed the offsets row since its snapshot);
    # the commit ran again and found the epoch moved
    assert len(outcome) == 1 and isinstance(outcome[0], OwnershipLost)
    assert totals(cfg) == {}
    new.commit(batch(1, 0, events(8)))
    assert sum(t[0] for t in totals(cfg).values()) == 8


def test_owners_of_different_partitions_commit_at_once(
    cfg: Settings, lake_sets: list[LakeLedgerSet]
) -> None:
    ledgers = [new_set(cfg, lake_sets, f"w{p}").acquire(p) for p in range(3)]
    errors: list[BaseException] = []

    def run(p: int) -> None:
        try:
            for i in range(4):
                ledgers[p].commit(batch(p, i * 10, events(10, start=p * 1000 + i * 10)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(p,)) for p in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert errors == []
    assert sum(t[0] for t in totals(cfg).values()) == 120
    reader = open_lake_usage(open_lake(cfg), TOPIC)
    try:
        assert reader.freshness.partitions == 3
        assert reader.lake_snapshot is not None
        assert f"lake snapshot {reader.lake_snapshot}" in reader.freshness.describe()
    finally:
        reader.close()
