"""The peers and Apache Kafka's own Java consumer, measured on the worker's topic.

Each peer app runs as a whole process in its own venv, with its own consumer group (or
none) reading the topic from the start; its totals must equal the worker's, per tenant
and period, or the bench fails. ``ConsumerPerformance`` (kafka-consumer-perf-test) runs
from the jars ``deploy/local-kafka`` caches, with the JVM options of Kafka's own script.
Nothing is downloaded here: a peer whose venv is missing is reported, not installed.
"""

from __future__ import annotations

import contextlib
import csv
import os
import statistics
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka.admin import AdminClient

from aggregator.views import open_usage
from bench.peers import PEERS, ROOT, Peer
from bench.peers.fold import TOTAL_FIELDS, Totals, differences, read_result
from bench.process import ProcessRun, run_measured

MILLION = 1_000_000
GIB = 1 << 30
JAVA_TOOL = "org.apache.kafka.tools.ConsumerPerformance"
# bin/kafka-consumer-perf-test.sh sets this heap; kafka-run-class.sh adds the G1 flags
JVM_OPTIONS = (
    "-Xmx512M",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
)
JAVA = "java"  # the Java consumer's name among the contenders
NAMES = (*(p.name for p in PEERS), JAVA)


def worker_totals(data_dir: Path, topic: str) -> Totals:
    """The worker's totals, read from its published snapshot (the ``usage`` view)."""
    sql = f"SELECT tenant_id, period, {', '.join(TOTAL_FIELDS)} FROM usage"
    with open_usage(data_dir / "snapshot", topic) as reader:
        rows = reader.con.execute(sql).fetchall()
    return {f"{t}/{p}": dict(zip(TOTAL_FIELDS, rest, strict=True)) for t, p, *rest in rows}


def _jars() -> Path:
    return Path(os.environ.get("LOCAL_KAFKA_HOME", ROOT / ".cache")) / "kafka-jars"


def java_unavailable() -> str | None:
    if not (_jars() / ".complete").exists():
        return f"not available: no Kafka jars in {_jars()} (deploy/local-kafka fetches them)"
    return None


@dataclass
class Sample:
    """One measured run of a peer or of the Java consumer."""

    run: ProcessRun
    own_seconds: float  # as the peer times itself: client created -> done


@dataclass
class Contender:
    """A peer or the Java consumer, and its samples."""

    name: str
    label: str
    guarantee: str
    unavailable: str | None
    peer: Peer | None  # None: the Java consumer
    samples: list[Sample] = field(default_factory=list)


