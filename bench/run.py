"""``make bench``: the worker's throughput against a raw consumer and a naive baseline.

    .venv/bin/python -m bench.run [--events 1000000] [--tenants 1000] [--partitions 6]
                                  [--preload-ids 0] [--repeat 1] [--output bench-results.json]

On the local broker (``bench.broker.real_broker``: KAFKA_BOOTSTRAP_SERVERS, or
``deploy/local-kafka`` on port 29092) it produces N valid events with the emitter's bulk
path, then measures in one run, ``--repeat`` times each, interleaved:
(a) a raw confluent-kafka consume, (b) a naive per-message consumer (bench.baselines),
(c) ``pf-metering consume --drain`` as a subprocess from empty, dedup and exactly-once
commits on (bench.worker_run); then the Java consumer and (``--peer-repeat`` rounds)
the peers on the same topic, checked against the worker's totals (bench.peers.measure).
It prints events/s (medians), c/a, c/b, the worker's peak RSS, the peers' table and
issue 18's targets, writes them to ``--output`` (git-ignored), then runs
``bench/bill_bench.py``. Unless ``--skip-scaling``: embedded against cluster mode with
1 and 3 workers on the same topic (bench.scaling, PostgreSQL from deploy/local-postgres).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

import psutil
from confluent_kafka import libversion
from confluent_kafka.admin import AdminClient

from bench import scaling
from bench.baselines import Measured, naive_consume, raw_consume
from bench.broker import create_topic, real_broker
from bench.events import synthetic_events
from bench.peers import measure as peers
from bench.worker_run import WorkerRun, preload_seen_ids, run_worker
from common.settings import load_settings
from emitter import Emitter

T = TypeVar("T")

GIB = 1 << 30
RSS_TARGET = 1.5 * GIB
DICT_EVENTS = 200_000


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    packages = ("confluent-kafka", "duckdb", "polars", "pyarrow", "fastavro")
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(psutil.virtual_memory().total / GIB, 1),
        "python": platform.python_version(),
        "librdkafka": libversion()[0],
        **{name: version(name) for name in packages},
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def emit(bootstrap: str, topic: str, source: Any) -> float:
    """Events/s of one emitter sending ``source`` (flush included)."""
    count = source.height if hasattr(source, "height") else len(source)
    with Emitter(bootstrap, topic) as emitter:
        started = time.perf_counter()
        emitter.emit_many(source)
        emitter.flush()
        return count / (time.perf_counter() - started)


def delete_topics(bootstrap: str, topics: list[str]) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.delete_topics(topics).values():
        with contextlib.suppress(Exception):
            future.result(timeout=30)


def bill_bench() -> dict[str, Any] | None:
    """Run ``bench/bill_bench.py``'s own main (if present); its output, captured."""
    if importlib.util.find_spec("bench.bill_bench") is None:
        return None
    from bench import bill_bench as module

    saved_env, saved_argv = dict(os.environ), sys.argv
    out = io.StringIO()
    started = time.perf_counter()
    try:
        sys.argv = ["bench.bill_bench"]
        with contextlib.redirect_stdout(out):
            module.main()
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
    return {
        "seconds": round(time.perf_counter() - started, 2),
        "output": out.getvalue().splitlines(),
    }


