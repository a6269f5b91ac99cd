"""Cluster mode on a three-broker Kafka (``deploy/local-kafka start --brokers 3`` bound to the
hosts' bridge: replication factor 3, min.insync.replicas 2): two workers on network-namespace
hosts consume while the broker leading a partition is SIGKILLed (no controlled shutdown) and
events keep arriving through the idempotent, acks=all emitter. The partitions' leadership
moves to the survivors, the workers fetch from the new leaders, and the lake's totals equal
the independent fold: nothing lost, nothing doubled."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from tests.support.cluster_hosts import (
    Cluster,
    Lake,
    claimed,
    hosts_cluster,
    postgres_port,
    produce,
    reconcile,
    spans,
)
from tests.support.kafka_cluster import CLUSTER_PORT, kill_node
from tests.support.netns import namespaces_available
from tests.support.postgres import create_database
from tests.support.waiting import wait_for

WHY_NOT = namespaces_available()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=f"no network namespaces: {WHY_NOT}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("hosts")
    with hosts_cluster(root, 2, postgres_port(2), CLUSTER_PORT, brokers=3) as made:
        yield made


def replicated_topic(admin: AdminClient, partitions: int = 6) -> str:
    """A new topic with the cluster's defaults (three replicas each), once every broker's
    metadata shows its partitions."""
    topic = f"pf-test-{uuid.uuid4().hex[:12]}"
    admin.create_topics([NewTopic(topic, num_partitions=partitions)])[topic].result(timeout=60)

    def described() -> bool:
        found = admin.list_topics(topic, timeout=60).topics[topic].partitions
        return len(found) == partitions and all(len(p.replicas) == 3 for p in found.values())

    wait_for(described, "the new topic's partitions in the metadata", timeout=120)
    return topic


def leader_of(admin: AdminClient, topic: str, partition: int) -> int:
    return int(admin.list_topics(topic, timeout=60).topics[topic].partitions[partition].leader)


def test_the_partition_leaders_broker_killed_under_load(cluster: Cluster, tmp_path: Path) -> None:
    admin = AdminClient({"bootstrap.servers": cluster.bootstrap})
    topic = replicated_topic(admin)
    lake = Lake(
        cluster,
        create_database(cluster.server),
        tmp_path / "lake",
        topic,
        f"g-{uuid.uuid4().hex[:8]}",
    )
    try:
        one, two = cluster.net.hosts
        logs = [tmp_path / "one.log", tmp_path / "two.log"]
        for host, log in zip((one, two), logs, strict=True):
            lake.worker(host, log)
        wait_for(lambda: all(claimed(log) for log in logs), "both workers' claims", timeout=600)
        unique, resent = produce(lake, 6_000, seed=61)
        wait_for(lambda: all(spans(log, "committed") for log in logs), "both committing", 600)
        killed = leader_of(admin, topic, 0)
        kill_node(CLUSTER_PORT, killed, cluster.net.server("kafka"))
        wait_for(
            lambda: leader_of(admin, topic, 0) not in (killed, -1),
            "a surviving broker to lead partition 0",
            timeout=300,
        )
        more, more_resent = produce(lake, 6_000, seed=63)  # through the two survivors
        records = len(unique) + resent + len(more) + more_resent
        reconcile(lake, unique + more, resent + more_resent, records)
        assert all(p.returncode == 0 for p in lake.procs)
        print(f"killed broker {killed} (leader of partition 0); {records} records reconciled")
    finally:
        lake.stop()
