"""The three-broker Kafka of ``deploy/local-kafka start --brokers 3`` driven from tests: start it
(or a stopped node of it again), kill one node, stop it."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support import REPO
from tests.support.waiting import wait_for

LOCAL_KAFKA = REPO / "deploy" / "local-kafka"
CLUSTER_PORT = int(
    os.environ.get(
        "PF_TEST_KAFKA_CLUSTER_PORT", str(int(os.environ.get("PF_TEST_KAFKA_PORT", "29092")) + 2)
    )
)
"""Node 1's port; nodes 2 and 3 take the next two, their controllers the three after."""


def kafka_cluster(action: str, port: int, *extra: str, env: dict[str, str] | None = None) -> str:
    """``deploy/local-kafka ACTION --port PORT --brokers 3 EXTRA``; its last stdout line."""
    out = subprocess.run(
        [str(LOCAL_KAFKA), action, "--port", str(port), "--brokers", "3", *extra],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )
    assert out.returncode == 0 or action == "status", out.stderr
    lines = out.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def kill_node(port: int, node: int, host: str = "127.0.0.1") -> None:
    """SIGKILL node ``node`` (1-3) of the cluster on ``host``:``port``: no controlled
    shutdown."""
    name = f"kafka-{port}" if host == "127.0.0.1" else f"kafka-{host}-{port}"
    state = Path(os.environ.get("LOCAL_KAFKA_HOME", REPO / ".cache")) / name
    pid = int((state / f"node-{node}" / "kafka.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not _alive(pid), f"Kafka node {node} to die")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0


@contextmanager
def running_cluster(port: int = CLUSTER_PORT, env: dict[str, str] | None = None) -> Iterator[str]:
    """Yield the bootstrap list of a running three-broker cluster on ``port``; stop it
    afterwards if this started it (``PF_KEEP_KAFKA=1`` keeps it)."""
    started = not kafka_cluster("status", port, env=env).startswith("running")
    bootstrap = kafka_cluster("start", port, env=env)
    try:
        yield bootstrap
    finally:
        if started and not os.environ.get("PF_KEEP_KAFKA"):
            kafka_cluster("stop", port, env=env)
