"""The commit step in cluster mode, on a real lake (PostgreSQL catalog): a batch whose commit
is refused by the ownership fence is dropped, not counted nor acknowledged, said once, and
the partition's later batches are dropped too until it is assigned again."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest

from aggregator.lake import open_lake
from aggregator.lake_ledger import LakeLedgerSet
from common.settings import load_settings
from consumer.metrics import WorkerMetrics
from consumer.steps import CommitToLedger
from consumer.types import END_OF_POLL, Batch, Decoded, WorkerStats
from schemas.codec import default_codec
from schemas.prepare import prepare_batch
from schemas.record_batch import RecordBatch
from tests.support.events import make_event

TOPIC = "t"


class Recorder:
    def __init__(self) -> None:
        self.items: list[Any] = []

    def submit(self, item: Any) -> None:
        self.items.append(item)


def decoded(first: int, n: int) -> Batch[Decoded]:
    codec = default_codec()
    values: list[bytes | None] = [codec.encode(make_event("acme")) for _ in range(n)]
    records = RecordBatch(list(range(first, first + n)), [b"acme"] * n, values)
    prepared = prepare_batch(0, records, codec, int(time.time() * 1_000_000), None)
    return Batch(0, first, first + n, Decoded(prepared, 0.0))


@pytest.fixture
def two_owners(cluster_env: dict[str, str]) -> Iterator[tuple[LakeLedgerSet, LakeLedgerSet]]:
    connect = partial(open_lake, load_settings())
    old, new = LakeLedgerSet(connect, TOPIC, "old"), LakeLedgerSet(connect, TOPIC, "new")
    yield old, new
    old.close(None)
    new.close(None)


def test_a_refused_commit_is_dropped_said_once_and_the_partition_left(
    two_owners: tuple[LakeLedgerSet, LakeLedgerSet], caplog: pytest.LogCaptureFixture
) -> None:
    old, new = two_owners
    stats, metrics, after = WorkerStats(), WorkerMetrics(), Recorder()
    step = CommitToLedger(old, stats, metrics, next_step=after)
    old.acquire(0)
    step.submit(decoded(0, 5))
    assert stats.counted == 5 and len(after.items) == 1
    new.acquire(0)  # the group gave the partition to another worker, which claimed it
    with caplog.at_level(logging.DEBUG, logger="consumer.worker"):
        step.submit(decoded(5, 4))
        step.submit(decoded(9, 3))
        step.submit(END_OF_POLL)
    assert stats.counted == 5 and stats.batches == 1  # neither counted
    assert after.items[1:] == [END_OF_POLL]  # nor acknowledged
    assert step.lost == {0}
    sample = metrics.registry.get_sample_value("pf_commits_refused_total", {"partition": "0"})
    assert sample == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith("p0: batch [5, 9) dropped, not counted:")
    assert "no longer ours" in warnings[0]
    assert new.held[0].next_offset == 5  # the new owner resumes after the last commit
