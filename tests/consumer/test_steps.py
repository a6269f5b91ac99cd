"""``consumer.steps``: each step on its own, with a recording step after it, on real
DuckDB ledgers."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest

from aggregator.ledger import CommitResult, LedgerSet
from consumer.metrics import WorkerMetrics
from consumer.steps import Accumulate, Acknowledge, CommitToLedger, Decode
from consumer.types import END_OF_POLL, Batch, Head, Polled, WorkerStats
from schemas.codec import default_codec
from schemas.prepare import prepare_batch
from schemas.record_batch import RecordBatch
from tests.support.events import make_event


class Recorder:
    """The next step: keeps what it was given."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    def submit(self, item: Any) -> None:
        self.items.append(item)


def records(offsets: range, values: list[bytes | None] | None = None) -> RecordBatch:
    n = len(offsets)
    return RecordBatch(list(offsets), [None] * n, values or [b"v"] * n)


def test_accumulate_drops_redelivered_records_and_partitions_not_held() -> None:
    heads = {0: Head(5), 1: Head(None)}
    after = Recorder()
    step = Accumulate(heads, batch_size=1000, next_step=after)
    step.submit({0: records(range(0, 8)), 1: records(range(0, 3)), 2: records(range(0, 4))})
    assert after.items == []  # nothing handed over below the batch size
    step.hand_over()
    *batches, end = after.items
    assert end is END_OF_POLL
    assert [(b.partition, b.first_offset, b.next_offset) for b in batches] == [(0, 5, 8), (1, 0, 3)]
    assert batches[0].payload.records.offsets == [5, 6, 7]
    assert batches[0].payload.head is heads[0]
    assert heads[0].next_offset == 8 and heads[1].next_offset == 3  # advanced on collecting
    assert [b.committable for b in batches] == [{0: 8}, {1: 3}]


def test_accumulate_hands_a_full_partition_over_at_once_in_one_batch() -> None:
    heads = {0: Head(None), 1: Head(None)}
    after = Recorder()
    step = Accumulate(heads, batch_size=10, next_step=after)
    step.submit({0: records(range(0, 6)), 1: records(range(0, 2))})
    step.submit({0: records(range(6, 12))})
    assert [type(i).__name__ for i in after.items] == ["Batch", "EndOfPoll"]
    assert (after.items[0].partition, after.items[0].first_offset) == (0, 0)
    assert after.items[0].next_offset == 12 and len(after.items[0].payload.records) == 12
    step.hand_over([0])  # nothing waits of partition 0: nothing to hand over, no marker
    assert len(after.items) == 2
    step.hand_over()
    assert after.items[2].partition == 1 and after.items[3] is END_OF_POLL


def test_accumulate_forgets_a_partition_revoked_while_its_records_waited() -> None:
    heads = {0: Head(None)}
    after = Recorder()
    step = Accumulate(heads, batch_size=100, next_step=after)
    step.submit({0: records(range(0, 3))})
    del heads[0]
    step.hand_over()
    assert after.items == []


def test_accumulate_drops_what_waited_of_a_lost_partition() -> None:
    """A lost assignment: what was polled of it and not handed over is never handed over
    (the new owner redoes it); the other partitions' records still go."""
    heads = {0: Head(None), 1: Head(None)}
    after = Recorder()
    step = Accumulate(heads, batch_size=100, next_step=after)
    step.submit({0: records(range(0, 3)), 1: records(range(0, 2))})
    step.drop([0])
    step.hand_over()
    assert [i.partition for i in after.items if isinstance(i, Batch)] == [1]


def test_acknowledge_commits_the_newest_offset_of_each_partition_on_poll() -> None:
    commits: list[dict[int, int]] = []
    step = Acknowledge(lambda offsets: commits.append(dict(offsets)))
    step.poll()
    assert commits == []  # nothing acknowledged: no commit
    result = CommitResult(1, 0, 0)
    for partition, first, end in ((0, 0, 5), (1, 0, 3), (0, 5, 9)):
        step.submit(Batch(partition, first, end, result))
    step.submit(END_OF_POLL)
    assert commits == []  # only the main thread's poll commits
    step.poll()
    step.poll()
    assert commits == [{0: 9, 1: 3}]


@pytest.fixture
def ledgers(tmp_path: Path) -> Any:
    held = LedgerSet(tmp_path / "ledger", "t", lock_timeout=5)
    yield held
    held.close(None)


def test_decode_then_commit_to_ledger_carry_the_batch_to_its_ledger(
    ledgers: LedgerSet, caplog: pytest.LogCaptureFixture
) -> None:
    codec = default_codec()
    event = make_event("acme")
    values: list[bytes | None] = [codec.encode(event), codec.encode(event), b"not avro"]
    ledger = ledgers.acquire(0)
    stats, metrics, after = WorkerStats(), WorkerMetrics(), Recorder()
    commit = CommitToLedger(ledgers, stats, metrics, next_step=after)
    now = int(time.time() * 1_000_000)
    decode = Decode(lambda p, recs, at: prepare_batch(p, recs, codec, at, None), next_step=commit)
    head = Head(10)
    with caplog.at_level(logging.DEBUG, logger="consumer.worker"):
        # counted, duplicate, dead
        decode.submit(Batch(0, 10, 13, Polled(records(range(10, 13), values), head, now)))
        decode.submit(END_OF_POLL)
    committed, end = after.items
    assert end is END_OF_POLL
    assert (committed.partition, committed.first_offset, committed.next_offset) == (0, 10, 13)
    assert committed.payload == CommitResult(counted=1, duplicates=1, dead=1)
    assert committed.committable == {0: 13}
    assert ledger.next_offset == 13
    assert (stats.consumed, stats.counted, stats.duplicates, stats.dead) == (3, 1, 1, 1)
    assert metrics.registry.get_sample_value("pf_events_counted_total") == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "consumer.worker"]
    assert lines == [
        "committing p0 [10, 13)",
        "committed p0 [10, 13): 1 counted, 1 duplicates, 1 dead",
        "batch done",
    ]
