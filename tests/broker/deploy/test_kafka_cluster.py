"""``deploy/local-kafka start --brokers 3``: three brokers whose new topics get replication
factor 3 and min.insync.replicas 2, so a producer with acks=all goes on when one broker is
killed; the bootstrap list is the start's last line."""

from __future__ import annotations

import uuid

from confluent_kafka import KafkaError, Message, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._config import ConfigResource
from confluent_kafka.cimpl import NewTopic

from tests.support.kafka_cluster import CLUSTER_PORT, kafka_cluster, kill_node
from tests.support.waiting import wait_for


def _topic_config(admin: AdminClient, topic: str) -> dict[str, str]:
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    entries = admin.describe_configs([resource])[resource].result(timeout=60)
    return {name: entry.value for name, entry in entries.items()}


def test_three_brokers_replicate_and_survive_one_killed(kafka_cluster_bootstrap: str) -> None:
    port = CLUSTER_PORT
    assert kafka_cluster_bootstrap == ",".join(f"127.0.0.1:{port + i}" for i in range(3))
    admin = AdminClient({"bootstrap.servers": kafka_cluster_bootstrap})
    assert len(admin.list_topics(timeout=60).brokers) == 3
    topic = f"pf-cluster-{uuid.uuid4().hex[:10]}"
    admin.create_topics([NewTopic(topic, num_partitions=3)])[topic].result(timeout=60)

    def described() -> bool:  # a broker may answer before the new topic's metadata reached it
        return len(admin.list_topics(topic, timeout=60).topics[topic].partitions) == 3

    wait_for(described, "the new topic's three partitions in the metadata")
    meta = admin.list_topics(topic, timeout=60).topics[topic]
    assert sorted(len(p.replicas) for p in meta.partitions.values()) == [3, 3, 3]
    assert _topic_config(admin, topic)["min.insync.replicas"] == "2"
    broker = ConfigResource(ConfigResource.Type.BROKER, "1")
    config = admin.describe_configs([broker])[broker].result(timeout=60)
    for name in ("offsets.topic.replication.factor", "transaction.state.log.replication.factor"):
        assert config[name].value == "3", name
    assert config["transaction.state.log.min.isr"].value == "2"

    leader = meta.partitions[0].leader
    kill_node(port, leader)
    try:
        delivered: list[KafkaError | None] = []

        def report(err: KafkaError | None, _msg: Message) -> None:
            delivered.append(err)

        producer = Producer(
            {
                "bootstrap.servers": kafka_cluster_bootstrap,
                "acks": "all",
                "enable.idempotence": True,
                "message.timeout.ms": 300_000,
            }
        )
        for i in range(300):
            producer.produce(
                topic, key=str(i).encode(), value=b"x", partition=i % 3, on_delivery=report
            )
        assert producer.flush(310) == 0
        assert delivered == [None] * 300
        assert kafka_cluster("status", port).startswith("degraded: 2 of 3")
    finally:
        kafka_cluster("start", port)  # the killed node comes back for the next test
    assert kafka_cluster("status", port).startswith("running (3 broker(s))")
