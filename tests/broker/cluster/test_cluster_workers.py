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
from pathlib import Path

import pytest

from bench.broker import create_topic
from tests.support import worker_harness as harness
from tests.support.cluster_hosts import (
    Cluster,
    Lake,
    catalog_connected,
    claimed,
    committed_under,
    first_commit_after_claim,
    hosts_cluster,
    postgres_port,
    produce,
    reconcile,
    spans,
)
from tests.support.log_lines import (
    ASSIGNED,
    CATALOG_BACK,
    CATALOG_LOST,
    CLAIMED,
    COMMIT_SETTLED,
    LOST,
    REFUSED,
)
from tests.support.netns import (
    namespaces_available,
    start_postgres,
)
from tests.support.postgres import create_database, local_postgres
from tests.support.waiting import free_port, scrape, wait_for

WHY_NOT = namespaces_available()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=f"no network namespaces: {WHY_NOT}")
KAFKA_PORT = int(os.environ.get("PF_TEST_KAFKA_PORT", "29092"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with hosts_cluster(tmp_path_factory.mktemp("hosts"), 3, postgres_port(1), KAFKA_PORT) as made:
        yield made


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


def test_workers_wait_out_a_postgres_restart_under_load(lake: Lake, tmp_path: Path) -> None:
    """PostgreSQL stopped while two workers commit and events keep arriving, then started
    again on its port: the workers wait (their log line, ``pf_catalog_connected`` 0), go on
    on new connections (1), and the totals are exact: nothing lost, nothing doubled."""
    hosts, net = lake.cluster.net.hosts[:2], lake.cluster.net
    logs, ports = [tmp_path / "one.log", tmp_path / "two.log"], [free_port(), free_port()]
    procs = [lake.worker(h, log, p) for h, log, p in zip(hosts, logs, ports, strict=True)]
    wait_for(lambda: all(claimed(log) for log in logs), "both workers' claims", timeout=600)
    unique, resent = produce(lake, 8_000, seed=41)
    wait_for(lambda: all(spans(log, "committed") for log in logs), "both workers committing", 600)
    assert local_postgres("stop", lake.cluster.postgres_port).returncode == 0
    later, again = produce(lake, 4_000, seed=43)  # arrives while the catalog is away

    def waiting() -> list[int]:
        return [
            i
            for i, (h, log, p) in enumerate(zip(hosts, logs, ports, strict=True))
            if CATALOG_LOST in log.read_text() and catalog_connected(h, p) == 0
        ]

    wait_for(waiting, "a worker waiting for the catalog", timeout=300)
    down = waiting()
    assert all(p.poll() is None for p in procs)  # waiting, not failed
    assert start_postgres(net, lake.cluster.postgres_port).returncode == 0
    for i in down:
        back, log = hosts[i], logs[i]
        wait_for(lambda: CATALOG_BACK.search(log.read_text()), "the catalog back", 300)  # noqa: B023
        wait_for(lambda: catalog_connected(back, ports[i]) == 1, "pf_catalog_connected 1")  # noqa: B023
    settled = [m.group(2) for log in logs for m in COMMIT_SETTLED.finditer(log.read_text())]
    print(f"workers that waited: {down}; COMMITs cut off and settled: {settled}")
    reconcile(lake, unique + later, resent + again, len(unique) + resent + len(later) + again)
    assert all(p.returncode == 0 for p in procs)


def test_a_host_cut_off_from_kafka_but_not_postgres_is_fenced(lake: Lake, tmp_path: Path) -> None:
    """Host one loses Kafka (a blackhole route to it in its namespace) but keeps PostgreSQL:
    past the session timeout the group gives its partitions to host two, which claims them
    with newer epochs and goes on; whatever host one still had is committed before that
    claim or refused after it, never counted twice; once reconnected it rejoins, claims
    anew and resumes from the lake's offsets. Totals exact."""
    one, two = lake.cluster.net.hosts[:2]
    kafka = lake.cluster.net.server("kafka")
    first, second = tmp_path / "cut.log", tmp_path / "other.log"
    lake.worker(one, first)
    lake.worker(two, second)
    wait_for(lambda: claimed(first) and claimed(second), "both workers' claims", timeout=600)
    unique, resent = produce(lake, 6_000, seed=51)
    wait_for(lambda: spans(first, "committed"), "host one committing", timeout=600)
    one.cut_off(kafka)
    held = claimed(first)
    theirs = {p for p, epoch in held.items() if epoch > claimed(second).get(p, 0)}
    more, more_resent = produce(lake, 6_000, seed=53)  # only host two can fetch these

    def taken_over() -> bool:
        now = claimed(second)
        return all(now.get(p, 0) > held[p] for p in theirs)

    wait_for(taken_over, "host two to claim host one's partitions", timeout=600)
    # its client's own session timer gives them up too: what it had polled is dropped
    wait_for(lambda: LOST in first.read_text(), "host one to declare its partitions lost", 300)
    one.reconnect(kafka)
    rejoined = len(CLAIMED.findall(first.read_text()))
    wait_for(
        lambda: len(CLAIMED.findall(first.read_text())) > rejoined,
        "host one to rejoin and claim partitions again",
        timeout=600,
    )
    last, last_resent = produce(lake, 2_000, seed=57)
    batches = ((unique, resent), (more, more_resent), (last, last_resent))
    records = sum(len(u) + r for u, r in batches)
    reconcile(lake, unique + more + last, resent + more_resent + last_resent, records)
    assert all(p.returncode == 0 for p in lake.procs)
    refusals = {int(m.group(1)) for m in REFUSED.finditer(first.read_text())}
    assert refusals <= theirs
    for p in theirs:  # host one's commits under its old epoch all end where host two resumed
        resumed = first_commit_after_claim(second, p)
        ends = [end for _, end in committed_under(first, p, held[p])]
        assert resumed is None or max(ends, default=0) <= resumed, (p, ends, resumed)
    print(f"host one's partitions {sorted(theirs)} taken over; refused on: {sorted(refusals)}")
