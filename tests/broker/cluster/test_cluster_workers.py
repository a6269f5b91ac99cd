"""Cluster mode across hosts: workers on network-namespace hosts (each its own data dir)
share only Kafka, PostgreSQL (the DuckLake's catalog) and the lake path, and a reader host
with only the catalog and lake settings reads the lake. Each scenario reconciles every
tenant's and period's totals against the independent fold (tests/support/oracle.py):

- two workers split the partitions; ``usage``, ``sql`` and ``dead-letters`` on a third host;
- a worker SIGKILLed inside a ledger commit: nothing lost, nothing doubled;
- the zombie: a worker SIGSTOPped inside a commit past the session timeout, its partitions
  taken over and committed by the other worker, then SIGCONTed: its in-hand batch's commit
  is refused (its log and ``pf_commits_refused_total`` say so) and the totals stay exact.

The lake path is a folder every namespace sees (one machine's filesystem stands in for
shared storage).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from aggregator.lake import open_lake
from aggregator.lake_ledger import partition_schemas
from bench.broker import create_topic
from common.settings import load_settings
from schemas.codec import COUNTERS
from tests.support import worker_harness as harness
from tests.support.cli_runner import BIN
from tests.support.log_lines import ASSIGNED, CLAIMED, REFUSED, SPAN
from tests.support.netns import Host, Network, kafka_on, namespaces_available, network, postgres_on
from tests.support.postgres import create_database
from tests.support.waiting import free_port, scrape, wait_for

WHY_NOT = namespaces_available()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=f"no network namespaces: {WHY_NOT}")
KAFKA_PORT = int(os.environ.get("PF_TEST_KAFKA_PORT", "29092"))
# the session's own server (tests/fixtures/postgres.py) is on PF_TEST_POSTGRES_PORT
POSTGRES_PORT = (
    int(os.environ["PF_TEST_POSTGRES_PORT"]) + 1
    if os.environ.get("PF_TEST_POSTGRES_PORT")
    else free_port()
)
RUN = {
    "METERING_BATCH_SIZE": "500",
    "METERING_SHUTDOWN_SECONDS": "120",
    "METERING_LATE_USAGE_MONTHS": "0",
    "LOG_LEVEL": "DEBUG",
}
COLUMNS = ["tenant_id", "period", "events", "sessions", *COUNTERS]


@dataclass(frozen=True)
class Cluster:
    net: Network
    server: str  # the PostgreSQL server's URI (a superuser's)
    bootstrap: str


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("hosts")
    with (
        network(3, root) as net,
        postgres_on(net, POSTGRES_PORT) as server,
        kafka_on(net, KAFKA_PORT) as bootstrap,
    ):
        yield Cluster(net, server, bootstrap)


@dataclass
class Lake:
    """One test's lake: a fresh catalog database, lake folder, topic and group."""

    cluster: Cluster
    catalog: str
    path: Path
    topic: str
    group: str
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def env(self, host: Host, **extra: str) -> dict[str, str]:
        """What a host is given: the catalog, the lake, its own data dir, and ``extra``."""
        return {
            **os.environ,
            "METERING_CATALOG": self.catalog,
            "METERING_LAKE_PATH": str(self.path),
            "METERING_DATA_DIR": str(host.data_dir / self.topic),
            "METERING_TOPIC": self.topic,
            **extra,
        }

    def worker(self, host: Host, log: Path, metrics_port: int) -> subprocess.Popen[str]:
        env = self.env(
            host,
            KAFKA_BOOTSTRAP_SERVERS=self.cluster.bootstrap,
            METERING_GROUP=self.group,
            **RUN,
        )
        with log.open("a") as out:
            proc = host.popen(
                [str(BIN), "consume", "--metrics-port", str(metrics_port)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
            )
        self.procs.append(proc)
        return proc

    def cli(self, host: Host, *args: str) -> subprocess.CompletedProcess[str]:
        """``pf-metering ARGS`` on ``host`` with only the catalog and lake settings."""
        proc = host.run([str(BIN), *args], env=self.env(host))
        assert proc.returncode == 0, proc.stderr
        return proc

    def query(self, table: str, select: str) -> list[tuple[Any, ...]]:
        """``select`` over every partition's ``table`` in the lake (``{t}``: their union),
        read in this process; [] while no partition has a ledger."""
        settings = load_settings(
            metering_catalog=self.catalog,
            metering_lake_path=str(self.path),
            metering_data_dir=self.path.parent / "probe",
        )
        con = open_lake(settings)
        try:
            schemas = partition_schemas(con, self.topic).values()
            if not schemas:
                return []
            union = " UNION ALL ".join(f"SELECT * FROM {s}.{table}" for s in schemas)
            return con.execute(select.format(t=f"({union})")).fetchall()
        finally:
            con.close()

    def totals(self) -> dict[tuple[str, str], dict[str, int]]:
        """Every tenant's and period's totals in the lake."""
        sums = ", ".join(f"sum({c})" for c in COLUMNS[2:])
        rows = self.query("aggregates", f"SELECT tenant_id, period, {sums} FROM {{t}} GROUP BY ALL")
        return {(r[0], r[1]): dict(zip(COLUMNS[2:], map(int, r[2:]), strict=True)) for r in rows}

    def duplicates(self) -> int:
        return sum(int(r[0]) for r in self.query("duplicates", "SELECT count(*) FROM {t}"))

    def caught_up(self, records: int) -> bool:
        """Whether the stored offsets cover all ``records`` produced (every partition of a
        new topic starts at offset 0)."""
        rows = self.query("offsets", "SELECT sum(coalesce(next_offset, 0)) FROM {t}")
        return bool(rows) and int(rows[0][0] or 0) >= records

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(180)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def lake(cluster: Cluster, tmp_path: Path) -> Iterator[Lake]:
    made = Lake(
        cluster,
        create_database(cluster.server),
        tmp_path / "lake",
        create_topic(cluster.bootstrap, 6),
        f"g-{uuid.uuid4().hex[:8]}",
    )
    yield made
    made.stop()


def produce(lake: Lake, n: int, seed: int) -> tuple[list[dict[str, Any]], int]:
    """``n`` valid events plus re-sends of some of them; returns (unique events, re-sends)."""
    unique = harness.random_events(n, tenants=24, seed=seed)
    sent = harness.with_duplicates(unique, 0.05, seed=seed + 1)
    harness.produce(lake.cluster.bootstrap, lake.topic, sent)
    return unique, len(sent) - len(unique)


def reconcile(lake: Lake, unique: list[dict[str, Any]], resent: int, records: int) -> None:
    """Wait until the lake's offsets cover every record, stop the workers, and compare the
    totals with the independent fold: nothing lost, nothing counted twice."""
    wait_for(lambda: lake.caught_up(records), "the lake to cover every record", timeout=900)
    lake.stop()
    assert lake.totals() == harness.expected_totals(unique)
    assert lake.duplicates() == resent


def spans(log: Path, step: str) -> list[tuple[int, int, int]]:
    """The (partition, from, to) of every ``step`` ("committing" or "committed") logged."""
    out = []
    for m in SPAN.finditer(log.read_text(errors="replace")):
        if m.group(1) == step:
            out.append((int(m.group(2)), int(m.group(3)), int(m.group(4))))
    return out


def first_commit_after_claim(log: Path, partition: int) -> int | None:
    """The first offset this worker committed ``partition`` from after it last claimed it
    (None: not yet)."""
    text = log.read_text(errors="replace")
    claim = [m.end() for m in CLAIMED.finditer(text) if int(m.group(1)) == partition][-1]
    for m in SPAN.finditer(text, claim):
        if m.group(1) == "committing" and int(m.group(2)) == partition:
            return int(m.group(3))
    return None


def claimed(log: Path) -> dict[int, int]:
    """Partition -> the newest epoch this worker claimed it with."""
    out: dict[int, int] = {}
    for m in CLAIMED.finditer(log.read_text(errors="replace")):
        out[int(m.group(1))] = int(m.group(2))
    return out


def test_two_workers_share_one_lake_and_a_third_host_reads_it(lake: Lake, tmp_path: Path) -> None:
    one, two, reader = lake.cluster.net.hosts
    logs = [tmp_path / "one.log", tmp_path / "two.log"]
    procs = [lake.worker(h, log, free_port()) for h, log in zip((one, two), logs, strict=True)]
    # both hold partitions before anything is produced (a fast host could drain it alone;
    # the later one can only have claimed what the other gave up)
    wait_for(lambda: all(claimed(log) for log in logs), "both workers' claims", timeout=600)
    unique, resent = produce(lake, 4_000, seed=11)
    bad: list[tuple[bytes | None, bytes | None]] = [(b"tenant_3.x", b"not avro"), (None, b"\x00")]
    harness.produce_raw(lake.cluster.bootstrap, lake.topic, bad)
    reconcile(lake, unique, resent, len(unique) + resent + len(bad))
    assert all(p.returncode == 0 for p in procs)
    for log in logs:  # both took part: each committed batches of its own partitions
        assert spans(log, "committed"), log.read_text()[-2000:]
    assert not (one.data_dir / lake.topic / "ledger").exists()  # the truth is in the lake

    # a host with only METERING_CATALOG and METERING_LAKE_PATH reads one snapshot
    sql = lake.cli(reader, "sql", "-f", "json", "SELECT sum(events) AS n FROM usage")
    assert json.loads(sql.stdout) == [{"n": len(unique)}]
    assert "lake snapshot" in sql.stderr
    tenant, period = sorted(harness.expected_totals(unique))[0]
    shown = json.loads(lake.cli(reader, "usage", tenant, period, "-f", "json").stdout)
    assert shown["events"] == harness.expected_totals(unique)[(tenant, period)]["events"]
    dead = json.loads(lake.cli(reader, "dead-letters", "-f", "json").stdout)
    assert len(dead) == len(bad) and {d["state"] for d in dead} == {"open"}


def inside_a_commit(
    lake: Lake, first: Path, second: Path, metrics_port: int
) -> subprocess.Popen[str]:
    """Start a worker on host one (logging to ``first``), then one on host two; return the
    first once both hold partitions and it is inside a ledger transaction."""
    one, two, _ = lake.cluster.net.hosts
    worker = lake.worker(one, first, metrics_port)
    lake.worker(two, second, free_port())
    wait_for(
        lambda: second.read_text().count(ASSIGNED) >= 1,
        "the second worker's assignment",
        timeout=600,
    )
    wait_for(
        lambda: len(spans(first, "committing")) > len(spans(first, "committed")),
        "the first worker inside a commit",
        timeout=600,
        every=0.01,
    )
    return worker


def test_a_worker_killed_inside_a_commit_loses_and_doubles_nothing(
    lake: Lake, tmp_path: Path
) -> None:
    one = lake.cluster.net.hosts[0]
    unique, resent = produce(lake, 12_000, seed=21)
    first, second = tmp_path / "one.log", tmp_path / "two.log"
    victim = inside_a_commit(lake, first, second, free_port())
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    lake.worker(one, tmp_path / "one-again.log", free_port())  # restarted on its host
    reconcile(lake, unique, resent, len(unique) + resent)


def test_a_zombie_woken_with_a_batch_in_hand_is_refused(lake: Lake, tmp_path: Path) -> None:
    one = lake.cluster.net.hosts[0]
    unique, resent = produce(lake, 16_000, seed=31)
    first, second = tmp_path / "zombie.log", tmp_path / "other.log"
    zombie_metrics = free_port()
    zombie = inside_a_commit(lake, first, second, zombie_metrics)
    zombie.send_signal(signal.SIGSTOP)
    in_hand = spans(first, "committing")[-1]
    held = claimed(first)  # the zombie's partitions: those it claimed last
    theirs = {p for p, epoch in held.items() if epoch > claimed(second).get(p, 0)}
    assert in_hand[0] in theirs

    def taken_over() -> bool:
        now = claimed(second)
        return all(now.get(p, 0) > held[p] for p in theirs)

    # past the session timeout the group gives the zombie's partitions to the other
    # worker, which claims them with a newer epoch and commits there
    wait_for(taken_over, "the other worker to claim the zombie's partitions", timeout=600)
    claims_done = len(spans(second, "committed"))

    def committed_there() -> bool:
        return any(p in theirs for p, _, _ in spans(second, "committed")[claims_done:])

    wait_for(committed_there, "a commit of the taken-over partitions", timeout=600)
    zombie.send_signal(signal.SIGCONT)

    wait_for(lambda: REFUSED.search(first.read_text()), "the zombie's commit refused", timeout=300)
    refusals = [
        (int(m.group(1)), int(m.group(2)), int(m.group(3)))
        for m in REFUSED.finditer(first.read_text())
    ]
    assert {p for p, _, _ in refusals} <= theirs
    # Where the other worker resumed the partition says whether the zombie's COMMIT of the
    # batch in hand had reached the lake before the stop landed (the stop can fall between
    # the COMMIT and its log line): if not, that very batch is the one refused.
    wait_for(
        lambda: first_commit_after_claim(second, in_hand[0]) is not None,
        "the new owner's first commit of the in-hand batch's partition",
        timeout=600,
    )
    resumed = first_commit_after_claim(second, in_hand[0])
    assert resumed is not None
    assert resumed in (in_hand[1], in_hand[2])
    if resumed == in_hand[1]:
        assert in_hand in refusals
    metric = f'pf_commits_refused_total{{partition="{refusals[0][0]}"}}'
    wait_for(lambda: scrape(zombie_metrics, one.address).get(metric, 0) >= 1, metric)
    reconcile(lake, unique, resent, len(unique) + resent)
