"""Finding a real Kafka broker for tests and benchmarks (never a mock).

Order: ``KAFKA_BOOTSTRAP_SERVERS`` if set; else testcontainers' Kafka when a Docker engine
answers; else ``deploy/local-kafka`` (official Apache Kafka jars) on a test port.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

ROOT = Path(__file__).resolve().parent.parent
LOCAL_KAFKA = ROOT / "deploy" / "local-kafka"
TEST_PORT = int(os.environ.get("PF_TEST_KAFKA_PORT", "29092"))


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


def local_kafka(action: str, port: int = TEST_PORT) -> str:
    out = subprocess.run(
        [str(LOCAL_KAFKA), action, "--port", str(port)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = out.stdout.strip().splitlines()
    return lines[-1] if lines else ""


@contextmanager
def real_broker() -> Iterator[str]:
    """Yield a bootstrap address of a running broker; stop it afterwards if we started it."""
    env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if env:
        yield env
        return
    if _docker_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer() as container:
            yield container.get_bootstrap_server()
        return
    status = subprocess.run(
        [str(LOCAL_KAFKA), "status", "--port", str(TEST_PORT)], capture_output=True
    )
    started = status.returncode != 0
    address = local_kafka("start")
    try:
        yield address
    finally:
        if started and not os.environ.get("PF_KEEP_KAFKA"):
            local_kafka("stop")


def create_topic(bootstrap: str, partitions: int = 6, name: str | None = None) -> str:
    topic = name or f"pf-test-{uuid.uuid4().hex[:12]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics(
        [NewTopic(topic, num_partitions=partitions, replication_factor=1)]
    )
    futures[topic].result(timeout=60)
    return topic


TopicFactory = Callable[..., str]