def _delete_topics_of(bootstrap: str, group: str) -> None:
    """Delete the topics a peer created for ``group`` (Quix's changelogs)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topics = [t for t in admin.list_topics(timeout=30).topics if group in t]
    if topics:
        for future in admin.delete_topics(topics).values():
            with contextlib.suppress(Exception):
                future.result(timeout=30)


def run_peer(
    peer: Peer, bootstrap: str, topic: str, events: int, work: Path, expected: Totals
) -> Sample:
    """One run of ``peer``; raises unless it exits 0 with the ``expected`` totals."""
    group = f"bench-{peer.name}-{uuid.uuid4().hex[:8]}"
    workdir = work / group
    workdir.mkdir(parents=True)
    result = workdir / "result.json"
    command = [
        str(peer.python),
        "-m",
        peer.module,
        "--bootstrap",
        bootstrap,
        "--topic",
        topic,
        "--events",
        str(events),
        "--group",
        group,
        "--workdir",
        str(workdir),
        "--result",
        str(result),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        run = run_measured(command, env, workdir / "peer.log", cwd=workdir)
    finally:
        _delete_topics_of(bootstrap, group)
    if run.code != 0 or not result.exists():
        raise RuntimeError(f"peer {peer.name} exited {run.code}:\n{run.output[-3000:]}")
    seconds, totals = read_result(result)
    wrong = differences(expected, totals)
    if wrong:
        raise RuntimeError(f"peer {peer.name}'s totals differ from the worker's: {wrong}")
    return Sample(run, seconds)


def run_java(bootstrap: str, topic: str, events: int, work: Path) -> Sample:
    """One run of ConsumerPerformance over ``events`` records; raises unless it read all."""
    group = f"bench-java-{uuid.uuid4().hex[:8]}"
    command = [
        "java",
        *JVM_OPTIONS,
        "-cp",
        f"{_jars()}/*",
        JAVA_TOOL,
        "--bootstrap-server",
        bootstrap,
        "--topic",
        topic,
        "--messages",
        str(events),
        "--group",
        group,
        "--timeout",
        "60000",
    ]
    run = run_measured(command, dict(os.environ), work / f"{group}.log")
    lines = [line for line in run.output.splitlines() if "," in line and "SLF4J" not in line]
    rows = list(csv.reader(lines, skipinitialspace=True))
    if run.code != 0 or len(rows) < 2:
        raise RuntimeError(f"ConsumerPerformance exited {run.code}:\n{run.output[-3000:]}")
    stats = dict(zip(rows[0], rows[-1], strict=True))
    consumed = int(stats["data.consumed.in.nMsg"])
    if consumed < events:
        raise RuntimeError(f"ConsumerPerformance read {consumed} of {events} records")
    return Sample(run, consumed / float(stats["nMsg.sec"]))


class PeerBench:
    """The peers' and the Java consumer's share of a ``make bench`` run."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        events: int,
        work: Path,
        names: list[str],
        peer_repeat: int,
    ) -> None:
        self.bootstrap, self.topic, self.events, self.work = bootstrap, topic, events, work
        self.peer_repeat = peer_repeat
        self.expected: Totals | None = None
        self.contenders = [
            Contender(p.name, p.library, p.guarantee, p.unavailable(), p)
            for p in PEERS
            if p.name in names
        ]
        if JAVA in names:
            java = Contender(
                JAVA,
                "Apache Kafka ConsumerPerformance",
                "none (reads only)",
                java_unavailable(),
                None,
            )
            self.contenders.append(java)

    def round(self, index: int, worker_data: Path) -> None:
        """Round ``index``: the Java consumer every round, the peers in the first
        ``peer_repeat``; the first round also reads the worker's totals in ``worker_data``."""
        if self.expected is None:
            self.expected = worker_totals(worker_data, self.topic)
        for c in self.contenders:
            if c.unavailable is not None or (c.peer is not None and index >= self.peer_repeat):
                continue
            if c.peer is None:
                sample = run_java(self.bootstrap, self.topic, self.events, self.work)
            else:
                sample = run_peer(
                    c.peer, self.bootstrap, self.topic, self.events, self.work, self.expected
                )
            c.samples.append(sample)
            s, gib = sample.run, sample.run.peak_rss_bytes / GIB
            print(
                f"[{index + 1}] {c.name:<8} {self.events / s.seconds:>12,.0f} events/s whole "
                f"process ({self.events / sample.own_seconds:,.0f} as it times itself), "
                f"{s.cpu_seconds:.1f} s CPU, peak RSS {gib:.2f} GiB"
            )

    def summary(self, worker: dict[str, float]) -> dict[str, Any]:
        """Per contender: medians and ratios against ``worker`` (its median
        ``events_per_s`` timed like (a) and ``process_events_per_s``)."""
        out: dict[str, Any] = {}
        for c in self.contenders:
            entry: dict[str, Any] = {"library": c.label, "guarantee": c.guarantee}
            if c.unavailable is not None:
                out[c.name] = {**entry, "status": c.unavailable}
                continue
            process = statistics.median([self.events / s.run.seconds for s in c.samples])
            own = statistics.median([self.events / s.own_seconds for s in c.samples])
            cpu = statistics.median([s.run.cpu_seconds for s in c.samples])
            out[c.name] = {
                **entry,
                "status": "ok" if c.peer is None else "ok, totals equal the worker's",
                "rounds": len(c.samples),
                "process_events_per_s": round(process),
                "own_events_per_s": round(own),
                "cpu_seconds_per_million": round(cpu * MILLION / self.events, 2),
                "peak_rss_bytes": max(s.run.peak_rss_bytes for s in c.samples),
                "process_samples": [round(self.events / s.run.seconds) for s in c.samples],
                "worker_over_it_whole_process": round(worker["process_events_per_s"] / process, 2),
                "worker_over_it_own_timing": round(worker["events_per_s"] / own, 2),
            }
        return out


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """Issue 18's targets, each with the measured value and whether it is met."""
    peers, worker = result["peers"], result["worker_process_events_per_s"]["median"]
    found: dict[str, Any] = {}
    rates = {n: p["process_events_per_s"] for n, p in peers.items() if n != JAVA and "rounds" in p}
    if rates:
        fastest = max(rates, key=rates.__getitem__)
        ratio = peers[fastest]["worker_over_it_whole_process"]
        found["worker_over_fastest_peer"] = {
            "peer": fastest,
            "value": ratio,
            "target": 10,
            "met": ratio >= 10,
        }
    if "rounds" in peers.get(JAVA, {}):
        java = peers[JAVA]
        for key in ("worker_over_it_whole_process", "worker_over_it_own_timing"):
            found[f"worker_over_java_{key.removeprefix('worker_over_it_')}"] = {
                "value": java[key],
                "target": 0.8,
                "met": java[key] >= 0.8,
            }
    raw = result["raw_consume_events_per_s"]["median"]
    for key, value, target in (
        ("c_over_a_whole_process", worker / raw, 0.5),
        ("c_over_a", result["c_over_a"], 0.65),
    ):
        found[key] = {"value": round(value, 3), "target": target, "met": value >= target}
    return found


def report(result: dict[str, Any]) -> None:
    """Print the peers' table and the targets."""
    events = result["events"]
    print(
        f"\n  {'':<10}{'events/s':>12}{'own timing':>12}{'CPU s/M':>9}{'RSS GiB':>9}"
        f"{'worker/it':>11}  (whole process; own timing: client created -> done)"
    )
    cpu = statistics.median(result["worker_cpu_seconds"]) * MILLION / events
    print(
        f"  {'worker':<10}{result['worker_process_events_per_s']['median']:>12,}"
        f"{result['worker_events_per_s']['median']:>12,}{cpu:>9.2f}"
        f"{result['worker_peak_rss_gib']:>9.2f}"
    )
    for name, p in result["peers"].items():
        if "rounds" not in p:
            print(f"  {name:<10}{p['status']}")
            continue
        gib = p["peak_rss_bytes"] / GIB
        print(
            f"  {name:<10}{p['process_events_per_s']:>12,}{p['own_events_per_s']:>12,}"
            f"{p['cpu_seconds_per_million']:>9.2f}{gib:>9.2f}"
            f"{p['worker_over_it_whole_process']:>11.2f}  {p['library']}: {p['guarantee']}"
        )
    for name, t in result["targets"].items():
        state = "met" if t["met"] else "MISSED"
        print(f"  target {name:<36} {t['value']:>8} (>= {t['target']}): {state}")