def isolated(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a fresh interpreter. Why: measured in this process, (a) ran up to
    45% slower in later rounds than in the first (the heap and collector state the other
    measurements leave behind), which flattered the worker's ratios."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


def naive_counted(
    bootstrap: str, topic: str, partitions: int, events: int, poll: int, db: Path
) -> tuple[Measured, int]:
    """(b)'s timing and how many events it counted (its folder stays in its process)."""
    got, folder = naive_consume(bootstrap, topic, partitions, events, poll, db)
    return got, folder.counted


def summary(samples: list[float]) -> dict[str, Any]:
    return {"median": round(statistics.median(samples)), "samples": [round(s) for s in samples]}


def measure(args: argparse.Namespace, bootstrap: str, topic: str, work: Path) -> dict[str, Any]:
    batch = load_settings().batch_size if args.batch_size is None else args.batch_size
    worker_env = {} if args.batch_size is None else {"METERING_BATCH_SIZE": str(args.batch_size)}
    template = None
    if args.preload_ids:
        template = work / "preloaded"
        took = preload_seen_ids(template / "ledger", topic, args.partitions, args.preload_ids)
        print(f"preloaded {args.preload_ids:,} dedup ids in {took:.1f} s")
    raw: list[Measured] = []
    naive: list[Measured] = []
    runs: list[WorkerRun] = []
    names = [n for n in args.peers.split(",") if n in peers.NAMES]
    others = peers.PeerBench(bootstrap, topic, args.events, work, names, args.peer_repeat)
    for round_ in range(args.repeat):
        poll = args.baseline_poll
        raw.append(isolated(raw_consume, bootstrap, topic, args.partitions, args.events, poll))
        print(f"[{round_ + 1}/{args.repeat}] (a) raw consume   {raw[-1].rate:>12,.0f} events/s")
        if not args.skip_naive:
            db = work / f"naive-{round_}.duckdb"
            got, counted = isolated(
                naive_counted, bootstrap, topic, args.partitions, args.events, poll, db
            )
            assert counted == args.events, counted
            naive.append(got)
            print(f"[{round_ + 1}/{args.repeat}] (b) naive         {got.rate:>12,.0f} events/s")
        data = work / f"worker-{round_}"
        if template is not None:
            shutil.copytree(template, data)
        runs.append(run_worker(bootstrap, topic, data, args.events, worker_env, args.worker_source))
        run = runs[-1]
        if run.counted != args.events or run.dead or run.duplicates:
            raise RuntimeError(f"worker counted {run.counted} of {args.events}: {run}")
        rss = run.peak_rss_bytes / GIB
        print(
            f"[{round_ + 1}/{args.repeat}] (c) worker        {run.rate:>12,.0f} events/s "
            f"({run.process_rate:,.0f} whole process), {run.cpu_seconds:.1f} s CPU, "
            f"peak RSS {rss:.2f} GiB"
        )
        others.round(round_, data)
        shutil.rmtree(data, ignore_errors=True)
    a = statistics.median(m.rate for m in raw)
    c = statistics.median(r.rate for r in runs)
    c_process = statistics.median(r.process_rate for r in runs)
    peak = max(r.peak_rss_bytes for r in runs)
    result: dict[str, Any] = {
        "batch_size": batch,
        "baseline_poll": args.baseline_poll,
        "raw_consume_events_per_s": summary([m.rate for m in raw]),
        "worker_events_per_s": summary([r.rate for r in runs]),
        "worker_process_events_per_s": summary([r.process_rate for r in runs]),
        "worker_seconds": [round(r.worker_seconds, 2) for r in runs],
        "worker_process_seconds": [round(r.seconds, 2) for r in runs],
        "worker_cpu_seconds": [round(r.cpu_seconds, 2) for r in runs],
        "worker_peak_rss_bytes": peak,
        "worker_peak_rss_gib": round(peak / GIB, 3),
        "rss_target_met": peak <= RSS_TARGET,
        "c_over_a": round(c / a, 3),
        "c_over_a_whole_process": round(c_process / a, 3),
        "c_over_a_target_met": c >= 0.5 * a,
        "worker_cpu_seconds_per_million": round(
            statistics.median(r.cpu_seconds for r in runs) * 1e6 / args.events, 2
        ),
    }
    worker = {"events_per_s": c, "process_events_per_s": c_process}
    result["peers"] = others.summary(worker)
    if naive:
        b = statistics.median(m.rate for m in naive)
        result["naive_events_per_s"] = summary([m.rate for m in naive])
        result["c_over_b"] = round(c / b, 3)
        result["c_over_b_whole_process"] = round(c_process / b, 3)
        result["c_over_b_target_met"] = c >= 3 * b
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--tenants", type=int, default=1_000)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument(
        "--preload-ids",
        type=int,
        default=0,
        help="dedup ids put into the worker's ledgers before (c)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="rounds of (a), (b), (c)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="METERING_BATCH_SIZE for (c) (default: the worker's own default)",
    )
    parser.add_argument(
        "--baseline-poll",
        type=int,
        default=20_000,
        help="poll size of (a) and (b); 20000 is where (a) measured fastest (it slows down "
        "by a quarter at 100000), so the worker is never compared with a handicapped (a)",
    )
    parser.add_argument(
        "--worker-source",
        type=Path,
        default=None,
        help="run (c) from another checkout, e.g. a git worktree of main",
    )
    parser.add_argument(
        "--peers",
        default=",".join(peers.NAMES),
        help=f"comma-separated, of {','.join(peers.NAMES)} (none: no peers)",
    )
    parser.add_argument("--peer-repeat", type=int, default=1, help="rounds of the peers")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--skip-bill", action="store_true")
    parser.add_argument(
        "--skip-scaling",
        action="store_true",
        help="leave out embedded against cluster mode, 1 and 3 workers (bench.scaling)",
    )
    parser.add_argument("--output", type=Path, default=Path("bench-results.json"))
    args = parser.parse_args(argv)

    results: dict[str, Any] = {
        "machine": machine(),
        "events": args.events,
        "tenants": args.tenants,
        "partitions": args.partitions,
        "preload_ids": args.preload_ids,
        "repeat": args.repeat,
    }
    events = synthetic_events(args.events, args.tenants)
    with real_broker() as bootstrap, tempfile.TemporaryDirectory(prefix="pf-bench-") as tmp:
        topic = create_topic(bootstrap, args.partitions, f"pf-bench-{uuid.uuid4().hex[:8]}")
        scratch = create_topic(bootstrap, args.partitions, f"pf-bench-{uuid.uuid4().hex[:8]}")
        try:
            # the measured topic once, then (--repeat) the same events again to a scratch one
            rates = [
                emit(bootstrap, topic if i == 0 else scratch, events) for i in range(args.repeat)
            ]
            results["emitter_events_per_s"] = round(statistics.median(rates))
            results["emitter_samples"] = [round(r) for r in rates]
            print(f"emitter (columnar input)   {results['emitter_events_per_s']:>12,} events/s")
            dicts = events.head(min(DICT_EVENTS, args.events)).to_dicts()
            results["emitter_dict_events_per_s"] = round(emit(bootstrap, scratch, dicts))
            print(
                f"emitter (dict input)       {results['emitter_dict_events_per_s']:>12,} events/s"
            )
            del dicts
            results.update(measure(args, bootstrap, topic, Path(tmp)))
            results["targets"] = peers.targets(results)
            if not args.skip_scaling:
                raw = results["raw_consume_events_per_s"]["median"]
                results["scaling"] = scaling.measure(
                    bootstrap, topic, args.events, args.repeat, raw, Path(tmp)
                )
        finally:
            delete_topics(bootstrap, [topic, scratch])
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report(results)
    peers.report(results)
    if "scaling" in results:
        scaling.report(results["scaling"])
    if not args.skip_bill:
        results["bill_bench"] = bill_bench()
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {args.output}")
    return results


