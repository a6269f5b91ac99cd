"""Stripe webhooks: signature verification (real HMAC signatures), the status mapping, and the
HTTP endpoint on a real billing DuckDB file shared with other processes."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import stripe

from billing.db import billing_db
from billing.model import InvoiceStatus
from billing.stripe.webhooks import EventError, SignatureError, next_status, parse_event, verify
from tests.fixtures.stripe import WEBHOOK_SECRET, LocalBilling, stripe_signature, utc
from tests.fixtures.webhooks import (
    NOT_DUE,
    NOW,
    PAST_DUE,
    Endpoint,
    T,
    event,
    make_app,
    post,
    serve,
    store_sent_invoices,
)
from tests.support.cli_runner import assert_user_error, run_cli
from tests.support.webhook_process import webhooks_serve

# --- signatures ----------------------------------------------------------------------------


def test_our_test_signatures_are_the_ones_stripe_python_accepts() -> None:
    payload = event("evt_1", "invoice.paid", "in_1")
    now = int(time.time())
    header = stripe_signature(payload, WEBHOOK_SECRET, now)
    construct: Any = stripe.Webhook.construct_event  # untyped in stripe-python 13
    parsed = construct(payload.decode(), header, WEBHOOK_SECRET)
    assert parsed.id == "evt_1"
    verify(payload, header, WEBHOOK_SECRET, now=now)


def test_a_rotated_secret_header_with_several_signatures_is_accepted() -> None:
    payload = event("evt_1", "invoice.paid", "in_1")
    old = stripe_signature(payload, "whsec_old", T).split(",")[1]
    header = f"{stripe_signature(payload, WEBHOOK_SECRET, T)},{old},v0=deadbeef"
    verify(payload, header, WEBHOOK_SECRET, now=T)
    verify(payload, header, "whsec_old", now=T)


def test_the_tolerance_is_300_seconds_by_default() -> None:
    payload = event("evt_1", "invoice.paid", "in_1")
    verify(payload, stripe_signature(payload, WEBHOOK_SECRET, T - 300), WEBHOOK_SECRET, now=T)
    with pytest.raises(SignatureError, match="tolerance"):
        verify(payload, stripe_signature(payload, WEBHOOK_SECRET, T - 301), WEBHOOK_SECRET, now=T)


@pytest.mark.parametrize(
    ("header", "payload", "reason"),
    [
        (None, None, "missing"),
        ("", None, "missing"),
        ("v1=abc", None, "no timestamp"),
        (f"t={T}", None, "no v1"),
        (f"t=soon,v1={'0' * 64}", None, "malformed timestamp"),
        ("SIGNED", b'{"id": "evt_1", "type": "invoice.paid", "amount": 1}', "does not match"),
        ("OTHER_SECRET", None, "does not match"),
        ("V0_ONLY", None, "no v1"),
        ("STALE", None, "tolerance"),
        ("FUTURE", None, "tolerance"),
    ],
)
def test_bad_signatures_are_rejected(
    header: str | None, payload: bytes | None, reason: str
) -> None:
    signed = event("evt_1", "invoice.paid", "in_1")
    good = stripe_signature(signed, WEBHOOK_SECRET, T)
    made = {
        "SIGNED": good,
        "OTHER_SECRET": stripe_signature(signed, "whsec_other", T),
        "V0_ONLY": good.replace("v1=", "v0="),
        "STALE": stripe_signature(signed, WEBHOOK_SECRET, T - 3600),
        "FUTURE": stripe_signature(signed, WEBHOOK_SECRET, T + 3600),
    }
    with pytest.raises(SignatureError, match=reason):
        verify(payload or signed, made.get(header or "", header), WEBHOOK_SECRET, now=T)


def test_events_are_parsed_for_id_type_and_our_invoice_id() -> None:
    parsed = parse_event(event("evt_9", "invoice.voided", "in_9", "inv-x"))
    assert (parsed.event_id, parsed.type, parsed.object_id, parsed.invoice_id) == (
        "evt_9",
        "invoice.voided",
        "in_9",
        "inv-x",
    )
    for bad in (b"not json", b"[]", b'{"type": "invoice.paid"}', b'{"id": "", "type": "x"}'):
        with pytest.raises(EventError):
            parse_event(bad)


# --- the status mapping --------------------------------------------------------------------

DUE = utc("2025-03-03T00:00:00")


@pytest.mark.parametrize(
    ("kind", "current", "now", "expected"),
    [
        ("invoice.paid", InvoiceStatus.sent, NOW, InvoiceStatus.paid),
        ("invoice.paid", InvoiceStatus.overdue, NOW, InvoiceStatus.paid),
        ("invoice.paid", InvoiceStatus.finalized, NOW, InvoiceStatus.paid),
        ("invoice.voided", InvoiceStatus.sent, NOW, InvoiceStatus.void),
        ("invoice.marked_uncollectible", InvoiceStatus.sent, NOW, InvoiceStatus.overdue),
        ("invoice.payment_failed", InvoiceStatus.sent, NOW, InvoiceStatus.overdue),
        ("invoice.payment_failed", InvoiceStatus.sent, utc("2025-03-02T00:00:00"), None),
        ("invoice.payment_failed", InvoiceStatus.overdue, NOW, None),
        ("invoice.payment_failed", InvoiceStatus.paid, NOW, None),  # late and out of order
        ("invoice.voided", InvoiceStatus.paid, NOW, None),
        ("invoice.paid", InvoiceStatus.void, NOW, None),
        ("invoice.paid", InvoiceStatus.paid, NOW, None),
        ("customer.created", InvoiceStatus.sent, NOW, None),
    ],
)
def test_status_mapping(
    kind: str, current: InvoiceStatus, now: datetime, expected: InvoiceStatus | None
) -> None:
    assert next_status(kind, current, due_date=DUE, now=now) == expected


# --- the endpoint --------------------------------------------------------------------------


def test_paid_moves_the_invoice_and_a_replay_is_acknowledged_once(endpoint: Endpoint) -> None:
    payload = event("evt_1", "invoice.paid", "in_acme01", PAST_DUE)
    assert endpoint.deliver(payload) == (200, {"status": "sent -> paid"})
    assert endpoint.status(PAST_DUE) is InvoiceStatus.paid
    assert endpoint.deliver(payload) == (200, {"status": "duplicate"})
    assert endpoint.events() == [("evt_1", "sent -> paid")]


def test_bad_or_stale_signatures_get_400_and_change_nothing(endpoint: Endpoint) -> None:
    payload = event("evt_1", "invoice.paid", "in_acme01", PAST_DUE)
    forged = stripe_signature(payload, "whsec_guess", T)
    stale = stripe_signature(payload, WEBHOOK_SECRET, T - 301)
    for header in (None, "t=1,v1=00", forged, stale):
        status, body = endpoint.deliver(payload, header)
        assert status == 400, (header, body)
    tampered = payload.replace(b"invoice.paid", b"invoice.void")
    assert endpoint.deliver(tampered, stripe_signature(payload, WEBHOOK_SECRET, T))[0] == 400
    assert endpoint.status(PAST_DUE) is InvoiceStatus.sent
    assert endpoint.events() == []


@pytest.mark.parametrize(
    ("kind", "invoice_id", "stripe_id", "expected"),
    [
        ("invoice.voided", PAST_DUE, "in_acme01", InvoiceStatus.void),
        ("invoice.marked_uncollectible", NOT_DUE, "in_acme02", InvoiceStatus.overdue),
        ("invoice.payment_failed", PAST_DUE, "in_acme01", InvoiceStatus.overdue),
        ("invoice.payment_failed", NOT_DUE, "in_acme02", InvoiceStatus.sent),
    ],
)
def test_each_event_type_moves_the_local_status(
    endpoint: Endpoint, kind: str, invoice_id: str, stripe_id: str, expected: InvoiceStatus
) -> None:
    assert endpoint.deliver(event("evt_1", kind, stripe_id, invoice_id))[0] == 200
    assert endpoint.status(invoice_id) is expected


def test_an_event_without_metadata_is_matched_by_stripe_invoice_id(endpoint: Endpoint) -> None:
    assert endpoint.deliver(event("evt_1", "invoice.paid", "in_acme02")) == (
        200,
        {"status": "sent -> paid"},
    )
    assert endpoint.status(NOT_DUE) is InvoiceStatus.paid


def test_unknown_invoices_are_logged_and_acknowledged(
    endpoint: Endpoint, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="billing.stripe.webhook_server"):
        reply = endpoint.deliver(event("evt_1", "invoice.paid", "in_elsewhere", "inv-nobody"))
        assert endpoint.deliver(event("evt_2", "invoice.paid", "in_elsewhere")) == (
            200,
            {"status": "unknown_invoice"},
        )
    assert reply == (200, {"status": "unknown_invoice"})
    assert "no local invoice for Stripe invoice in_elsewhere" in caplog.text
    assert endpoint.events() == [("evt_1", "unknown_invoice"), ("evt_2", "unknown_invoice")]


def test_events_about_another_stripe_invoice_or_type_change_nothing(endpoint: Endpoint) -> None:
    other = event("evt_1", "invoice.paid", "in_duplicate", PAST_DUE)
    assert endpoint.deliver(other) == (200, {"status": "other_stripe_invoice"})
    ignored = event("evt_2", "customer.updated", "cus_1")
    assert endpoint.deliver(ignored) == (200, {"status": "ignored"})
    assert endpoint.status(PAST_DUE) is InvoiceStatus.sent


def test_unreadable_bodies_and_other_paths(endpoint: Endpoint) -> None:
    assert endpoint.deliver(b"not json")[0] == 400
    assert post(endpoint.url + "/other", b"{}", None)[0] == 404
    with urllib.request.urlopen(endpoint.url + "/healthz", timeout=10) as response:
        assert response.status == 200


HOLDER = """
import sys, duckdb
con = duckdb.connect(sys.argv[1])
print("locked", flush=True)
sys.stdin.readline()
con.close()
"""


def hold_lock(path: Path) -> subprocess.Popen[str]:
    """Another process (a worker, the billing job) holding the billing file open."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def release(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.wait(timeout=30) == 0


