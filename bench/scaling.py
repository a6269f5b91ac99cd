"""Issue 15's table: embedded against cluster mode, one worker against three, one topic.

For each mode and worker count, N ``pf-metering consume --drain`` processes in one consumer
group drain the measured topic from empty (exactly-once on, as always): embedded mode shares
one data dir (the workers' own ledger files); cluster mode gives each worker its own data dir
(a host's caches) and shares ``METERING_CATALOG`` (a fresh database on a
``deploy/local-postgres`` server) and ``METERING_LAKE_PATH`` (a local folder). Measured:
events/s from the first start to the last exit, CPU seconds per million events summed over
the workers, and commit latency (p50: the median of the workers' own; p99: the worst one).
Each group's totals must add up to the events produced, with no duplicate and no dead letter.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from bench.broker import ROOT
from bench.worker_run import WorkerRun, run_worker

LOCAL_POSTGRES = ROOT / "deploy" / "local-postgres"
MODES = ("embedded", "cluster")
WORKER_COUNTS = (1, 3)


@dataclass
class GroupRun:
    """One drain of the topic by ``workers`` processes in ``mode``."""

    mode: str
    workers: int
    events: int
    seconds: float  # first start to last exit
    worker_seconds: float  # the longest of the workers' own timings (Kafka client to close)
    cpu_seconds: float  # summed over the workers
    commit_p50_ms: float
    commit_p99_ms: float

    @property
    def events_per_s(self) -> float:
        """Timed like the main table's (c): the workers' own timing."""
        return self.events / self.worker_seconds

    @property
    def process_events_per_s(self) -> float:
        """From the first process start to the last exit."""
        return self.events / self.seconds

    @property
    def cpu_seconds_per_million(self) -> float:
        return self.cpu_seconds * 1e6 / self.events


@contextmanager
def postgres_server() -> Iterator[str]:
    """The URI of a ``deploy/local-postgres`` server (``PF_BENCH_POSTGRES_PORT``, default
    25432); stopped afterwards if this started it."""
    port = os.environ.get("PF_BENCH_POSTGRES_PORT", "25432")

    def run(action: str) -> subprocess.CompletedProcess[str]:
        argv = [str(LOCAL_POSTGRES), action, "--port", port]
        return subprocess.run(argv, capture_output=True, text=True, timeout=300)

    started = run("status").returncode != 0
    out = run("start")
    if out.returncode != 0:
        raise RuntimeError(f"deploy/local-postgres start failed: {out.stderr.strip()}")
    try:
        yield out.stdout.strip().splitlines()[-1]
    finally:
        if started:
            run("stop")


def fresh_database(server: str) -> str:
    """A new, empty database on ``server``; its URI."""
    name = f"pfbench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server, autocommit=True) as con:
        con.execute(f'CREATE DATABASE "{name}"')
    return server.rsplit("/", 1)[0] + "/" + name


def drain_group(
    bootstrap: str, topic: str, events: int, workers: int, mode_env: dict[str, str], work: Path
) -> list[WorkerRun]:
    """``workers`` drains side by side in one new group; embedded mode (no catalog in
    ``mode_env``) shares ``work``, cluster mode gives each its own folder under it."""
    group = f"bench-scaling-{uuid.uuid4().hex[:8]}"
    shared = "METERING_CATALOG" not in mode_env

    def one(i: int) -> WorkerRun:
        data = work if shared else work / f"host-{i}"
        return run_worker(
            bootstrap, topic, data, events, mode_env, group=group, log_name=f"worker-{i}.log"
        )

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, range(workers)))


def measure_group(
    bootstrap: str, topic: str, events: int, workers: int, mode: str, env: dict[str, str],
    work: Path,
) -> GroupRun:  # fmt: skip
    """One group's drain, reconciled against the events produced."""
    started = time.perf_counter()
    runs = drain_group(bootstrap, topic, events, workers, env, work)
    seconds = time.perf_counter() - started
    counted = sum(r.counted for r in runs)
    if counted != events or any(r.duplicates or r.dead for r in runs):
        raise RuntimeError(f"{mode} x{workers} counted {counted} of {events}: {runs}")
    p50s = [r.commit_p50_ms for r in runs if r.commit_p50_ms is not None]
    p99s = [r.commit_p99_ms for r in runs if r.commit_p99_ms is not None]
    return GroupRun(
        mode, workers, events, seconds, max(r.worker_seconds for r in runs),
        sum(r.cpu_seconds for r in runs),
        statistics.median(p50s), max(p99s),
    )  # fmt: skip


