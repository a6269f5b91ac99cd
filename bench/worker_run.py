"""(c): the real worker, ``pf-metering consume --drain``, as a subprocess from empty.

Timed two ways: like (a), from creating the Kafka client to closing it (group join,
ledger files and the final checkpoint included; the worker prints it), and from process
start to exit (interpreter start and imports, ~0.9 s, added). Its peak RSS is the largest
sum over the process tree, polled with psutil. Optionally the partition ledgers are first
given ``preload`` dedup ids, as if that many events had been counted inside the dedup
window.
"""

from __future__ import annotations

import os
import re
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from aggregator.ledger import LedgerSet
from bench.process import run_measured

BIN = Path(sys.executable).parent / "pf-metering"
_SUMMARY = re.compile(
    r"consumed (\d+) records: (\d+) counted, (\d+) duplicates, (\d+) dead-lettered"
    r"(?:, \d+ forwarded)?"
    r"(?: in ([\d.]+) s)?"  # (older workers, run with --worker-source, do not say)
    r"(?:; commits p50 ([\d.]+) ms, p99 ([\d.]+) ms)?"
)


@dataclass
class WorkerRun:
    """What one drain of the worker did and cost."""

    events: int
    seconds: float  # process start to exit
    cpu_seconds: float  # user + system of the worker process (all its threads)
    peak_rss_bytes: int
    consumed: int
    counted: int
    duplicates: int
    dead: int
    worker_seconds: float  # as the worker reports it: its creation to its close
    commit_p50_ms: float | None = None  # of its ledger commits (None: it made none)
    commit_p99_ms: float | None = None

    @property
    def rate(self) -> float:
        """Events/s timed like (a): from creating the Kafka client to closing it."""
        return self.events / self.worker_seconds if self.worker_seconds > 0 else 0.0

    @property
    def process_rate(self) -> float:
        """Events/s from process start to exit (interpreter start and imports included)."""
        return self.events / self.seconds if self.seconds > 0 else 0.0


def preload_seen_ids(ledger_dir: Path, topic: str, partitions: int, ids: int) -> float:
    """Put ``ids`` dedup ids (spread over the partitions, inside the window) into the
    ledgers' ``seen_events``; returns the seconds it took."""
    started = time.perf_counter()
    now = int(time.time() * 1_000_000)
    ledgers = LedgerSet(ledger_dir, topic, lock_timeout=10, memory_limit="1GB")
    try:
        for p in range(partitions):
            ledger = ledgers.acquire(p)
            lo, hi = p * ids // partitions, (p + 1) * ids // partitions
            ledgers.con.execute(
                f"""INSERT INTO {ledger.alias}.seen_events
                    SELECT md5_number('preload' || chr(0) || i::VARCHAR), {p},
                           {now} - (i % 1000000) * 1000000
                    FROM range({lo}, {hi}) t(i)"""
            )
    finally:
        ledgers.close(None)
    return time.perf_counter() - started


def run_worker(
    bootstrap: str,
    topic: str,
    data_dir: Path,
    expected: int,
    extra_env: dict[str, str],
    source: Path | None = None,
    timeout: float = 3600,
    group: str | None = None,
    log_name: str = "worker.log",
) -> WorkerRun:
    """Drain ``topic`` with a fresh worker (own group, own data dir) and measure it.

    ``source``: run the worker from another checkout (before/after comparisons); ``group``:
    join this consumer group (workers draining side by side) and log to ``log_name``."""
    command = [str(BIN), "consume", "--drain"]
    if source is not None:
        command = [sys.executable, "-c", "from pf_metering.cli import main; main()", *command[1:]]
    env = {
        **os.environ,
        **({"PYTHONPATH": str(source)} if source is not None else {}),
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "METERING_TOPIC": topic,
        "METERING_DATA_DIR": str(data_dir),
        "METERING_GROUP": group or f"bench-worker-{uuid.uuid4().hex[:8]}",
        **extra_env,
    }
    log_path = data_dir / log_name
    data_dir.mkdir(parents=True, exist_ok=True)
    run = run_measured(command, env, log_path, cwd=source, timeout=timeout)
    output = run.output
    if run.code != 0:
        raise RuntimeError(f"worker exited {run.code}:\n{output[-3000:]}")
    found = _SUMMARY.search(output)
    if found is None:
        raise RuntimeError(f"worker printed no summary:\n{output[-3000:]}")
    consumed, counted, duplicates, dead = (int(g) for g in found.groups()[:4])
    worker_seconds = float(found.group(5)) if found.group(5) else run.seconds
    p50, p99 = (float(g) if g else None for g in found.groups()[5:7])
    return WorkerRun(
        expected, run.seconds, run.cpu_seconds, run.peak_rss_bytes, consumed, counted,
        duplicates, dead, worker_seconds, p50, p99,
    )  # fmt: skip
