"""Kills, signals and rebalances: totals stay exact against an independent count."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.support.cli_runner import BIN, run_cli
from tests.support.log_lines import ASSIGNED, COMMITTED
from tests.support.worker_harness import (
    SMALL_BATCHES,
    drain,
    expected_totals,
    kill_randomly,
    ledger_totals,
    produce,
    random_events,
    start_worker,
    wait_for_line,
    with_duplicates,
)


def test_sigkill_at_random_points_loses_and_doubles_nothing(env: dict[str, str]) -> None:
    events = with_duplicates(random_events(40_000, tenants=30, seed=11), ratio=0.1)
    produce(env["KAFKA_BOOTSTRAP_SERVERS"], env["METERING_TOPIC"], events)
    run_env = {**env, **SMALL_BATCHES}
    kills = kill_randomly(run_env, kills=6, seed=5, max_wait=3.0)
    assert kills >= 4
    drain(run_env)
    assert ledger_totals(env) == expected_totals(events)


def test_sigterm_stops_cleanly_mid_stream(env: dict[str, str], tmp_path: Path) -> None:
    events = random_events(20_000, seed=12)
    produce(env["KAFKA_BOOTSTRAP_SERVERS"], env["METERING_TOPIC"], events)
    log = tmp_path / "worker.log"
    proc = start_worker({**env, **SMALL_BATCHES, "LOG_LEVEL": "DEBUG"}, log=log)
    wait_for_line(log, COMMITTED, proc)  # mid-stream: at least one batch committed
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    err = log.read_text()
    assert proc.returncode == 0, err
    assert "consumed" in err and "Traceback" not in err
    drain(env)
    assert ledger_totals(env) == expected_totals(events)


def test_two_workers_share_partitions_through_a_rebalance(
    env: dict[str, str], tmp_path: Path
) -> None:
    events = with_duplicates(random_events(30_000, tenants=40, seed=13), ratio=0.05)
    produce(env["KAFKA_BOOTSTRAP_SERVERS"], env["METERING_TOPIC"], events[:15_000])
    run_env = {**env, **SMALL_BATCHES, "LOG_LEVEL": "DEBUG"}
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    first = start_worker(run_env, log=logs[0])
    wait_for_line(logs[0], COMMITTED, first)  # the first worker is mid-stream
    second = start_worker(run_env, log=logs[1])  # joins: partitions move between workers
    wait_for_line(logs[1], ASSIGNED, second)
    produce(env["KAFKA_BOOTSTRAP_SERVERS"], env["METERING_TOPIC"], events[15_000:])
    wait_for_line(logs[1], COMMITTED, second)  # the second worker commits what it took over
    for proc in (first, second):
        proc.send_signal(signal.SIGTERM)
    for proc, log in zip((first, second), logs, strict=True):
        proc.wait(timeout=90)
        assert proc.returncode == 0, log.read_text()
    drain(env)
    assert ledger_totals(env) == expected_totals(events)


def test_eager_rebalancing_strategy_is_exact_too(env: dict[str, str]) -> None:
    events = random_events(10_000, seed=14)
    produce(env["KAFKA_BOOTSTRAP_SERVERS"], env["METERING_TOPIC"], events)
    run_env = {**env, **SMALL_BATCHES}
    procs = [
        subprocess.Popen(
            [str(BIN), "consume", "--drain", "--assignment-strategy", "range"],
            env={**os.environ, **run_env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
    assert ledger_totals(env) == expected_totals(events)


def test_readers_work_while_a_worker_runs(env: dict[str, str]) -> None:
    events = random_events(5_000, seed=15)
    produce(env["KAFKA_BOOTSTRAP_SERVERS"], env["METERING_TOPIC"], events)
    port = 19100 + os.getpid() % 500
    proc = start_worker({**env, **SMALL_BATCHES}, "--metrics-port", str(port))
    try:
        deadline = time.time() + 60
        expected = expected_totals(events)
        while time.time() < deadline and ledger_totals(env) != expected:
            time.sleep(0.5)
        assert ledger_totals(env) == expected
        q = run_cli("sql", "SELECT sum(events) AS n FROM usage", "-f", "json", env=env, check=True)
        assert f'"n": {len(events)}' in q.stdout
        assert "usage data as of" in q.stderr
        dl = run_cli("dead-letters", "-f", "json", env=env, check=True)
        assert dl.stdout.strip() == "[]"
        duck = subprocess.run(
            [
                str(BIN.parent / "duckdb"),
                "-readonly",
                "-csv",
                str(os.path.join(env["METERING_DATA_DIR"], "query.duckdb")),
                "-c",
                "SELECT sum(events) FROM usage",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert duck.returncode == 0, duck.stderr
        assert str(len(events)) in duck.stdout
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        text = body.decode()
        for name in (
            "pf_events_consumed_total",
            "pf_events_counted_total",
            "pf_events_duplicate_total",
            "pf_events_dead_lettered_total",
            "pf_batch_duration_seconds_bucket",
            "pf_consumer_lag",
            "pf_last_commit_timestamp_seconds",
        ):
            assert name in text, name
        assert f"pf_events_counted_total {float(len(events))}" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0
