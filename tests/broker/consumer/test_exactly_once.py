"""Exactly once whatever the producer, the key or the arrival order, against the real broker;
every total reconciled with the independent count (``tests.oracle``)."""

from __future__ import annotations

import json
import random
import signal
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import duckdb
from confluent_kafka import Producer

from aggregator.ledger import ledger_path
from common.settings import load_settings
from emitter import Emitter
from schemas.codec import default_codec
from schemas.partitioning import partition_for
from schemas.periods import Period
from tests.support.cli_runner import run_cli
from tests.support.waiting import free_port, scrape, wait_for
from tests.support.worker_harness import (
    SMALL_BATCHES,
    drain,
    expected_totals,
    kill_randomly,
    ledger_totals,
    produce,
    produce_raw,
    random_events,
    read_topic,
    read_while_running,
    start_worker,
    with_duplicates,
)

PARTITIONS = 6


def ledger_rows(env: dict[str, str], sql: str) -> list[tuple[Any, ...]]:
    """``sql`` over every partition ledger (read-only; no worker may hold them)."""
    settings = load_settings(
        metering_data_dir=env["METERING_DATA_DIR"], metering_topic=env["METERING_TOPIC"]
    )
    rows: list[tuple[Any, ...]] = []
    for path in sorted(
        ledger_path(settings.ledger_dir, settings.metering_topic, 0).parent.glob("p-*.duckdb")
    ):
        con = duckdb.connect(str(path), read_only=True)
        try:
            rows += con.execute(sql).fetchall()
        finally:
            con.close()
    return rows


def wrong_partition(tenant: str) -> int:
    return (partition_for(tenant, PARTITIONS) + 1 + len(tenant) % (PARTITIONS - 1)) % PARTITIONS


def test_every_producer_and_key_counts_each_event_once(env: dict[str, str]) -> None:
    """The same events through a murmur2 producer (the Emitter's default), a
    consistent_random one (librdkafka's default) and with no key, plus events only ever
    sent on a wrong partition: each counted once, at its tenant's partition; what arrived
    elsewhere is forwarded (metric per source partition), a foreign key stays dead."""
    bootstrap, topic = env["KAFKA_BOOTSTRAP_SERVERS"], env["METERING_TOPIC"]
    codec = default_codec()
    events = random_events(900, tenants=14, seed=21)
    produce(bootstrap, topic, events)  # murmur2: the contract
    with Emitter(bootstrap, topic, config={"partitioner": "consistent_random"}) as crc32:
        for e in events:
            crc32.emit(e)
    produce_raw(bootstrap, topic, [(None, codec.encode(e)) for e in events])  # no key
    elsewhere = random_events(300, tenants=14, seed=22)
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for e in elsewhere:
        producer.produce(
            topic,
            codec.encode(e),
            e["tenant_id"].encode(),
            partition=wrong_partition(e["tenant_id"]),
        )
    foreign = random_events(7, tenants=3, seed=23)
    for e in foreign:
        producer.produce(topic, codec.encode(e), b"someone-else")
    assert producer.flush(60) == 0

    # the independent count of what must be forwarded, per source partition
    must_forward: Counter[int] = Counter()
    for partition, records in read_topic(bootstrap, topic).items():
        for rec in records:
            tenant = codec.decode(rec.value)["tenant_id"]
            if rec.key is None or (
                rec.key == tenant.encode() and partition_for(tenant, PARTITIONS) != partition
            ):
                must_forward[partition] += 1
    assert sum(must_forward.values()) >= len(events) + len(elsewhere)

    port = free_port()
    proc = start_worker({**env, **SMALL_BATCHES}, "--metrics-port", str(port))
    try:
        expected = expected_totals(events + elsewhere)
        wait_for(lambda: read_while_running(lambda: ledger_totals(env)) == expected, "totals")
        metrics = scrape(port)
        forwarded = {
            p: metrics.get(f'pf_events_forwarded_total{{partition="{p}"}}', 0.0)
            for p in range(PARTITIONS)
        }
        assert forwarded == {p: float(must_forward[p]) for p in range(PARTITIONS)}
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert ledger_totals(env) == expected
    dead = json.loads(run_cli("dead-letters", "-f", "json", env=env, check=True).stdout)
    assert sorted(d["reason_code"] for d in dead) == ["key_mismatch"] * len(foreign)
    # recorded as forwarded where they landed, never counted there
    rows = ledger_rows(env, "SELECT partition, to_partition, tenant_id FROM forwarded")
    assert Counter(r[0] for r in rows) == must_forward
    assert all(partition_for(tenant, PARTITIONS) == to for _p, to, tenant in rows)
    # every copy that was forwarded arrived at the tenant's partition, keyed by tenant
    copies = [
        rec for partition, records in read_topic(bootstrap, topic).items() for rec in records
        if rec.key is not None and partition_for(rec.key.decode(), PARTITIONS) == partition
    ]  # fmt: skip
    assert len(copies) >= len(events) + sum(must_forward.values())
    # a second worker run changes nothing
    drain(env)
    assert ledger_totals(env) == expected


def month_start(months_ago: int) -> int:
    now = Period.of(datetime.now(UTC))
    index = now.year * 12 + now.month - 1 - months_ago
    return int(Period(index // 12, index % 12 + 1).start.timestamp()) * 1_000_000


def events_between(n: int, start: int, end: int, seed: int, tenants: int = 14) -> list[Any]:
    rng = random.Random(seed)
    out = random_events(n, tenants=tenants, seed=seed)
    for e in out:
        e["occurred_at"] = rng.randrange(start, end)
    return out


def test_months_in_random_order_with_sigkills_count_exactly(env: dict[str, str]) -> None:
    """Three months of events (and some of a period past the late-usage horizon), in random
    order, with SIGKILLs: every event of a billable period counted exactly once whatever
    the order; every event of the closed period dead-lettered as past the horizon."""
    now = int(time.time() * 1_000_000) - 3_600_000_000
    billable = [
        *events_between(4000, month_start(2), month_start(1), seed=31),
        *events_between(4000, month_start(1), month_start(0), seed=32),
        *events_between(3000, month_start(0), max(now, month_start(0) + 1), seed=33),
    ]
    past = events_between(500, month_start(5), month_start(4), seed=34)  # horizon: 3 months
    everything = with_duplicates(billable + past, ratio=0.05, seed=35)
    random.Random(36).shuffle(everything)
    produce(env["KAFKA_BOOTSTRAP_SERVERS"], env["METERING_TOPIC"], everything)
    run_env = {**env, **SMALL_BATCHES, "METERING_LATE_USAGE_MONTHS": "3"}
    assert kill_randomly(run_env, kills=5, seed=37, max_wait=3.0) >= 3
    drain(run_env)
    assert ledger_totals(env) == expected_totals(billable)
    dead = json.loads(run_cli("dead-letters", "-f", "json", env=env, check=True).stdout)
    past_ids = {e["event_id"] for e in past}
    sent_past = sum(e["event_id"] in past_ids for e in everything)
    assert Counter(d["reason_code"] for d in dead) == {"past_late_usage_horizon": sent_past}
    assert all("can no longer be billed" in d["reason"] for d in dead)
