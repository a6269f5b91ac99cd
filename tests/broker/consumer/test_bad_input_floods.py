"""Bad input through the real broker: oversized values up to ~0.9 MB amid valid events, and a
flood of invalid events of every class (20k, 100k under soak) ahead of valid ones, which must
all be counted, with the flood visible in the worker's metrics."""

from __future__ import annotations

import math
import os
import random
import signal
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aggregator.views import open_usage
from common.settings import load_settings
from schemas.codec import MAX_VALUE_BYTES, SINGLE_OBJECT_MAGIC, default_codec
from tests.support import worker_harness as harness
from tests.support.events import make_event

SOAK = os.environ.get("PF_SOAK") == "1"
FLOOD = 100_000 if SOAK else 20_000
CODEC = default_codec()
HEADERS = [CODEC.versions[v].header for v in sorted(CODEC.versions)]
HOUR = 3_600_000_000
Raw = tuple[bytes | None, bytes | None]


def test_oversized_values_are_dead_lettered_and_nothing_stalls(env: dict[str, str]) -> None:
    bootstrap, topic = env["KAFKA_BOOTSTRAP_SERVERS"], env["METERING_TOPIC"]
    valid = harness.with_duplicates(harness.random_events(3_000, tenants=12, seed=51), ratio=0.1)
    rnd = random.Random(52)
    sizes = [MAX_VALUE_BYTES + 1, 256 * 1024, 900_000]  # under every broker's 1 MB default
    big: list[Raw] = [(b"tenant_3.x", HEADERS[0] + rnd.randbytes(size - 10)) for size in sizes]
    harness.produce(bootstrap, topic, valid[:1500])
    harness.produce_raw(bootstrap, topic, big)
    harness.produce(bootstrap, topic, valid[1500:])
    harness.drain(env)
    assert harness.ledger_totals(env) == harness.expected_totals(valid)
    letters = dead_letter_counts(env)
    assert letters == {"oversized": len(sizes)}


def flood_of_every_class(n: int, now: int) -> tuple[list[Raw], Counter[str]]:
    """``n`` invalid values cycling through every class Kafka can deliver, each one unique."""
    makers: dict[str, Callable[[int], Raw]] = {
        "not_single_object": lambda i: (b"t1", f"garbage {i}".encode()),
        "unknown_fingerprint": lambda i: (b"t1", SINGLE_OBJECT_MAGIC + i.to_bytes(8, "little")),
        "undecodable_body": lambda i: (b"t2", enc(i, "t2")[:-2]),
        "invalid_event_id": lambda i: (b"t3", enc(i, "t3", event_id="")),
        "invalid_tenant_id": lambda i: (b"bad tenant", enc(i, "bad tenant")),
        "invalid_session_id": lambda i: (b"t4", enc(i, "t4", session_id="")),
        "invalid_source": lambda i: (b"t5", enc(i, "t5", source="")),
        "negative_counter": lambda i: (b"t6", enc(i, "t6", cpu_ms=-i - 1)),
        "invalid_risk_score": lambda i: (b"t7", enc(i, "t7", risk_score=math.nan)),
        "future_timestamp": lambda i: (b"t8", enc(i, "t8", occurred_at=now + 10 * HOUR)),
        "key_mismatch": lambda i: (b"t9", enc(i, "t10")),
    }

    def enc(i: int, tenant: str, **changes: Any) -> bytes:
        return CODEC.encode(make_event(tenant, **{"event_id": f"flood-{i}", **changes}))

    classes = list(makers)
    items = [makers[classes[i % len(classes)]](i) for i in range(n)]
    return items, Counter(classes[i % len(classes)] for i in range(n))


def dead_letter_counts(env: dict[str, str]) -> dict[str, int]:
    cfg = load_settings(
        metering_data_dir=env["METERING_DATA_DIR"], metering_topic=env["METERING_TOPIC"]
    )
    with open_usage(cfg.snapshot_dir, cfg.metering_topic) as reader:
        rows = reader.con.execute(
            "SELECT reason_code, count(*) FROM dead_letters GROUP BY ALL"
        ).fetchall()
    return {str(code): int(n) for code, n in rows}


@pytest.mark.soak
def test_a_flood_of_invalid_events_does_not_stall_the_valid_ones(
    env: dict[str, str], tmp_path: Path
) -> None:
    bootstrap, topic = env["KAFKA_BOOTSTRAP_SERVERS"], env["METERING_TOPIC"]
    flood, classes = flood_of_every_class(FLOOD, int(time.time() * 1_000_000))
    valid = harness.with_duplicates(harness.random_events(2_000, tenants=20, seed=53), ratio=0.1)
    harness.produce_raw(bootstrap, topic, flood)
    harness.produce(bootstrap, topic, valid)  # behind the whole flood
    port = 19600 + os.getpid() % 300
    log = tmp_path / "worker.log"
    worker = harness.start_worker(env, "--metrics-port", str(port), log=log)
    try:
        expected = harness.expected_totals(valid)
        deadline = time.monotonic() + 600
        while (
            harness.read_while_running(lambda: harness.ledger_totals(env)) != expected
            or harness.read_while_running(lambda: dead_letter_counts(env)) != classes
        ):
            assert worker.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the valid events were not all counted"
            time.sleep(0.5)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=120)
    assert worker.returncode == 0, log.read_text()[-3000:]
    text = metrics.decode()
    for code, n in classes.items():  # the flood is visible, reason by reason
        assert f'pf_events_dead_lettered_total{{reason="{code}"}} {float(n)}' in text, code
    assert f"pf_events_counted_total {float(sum(t['events'] for t in expected.values()))}" in text
