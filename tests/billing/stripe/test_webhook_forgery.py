"""Webhook deliveries forged, reused or malformed beyond what tests/billing/stripe/test_webhooks.py
covers: a captured signature moved to a fresh timestamp, two timestamps in one header, an
event id replayed with other content, bodies without or with an absurd ``Content-Length``."""

from __future__ import annotations

import socket

from billing.model import InvoiceStatus
from tests.fixtures.stripe import WEBHOOK_SECRET, stripe_signature
from tests.fixtures.webhooks import PAST_DUE, Endpoint, T, event


def test_a_captured_signature_moved_to_a_fresh_timestamp_is_refused(endpoint: Endpoint) -> None:
    payload = event("evt_1", "invoice.paid", "in_acme01", PAST_DUE)
    captured = stripe_signature(payload, WEBHOOK_SECRET, T - 3600)  # an hour old: stale
    forged = captured.replace(f"t={T - 3600}", f"t={T}")  # the replayer freshens the stamp
    assert endpoint.deliver(payload, forged)[0] == 400
    doubled = f"t={T},{captured}"  # two timestamps: the signed one must be the checked one
    assert endpoint.deliver(payload, doubled)[0] == 400
    assert endpoint.status(PAST_DUE) is InvoiceStatus.sent and endpoint.events() == []


def test_a_replayed_event_id_cannot_change_a_status_again(endpoint: Endpoint) -> None:
    assert endpoint.deliver(event("evt_1", "invoice.paid", "in_acme01", PAST_DUE))[0] == 200
    voided = event("evt_1", "invoice.voided", "in_acme01", PAST_DUE)  # same id, other content
    assert endpoint.deliver(voided) == (200, {"status": "duplicate"})
    assert endpoint.status(PAST_DUE) is InvoiceStatus.paid
    assert endpoint.events() == [("evt_1", "sent -> paid")]


def raw_post(url: str, head: str, body: bytes = b"") -> int:
    """Send a hand-made request; return the status code."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode() + b"\r\n\r\n" + body)
        return int(sock.recv(1024).split()[1])


def test_oversized_or_unsized_bodies_are_refused_unread(endpoint: Endpoint) -> None:
    url = endpoint.url
    signed = stripe_signature(b"{}", WEBHOOK_SECRET, T)
    head = f"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nStripe-Signature: {signed}"
    assert raw_post(url, head) == 411  # no Content-Length
    assert raw_post(url, head + "\r\nContent-Length: 2000000000") == 413  # never read
    assert raw_post(url, head + "\r\nContent-Length: -1") == 413
    assert endpoint.events() == []