def measure(
    bootstrap: str, topic: str, events: int, repeat: int, raw_events_per_s: float, work: Path
) -> dict[str, Any]:
    """The table: per mode and worker count, medians of ``repeat`` drains; c/a against the
    raw consume's rate measured in the same run."""
    runs: dict[tuple[str, int], list[GroupRun]] = {}
    with postgres_server() as server:
        for round_ in range(repeat):
            for mode in MODES:
                for workers in WORKER_COUNTS:
                    env: dict[str, str] = {}
                    folder = work / f"scaling-{mode}-{workers}-{round_}"
                    if mode == "cluster":
                        env["METERING_CATALOG"] = fresh_database(server)
                        env["METERING_LAKE_PATH"] = str(folder / "lake")
                    run = measure_group(bootstrap, topic, events, workers, mode, env, folder)
                    runs.setdefault((mode, workers), []).append(run)
                    print(
                        f"[{round_ + 1}/{repeat}] {mode:<8} x{workers} "
                        f"{run.events_per_s:>12,.0f} events/s, "
                        f"{run.cpu_seconds_per_million:.2f} CPU s/M, commits p50 "
                        f"{run.commit_p50_ms:.1f} ms p99 {run.commit_p99_ms:.1f} ms"
                    )
    return summarize(runs, raw_events_per_s)


def summarize(runs: dict[tuple[str, int], list[GroupRun]], raw: float) -> dict[str, Any]:
    """Medians per (mode, workers), the ratios issue 15 asks for and its targets."""

    def median(key: tuple[str, int], field: str) -> float:
        return float(statistics.median(getattr(r, field) for r in runs[key]))

    table: dict[str, Any] = {}
    for key in runs:
        mode, workers = key
        rate = median(key, "events_per_s")
        table[f"{mode}_x{workers}"] = {
            "events_per_s": round(rate),
            "process_events_per_s": round(median(key, "process_events_per_s")),
            "c_over_a": round(rate / raw, 3),
            "cpu_seconds_per_million": round(median(key, "cpu_seconds_per_million"), 2),
            "commit_p50_ms": round(median(key, "commit_p50_ms"), 1),
            "commit_p99_ms": round(median(key, "commit_p99_ms"), 1),
        }
    one, three = WORKER_COUNTS[0], WORKER_COUNTS[-1]
    cluster, embedded = table[f"cluster_x{one}"], table[f"embedded_x{one}"]
    cpu_ratio = cluster["cpu_seconds_per_million"] / embedded["cpu_seconds_per_million"]
    for mode in MODES:
        single, many = table[f"{mode}_x{one}"], table[f"{mode}_x{three}"]
        table[f"{mode}_x{three}_over_x{one}"] = {
            "events_per_s": round(many["events_per_s"] / single["events_per_s"], 3),
            "cpu_seconds_per_million": round(
                many["cpu_seconds_per_million"] / single["cpu_seconds_per_million"], 3
            ),
        }
    table["targets"] = {
        "cluster_c_over_a": {
            "value": cluster["c_over_a"], "target": 0.35, "met": cluster["c_over_a"] >= 0.35,
        },
        "cluster_cpu_per_event_over_embedded": {
            "value": round(cpu_ratio, 3), "target": 1.5, "met": cpu_ratio <= 1.5,
        },
    }  # fmt: skip
    return table


def report(table: dict[str, Any]) -> None:
    """The table as ``make bench`` prints it."""
    print(
        "\n  mode      workers     events/s    c/a   CPU s/M   commit p50   commit p99"
        "   (events/s timed as (c); whole process in the JSON)"
    )
    for mode in MODES:
        for workers in WORKER_COUNTS:
            row = table[f"{mode}_x{workers}"]
            print(
                f"  {mode:<9} {workers:>7} {row['events_per_s']:>12,} {row['c_over_a']:>6.2f} "
                f"{row['cpu_seconds_per_million']:>9.2f} {row['commit_p50_ms']:>9.1f} ms "
                f"{row['commit_p99_ms']:>9.1f} ms"
            )
    for mode in MODES:
        ratio = table[f"{mode}_x{WORKER_COUNTS[-1]}_over_x{WORKER_COUNTS[0]}"]
        print(
            f"  {mode}: {WORKER_COUNTS[-1]} workers against 1: events/s x"
            f"{ratio['events_per_s']:.2f}, CPU per event x{ratio['cpu_seconds_per_million']:.2f}"
        )
    for name, target in table["targets"].items():
        verdict = "met" if target["met"] else "MISSED"
        print(f"  {name:<38}{target['value']:>8.3f}   (target {target['target']}: {verdict})")
