"""The broker stopped and restarted mid-run: workers survive, nothing is lost or doubled.

The test starts a broker of its own with ``deploy/local-kafka`` on a dedicated port (state in
``.cache/kafka-PORT``), so the broker the rest of the suite shares is never touched. Two
independent pipelines read the same topic through the outage: a long-running worker and a
``--drain`` worker (own data folder, own group), while a producer keeps sending through it
(its idempotent retries land after the restart). ``make test`` restarts the broker once;
``PF_SOAK=1`` (``make soak``) sends more and restarts it three times.

Every wait is on a state the workers report (a commit, "cannot reach the Kafka broker",
``pf_broker_connected`` on /metrics), never on how fast a busy machine gets there: the drain
worker cannot end while the broker is away, since it asks the broker for the ends first.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.broker import create_topic, local_kafka
from emitter import Emitter
from tests.support.log_lines import COMMITTED, UNREACHABLE
from tests.support.waiting import free_port, wait_for
from tests.support.worker_harness import (
    drain,
    expected_totals,
    ledger_totals,
    produce,
    random_events,
    read_while_running,
    start_worker,
    with_duplicates,
)

PORT = int(os.environ.get("PF_FAULT_KAFKA_PORT", "29192"))
SOAK = os.environ.get("PF_SOAK") == "1"
EVENTS = 100_000 if SOAK else 30_000
RESTARTS = 3 if SOAK else 1
RUN_ENV = {"METERING_BATCH_SIZE": "500", "METERING_SNAPSHOT_SECONDS": "0.5", "LOG_LEVEL": "DEBUG"}
# An outage may last as long as a busy machine needs to restart the broker: the producer and
# the draining worker wait up to 10 minutes (their defaults, 120 s, are a race with the CPU).
OUTAGE_LIMIT_MS = 600_000
DRAIN_ENV = {"METERING_DRAIN_TIMEOUT": str(OUTAGE_LIMIT_MS // 1000)}


@pytest.fixture(scope="module")
def own_broker() -> Iterator[str]:
    """A broker of this module's own, stopped at the end."""
    address = local_kafka("start", PORT)
    try:
        yield address
    finally:
        local_kafka("stop", PORT)


