"""Running real worker processes against the real broker, and checking the ledger."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import duckdb

from aggregator.ledger import ledger_path
from aggregator.views import open_usage
from common.errors import OperationError
from common.settings import load_settings
from emitter import Emitter
from schemas.codec import COUNTERS
from schemas.prepare import Record
from tests.support.cli_runner import BIN
from tests.support.oracle import Totals, fold_totals

TotalsByKey = dict[tuple[str, str], dict[str, int]]
T = TypeVar("T")


def produce(
    bootstrap: str, topic: str, events: list[dict[str, Any]], version: int | None = None
) -> None:
    with Emitter(bootstrap, topic, schema_version=version, validate_events=False) as emitter:
        for e in events:
            emitter.emit(e)


def produce_raw(bootstrap: str, topic: str, items: list[tuple[bytes | None, bytes | None]]) -> None:
    with Emitter(bootstrap, topic) as emitter:
        for key, value in items:
            emitter.produce_raw(key, value)


# Small batches and frequent snapshots, so a worker is mid-stream within a second. The clean
# stop these tests end with can outlast the 10 s default bound on a loaded machine; the bound
# itself is tested in tests/broker/consumer/test_shutdown.py.
SMALL_BATCHES = {
    "METERING_BATCH_SIZE": "500",
    "METERING_SNAPSHOT_SECONDS": "0.5",
    "METERING_SHUTDOWN_SECONDS": "120",
}


def random_events(
    n: int, tenants: int = 20, seed: int = 1, period: tuple[int, int] = (2025, 1)
) -> list[dict[str, Any]]:
    """``n`` valid events over ``tenants`` tenants, dated inside ``period``."""
    rng = random.Random(seed)
    start = int(datetime(*period, 1, tzinfo=UTC).timestamp() * 1_000_000)
    out = []
    for _ in range(n):
        tenant = f"tenant_{rng.randrange(tenants)}.x"
        out.append(
            {
                "event_id": str(uuid.UUID(int=rng.getrandbits(128))),
                "tenant_id": tenant,
                "session_id": f"s-{rng.randrange(n // 5 + 1)}",
                "occurred_at": start + rng.randrange(27 * 86_400 * 1_000_000),
                "source": rng.choice(["gateway", "policy-kernel"]),
                **{c: rng.randrange(0, 1000) for c in COUNTERS},
                "risk_score": rng.choice([None, round(rng.random(), 3)]),
            }
        )
    return out


def with_duplicates(
    events: list[dict[str, Any]], ratio: float, seed: int = 2
) -> list[dict[str, Any]]:
    """Interleave re-sends of earlier events (same event produced again)."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for e in events:
        out.append(e)
        if out and rng.random() < ratio:
            out.append(dict(rng.choice(out)))
    return out


