"""The Stripe webhook endpoint: a stdlib HTTP shell around ``billing.stripe.webhooks``.

Each delivery opens the billing DuckDB file for just that request (``Connect``, which waits
while another process holds the file lock), so the endpoint runs next to workers and the
billing job. Answers: 400 for a bad or stale signature or an unreadable event, 200 for an event
processed, already seen, about an unknown invoice, or of a type we ignore, 500 when the billing
file stays locked (Stripe then redelivers later).

Writes are ordered so a crash between them is harmless: the status change first, then the
event id. A redelivery after such a crash recomputes the same status and changes nothing.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol

import duckdb

from billing.model import Invoice, InvoiceStatus
from billing.stripe import state as stripe_state
from billing.stripe.state import Connect
from billing.stripe.webhooks import (
    DEFAULT_TOLERANCE,
    HANDLED,
    Event,
    EventError,
    SignatureError,
    next_status,
    parse_event,
    verify,
)
from common.errors import OperationError

# The logger's name is pinned: operators filter on it; it predates the module's move.
log = logging.getLogger("billing.webhook_server")

WEBHOOK_PATHS = frozenset({"/", "/webhooks/stripe"})
MAX_BODY = 1024 * 1024


class InvoiceStatusStore(Protocol):
    """What webhooks need from the invoice store (``billing.invoice_store``)."""

    def get_invoice(self, con: duckdb.DuckDBPyConnection, invoice_id: str) -> Invoice | None: ...

    def set_status_by_invoice_id(
        self, con: duckdb.DuckDBPyConnection, invoice_id: str, status: InvoiceStatus
    ) -> bool: ...


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, str]


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class WebhookApp:
    """Verifies, deduplicates and applies one delivery; knows nothing about HTTP."""

    secret: str
    store: InvoiceStatusStore
    connect: Connect
    tolerance: int = DEFAULT_TOLERANCE
    clock: Callable[[], datetime] = _utcnow
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def handle(self, payload: bytes, signature: str | None) -> Reply:
        now = self.clock()
        try:
            verify(payload, signature, self.secret, now=now.timestamp(), tolerance=self.tolerance)
            event = parse_event(payload)
        except (SignatureError, EventError) as exc:
            log.warning("webhook rejected: %s", exc)
            return Reply(400, {"error": str(exc)})
        try:
            with self._lock:  # one delivery at a time: no write conflicts between threads
                outcome = self._apply(event, now)
        except (OperationError, duckdb.Error) as exc:
            log.error("webhook %s not processed: %s", event.event_id, exc)
            return Reply(500, {"error": "billing database unavailable, retry later"})
        log.info("webhook %s %s: %s", event.event_id, event.type, outcome)
        return Reply(200, {"status": outcome})

    def _apply(self, event: Event, now: datetime) -> str:
        with self.connect() as con:
            if stripe_state.event_seen(con, event.event_id):
                return "duplicate"
            invoice_id, outcome = self._route(con, event, now)
            stripe_state.record_event(con, event.event_id, event.type, invoice_id, outcome)
        return outcome

    def _route(
        self, con: duckdb.DuckDBPyConnection, event: Event, now: datetime
    ) -> tuple[str | None, str]:
        if event.type not in HANDLED:
            return None, "ignored"
        invoice_id = event.invoice_id
        if invoice_id is None and event.object_id is not None:
            invoice_id = stripe_state.invoice_id_for(con, event.object_id)
        invoice = self.store.get_invoice(con, invoice_id) if invoice_id else None
        if invoice is None:
            log.warning(
                "webhook %s: no local invoice for Stripe invoice %s (invoice_id %s)",
                event.event_id,
                event.object_id,
                invoice_id,
            )
            return invoice_id, "unknown_invoice"
        if event.object_id and invoice.stripe_invoice_id not in (None, event.object_id):
            log.warning(
                "webhook %s is about Stripe invoice %s, but %s was pushed as %s",
                event.event_id,
                event.object_id,
                invoice.invoice_id,
                invoice.stripe_invoice_id,
            )
            return invoice.invoice_id, "other_stripe_invoice"
        target = next_status(event.type, invoice.status, due_date=invoice.due_date, now=now)
        if target is None:
            return invoice.invoice_id, f"unchanged ({invoice.status.value})"
        self.store.set_status_by_invoice_id(con, invoice.invoice_id, target)
        return invoice.invoice_id, f"{invoice.status.value} -> {target.value}"


class WebhookServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: WebhookApp) -> None:
        super().__init__(address, _Handler)
        self.app = app

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"


class KeepAliveHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive with TCP_NODELAY: headers and body go out in separate writes, and
    without it Nagle's algorithm and delayed ACKs hold back every keep-alive response."""

    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Handler(KeepAliveHandler):
    server: WebhookServer

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._send(200, {"status": "ok"})
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self) -> None:
        if self.path.split("?", 1)[0] not in WEBHOOK_PATHS:
            self._send(404, {"error": "not found"})
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True  # the unread body must not be taken for a request
            self._send(411, {"error": "Content-Length required"})
            return
        if length < 0 or length > MAX_BODY:
            self.close_connection = True
            self._send(413, {"error": "body too large"})
            return
        payload = self.rfile.read(length)
        reply = self.server.app.handle(payload, self.headers.get("Stripe-Signature"))
        self._send(reply.status, reply.body)

    def _send(self, status: int, body: dict[str, str]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)
