"""The worker's assignment, revocation, drain and lag logic, on an in-memory consumer
(``tests.support.memory_consumer``) and real DuckDB ledgers. The same worker against
the real broker, with kills and faults: ``tests/broker/consumer/`` (the fault
suites)."""

from __future__ import annotations

import dataclasses
import gc
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest
from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException

from aggregator.ledger import ledger_path
from aggregator.recovery import empty_file_bytes
from aggregator.views import open_usage
from common.errors import OperationError
from consumer.config import WorkerConfig
from consumer.worker import Worker
from schemas.codec import default_codec
from schemas.partitioning import partition_for
from tests.support.memory_consumer import MemoryBroker, MemoryConsumer
from tests.support.worker_harness import expected_totals, random_events

TOPIC = "pf.usage.test"
COOPERATIVE, EAGER = "cooperative-sticky", "range"


@pytest.fixture(autouse=True)
def _interpreter_tuning_restored() -> Iterator[None]:
    """``Worker.run`` tunes the GC and the GIL switch interval for the process."""
    interval, thresholds = sys.getswitchinterval(), gc.get_threshold()
    yield
    sys.setswitchinterval(interval)
    gc.set_threshold(*thresholds)


@pytest.fixture
def broker() -> MemoryBroker:
    made = MemoryBroker()
    made.create_topic(TOPIC, 3)
    return made


@pytest.fixture
def config(tmp_path: Path) -> WorkerConfig:
    data = tmp_path / "data"
    return WorkerConfig(
        topic=TOPIC,
        group="g",
        kafka={},
        data_dir=data,
        ledger_dir=data / "ledger",
        snapshot_dir=data / "snapshot",
        batch_size=100,
        late_usage_months=0,
        snapshot_seconds=5.0,
        lock_timeout=5.0,
    )


def start(
    broker: MemoryBroker, config: WorkerConfig, **kwargs: Any
) -> tuple[Worker, MemoryConsumer]:
    """A worker on ``broker`` and the in-memory consumer it made."""
    made: list[MemoryConsumer] = []

    def factory(conf: dict[str, Any]) -> MemoryConsumer:
        made.append(broker.consumer(conf))
        return made[-1]

    worker = Worker(config, consumer_factory=factory, **kwargs)
    return worker, made[0]


