"""The webhook endpoint cannot be held down and answers every request: idle and half-sent
connections are closed at a deadline and bounded in number, a real backlog, the open-file
limit raised (and ``LimitNOFILE`` in the unit), and inputs that used to get no HTTP answer
(a non-ASCII signature, a deeply nested signed body, a data dir that is a file) get theirs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from billing.db import billing_db
from billing.stripe.webhook_server import BACKLOG, WebhookApp, WebhookServer
from tests.fixtures.stripe import WEBHOOK_SECRET, LocalBilling, stripe_signature
from tests.fixtures.webhooks import NOW, PAST_DUE, Endpoint, T, event, post
from tests.support import REPO
from tests.support.cli_runner import BIN


def test_a_non_ascii_signature_or_a_deeply_nested_body_gets_a_400(endpoint: Endpoint) -> None:
    payload = event("evt_1", "invoice.paid", "in_acme01", PAST_DUE)
    for header in (f"t={T},v1=\u00e9\u00e9", f"t={T},v1=\u00ff" * 3):
        assert endpoint.deliver(payload, header)[0] == 400
    nested = b"[" * 100_000 + b"]" * 100_000
    assert endpoint.deliver(nested) == (400, {"error": "body is nested too deeply"})
    deep_object = b'{"id": "evt_2", "type": "invoice.paid", "data": ' + nested + b"}"
    assert endpoint.deliver(deep_object)[0] == 400
    assert endpoint.events() == []


def test_a_data_dir_that_is_a_file_gets_a_500(billing: LocalBilling, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "data"
    not_a_dir.write_text("a file")
    app = WebhookApp(
        WEBHOOK_SECRET,
        billing.store,
        lambda: billing_db(not_a_dir / "billing.duckdb", 1.0),
        clock=lambda: NOW,
    )
    with serving(WebhookServer(("127.0.0.1", 0), app)) as server:
        payload = event("evt_1", "invoice.paid", "in_acme01", PAST_DUE)
        status, body = post(server.url, payload, stripe_signature(payload, WEBHOOK_SECRET, T))
    assert status == 500 and "retry later" in body["error"]


@contextmanager
def serving(server: WebhookServer) -> Iterator[WebhookServer]:
    """Run ``server`` on a thread for the block."""
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(name="quick")
def quick_fixture(billing: LocalBilling) -> Iterator[WebhookServer]:
    """A server whose requests must arrive within 1 s, 4 connections at most."""
    app = WebhookApp(WEBHOOK_SECRET, billing.store, billing.connect, clock=lambda: NOW)
    with serving(
        WebhookServer(("127.0.0.1", 0), app, max_connections=4, request_timeout=1.0)
    ) as server:
        yield server


@pytest.fixture
def threads_before() -> int:
    return threading.active_count()


def closed_by_server(sock: socket.socket) -> bool:
    """Wait (up to a minute) for the peer to close; True if it did."""
    sock.settimeout(60)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def test_idle_and_half_sent_connections_are_closed_at_the_deadline(quick: WebhookServer) -> None:
    host, port = quick.server_address[:2]
    idle = socket.create_connection((str(host), port))
    half = socket.create_connection((str(host), port))
    half.sendall(b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\n")  # never finished
    body = socket.create_connection((str(host), port))
    body.sendall(b"POST /webhooks/stripe HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
    drip = socket.create_connection((str(host), port))
    stop = threading.Event()

    def trickle() -> None:  # a byte every 0.2 s: each read is quick, the request never ends
        try:
            for byte in b"POST /webhooks/stripe HTTP/1.1\r\nX-Slow: " + b"a" * 10_000:
                if stop.wait(0.2):
                    return
                drip.send(bytes([byte]))
        except OSError:
            return

    threading.Thread(target=trickle, daemon=True).start()
    try:
        for sock in (idle, half, body, drip):
            assert closed_by_server(sock)
    finally:
        stop.set()
        for sock in (idle, half, body, drip):
            sock.close()


def test_connections_are_bounded_and_a_valid_request_still_gets_through(
    threads_before: int, quick: WebhookServer
) -> None:
    host, port = quick.server_address[:2]
    held = [socket.create_connection((str(host), port)) for _ in range(20)]
    try:
        # never more handler threads than the bound, however many connections are held
        assert threading.active_count() - threads_before <= 1 + quick.max_connections
        payload = event("evt_1", "invoice.paid", "in_acme01", PAST_DUE)
        status, _ = post(quick.url, payload, stripe_signature(payload, WEBHOOK_SECRET, T))
        assert status == 200  # once the held ones were closed at their deadline
        assert threading.active_count() - threads_before <= 1 + quick.max_connections
    finally:
        for sock in held:
            sock.close()


def test_the_listen_backlog_is_real(quick: WebhookServer) -> None:
    assert WebhookServer.request_queue_size == BACKLOG >= 1024


# The server as systemd would start it without LimitNOFILE (soft 1024), hard limit higher.
_FILE_LIMITED = """
import os, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 4096))
os.execv(sys.argv[1], sys.argv[1:])
"""


def test_a_thousand_held_connections_do_not_keep_a_valid_request_out(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "METERING_DATA_DIR": str(tmp_path / "data"),
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
    }
    server = subprocess.Popen(
        [sys.executable, "-c", _FILE_LIMITED, str(BIN), "webhooks", "serve", "--port", "0"],
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert server.stderr is not None
    url = server.stderr.readline().split()[-1]
    host, port = url.removeprefix("http://").split(":")
    held: list[socket.socket] = []
    warm = event("evt_warm", "invoice.paid", "in_x", "inv-x")  # the billing file is created
    assert post(url, warm, stripe_signature(warm, WEBHOOK_SECRET, int(time.time())))[0] == 200
    try:
        for i in range(1100):  # idle ones, and half-sent ones
            sock = socket.create_connection((host, int(port)), timeout=30)
            if i % 2:
                sock.sendall(b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\n")
            held.append(sock)
        payload = event("evt_held", "invoice.paid", "in_x", "inv-x")
        now = int(time.time())
        started = time.monotonic()
        status, body = post(url, payload, stripe_signature(payload, WEBHOOK_SECRET, now))
        print(f"\nanswered in {time.monotonic() - started:.3f} s with 1,100 connections held")
        assert (status, body) == (200, {"status": "unknown_invoice"})
    finally:
        for sock in held:
            sock.close()
        server.terminate()
        server.communicate(timeout=60)


def test_the_units_raise_the_open_file_limit() -> None:
    for unit in ("pf-metering-webhooks.service", "pf-metering-worker@.service"):
        lines = (REPO / "deploy" / "systemd" / unit).read_text().splitlines()
        limits = [int(ln.split("=")[1]) for ln in lines if ln.startswith("LimitNOFILE=")]
        assert limits and limits[0] >= 16_384, unit