def test_the_billing_file_is_free_between_requests(endpoint: Endpoint) -> None:
    assert endpoint.deliver(event("evt_1", "invoice.paid", "in_acme01", PAST_DUE))[0] == 200
    release(hold_lock(endpoint.billing.path))  # another process can open it read-write


def test_a_delivery_waits_for_another_process_to_release_the_file(endpoint: Endpoint) -> None:
    holder = hold_lock(endpoint.billing.path)
    replies: list[tuple[int, dict[str, str]]] = []
    payload = event("evt_1", "invoice.paid", "in_acme01", PAST_DUE)
    sender = threading.Thread(target=lambda: replies.append(endpoint.deliver(payload)))
    sender.start()
    sender.join(0.5)
    assert sender.is_alive() and not replies  # waiting on the lock, not failing
    release(holder)
    sender.join(60)
    assert replies == [(200, {"status": "sent -> paid"})]
    assert endpoint.status(PAST_DUE) is InvoiceStatus.paid


def test_a_file_locked_too_long_gets_500_and_the_redelivery_is_processed(
    billing: LocalBilling,
) -> None:
    payload = event("evt_1", "invoice.voided", "in_acme01", PAST_DUE)
    header = stripe_signature(payload, WEBHOOK_SECRET, T)
    with serve(make_app(billing, lock_timeout=0.2)) as url:
        holder = hold_lock(billing.path)
        try:
            status, _ = post(url + "/", payload, header)
        finally:
            release(holder)
        assert status == 500
        assert post(url + "/", payload, header) == (200, {"status": "sent -> void"})
    assert billing.get(PAST_DUE).status is InvoiceStatus.void


