"""Cluster mode across network-namespace hosts, for the tests in tests/broker/cluster: one
test's lake (catalog database, lake folder, topic, group) and the workers and commands run on
hosts against it, what their DEBUG traces say (claims, committed spans), and the
reconciliation of the lake's totals against the independent fold (tests/support/oracle.py
through ``worker_harness.expected_totals``)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aggregator.lake import open_lake
from aggregator.lake_ledger import partition_schemas
from common.settings import load_settings
from schemas.codec import COUNTERS
from tests.support import worker_harness as harness
from tests.support.cli_runner import BIN
from tests.support.log_lines import CLAIMED, SPAN
from tests.support.netns import Host, Network, kafka_on, network, postgres_on
from tests.support.waiting import free_port, scrape, wait_for

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
    postgres_port: int


def postgres_port(nth: int) -> int:
    """The ``nth`` module's PostgreSQL port: past the session's own server
    (tests/fixtures/postgres.py, on PF_TEST_POSTGRES_PORT), or a free one."""
    base = os.environ.get("PF_TEST_POSTGRES_PORT")
    return int(base) + nth if base else free_port()


@contextmanager
def hosts_cluster(
    root: Path, hosts: int, pg_port: int, kafka_port: int, brokers: int = 1
) -> Iterator[Cluster]:
    """``hosts`` namespace hosts under ``root`` with PostgreSQL on ``pg_port`` and a
    ``brokers``-node Kafka on ``kafka_port``, all on their bridge; removed on exit."""
    with (
        network(hosts, root) as net,
        postgres_on(net, pg_port) as server,
        kafka_on(net, kafka_port, brokers) as bootstrap,
    ):
        yield Cluster(net, server, bootstrap, pg_port)


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

    def worker(
        self, host: Host, log: Path, metrics_port: int | None = None
    ) -> subprocess.Popen[str]:
        env = self.env(
            host,
            KAFKA_BOOTSTRAP_SERVERS=self.cluster.bootstrap,
            METERING_GROUP=self.group,
            **RUN,
        )
        with log.open("a") as out:
            proc = host.popen(
                [str(BIN), "consume", "--metrics-port", str(metrics_port or free_port())],
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


def catalog_connected(host: Host, port: int) -> float | None:
    """The worker's ``pf_catalog_connected`` (None: not answering yet)."""
    try:
        return scrape(port, host.address).get("pf_catalog_connected")
    except OSError:
        return None


def committed_under(log: Path, partition: int, epoch: int) -> list[tuple[int, int]]:
    """The [from, to) spans this worker committed of ``partition`` while it held it with
    ``epoch`` (from that claim to its next claim of the partition)."""
    text = log.read_text(errors="replace")
    claims = [
        (m.start(), int(m.group(2))) for m in CLAIMED.finditer(text) if int(m.group(1)) == partition
    ]
    begin = next(at for at, e in claims if e == epoch)
    end = next((at for at, e in claims if at > begin), len(text))
    return [
        (int(m.group(3)), int(m.group(4)))
        for m in SPAN.finditer(text, begin, end)
        if m.group(1) == "committed" and int(m.group(2)) == partition
    ]
