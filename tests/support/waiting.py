"""Waiting on states (never on a fixed time), and the loopback helpers those waits poll."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Callable
from typing import Any


def wait_for(
    condition: Callable[[], Any],
    what: str = "a condition",
    timeout: float = 120,
    every: float = 0.1,
) -> None:
    """Poll ``condition`` until it is truthy; ``timeout`` only bounds a hung process."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int, host: str = "127.0.0.1") -> dict[str, float]:
    """A worker's /metrics on ``host:port``: each sample's name with labels -> value."""
    body = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read()
    out = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out
