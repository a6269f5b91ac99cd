"""A worker that cannot reach the cluster says so once a minute and on /metrics (issue 17,
point 1), and librdkafka's own repeats are dropped."""

from __future__ import annotations

import logging
import signal
import time
import urllib.request
from pathlib import Path

import pytest
from confluent_kafka import KafkaError
from prometheus_client import CollectorRegistry, Gauge

from common.logs import RepeatFilter
from consumer.connectivity import BrokerWatch
from tests.support.waiting import free_port
from tests.support.worker_harness import start_worker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_one_line_a_minute_while_down(caplog: pytest.LogCaptureFixture) -> None:
    gauge = Gauge("pf_broker_connected", "x", registry=CollectorRegistry())
    clock = Clock()
    watch = BrokerWatch("127.0.0.1:1", gauge, clock)
    assert watch.connected and gauge._value.get() == 1
    down = KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down")
    assert not watch.on_error(KafkaError(KafkaError._MSG_TIMED_OUT, "other"))
    with caplog.at_level(logging.WARNING, logger="consumer.worker"):
        for _ in range(121):  # librdkafka repeats it every few ms
            clock.now += 0.5
            assert watch.on_error(down)
            watch.tick()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 + 1, lines  # at once, then a minute later
    assert lines[0].startswith("cannot reach the Kafka broker at 127.0.0.1:1 (KAFKA_BOOTSTRAP_")
    assert not watch.connected and gauge._value.get() == 0 and watch.down_for() == 60
    watch.reached()
    assert watch.connected and gauge._value.get() == 1 and watch.down_for() == 0


def test_probes_while_down_only() -> None:
    clock = Clock()
    watch = BrokerWatch("b", Gauge("g", "x", registry=CollectorRegistry()), clock)
    assert not watch.probe_due()
    watch.lost("gone")
    assert watch.probe_due() and not watch.probe_due()
    clock.now += 5
    assert watch.probe_due()


def test_repeats_differing_only_in_numbers_are_dropped() -> None:
    rf = RepeatFilter(window=60)

    def record(msg: str, at: float) -> logging.LogRecord:
        r = logging.LogRecord("rdkafka", logging.WARNING, "", 0, msg, None, None)
        r.created = at
        return r

    text = "127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed (after {}ms in state CONNECT)"
    assert rf.filter(record(text.format(0), 0))
    assert not rf.filter(record(text.format(12), 1))
    assert rf.filter(record(text.format(3), 61))


def test_a_worker_without_its_broker_says_so(data_env: dict[str, str], tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "worker.log"
    env = {**data_env, "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    worker = start_worker(env, "--metrics-port", str(port), log=log)
    try:
        deadline = time.monotonic() + 120
        while "pf_broker_connected 0.0" not in metrics(port):
            assert worker.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=120) == 0, log.read_text()
    text = log.read_text()
    said = [line for line in text.splitlines() if "cannot reach the Kafka broker at" in line]
    assert len(said) == 1 and "127.0.0.1:1 (KAFKA_BOOTSTRAP_SERVERS)" in said[0], text
    assert len([line for line in text.splitlines() if "rdkafka" in line]) <= 3, text


def metrics(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return str(r.read().decode())
    except OSError:
        return ""