def report(r: dict[str, Any]) -> None:
    def line(label: str, value: str) -> None:
        print(f"  {label:<34}{value}")

    print(
        f"\n{r['events']:,} events, {r['tenants']:,} tenants, {r['partitions']} partitions, "
        f"{r['preload_ids']:,} preloaded dedup ids, median of {r['repeat']}"
    )
    line("(a) raw consume", f"{r['raw_consume_events_per_s']['median']:>12,} events/s")
    if "naive_events_per_s" in r:
        line("(b) naive baseline", f"{r['naive_events_per_s']['median']:>12,} events/s")
    line(
        "(c) pf-metering consume --drain",
        f"{r['worker_events_per_s']['median']:>12,} events/s"
        "   (Kafka client created -> closed, as (a))",
    )
    line(
        "    the same, whole process",
        f"{r['worker_process_events_per_s']['median']:>12,} "
        "events/s   (interpreter start and imports included)",
    )
    ok = {True: "met", False: "MISSED"}
    line(
        "c / a",
        f"{r['c_over_a']:>12.2f}   (target >= 0.5: {ok[r['c_over_a_target_met']]}; "
        f"whole process {r['c_over_a_whole_process']:.2f})",
    )
    if "c_over_b" in r:
        line(
            "c / b",
            f"{r['c_over_b']:>12.2f}   (target >= 3: {ok[r['c_over_b_target_met']]}; "
            f"whole process {r['c_over_b_whole_process']:.2f})",
        )
    line(
        "worker peak RSS",
        f"{r['worker_peak_rss_gib']:>12.2f} GiB (target <= 1.5: {ok[r['rss_target_met']]})",
    )
    line("emitter", f"{r['emitter_events_per_s']:>12,} events/s (columnar input)")
    line("emitter", f"{r['emitter_dict_events_per_s']:>12,} events/s (dict input)")


if __name__ == "__main__":
    main()