def with_corrections(
    events: list[dict[str, Any]], ratio: float, seed: int = 3
) -> list[dict[str, Any]]:
    """Interleave corrections of earlier events' tenants and periods: signed deltas of one
    to three counters, mostly down, large enough that some would go below zero."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for e in events:
        out.append(e)
        if rng.random() < ratio:
            deltas = dict.fromkeys(COUNTERS, 0)
            for name in rng.sample(COUNTERS, rng.randint(1, 3)):
                deltas[name] = rng.randint(-600_000, 500) or -1
            out.append(
                {
                    **e, **deltas, "event_id": str(uuid.UUID(int=rng.getrandbits(128))),
                    "session_id": "correction", "risk_score": None, "kind": "correction",
                    "corrects_event_id": e["event_id"], "reason": "fault-test correction",
                }
            )  # fmt: skip
    return out


def start_worker(env: dict[str, str], *args: str, log: Path | None = None) -> subprocess.Popen[str]:
    """A ``consume`` process; with ``log``, its stdout and stderr go to that file (a pipe
    nobody reads would block a chatty worker)."""
    if log is None:
        return subprocess.Popen(
            [str(BIN), "consume", *args],
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    with log.open("w") as out:
        return subprocess.Popen(
            [str(BIN), "consume", *args],
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )


def wait_for_line(
    log: Path, marker: str, proc: subprocess.Popen[str], count: int = 1, timeout: float = 300
) -> None:
    """Wait until ``log`` holds ``marker`` ``count`` times (a state, not a time); fail if
    ``proc`` exits first or ``timeout`` passes (a bound for a hung worker only)."""
    deadline = time.monotonic() + timeout
    while log.read_text(errors="replace").count(marker) < count:
        assert proc.poll() is None, f"worker exited ({proc.returncode}) before {marker!r}"
        assert time.monotonic() < deadline, f"no {marker!r} in {log} after {timeout} s"
        time.sleep(0.1)


def drain(env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(BIN), "consume", "--drain"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def kill_randomly(env: dict[str, str], kills: int, seed: int = 3, max_wait: float = 4.0) -> int:
    """Start a worker and SIGKILL it at random moments, ``kills`` times; returns kills done."""
    rng = random.Random(seed)
    done = 0
    for _ in range(kills):
        proc = start_worker(env)
        time.sleep(rng.uniform(0.3, max_wait))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            done += 1
        proc.wait()
    return done


def ledger_totals(env: dict[str, str]) -> dict[tuple[str, str], dict[str, int]]:
    settings = load_settings(
        metering_data_dir=env["METERING_DATA_DIR"], metering_topic=env["METERING_TOPIC"]
    )
    reader = open_usage(settings.snapshot_dir, settings.metering_topic)
    cols = ["tenant_id", "period", "events", "sessions", *COUNTERS]
    rows = reader.con.execute(f"SELECT {', '.join(cols)} FROM usage").fetchall()
    reader.close()
    return {(r[0], r[1]): dict(zip(cols[2:], r[2:], strict=True)) for r in rows}


def read_while_running(read: Callable[[], T]) -> T | None:
    """``read()`` of the published snapshot while a worker may be replacing its files; None
    when the read still met a file being replaced (``open_usage`` retries such reads)."""
    try:
        return read()
    except (duckdb.Error, OperationError):
        return None


def expected_totals(events: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, int]]:
    def flat(t: Totals) -> dict[str, int]:
        return {
            "events": t.events,
            "sessions": len(t.sessions),
            **{c: t.counters[c] for c in COUNTERS},
        }

    return {k: flat(v) for k, v in fold_totals(events).items()}


def ledger_state(env: dict[str, str]) -> dict[int, tuple[int | None, TotalsByKey]]:
    """Per partition, straight from the ledger files (no worker may hold them): the stored
    next offset and the aggregates, opened read-only (the write-ahead log is replayed in
    memory, the files stay untouched)."""
    settings = load_settings(
        metering_data_dir=env["METERING_DATA_DIR"], metering_topic=env["METERING_TOPIC"]
    )
    folder = ledger_path(settings.ledger_dir, settings.metering_topic, 0).parent
    cols = ["tenant_id", "period", "events", "sessions", *COUNTERS]
    out: dict[int, tuple[int | None, TotalsByKey]] = {}
    for path in sorted(folder.glob("p-*.duckdb")):
        partition = int(path.stem.split("-")[1])
        con = duckdb.connect(str(path), read_only=True)
        try:
            row = con.execute("SELECT max(next_offset) FROM offsets").fetchone()
            rows = con.execute(f"SELECT {', '.join(cols)} FROM aggregates").fetchall()
        finally:
            con.close()
        totals = {(r[0], r[1]): dict(zip(cols[2:], r[2:], strict=True)) for r in rows}
        out[partition] = (row[0] if row else None, totals)
    return out


def read_topic(bootstrap: str, topic: str, timeout: float = 120) -> dict[int, list[Record]]:
    """Every record of ``topic`` by partition, in offset order, read back independently of
    the worker (a plain consumer, no group membership, no committed offsets)."""
    from confluent_kafka import Consumer, TopicPartition

    conf = {
        "bootstrap.servers": bootstrap,
        "group.id": "pf-read-topic",
        "enable.auto.commit": False,
    }
    consumer = Consumer(conf)
    try:
        meta = consumer.list_topics(topic, timeout=30).topics[topic]
        ends = {}
        for p in meta.partitions:
            ends[p] = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1]
        consumer.assign([TopicPartition(topic, p, 0) for p in ends])
        out: dict[int, list[Record]] = {p: [] for p in ends}
        remaining = sum(ends.values())
        deadline = time.monotonic() + timeout
        while remaining > 0:
            assert time.monotonic() < deadline, f"{remaining} records of {topic} not read back"
            for msg in consumer.consume(10_000, 1.0):
                partition, offset = msg.partition(), msg.offset()
                if msg.error() or partition is None or offset is None:
                    continue
                if offset < ends[partition]:
                    out[partition].append(Record(offset, msg.key(), msg.value()))
                    remaining -= 1
        return out
    finally:
        consumer.close()
