"""Storage refusing writes: the worker stops without advancing offsets, exits non-zero with a
one-line error and no traceback; once the storage is fixed it resumes and totals are exact.

The refusal is a real one from the kernel, portable and without root: the worker runs with
``RLIMIT_FSIZE`` lowered (and SIGXFSZ ignored), so a write that would grow a file past the
limit is cut short and the next one fails with EFBIG, which is what a full disk does to a
write (ENOSPC) as far as DuckDB can tell. Three places are hit: the write-ahead log of a
batch commit, the checkpoint when the worker stops, and the creation of the ledger itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from schemas.codec import default_codec
from schemas.prepare import Record
from tests.support import worker_harness as harness
from tests.support.cli_runner import BIN, FILE_SIZE_LIMITED, assert_user_error

BATCHES = {"METERING_BATCH_SIZE": "500"}


def consume_with_file_limit(env: dict[str, str], limit: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", FILE_SIZE_LIMITED, str(limit), str(BIN), "consume", "--drain"],
        env={**os.environ, **env, **BATCHES},
        capture_output=True,
        text=True,
        timeout=300,
    )


def kafka_committed(env: dict[str, str], partitions: list[int]) -> dict[int, int]:
    """The group's Kafka-side committed offsets (lag monitoring only)."""
    consumer = Consumer(
        {"bootstrap.servers": env["KAFKA_BOOTSTRAP_SERVERS"], "group.id": env["METERING_GROUP"]}
    )
    try:
        got = consumer.committed(
            [TopicPartition(env["METERING_TOPIC"], p) for p in partitions], timeout=30
        )
    finally:
        consumer.close()
    return {tp.partition: tp.offset for tp in got}


def decoded(records: list[Record]) -> list[dict[str, Any]]:
    codec = default_codec()
    return [codec.decode(r.value) for r in records]


def test_storage_refusing_writes_stops_the_worker_and_loses_nothing(env: dict[str, str]) -> None:
    """One topic, storage refusing writes three ways in a row, then fixed."""
    events = harness.with_duplicates(harness.random_events(10_000, tenants=30, seed=31), ratio=0.1)
    harness.produce(env["KAFKA_BOOTSTRAP_SERVERS"], env["METERING_TOPIC"], events)

    # 1. Not even a ledger file can be created (it is left torn, a byte long).
    failed = consume_with_file_limit(env, 1)
    assert_user_error(failed, "cannot open ledger")
    assert "File too large" in failed.stderr

    # 2. A batch commit: a write-ahead log outgrows the limit after a few batches.
    failed = consume_with_file_limit(env, 60_000)
    assert_user_error(failed, "ledger commit failed for")
    assert "File too large" in failed.stderr
    assert "cut short at creation" in failed.stderr  # the torn files of 1. were set aside
    # The stored offsets say exactly what the stored aggregates hold: per partition, the
    # records below the offset (read back from Kafka and folded here) and nothing else.
    topic = harness.read_topic(env["KAFKA_BOOTSTRAP_SERVERS"], env["METERING_TOPIC"])
    state = harness.ledger_state(env)
    assert set(state) == set(topic)
    for partition, (offset, totals) in state.items():
        produced = decoded(topic[partition][: offset or 0])
        assert totals == harness.expected_totals(produced), partition
    stopped_early = [p for p, (offset, _) in state.items() if (offset or 0) < len(topic[p])]
    assert stopped_early, "the worker should have stopped before the end of the topic"
    # Kafka's committed offsets (monitoring only) never run ahead of the ledger
    for partition, offset in kafka_committed(env, sorted(topic)).items():
        assert offset <= (state[partition][0] or 0), (partition, offset)

    # 3. Every batch fits, the checkpoint when the worker stops does not.
    failed = consume_with_file_limit(env, 250_000)
    assert_user_error(failed, "stopping the worker failed")
    assert "File too large" in failed.stderr

    resumed = harness.drain(env)  # storage fixed: no limit
    assert "Traceback" not in resumed.stderr
    assert harness.ledger_totals(env) == harness.expected_totals(events)
