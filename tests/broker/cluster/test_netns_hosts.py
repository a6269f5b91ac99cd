"""The network-namespace harness: hosts reach PostgreSQL and Kafka on the bridge (and nothing
off it), and one host can be cut off from Kafka while it still reaches PostgreSQL and the
other host still reaches both."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.netns import kafka_on, namespaces_available, network, postgres_on
from tests.support.waiting import free_port

WHY_NOT = namespaces_available()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=f"no network namespaces: {WHY_NOT}")
KAFKA_PORT = int(os.environ.get("PF_TEST_KAFKA_PORT", "29092"))


def test_a_host_cut_off_from_kafka_still_reaches_postgres(tmp_path: Path) -> None:
    with (
        network(2, tmp_path) as net,
        postgres_on(net, free_port()) as catalog,
        kafka_on(net, KAFKA_PORT) as bootstrap,
    ):
        one, two = net.hosts
        assert bootstrap == f"{net.server('kafka')}:{KAFKA_PORT}"
        for host in net.hosts:
            routes = host.run(["ip", "route"]).stdout
            assert "default" not in routes and net.subnet in routes  # nothing off the bridge
            assert host.reaches("postgres", catalog) and host.reaches("kafka", bootstrap)
        assert one.data_dir != two.data_dir and one.data_dir.is_dir()

        one.cut_off(net.server("kafka"))
        assert not one.reaches("kafka", bootstrap)
        assert one.reaches("postgres", catalog)
        assert two.reaches("kafka", bootstrap) and two.reaches("postgres", catalog)

        one.reconnect(net.server("kafka"))
        assert one.reaches("kafka", bootstrap)
