"""Hosts on one machine for cluster tests: network namespaces (``ip netns``) joined by veth
pairs to a private bridge on a 10.x/24 subnet, each with loopback up and no route off that
subnet, so their traffic stays between them and the servers on the bridge.

The servers (PostgreSQL, Kafka) run in the root namespace bound to addresses of the bridge:
PostgreSQL on ``.1``, Kafka on ``.2``, so a host is cut off from one server by a blackhole
route to its address inside that host's namespace (its packets vanish, as in a partition;
other hosts and the other server are untouched). Needs root; ``namespaces_available`` says
whether they can be made here. Everything made is removed on exit, even after a failure.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.kafka_cluster import LOCAL_KAFKA
from tests.support.postgres import local_postgres, state_dir

_PROBE = """
import sys
server, target = sys.argv[1], sys.argv[2]
if server == "postgres":
    import psycopg
    try:
        with psycopg.connect(target, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError:
        sys.exit(1)
else:
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient
    try:
        AdminClient({"bootstrap.servers": target}).list_topics(timeout=8)
    except KafkaException:
        sys.exit(1)
"""
SERVERS = {"postgres": 1, "kafka": 2}
"""The last byte of each server's address on the bridge."""
FIRST_HOST = 10
"""Host i (from 1) is ``.FIRST_HOST + i``."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=60)


def namespaces_available() -> str | None:
    """None if network namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's ip is missing"
    name = f"pfprobe{os.getpid()}"
    made = _ip("netns", "add", name, check=False)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


@dataclass(frozen=True)
class Host:
    """One namespace: ``name`` for ``ip netns exec``, ``address`` on the bridge and its own
    data folder."""

    name: str
    address: str
    data_dir: Path

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 300)
        return subprocess.run(self.command(argv), **kwargs)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(self.command(argv), **kwargs)

    def reaches(self, server: str, target: str) -> bool:
        """Whether a client in this host gets an answer from ``server`` (``postgres``: a URI,
        ``kafka``: a bootstrap list) within a few seconds."""
        return self.run([sys.executable, "-c", _PROBE, server, target]).returncode == 0

    def cut_off(self, address: str) -> None:
        """Drop every packet this host sends to ``address`` (a server on the bridge)."""
        _ip("-n", self.name, "route", "add", "blackhole", f"{address}/32")

    def reconnect(self, address: str) -> None:
        _ip("-n", self.name, "route", "del", "blackhole", f"{address}/32")


@dataclass
class Network:
    """A bridge, its subnet ``prefix`` (``10.a.b``) and the hosts on it."""

    bridge: str
    prefix: str
    hosts: list[Host] = field(default_factory=list)

    def server(self, name: str) -> str:
        """The bridge address a server (``postgres`` or ``kafka``) binds to."""
        return f"{self.prefix}.{SERVERS[name]}"

    @property
    def subnet(self) -> str:
        return f"{self.prefix}.0/24"


def _free_prefix() -> str:
    used = _ip("-4", "-o", "addr").stdout
    for n in range(os.getpid() % 4000, os.getpid() % 4000 + 4000):
        prefix = f"10.{200 + (n // 256) % 50}.{n % 256}"
        if f" {prefix}." not in used:
            return prefix
    raise AssertionError("no free 10.x/24 subnet for the test network")


_NAME = re.compile(r"^pf([0-9a-z]{5})([0-9a-z])-h\d+$")
_made = itertools.count()


def _tag() -> str:
    """Five base-36 digits of this process's id, then a counter digit (names stay within the
    15 characters a link name may have)."""
    pid, digits = os.getpid(), ""
    for _ in range(5):
        pid, d = divmod(pid, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[d] + digits
    return digits + "0123456789abcdefghijklmnopqrstuvwxyz"[next(_made) % 36]


def remove_stale() -> None:
    """Remove the namespaces and bridges of test processes that died without cleaning up
    (SIGKILL): their names carry the creator's process id."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NAME.match(name)
        if m is None or Path(f"/proc/{int(m.group(1), 36)}").exists():
            continue
        _ip("netns", "del", name, check=False)
        _ip("link", "del", f"pfbr{m.group(1)}{m.group(2)}", check=False)


@contextmanager
def network(count: int, root: Path) -> Iterator[Network]:
    """``count`` hosts on a new bridge; host i's data folder is ``root/host-i``. Removes the
    namespaces and the bridge on exit (and first those a killed test run left behind)."""
    remove_stale()
    tag = _tag()
    net = Network(bridge=f"pfbr{tag}", prefix=_free_prefix())
    with ExitStack() as undo:
        _ip("link", "add", net.bridge, "type", "bridge")
        undo.callback(_ip, "link", "del", net.bridge, check=False)
        for last in SERVERS.values():
            _ip("addr", "add", f"{net.prefix}.{last}/24", "dev", net.bridge)
        _ip("link", "set", net.bridge, "up")
        for i in range(1, count + 1):
            name, veth = f"pf{tag}-h{i}", f"pf{tag}h{i}"  # veth + "p" <= 15 chars
            _ip("netns", "add", name)
            undo.callback(_ip, "netns", "del", name, check=False)
            _ip("link", "add", veth, "type", "veth", "peer", "name", f"{veth}p")
            _ip("link", "set", f"{veth}p", "netns", name)
            _ip("-n", name, "link", "set", f"{veth}p", "name", "eth0")
            address = f"{net.prefix}.{FIRST_HOST + i}"
            _ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", name, "link", "set", "eth0", "up")
            _ip("-n", name, "link", "set", "lo", "up")
            _ip("link", "set", veth, "master", net.bridge, "up")
            data = root / f"host-{i}"
            data.mkdir(parents=True, exist_ok=True)
            net.hosts.append(Host(name, address, data))
        yield net


def start_postgres(net: Network, port: int) -> subprocess.CompletedProcess[str]:
    """``deploy/local-postgres start`` on ``port``, listening on the bridge too and trusting
    its subnet (again after a ``stop``: the same server, the same data)."""
    env = {"LOCAL_POSTGRES_LISTEN": net.server("postgres"), "LOCAL_POSTGRES_TRUST": net.subnet}
    return local_postgres("start", port, env)


@contextmanager
def postgres_on(net: Network, port: int) -> Iterator[str]:
    """``start_postgres``; yields the URI the hosts use. Stopped and removed on exit."""
    out = start_postgres(net, port)
    try:
        assert out.returncode == 0, out.stderr
        uri = out.stdout.strip().splitlines()[-1]
        yield uri.replace("@127.0.0.1:", f"@{net.server('postgres')}:")
    finally:
        local_postgres("stop", port)
        shutil.rmtree(state_dir(port), ignore_errors=True)


@contextmanager
def kafka_on(net: Network, port: int, brokers: int = 1) -> Iterator[str]:
    """``deploy/local-kafka`` with ``brokers`` nodes bound to the bridge; yields the bootstrap
    list. Stopped and its state removed on exit."""
    host = net.server("kafka")
    env = {**os.environ, "LOCAL_KAFKA_HOST": host}
    argv = [str(LOCAL_KAFKA), "start", "--port", str(port), "--brokers", str(brokers)]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
        assert out.returncode == 0, out.stderr
        yield out.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(
            [str(LOCAL_KAFKA), "stop", "--port", str(port)],
            env=env,
            capture_output=True,
            timeout=300,
        )
        cache = Path(os.environ.get("LOCAL_KAFKA_HOME", LOCAL_KAFKA.parent.parent / ".cache"))
        shutil.rmtree(cache / f"kafka-{host}-{port}", ignore_errors=True)