def events_of(partition: int, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` events of tenants of their own whose partition (by the partition contract,
    in a topic of 3) is ``partition``, so the worker counts them where they are."""
    events = random_events(n, tenants=3, seed=seed)
    names: dict[str, str] = {}
    for event in events:
        tenant = event["tenant_id"]
        if tenant not in names:
            k = 0
            while partition_for(f"p{partition}-{k}-{tenant}", 3) != partition:
                k += 1
            names[tenant] = f"p{partition}-{k}-{tenant}"
        event["tenant_id"] = names[tenant]
    return events


def produce(broker: MemoryBroker, events: list[dict[str, Any]], partition: int) -> None:
    codec = default_codec()
    for event in events:
        broker.produce(TOPIC, partition, event["tenant_id"].encode(), codec.encode(event))


def ledger_offsets(config: WorkerConfig, *only: int) -> dict[int, int | None]:
    """Each partition's (or ``only`` these) stored next offset, read from its file (no
    worker may hold it)."""
    out: dict[int, int | None] = {}
    for path in sorted(ledger_path(config.ledger_dir, TOPIC, 0).parent.glob("p-*.duckdb")):
        if only and int(path.stem.split("-")[1]) not in only:
            continue
        con = duckdb.connect(str(path), read_only=True)
        try:
            row = con.execute("SELECT max(next_offset) FROM offsets").fetchone()
        finally:
            con.close()
        out[int(path.stem.split("-")[1])] = row[0] if row else None
    return out


def usage_totals(config: WorkerConfig) -> dict[tuple[str, str], dict[str, int]]:
    reader = open_usage(config.snapshot_dir, TOPIC)
    try:
        rows = reader.con.execute("SELECT tenant_id, period, events, sessions FROM usage")
        return {(r[0], r[1]): {"events": r[2], "sessions": r[3]} for r in rows.fetchall()}
    finally:
        reader.close()


def expected(events: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, int]]:
    keep = ("events", "sessions")
    return {k: {c: v[c] for c in keep} for k, v in expected_totals(events).items()}


def test_a_drain_folds_every_partition_and_resumes_each_at_its_ledgers_offset(
    broker: MemoryBroker, config: WorkerConfig, caplog: pytest.LogCaptureFixture
) -> None:
    events = [events_of(p, 15, seed=p) for p in range(3)]
    for p in range(3):
        produce(broker, events[p][:10], p)
    worker, consumer = start(broker, config, drain=True)
    with caplog.at_level(logging.INFO, logger="consumer.worker"):
        stats = worker.run()
    assert (stats.consumed, stats.counted, stats.duplicates, stats.dead) == (30, 30, 0, 0)
    assert consumer.assigned_at == [dict.fromkeys(range(3), OFFSET_BEGINNING)]
    assert "assigned [0, 1, 2]" in [r.getMessage() for r in caplog.records]
    assert ledger_offsets(config) == {0: 10, 1: 10, 2: 10}
    assert broker.committed == {(TOPIC, p): 10 for p in range(3)}  # for lag monitoring
    assert (config.data_dir / "query.duckdb").exists()
    assert usage_totals(config) == expected([e for p in range(3) for e in events[p][:10]])

    produce(broker, events[1][10:15], 1)
    produce(broker, events[2][:2], 2)  # the same events again: duplicates
    worker, consumer = start(broker, config, drain=True)
    stats = worker.run()
    assert consumer.assigned_at == [{0: 10, 1: 10, 2: 10}]  # from the ledgers, not Kafka
    assert (stats.consumed, stats.counted, stats.duplicates) == (7, 5, 2)
    assert ledger_offsets(config) == {0: 10, 1: 15, 2: 12}
    assert usage_totals(config) == expected(events[0][:10] + events[1] + events[2][:10])


@pytest.mark.parametrize("strategy", [COOPERATIVE, EAGER])
def test_a_revoked_partition_is_committed_whole_and_released_to_its_new_owner(
    broker: MemoryBroker, config: WorkerConfig, strategy: str
) -> None:
    events = [events_of(p, 20, seed=p) for p in range(3)]
    for p in range(3):
        produce(broker, events[p], p)
    broker.fetch_records = 4  # a partition: polls of 12 records fill no batch of 12
    config = dataclasses.replace(config, batch_size=12)
    worker, consumer = start(broker, config, drain=True, strategy=strategy)
    other = broker.consumer({"partition.assignment.strategy": strategy})
    seen: dict[str, Any] = {}

    def world(call: int) -> None:
        if call == 3:  # 8 records of each partition polled, none handed over yet
            assert worker.stats.consumed == 0
            other.subscribe([TOPIC])  # the group now deals partition 1 to the other member
        elif call == 4:  # partition 1 was revoked inside consume() number 3
            seen["offsets"] = ledger_offsets(config, 1)[1]  # its file is free to open
            seen["other"] = set(other.owned)
            seen["heads"] = sorted(worker.heads)
            registry = worker.metrics.registry
            seen["lag 1"] = registry.get_sample_value("pf_consumer_lag", {"partition": "1"})
            seen["revokes"] = registry.get_sample_value("pf_rebalances_total", {"kind": "revoke"})
            seen["held"] = registry.get_sample_value("pf_partitions_assigned")
        elif call == 5:
            broker.committed[(TOPIC, 1)] = 20  # the other member finished partition 1

    consumer.on_consume = world
    stats = worker.run()
    assert seen["offsets"] == 8  # what was polled of it before the revoke, all of it
    assert seen["other"] == {1} and seen["heads"] == [0, 2] and seen["held"] == 2
    assert seen["lag 1"] is None and seen["revokes"] == 1
    assert (config.snapshot_dir / TOPIC / "p-0001.aggregates.parquet").exists()
    if strategy == EAGER:  # everything revoked, then assigned anew from the ledgers
        assert consumer.assigned_at == [dict.fromkeys(range(3), OFFSET_BEGINNING), {0: 8, 2: 8}]
    else:
        assert consumer.assigned_at == [dict.fromkeys(range(3), OFFSET_BEGINNING)]
    assert stats.consumed == 48
    assert ledger_offsets(config) == {0: 20, 1: 8, 2: 20}
    assert usage_totals(config) == expected(events[0] + events[1][:8] + events[2])


def beside_another_member(
    broker: MemoryBroker, config: WorkerConfig
) -> tuple[Worker, MemoryConsumer, MemoryConsumer]:
    """10 events in each partition; a passive member joins first (partitions 0 and 2),
    then a draining worker (partition 1): (the worker, its consumer, the other member)."""
    for p in range(3):
        produce(broker, events_of(p, 10, seed=p), p)
    other = broker.consumer()
    other.subscribe([TOPIC])
    worker, consumer = start(broker, config, drain=True)
    return worker, consumer, other


def finish(broker: MemoryBroker, member: MemoryConsumer) -> None:
    """The member commits its partitions at their ends."""
    for p in member.owned:
        broker.committed[(TOPIC, p)] = len(broker.topics[TOPIC][p])


def test_drain_waits_for_the_partitions_other_members_hold(
    broker: MemoryBroker, config: WorkerConfig
) -> None:
    worker, consumer, other = beside_another_member(broker, config)
    seen: dict[int, Any] = {}

    def world(call: int) -> None:
        seen[call] = (worker.stats.consumed, set(other.owned))
        if call == 20:
            finish(broker, other)

    consumer.on_consume = world
    stats = worker.run()
    assert seen[3] == (10, {0, 2})  # dealt first: partitions 0 and 2, the worker 1
    assert consumer.calls == 20  # done with its own partition long before, it waited
    assert seen[20][0] == stats.consumed == 10


def test_kafka_offsets_lost_or_never_sent_are_committed_again_so_other_drains_end(
    broker: MemoryBroker, config: WorkerConfig
) -> None:
    """A member's ``--drain`` ends only once Kafka's committed offsets of the partitions
    others hold reach their ends: a lost asynchronous commit, or a partition taken over at
    its end (no record to commit), must not leave them behind for ever."""
    worker, consumer, other = beside_another_member(broker, config)
    consumer.async_commits_lost = 1  # the commit of the worker's batch is refused
    now = [0.0]
    worker.clock = lambda: now[0]
    seen: dict[int, int | None] = {}

    def world(call: int) -> None:
        now[0] += 0.6  # each poll takes 0.6 s of the worker's clock
        seen[call] = broker.committed.get((TOPIC, 1))
        if call == 12:
            finish(broker, other)

    consumer.on_consume = world
    worker.run()
    assert consumer.async_commits_lost == 0  # the batch's offset commit was refused
    assert seen[1] is None
    assert seen[12] == 10  # committed again while idle, long before the worker ends

    # A new worker takes the partition over at its end (Kafka's offset lost meanwhile).
    broker.committed.clear()
    worker, consumer = start(broker, config, drain=True)  # beside the same other member
    worker.clock = lambda: now[0]
    seen.clear()
    consumer.on_consume = world
    worker.run()
    assert seen[12] == ledger_offsets(config, 1)[1] == 10


def test_drain_keeps_waiting_while_the_broker_is_unreachable(
    broker: MemoryBroker, config: WorkerConfig, caplog: pytest.LogCaptureFixture
) -> None:
    worker, consumer, other = beside_another_member(broker, config)

    def world(call: int) -> None:
        if call == 3:
            broker.unreachable = KafkaError(KafkaError._TRANSPORT, "broker down")
        elif call == 10:
            broker.unreachable = None
            finish(broker, other)

    consumer.on_consume = world
    with caplog.at_level(logging.WARNING, logger="consumer.worker"):
        worker.run()
    assert consumer.calls == 10
    warned = [r.getMessage() for r in caplog.records if "end offsets unknown" in r.getMessage()]
    assert warned and all("waiting for the broker" in w for w in warned)


def test_a_fatal_client_error_stops_a_drain_and_keeps_what_was_committed(
    broker: MemoryBroker, config: WorkerConfig
) -> None:
    worker, consumer, _ = beside_another_member(broker, config)

    def world(call: int) -> None:
        if call == 5:
            broker.unreachable = KafkaError(KafkaError._FATAL, "fenced", fatal=True)

    consumer.on_consume = world
    with pytest.raises(KafkaException, match="fenced"):
        worker.run()
    assert consumer.calls == 5 and consumer.closed
    assert ledger_offsets(config) == {1: 10}  # committed before, and the file let go of


def test_lag_and_progress_follow_each_partitions_end(
    broker: MemoryBroker, config: WorkerConfig
) -> None:
    produce(broker, events_of(0, 12, seed=6), 0)
    produce(broker, events_of(1, 8, seed=7), 1)
    broker.fetch_records = 4
    progress: list[tuple[int, int]] = []
    worker, consumer = start(broker, config, progress=lambda c, r: progress.append((c, r)))
    consumer.paused = {2}  # never fetched: its end stays unknown
    seen: dict[int, tuple[dict[str, float | None], tuple[int, int]]] = {}

    def world(call: int) -> None:
        if call == 2:
            consumer.paused.add(0)  # 4 of partition 0's 12 records polled; the rest waits
        elif call in (4, 7):  # (calls 3 and 6 come back empty: the lags were updated)
            lags = {
                p: worker.metrics.registry.get_sample_value("pf_consumer_lag", {"partition": p})
                for p in ("0", "1", "2")
            }
            seen[call] = (lags, progress[-1])
            consumer.paused = set()
        elif call == 8:
            worker.stop_requested.set()

    consumer.on_consume = world
    stats = worker.run()
    # (partition 2: never fetched, its end not known)
    assert seen[4] == ({"0": 8, "1": 0, "2": None}, (12, 8))
    assert seen[7] == ({"0": 0, "1": 0, "2": 0}, (20, 0))
    assert stats.consumed == 20
    after = worker.metrics.registry.get_sample_value("pf_consumer_lag", {"partition": "0"})
    assert after is None  # partitions released when the worker stopped


def test_a_ledger_file_torn_at_creation_is_set_aside_on_assignment(
    broker: MemoryBroker, config: WorkerConfig, caplog: pytest.LogCaptureFixture
) -> None:
    produce(broker, events_of(0, 10, seed=8), 0)
    torn = ledger_path(config.ledger_dir, TOPIC, 0)
    torn.parent.mkdir(parents=True)
    torn.write_bytes(empty_file_bytes()[:1])  # a new file's first byte, as a full disk leaves it
    worker, _ = start(broker, config, drain=True)
    with caplog.at_level(logging.WARNING, logger="consumer.worker"):
        stats = worker.run()
    assert stats.counted == 10 and ledger_offsets(config)[0] == 10
    assert len(list(torn.parent.glob("p-0000.duckdb.torn-*"))) == 1
    assert any("cut short at creation" in r.getMessage() for r in caplog.records)


def test_a_partition_that_cannot_be_assigned_stops_the_worker(
    broker: MemoryBroker, config: WorkerConfig
) -> None:
    ledger_path(config.ledger_dir, TOPIC, 1).mkdir(parents=True)  # not a file DuckDB opens
    worker, consumer = start(broker, config, drain=True)
    with pytest.raises(OperationError, match="cannot open ledger"):
        worker.run()
    assert consumer.closed and worker.fatal is not None


def test_lag_stays_current_while_every_poll_brings_records(
    broker: MemoryBroker, config: WorkerConfig
) -> None:
    """A busy worker (never an empty poll) refreshes pf_consumer_lag every second, not every
    so many batches: the gauge trails the partition by at most the polls of one second."""
    produce(broker, events_of(0, 2_000, seed=9), 0)
    broker.fetch_records = 100
    now = [0.0]
    worker, consumer = start(broker, config, clock=lambda: now[0])
    seen: dict[int, float | None] = {}

    def world(call: int) -> None:
        now[0] += 0.6  # each poll takes 0.6 s of the worker's clock
        seen[call] = worker.metrics.registry.get_sample_value("pf_consumer_lag", {"partition": "0"})
        if call == 12:
            worker.stop_requested.set()

    consumer.on_consume = world
    worker.run()
    # before poll k, k - 1 polls of 100 records were handed over; refreshed within 2 polls
    for call in (6, 9, 12):
        lag = seen[call]
        assert lag is not None and lag <= 2_000 - 100 * (call - 3), seen