# --- the command line ----------------------------------------------------------------------


def test_webhooks_serve_help_and_bad_input(tmp_path: Path) -> None:
    shown = run_cli("webhooks", "serve", "--help")
    assert shown.returncode == 0 and "--port" in shown.stdout and "--host" in shown.stdout
    env = {"METERING_DATA_DIR": str(tmp_path), "STRIPE_WEBHOOK_SECRET": ""}
    assert_user_error(run_cli("webhooks", "serve", env=env), "STRIPE_WEBHOOK_SECRET is not set")
    env["STRIPE_WEBHOOK_SECRET"] = WEBHOOK_SECRET
    assert_user_error(run_cli("webhooks", "serve", "--port", "70000", env=env), "--port")


def test_webhooks_serve_runs_against_the_real_invoice_store(tmp_path: Path) -> None:
    from billing import invoice_store

    data = tmp_path / "data"
    with billing_db(data / "billing.duckdb", 10) as con:
        store_sent_invoices(con)
    env = {"METERING_DATA_DIR": str(data), "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET}
    with webhooks_serve(env) as server:
        payload = event("evt_1", "invoice.paid", "in_acme01", PAST_DUE)
        now = int(time.time())
        assert post(server.url, payload, stripe_signature(payload, "whsec_wrong", now))[0] == 400
        good = stripe_signature(payload, WEBHOOK_SECRET, now)
        assert post(server.url, payload, good) == (200, {"status": "sent -> paid"})
        assert post(server.url, payload, good) == (200, {"status": "duplicate"})
    assert server.returncode == 0, server.stderr
    assert WEBHOOK_SECRET not in server.stderr
    with billing_db(data / "billing.duckdb", 10) as con:
        stored = invoice_store.get_invoice(con, PAST_DUE)
    assert stored is not None and stored.status is InvoiceStatus.paid