@pytest.fixture
def broker_env(
    own_broker: str, data_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    values = {"KAFKA_BOOTSTRAP_SERVERS": own_broker, "METERING_TOPIC": create_topic(own_broker)}
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    return {**data_env, **values}


def broker_connected(port: int) -> float | None:
    """``pf_broker_connected`` as the worker serves it (None: not answering yet)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("pf_broker_connected "):
            return float(line.split()[1])
    return None


def committed_batches(log: Path) -> int:
    return log.read_text().count(COMMITTED)


def more_batches(log: Path) -> Callable[[], bool]:
    """True once the worker has committed more batches than it has now."""
    now = committed_batches(log)
    return lambda: committed_batches(log) > now


class SlowProducer(threading.Thread):
    """Sends events in chunks with pauses, so sending goes on through a broker outage."""

    def __init__(self, bootstrap: str, topic: str, events: list[dict[str, Any]]) -> None:
        super().__init__(daemon=True)
        self.args = (bootstrap, topic, events)
        self.error: BaseException | None = None

    def run(self) -> None:
        bootstrap, topic, events = self.args
        try:
            # Deliveries wait out the outage however long a busy machine takes to restart
            # the broker (the default 120 s ran out under CPU contention).
            config = {"message.timeout.ms": OUTAGE_LIMIT_MS}
            with Emitter(bootstrap, topic, validate_events=False, config=config) as emitter:
                for i in range(0, len(events), 500):
                    for event in events[i : i + 500]:
                        emitter.emit(event)
                    time.sleep(0.25)
        except BaseException as exc:  # reported by the test thread
            self.error = exc


@pytest.mark.soak
def test_workers_survive_a_broker_restart_mid_run(
    broker_env: dict[str, str], tmp_path: Path
) -> None:
    env = broker_env
    events = with_duplicates(random_events(EVENTS, tenants=40, seed=41), ratio=0.1)
    backlog, live = events[: len(events) * 2 // 3], events[len(events) * 2 // 3 :]
    produce(env["KAFKA_BOOTSTRAP_SERVERS"], env["METERING_TOPIC"], backlog)
    drain_env = {
        **env,
        "METERING_DATA_DIR": str(tmp_path / "drain-data"),
        "METERING_GROUP": env["METERING_GROUP"] + "-drain",
    }
    run_log, drain_log = tmp_path / "run.log", tmp_path / "drain.log"
    metrics_port = free_port()
    runner = start_worker({**env, **RUN_ENV}, "--metrics-port", str(metrics_port), log=run_log)
    drainer = start_worker({**drain_env, **RUN_ENV, **DRAIN_ENV}, "--drain", log=drain_log)
    producer = SlowProducer(env["KAFKA_BOOTSTRAP_SERVERS"], env["METERING_TOPIC"], live)
    try:
        # Hold the drain worker mid-run so that it surely meets the outage with work left
        # (at once: it can drain the whole backlog while the other worker still joins).
        wait_for(lambda: committed_batches(drain_log) > 0, "the drain worker to commit")
        os.kill(drainer.pid, signal.SIGSTOP)
        wait_for(lambda: committed_batches(run_log) > 0, "the worker to commit a batch")
        producer.start()
        for n in range(RESTARTS):
            if n:
                wait_for(more_batches(run_log), "another batch")
            local_kafka("stop", PORT)
            if n == 0:
                os.kill(drainer.pid, signal.SIGCONT)
                wait_for(lambda: UNREACHABLE in drain_log.read_text(), "the drain to wait")
            wait_for(lambda: broker_connected(metrics_port) == 0, "pf_broker_connected 0")
            for proc, log in ((runner, run_log), (drainer, drain_log)):
                assert proc.poll() is None, log.read_text()[-3000:]  # alive, broker down
            local_kafka("start", PORT)
            wait_for(lambda: broker_connected(metrics_port) == 1, "pf_broker_connected 1")
        producer.join(timeout=300)
        assert not producer.is_alive() and producer.error is None, producer.error
        assert drainer.wait(timeout=300) == 0, drain_log.read_text()[-3000:]
        expected = expected_totals(events)
        wait_for(
            lambda: read_while_running(lambda: ledger_totals(env)) == expected,
            "the worker to count every event",
        )
        assert runner.poll() is None, run_log.read_text()[-3000:]  # survived every restart
    finally:
        for proc in (runner, drainer):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    assert runner.returncode == 0, run_log.read_text()[-3000:]
    for log in (run_log, drain_log):
        assert "Traceback" not in log.read_text()
    drain(env)  # nothing left over, nothing counted again
    assert ledger_totals(env) == expected
    drain(drain_env)  # what the producer sent after the drain worker's end
    assert ledger_totals(drain_env) == expected


def test_a_drain_gives_up_after_metering_drain_timeout(
    broker_env: dict[str, str], tmp_path: Path
) -> None:
    """The broker goes away under a draining worker and does not come back: after
    METERING_DRAIN_TIMEOUT it stops, exit 1, one error line naming the setting."""
    env = broker_env
    produce(env["KAFKA_BOOTSTRAP_SERVERS"], env["METERING_TOPIC"], random_events(20_000, seed=5))
    log = tmp_path / "drain.log"
    drainer = start_worker({**env, **RUN_ENV, "METERING_DRAIN_TIMEOUT": "5"}, "--drain", log=log)
    try:
        wait_for(lambda: committed_batches(log) > 0, "the drain worker to commit")
        os.kill(drainer.pid, signal.SIGSTOP)  # so that it surely meets the outage
        local_kafka("stop", PORT)
        os.kill(drainer.pid, signal.SIGCONT)
        assert drainer.wait(timeout=300) == 1, log.read_text()[-3000:]
    finally:
        if drainer.poll() is None:
            os.kill(drainer.pid, signal.SIGCONT)
            drainer.kill()
            drainer.wait()
        local_kafka("start", PORT)
    lines = [line for line in log.read_text().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, log.read_text()[-3000:]
    assert "gave up draining: cannot reach the Kafka broker at" in lines[0]
    assert "(KAFKA_BOOTSTRAP_SERVERS)" in lines[0] and "METERING_DRAIN_TIMEOUT=5" in lines[0]
    assert "Traceback" not in log.read_text()
